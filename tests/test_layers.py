"""The architecture, enforced (issue 17): the stages of ``studio.core`` import only the stages
before them, the core never imports Qt or the UI, the command line imports the UI only to open
the window, the UI's widgets, panels and dialogs keep their order, and no module imports
itself back through others. Imports are read from the source (every import statement,
including those inside functions and under ``TYPE_CHECKING``), so nothing is hidden by moving an
import into a function."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIO = ROOT / "studio"

# the pipeline, lowest first; the shared modules sit below every stage
STAGES = ("models", "scan", "plan", "prune", "latency", "train", "export", "cluster")
SHARED = {"errors", "jobs", "files", "paths", "isolation", "command_guard"}
QT = ("PySide6", "shiboken6", "pyqtgraph", "superqt", "qtpy", "PyQt5", "PyQt6")
UI_ALLOWED = {  # layer -> the UI layers it may import
    "widgets": {"widgets", "base"},
    "panels": {"widgets", "panels", "base"},
    "dialogs": {"widgets", "dialogs", "base"},
}
# modules at the top of studio.ui that every layer may import; the rest there (the window, the
# app, the workflow) import the layers
UI_BASE = {"session", "runner", "format", "settings", "compat", "report_pdf"}
# the command line's only ways into the UI: open the window, and print a report's PDF with Qt
# what the commands share: options and loading; what transformers need beside it
CLI_SHARED = ("studio.cli.common", "studio.cli.hf")
CLI_TO_UI = {("studio.cli.gui", "studio.ui.app"), ("studio.cli.report", "studio.ui.report_pdf")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (a ``from pkg import name`` names ``pkg.name`` when that is
    a module of the studio)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if is_studio_module(candidate):
                    found.add(candidate)
    return found


def is_studio_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


def graph(root: Path = STUDIO) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(root.rglob("*.py")):
        edges[module_name(path)] = imports_of(path)
    return edges


def stage_of(module: str) -> int | None:
    """Index in STAGES of a ``studio.core`` module; -1 for the shared modules."""
    parts = module.split(".")
    if parts[:2] != ["studio", "core"] or len(parts) < 3:
        return None
    if parts[2] in STAGES:
        return STAGES.index(parts[2])
    return -1 if parts[2] in SHARED else None


def ui_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["studio", "ui"] or len(parts) < 3:
        return None
    if parts[2] in ("widgets", "panels", "dialogs"):
        return parts[2]
    return "base" if parts[2] in UI_BASE else "window"


def violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            found.extend(_check(module, target))
    return found


def _check(module: str, target: str) -> list[str]:
    edge = f"{module} imports {target}"
    if module.startswith("studio.core"):
        if target.startswith("studio.ui") or target.split(".")[0] in QT:
            return [f"{edge}: the core never imports the UI or Qt"]
        if target.startswith("studio.cli"):
            return [f"{edge}: the core never imports the command line"]
        mine, theirs = stage_of(module), stage_of(target)
        if mine is not None and theirs is not None and theirs > mine:
            return [f"{edge}: a lower stage never imports a higher one ({' -> '.join(STAGES)})"]
        if module.split(".")[-1] in SHARED and theirs is not None and theirs >= 0:
            return [f"{edge}: the shared modules import no stage"]
    if module.startswith("studio.cli"):
        if target.split(".")[0] in QT:
            return [f"{edge}: the command line never imports Qt"]
        if target.startswith("studio.ui") and (module, target) not in CLI_TO_UI:
            return [f"{edge}: the command line imports the UI only to open the window"]
        if module not in ("studio.cli", *CLI_SHARED) and target.startswith("studio.cli"):
            if target not in CLI_SHARED:
                return [f"{edge}: a command imports only {' and '.join(CLI_SHARED)}"]
    mine_ui, theirs_ui = ui_layer(module), ui_layer(target)
    if mine_ui in UI_ALLOWED and theirs_ui is not None and theirs_ui not in UI_ALLOWED[mine_ui]:
        return [f"{edge}: studio.ui.{mine_ui} may import {sorted(UI_ALLOWED[mine_ui])}"]
    return []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the studio's modules (a package's ``__init__`` counts as a module;
    an import of a package's submodule does not count as an import of the package)."""
    nodes = {m for m in edges}
    adjacency = {m: sorted(t for t in edges[m] if t in nodes and t != m) for m in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adjacency[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


def test_the_layers_hold() -> None:
    problems = violations(graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_every_core_module_belongs_to_a_stage_or_is_shared() -> None:
    for module in graph():
        parts = module.split(".")
        if parts[:2] == ["studio", "core"] and len(parts) > 2:
            assert stage_of(module) is not None, f"{module} is in no stage"


def test_every_package_says_what_it_holds() -> None:
    for init in STUDIO.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} has no docstring"


@pytest.mark.parametrize(
    ("module", "target", "expected"),
    [
        ("studio.core.scan.sensitivity", "studio.core.cluster.scan", "higher one"),
        ("studio.core.models.loaders", "studio.core.prune.engine", "higher one"),
        ("studio.core.plan.allocate", "studio.core.latency.predict", "higher one"),
        ("studio.core.models.data", "PySide6.QtCore", "never imports the UI or Qt"),
        ("studio.core.train.finetune", "studio.ui.runner", "never imports the UI or Qt"),
        ("studio.core.jobs", "studio.core.models.loaded", "higher one"),
        ("studio.cli.scan", "studio.ui.session", "only to open the window"),
        ("studio.cli.prune", "studio.cli.latency", "only studio.cli.common"),
        ("studio.ui.widgets.heatmap", "studio.ui.panels.planner_panel", "studio.ui.widgets"),
        ("studio.ui.panels.training_panel", "studio.ui.main_window", "studio.ui.panels"),
        ("studio.ui.panels.latency_panel", "studio.ui.dialogs.export_dialog", "studio.ui.panels"),
    ],
)
def test_a_forbidden_import_is_caught(module: str, target: str, expected: str) -> None:
    problems = _check(module, target)
    assert problems and expected in problems[0]


def test_allowed_imports_pass() -> None:
    for module, target in [
        ("studio.core.latency.fit", "studio.core.prune.engine"),
        ("studio.core.cluster.scan", "studio.core.scan.sensitivity"),
        ("studio.core.scan.sensitivity", "studio.core.jobs"),
        ("studio.cli.gui", "studio.ui.app"),
        ("studio.cli.prune", "studio.cli.common"),
        ("studio.ui.panels.planner_panel", "studio.ui.widgets.heatmap"),
        ("studio.ui.main_window", "studio.ui.dialogs.export_dialog"),
    ]:
        assert _check(module, target) == [], (module, target)


def test_a_cycle_is_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
