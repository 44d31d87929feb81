"""Data sets the studio evaluates on: the bundled digits, image folders, .npz arrays.

A :class:`DataSet` is a pair of tensors held in memory (the sets this desktop tool works on
are calibration- and validation-sized). ``y`` is ``None`` for unlabeled calibration data, in
which case quality is measured as fidelity to a reference model.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.core.errors import StudioError

DEMO_SIZE = 32
DEMO_SEED = 0
DEMO_VAL_FRACTION = 0.2
# Normalisation of the demo images after scaling pixels to 0..1.
DEMO_MEAN = 0.3
DEMO_STD = 0.4
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class DataSet:
    """Inputs ``x`` (N, ...) as float32 and optional integer labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor | None
    name: str
    classes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise StudioError(
                f"data set {self.name!r} has {len(self.x)} inputs but {len(self.y)} labels"
            )

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def fingerprint(self) -> str:
        """Content hash, used to key caches of results computed on this data."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x.numpy()).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y.numpy()).tobytes())
        return h.hexdigest()[:16]

    def subset(self, n: int) -> DataSet:
        return DataSet(self.x[:n], None if self.y is None else self.y[:n], self.name, self.classes)


@functools.lru_cache(maxsize=1)
def demo_splits() -> tuple[DataSet, DataSet]:
    """scikit-learn's 1,797 handwritten digits at 32x32, split 80/20 (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(
        images, size=(DEMO_SIZE, DEMO_SIZE), mode="bilinear", align_corners=False
    )
    images = ((images - DEMO_MEAN) / DEMO_STD).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        idx, test_size=DEMO_VAL_FRACTION, random_state=DEMO_SEED, stratify=digits.target
    )
    classes = tuple(str(i) for i in range(10))
    train = DataSet(images[train_idx], labels[train_idx], "digits (train)", classes)
    val = DataSet(images[val_idx], labels[val_idx], "digits (validation)", classes)
    return train, val


def matching_training_split(data: DataSet) -> DataSet | None:
    """The demo's training split when ``data`` is the demo's validation split (so that batch
    norms are re-estimated, and models trained, on other images than those measured), else
    None."""
    train, val = demo_splits()
    if len(data) == len(val) and data.name == val.name and data.fingerprint() == val.fingerprint():
        return train
    return None


def load_data(
    spec: str,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: float = 0.5,
    std: float = 0.5,
    unlabeled: bool = False,
) -> DataSet:
    """Load ``demo`` (validation split), an image folder, or an ``.npz`` file.

    ``image_size`` (H, W) and ``channels`` apply to image folders; ``unlabeled`` drops labels
    so that quality is measured as fidelity to a reference model.
    """
    if spec in ("demo", "demo:val"):
        data = demo_splits()[1]
    elif spec == "demo:train":
        data = demo_splits()[0]
    else:
        path = Path(spec)
        if not path.exists():
            raise StudioError(f"data not found: {spec} (expected 'demo', a folder or an .npz file)")
        if path.is_dir():
            data = _load_image_folder(path, image_size, channels, mean, std)
        elif path.suffix.lower() == ".npz":
            data = _load_npz(path)
        else:
            raise StudioError(
                f"unsupported data file {path.name}: "
                "use an image folder or an .npz with 'x' and 'y'"
            )
    if unlabeled and data.y is not None:
        data = DataSet(data.x, None, data.name + " (unlabeled)", data.classes)
    return data


def _load_npz(path: Path) -> DataSet:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays:
                keys = ", ".join(arrays.files) or "none"
                raise StudioError(f"{path.name} has no array named 'x' (arrays found: {keys})")
            x = np.asarray(arrays["x"])
            y = np.asarray(arrays["y"]) if "y" in arrays else None
    except StudioError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StudioError(f"cannot read {path.name} as an .npz archive: {exc}") from None
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise StudioError(
            f"{path.name}: 'x' must be a numeric array of shape (N, ...), got {x.shape}"
        )
    if y is not None:
        if y.ndim != 1 or y.dtype.kind not in "iub":
            raise StudioError(f"{path.name}: 'y' must be a 1-D integer array of labels")
        if len(y) != len(x):
            raise StudioError(f"{path.name}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    xt = torch.from_numpy(x.astype(np.float32))
    yt = None if y is None else torch.from_numpy(y.astype(np.int64))
    return DataSet(xt, yt, path.name)


def _load_image_folder(
    root: Path,
    image_size: tuple[int, int] | None,
    channels: int | None,
    mean: float,
    std: float,
) -> DataSet:
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if class_dirs:
        items = [(f, i) for i, d in enumerate(class_dirs) for f in sorted(d.iterdir())]
        labelled = True
    else:  # a flat folder of images: unlabeled calibration data
        items = [(f, -1) for f in sorted(root.iterdir())]
        labelled = False
    items = [(f, c) for f, c in items if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise StudioError(f"no images found in {root} (expected one subfolder of images per class)")
    mode = {1: "L", 3: "RGB", None: None}.get(channels)
    if channels is not None and mode is None:
        raise StudioError(f"channels must be 1 or 3, got {channels}")
    arrays, labels = [], []
    for file, label in items:
        try:
            with Image.open(file) as img:
                if mode is None:
                    mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
                img = img.convert(mode)
                if image_size is None:
                    image_size = (img.height, img.width)
                img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise StudioError(f"cannot read image {file}: {exc}") from None
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(label)
    x = (torch.from_numpy(np.stack(arrays)) - mean) / std
    y = torch.tensor(labels, dtype=torch.int64) if labelled else None
    classes = tuple(d.name for d in class_dirs)
    return DataSet(x.contiguous(), y, root.name, classes)
