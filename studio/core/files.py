"""Writing files safely: whole or not at all, and never over a file the user opened."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from studio.core.errors import StudioError


def write_atomic(path: str | Path, content: str | bytes, protected: tuple[Path, ...] = ()) -> Path:
    """Write ``content`` to a temporary file beside ``path`` and rename it into place.

    ``protected`` are the files the user opened (model, data): writing over one is refused.
    """
    target = Path(path)
    for other in protected:
        if other is not None and target.resolve() == Path(other).resolve():
            raise StudioError(f"refusing to write over {target.name}: it is an input file")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise StudioError(f"cannot write {target}: folder {folder} does not exist")
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StudioError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
