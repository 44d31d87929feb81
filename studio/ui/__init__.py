"""Qt front end of Pruning Studio (PySide6 + pyqtgraph + superqt). Only this package imports Qt.

- ``widgets/``: charts, the heatmap, the Pareto chart, layer bars, the scan settings form.
- ``panels/``: one module per tab or dock, with its helpers beside it.
- ``dialogs/``: compute setting, export, Netron graphs.
- here: ``app`` (start-up), ``main_window``, ``workflow`` (loading and evaluation jobs),
  ``session`` (the state views listen to), ``runner`` (the only place threads start),
  ``settings``, ``format``, ``compat``, ``progress``, ``report_pdf``.

Imports run widgets -> panels, dialogs -> the window; every layer may use the session, the
runner, settings, format, compat and report_pdf, and studio.core (tests/test_layers.py).
"""
