"""Persistent GUI settings (window layout, recent files) through QSettings.

Settings are INI files in Qt's user scope (``~/.config/PruningStudio/Pruning Studio.ini`` on
Linux, honouring ``XDG_CONFIG_HOME``). Tests redirect them with
``QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tmp_dir)``.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings

ORGANIZATION = "PruningStudio"
APPLICATION = "Pruning Studio"
MAX_RECENT = 10
RECENT_KEY = "recentFiles"
MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx", ".ts")


def studio_settings() -> QSettings:
    return QSettings(
        QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION
    )


def is_model_file(path: str) -> bool:
    return Path(path).suffix.lower() in MODEL_SUFFIXES


def is_model_folder(path: str) -> bool:
    """A Hugging Face model folder: a directory with a config.json."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


class RecentFiles:
    """Most-recently-opened model files and folders, newest first, at most ``MAX_RECENT``."""

    def __init__(self, settings: QSettings, key: str = RECENT_KEY) -> None:
        self.settings = settings
        self.key = key

    def paths(self) -> list[str]:
        value = self.settings.value(self.key, [])
        if isinstance(value, str):  # QSettings returns a lone string for a one-item list
            value = [value]
        return [str(v) for v in (value or []) if v][:MAX_RECENT]

    def add(self, path: str) -> None:
        path = str(Path(path).resolve())
        self._store([path] + [p for p in self.paths() if p != path])

    def remove(self, path: str) -> None:
        self._store([p for p in self.paths() if p != path])

    def clear(self) -> None:
        self._store([])

    def _store(self, paths: list[str]) -> None:
        self.settings.setValue(self.key, paths[:MAX_RECENT])
        self.settings.sync()
