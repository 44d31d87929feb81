"""The main window's export commands: File ▸ Export…, File ▸ Export report…, View ▸ Graphs.

Kept out of :mod:`studio.ui.main_window` so that it only adds menu entries. The dialogs are
made once per window and reused; :func:`close_all` stops the Netron servers when the window
closes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtWidgets import QFileDialog, QWidget

from studio.core.errors import StudioError
from studio.core.export.report import ReportData, render_html, write_report
from studio.ui.dialogs.export_dialog import ExportDialog
from studio.ui.dialogs.netron_view import GraphsDialog
from studio.ui.session import ERROR, Session

REPORT_FILTER = "Web page (*.html);;PDF (*.pdf)"


def _last_dir(window: Any) -> str:
    return str(window.settings.value("lastDir", str(Path.home())))


def open_export_dialog(window: Any) -> ExportDialog:
    """Show the export dialog (filled from the session as it is now)."""
    dialog = getattr(window, "_export_dialog", None)
    if dialog is None:
        dialog = ExportDialog(window.session, window.runner, _last_dir(window), window)
        window._export_dialog = dialog
    else:
        dialog.refresh()
    if window.session.model is None:
        dialog.message.setText("Open a model first (File ▸ Open model…).")
    dialog.show()
    dialog.raise_()
    return dialog


def open_graphs(window: Any) -> GraphsDialog:
    """Show the original and the pruned graph side by side in Netron."""
    old = getattr(window, "_graphs_dialog", None)
    if old is not None:
        old.stop()
        old.deleteLater()
    dialog = GraphsDialog(window.session, window.runner, window)
    dialog.error.connect(window._on_error)
    window._graphs_dialog = dialog
    dialog.show()
    dialog.start()
    return dialog


def close_all(window: Any) -> None:
    """Stop the Netron servers and cancel an export (the window is closing)."""
    graphs = getattr(window, "_graphs_dialog", None)
    if graphs is not None:
        graphs.stop()
    export = getattr(window, "_export_dialog", None)
    if export is not None:
        export.cancel_export()


def session_report(session: Session, export: Any = None, quantized: Any = None) -> ReportData:
    """What the session holds now (scan, pruning, fine-tuning, evaluation, last export)."""
    model = session.model
    if model is None:
        raise StudioError("open a model first: there is nothing to report")
    pruned, tuned = session.pruned, session.finetuned
    current = tuned.model if tuned else pruned.model if pruned else model
    data = ReportData(
        title=f"Pruning report: {model.name}", model_name=current.name, scan=session.scan
    )
    inv = session.inventory
    if pruned is not None:
        data.plan = pruned.plan
        data.shapes = [(n, b, a) for n, b, a in pruned.shapes if b is not None]
        data.summary = [
            ("Parameters", f"{pruned.params_before:,}", f"{pruned.params_after:,}"),
            ("MACs", f"{pruned.macs_before:,}", f"{pruned.macs_after:,}"),
            ("Size (state_dict bytes)", f"{pruned.size_before:,}", f"{pruned.size_after:,}"),
            ("Sparsity (zero weights)", "", f"{pruned.sparsity:.2%}"),
            ("Compression", "", f"{pruned.compression:.2f}× parameters"),
        ]
        if inv is not None:
            data.summary.insert(2, ("Layers", f"{len(inv.layers):,}", ""))
        data.quality = [("Original", pruned.quality_before), ("Pruned", pruned.quality_after)]
        data.notes += list(pruned.notes)
    elif inv is not None:
        data.summary = [
            ("Parameters", f"{inv.params:,}", ""),
            ("MACs", f"{inv.macs:,}", ""),
            ("Layers", f"{len(inv.layers):,}", ""),
            ("Sparsity (zero weights)", f"{inv.sparsity:.2%}", ""),
        ]
        if session.evaluation is not None:
            data.quality = [("Original", session.evaluation)]
    if pruned is None:
        data.notes.append("Nothing has been pruned yet.")
    if tuned is not None:
        data.history = list(tuned.history)
        acc = "—" if tuned.accuracy_after is None else f"{tuned.accuracy_after:.2%}"
        data.notes.append(
            f"Fine-tuned {tuned.epochs_run} epochs (best epoch {tuned.best_epoch}): accuracy {acc}"
        )
    data.quality = [(label, q) for label, q in data.quality if q is not None]
    data.export, data.quantized = export, quantized
    return data


def export_report(window: Any, path: str | Path) -> Path:
    """Write the session's report to ``path`` (.html, or .pdf through Qt)."""
    dialog = getattr(window, "_export_dialog", None)
    export = getattr(dialog, "last_result", None)
    quantized = getattr(dialog, "last_quantized", None)
    text = render_html(session_report(window.session, export, quantized))
    path = Path(path)
    protected = tuple(window.session.input_files())
    if path.suffix.lower() == ".pdf":
        from studio.ui.report_pdf import html_to_pdf

        html_to_pdf(text, path, protected)
    elif path.suffix.lower() in (".html", ".htm"):
        write_report(text, path, protected)
    else:
        raise StudioError(f"a report is written as .html or .pdf, not {path.suffix or path.name}")
    window.session.log(f"Report written to {path}")
    return path


def export_report_dialog(window: Any) -> None:
    """Ask for a file name, then write the report."""
    parent: QWidget = window
    default = str(Path(_last_dir(window)) / "pruning-report.html")
    path, _ = QFileDialog.getSaveFileName(parent, "Export report", default, REPORT_FILTER)
    if not path:
        return
    try:
        export_report(window, path)
    except StudioError as exc:
        window.session.log(f"Report not written: {exc}", ERROR)
        window._on_error("Report", str(exc))
