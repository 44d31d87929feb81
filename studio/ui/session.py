"""The state of one studio session, with a Qt signal for every change.

Panels receive the session in their constructor and listen; they never own the state.
The session holds plain core values (``LoadedModel``, ``DataSet``, ``Inventory``,
``EvalResult``) and is only changed on the GUI thread.

Text data for a language model (``demo-lm``, a .txt or .jsonl file) comes in two splits of
token-id sequences: ``data`` is the validation split (evaluation, perplexity) and
``calibration`` the calibration split (what scans and training measure on, so that the
validation text stays unseen). ``calibration`` is None for any other data. A transformer's
head/MLP/layer scan (``HeadScan``) is kept as ``head_scan``; ``scan`` holds CNN scans only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Signal

from studio.core.cluster.connection import Compute

if TYPE_CHECKING:
    import torch

    from studio.core.models.data import DataSet
    from studio.core.models.evaluate import EvalResult
    from studio.core.models.inventory import Inventory
    from studio.core.models.loaded import LoadedModel
    from studio.core.prune.engine import PruneResult
    from studio.core.scan.heads import HeadScan
    from studio.core.scan.types import ScanReport
    from studio.core.train.types import FinetuneResult

INFO, WARNING, ERROR, DETAIL = "info", "warning", "error", "detail"


class Session(QObject):
    """Current model, data, inventory and evaluation; emits ``*_changed`` on every change."""

    model_changed = Signal(object)  # LoadedModel | None
    data_changed = Signal(object)  # DataSet | None
    inventory_changed = Signal(object)  # Inventory | None
    evaluation_changed = Signal(object)  # EvalResult | None
    scan_changed = Signal(object)  # ScanReport | None: the latest finished sensitivity scan
    head_scan_changed = Signal(object)  # HeadScan | None: the latest finished transformer scan
    pruned_changed = Signal(object)  # PruneResult | None: the latest pruning of the model
    finetuned_changed = Signal(object)  # FinetuneResult | None: the pruned model fine-tuned
    compute_changed = Signal(object)  # Compute: where scans and fine-tuning run
    logged = Signal(float, str, str)  # timestamp, level, text

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._model: LoadedModel | None = None
        self._reference: torch.nn.Module | None = None
        self._data: DataSet | None = None
        self._calibration: DataSet | None = None
        self._data_spec: str | None = None
        self._inventory: Inventory | None = None
        self._evaluation: EvalResult | None = None
        self._scan: ScanReport | None = None
        self._head_scan: HeadScan | None = None
        self._pruned: PruneResult | None = None
        self._finetuned: FinetuneResult | None = None
        self._compute = Compute()

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def reference(self) -> torch.nn.Module | None:
        """The model as first loaded: what fidelity is measured against on unlabeled data."""
        return self._reference

    @property
    def data(self) -> DataSet | None:
        return self._data

    @property
    def calibration(self) -> DataSet | None:
        """The calibration split of text data (scans and training), None for other data."""
        return self._calibration

    @property
    def data_spec(self) -> str | None:
        """What the data was opened from (``demo``, ``demo-lm``, a path): text data is
        tokenized again when another language model is opened."""
        return self._data_spec

    @property
    def is_text_data(self) -> bool:
        """The data holds token ids (text for a language model), not images or arrays."""
        return self._data is not None and not self._data.x.is_floating_point()

    @property
    def inventory(self) -> Inventory | None:
        return self._inventory

    @property
    def evaluation(self) -> EvalResult | None:
        return self._evaluation

    @property
    def scan(self) -> ScanReport | None:
        return self._scan

    @property
    def head_scan(self) -> HeadScan | None:
        """The latest finished head/MLP/layer scan of a transformer (its rows are on the
        model's calibration split when the data is text)."""
        return self._head_scan

    @property
    def pruned(self) -> PruneResult | None:
        return self._pruned

    @property
    def finetuned(self) -> FinetuneResult | None:
        return self._finetuned

    @property
    def compute(self) -> Compute:
        """Where scans and fine-tuning run: this process, or Ray
        (studio.core.cluster.connection)."""
        return self._compute

    def set_compute(self, compute: Compute) -> None:
        self._compute = compute
        self.compute_changed.emit(compute)

    def set_model(self, model: LoadedModel | None) -> None:
        """A newly loaded model: its inventory, evaluation, scan and pruning are cleared."""
        self._model = model
        self._reference = model.module if model is not None else None
        self.set_inventory(None)
        self.set_evaluation(None)
        self.set_scan(None)
        self.set_head_scan(None)
        self.set_pruned(None)
        self.model_changed.emit(model)

    def set_data(
        self,
        data: DataSet | None,
        calibration: DataSet | None = None,
        spec: str | None = None,
    ) -> None:
        """New data: ``data`` is what the model is evaluated on; for text, ``calibration``
        is the split scans and training use. ``spec`` says where it came from."""
        self._data = data
        self._calibration = calibration if data is not None else None
        self._data_spec = spec if data is not None else None
        self.set_evaluation(None)
        self.set_scan(None)
        self.set_head_scan(None)
        self.data_changed.emit(data)

    def set_inventory(self, inventory: Inventory | None) -> None:
        self._inventory = inventory
        self.inventory_changed.emit(inventory)

    def set_evaluation(self, evaluation: EvalResult | None) -> None:
        self._evaluation = evaluation
        self.evaluation_changed.emit(evaluation)

    def input_files(self) -> tuple[Path, ...]:
        """Files the user opened: nothing the studio saves may overwrite them."""
        model = self._model
        return (model.path,) if model is not None and model.path is not None else ()

    def set_scan(self, report: ScanReport | None) -> None:
        self._scan = report
        self.scan_changed.emit(report)

    def set_head_scan(self, scan: HeadScan | None) -> None:
        self._head_scan = scan
        self.head_scan_changed.emit(scan)

    def set_pruned(self, result: PruneResult | None) -> None:
        """A pruned copy of the model (the loaded model itself never changes); None reverts."""
        self._pruned = result
        self.set_finetuned(None)
        self.pruned_changed.emit(result)

    def set_finetuned(self, result: FinetuneResult | None) -> None:
        """The pruned model (or the loaded one) after fine-tuning; None when it is stale."""
        self._finetuned = result
        self.finetuned_changed.emit(result)

    def log_failure(self, title: str, message: str, trace: str = "") -> None:
        """A failed job in the log: the one-line message, and the traceback of an unexpected
        error as a detail line (never in a dialog)."""
        self.log(f"{title}: {message}", ERROR)
        if trace:
            self.log(trace, DETAIL)

    def log(self, text: str, level: str = INFO) -> None:
        """Add a line to the session log (shown by the log panel, timestamped)."""
        self.logged.emit(time.time(), level, text)
