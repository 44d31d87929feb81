"""The window's tabs and docks, one module per panel with its helper modules beside it
(``planner_*``, ``training_*``, ``latency_*``, ``scan_text``). May import widgets, the runner,
the session and studio.core; never dialogs or the main window."""
