from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.core.errors import StudioError
from studio.core.models.data import DataSet, demo_splits, load_data


def test_demo_split_is_fixed_stratified_and_complete() -> None:
    train, val = demo_splits()
    assert len(train) + len(val) == 1797
    assert len(val) == 360
    assert train.x.shape[1:] == (1, 32, 32) and val.x.dtype == torch.float32
    counts = torch.bincount(val.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 of each digit
    again = demo_splits()[1]
    assert torch.equal(again.x, val.x) and torch.equal(again.y, val.y)
    assert val.fingerprint() == again.fingerprint() != train.fingerprint()


def test_npz_with_and_without_labels(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(12, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "labelled.npz", x=x, y=np.arange(12) % 3)
    np.savez(tmp_path / "calib.npz", x=x)
    labelled = load_data(str(tmp_path / "labelled.npz"))
    assert labelled.labelled and labelled.y.tolist()[:4] == [0, 1, 2, 0]
    assert torch.allclose(labelled.x, torch.from_numpy(x))
    calib = load_data(str(tmp_path / "calib.npz"))
    assert not calib.labelled and len(calib) == 12
    assert not load_data(str(tmp_path / "labelled.npz"), unlabeled=True).labelled


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 3))}, "no array named 'x'"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(3, dtype=int)}, "4 samples but 'y' has 3"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4)}, "integer array"),
    ],
)
def test_bad_npz_gives_clear_error(tmp_path, arrays, message) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(StudioError, match=message):
        load_data(str(path))


def test_corrupt_npz_and_missing_path(tmp_path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(StudioError, match="cannot read junk.npz"):
        load_data(str(path))
    with pytest.raises(StudioError, match="data not found"):
        load_data(str(tmp_path / "nope"))


def test_image_folder_labels_resize_and_normalise(tmp_path) -> None:
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 10), (value, value, value)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = load_data(str(tmp_path), image_size=(8, 16), mean=0.5, std=0.5)
    assert data.x.shape == (6, 3, 8, 16)
    assert data.classes == ("cat", "dog") and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(data.x[0], torch.full((3, 8, 16), -1.0))
    assert torch.allclose(data.x[-1], torch.full((3, 8, 16), 1.0))


def test_flat_image_folder_is_unlabeled_and_grey_stays_one_channel(tmp_path) -> None:
    for i in range(2):
        Image.new("L", (5, 5), 128).save(tmp_path / f"{i}.png")
    data = load_data(str(tmp_path))
    assert not data.labelled and data.x.shape == (2, 1, 5, 5)


def test_broken_image_is_named(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(StudioError, match="x.png"):
        load_data(str(tmp_path))


def test_labels_must_match_inputs() -> None:
    with pytest.raises(StudioError):
        DataSet(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), "t")


def test_matching_training_split_only_for_the_demo_validation_split() -> None:
    from studio.core.models.data import matching_training_split

    train, val = demo_splits()
    assert matching_training_split(val) is train
    assert matching_training_split(val.subset(100)) is None
    assert matching_training_split(train) is None
