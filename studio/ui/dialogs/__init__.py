"""Dialogs: compute setting, export, the Netron graphs, the report's PDF. May import widgets,
the runner, the session and studio.core."""
