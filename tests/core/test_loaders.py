"""Opening PyTorch files: format sniffing, safe unpickling, state_dicts, TorchScript, .pt2."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.models import zoo
from studio.core.models.loaded import EAGER, EXPORTED, TORCHSCRIPT
from studio.core.models.loaders import UntrustedPickleError, load_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (1, 1, 32, 32)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    ).eval()


def same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...] = SHAPE) -> bool:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def one_line_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(StudioError) as info:
        load_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and path.name in message, message
    return message


def _write_marker(path: str) -> None:
    Path(path).write_text("the payload ran")


class _Payload:
    """Unpickling this calls ``function(marker)``: what a malicious checkpoint would do."""

    def __init__(self, function: object, marker: Path) -> None:
        self.function, self.marker = function, marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        if self.function is os.system:
            return (os.system, (f"touch {self.marker}",))
        return (self.function, (str(self.marker),))


@pytest.mark.parametrize("function", [_write_marker, os.system], ids=["function", "os.system"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_without_running(
    tmp_path: Path, function: object, legacy: bool
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"weights": torch.zeros(2), "payload": _Payload(function, marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(UntrustedPickleError) as info:
        load_file(path)
    message = str(info.value)
    assert "\n" not in message and "--trust-pickle" in message and "checkpoint.pt" in message
    assert "system" in message or "_write_marker" in message  # names the global it needs
    assert not marker.exists()


def test_whole_module_needs_trust_then_loads(tmp_path: Path) -> None:
    model = tiny()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UntrustedPickleError, match="torch.nn.modules.container.Sequential"):
        load_file(path)
    assert "--input-shape" in one_line_error(path, trust_pickle=True)
    loaded = load_file(path, trust_pickle=True, input_shape=SHAPE)
    assert loaded.kind == EAGER and loaded.input_shape == SHAPE
    assert same_outputs(model, loaded.module)
    assert "does not run" in one_line_error(path, trust_pickle=True, input_shape=(1, 3, 32, 32))


def test_whole_zoo_module_knows_its_input_shape(tmp_path: Path) -> None:
    model = zoo.build("resnet20").eval()
    path = tmp_path / "resnet.pt"
    torch.save(model, path)
    loaded = load_file(path, trust_pickle=True)
    assert loaded.input_shape == zoo.default_input_shape("resnet20")
    assert same_outputs(model, loaded.module)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_state_dict_with_arch(tmp_path: Path, legacy: bool) -> None:
    model = zoo.build("resnet20").eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    loaded = load_file(path, arch="resnet20")
    assert loaded.kind == EAGER and loaded.arch == "resnet20" and loaded.path == path
    assert same_outputs(model, loaded.module)


def test_checkpoint_dict_with_dataparallel_names(tmp_path: Path) -> None:
    model = zoo.build("vgg11").eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    loaded = load_file(path, arch="vgg11")
    assert same_outputs(model, loaded.module)
    assert any("module." in note for note in loaded.notes)


def test_state_dict_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(zoo.build("resnet20", num_classes=100).state_dict(), path)
    assert "--arch NAME (one of resnet20" in one_line_error(path)
    wrong_arch = one_line_error(path, arch="vgg11")
    assert "does not fit vgg11" in wrong_arch and "missing keys" in wrong_arch
    wrong_classes = one_line_error(path, arch="resnet20")
    assert "fc.weight is (100, 64) in the file but (10, 64) in the model" in wrong_classes
    assert load_file(path, arch="resnet20", num_classes=100).arch == "resnet20"
    torch.save({"epoch": 3}, path)
    assert "holds a dict with keys 'epoch'" in one_line_error(path)


def test_torchscript_round_trip(tmp_path: Path) -> None:
    model = tiny()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    assert "--input-shape" in one_line_error(path)
    loaded = load_file(path, input_shape=SHAPE)
    assert loaded.kind == TORCHSCRIPT and same_outputs(model, loaded.module)
    assert "structural pruning" in loaded.unsupported


def test_exported_program_round_trip(tmp_path: Path) -> None:
    model = tiny()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(*SHAPE),)), str(path))
    loaded = load_file(path)
    assert loaded.kind == EXPORTED and loaded.input_shape == SHAPE
    assert same_outputs(model, loaded.module)
    assert "structural pruning" in loaded.unsupported
    loaded.module.eval()  # torch makes this raise on exported modules; the loader allows it
    assert "contradicts" in one_line_error(path, input_shape=(1, 3, 32, 32))


def test_pt2_with_pickled_payload_is_refused(tmp_path: Path) -> None:
    """torch.export.load unpickles sample inputs with weights_only=False if the safe load fails."""
    marker = tmp_path / "marker"
    good = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(tiny(), (torch.randn(*SHAPE),)), str(good))
    payload = io.BytesIO()
    torch.save(_Payload(_write_marker, marker), payload)
    bad = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            target.writestr(item, payload.getvalue() if "sample_inputs" in item.filename else data)
    with pytest.raises(UntrustedPickleError, match="sample_inputs"):
        load_file(bad)
    assert not marker.exists()


def _text(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("hello, this is not a model\n")
    return path


def _cut(tmp_path: Path, name: str, save: object) -> Path:
    buffer = io.BytesIO()
    torch.save(tiny().state_dict(), buffer, _use_new_zipfile_serialization=save == "zip")
    path = tmp_path / name
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


BAD_FILES = {
    "random bytes": (
        lambda d: _bytes(
            d, "random.pt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
        ),
        "starts with bytes",
    ),
    "empty": (lambda d: _bytes(d, "empty.pt", b""), "empty"),
    "text .pt": (lambda d: _text(d, "notes.pt"), "starts with text"),
    "text .onnx": (lambda d: _text(d, "notes.onnx"), "starts with text"),
    "truncated zip": (lambda d: _cut(d, "cut.pt", "zip"), "truncated"),
    "truncated legacy": (lambda d: _cut(d, "cut_legacy.pt", "legacy"), "truncated"),
    "random .onnx": (lambda d: _bytes(d, "random.onnx", b"\x08" + bytes(range(200))), "ONNX"),
    "other zip": (lambda d: _zip(d, "archive.pt"), "zip archive but not"),
    "plain pickle": (lambda d: _bytes(d, "plain.pkl", pickle.dumps({"a": 1})), "Python pickle"),
    "junk after torch header": (lambda d: _junk_after_header(d, "junk.pt"), "damaged"),
}


def _bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _junk_after_header(tmp_path: Path, name: str) -> Path:
    buffer = io.BytesIO()
    torch.save({}, buffer, _use_new_zipfile_serialization=False)
    junk = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)
    return _bytes(tmp_path, name, buffer.getvalue()[:16] + bytes(junk))


def _zip(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return path


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_one_line_errors(tmp_path: Path, case: str) -> None:
    make, expected = BAD_FILES[case]
    assert expected in one_line_error(make(tmp_path))


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="does not exist"):
        load_file(tmp_path / "nope.pt")
    with pytest.raises(StudioError, match="is a folder"):
        load_file(tmp_path)


def test_loading_never_changes_the_file(tmp_path: Path) -> None:
    model = tiny()
    x = torch.randn(*SHAPE)
    files = {
        "state.pt": lambda p: torch.save(zoo.build("resnet20").state_dict(), p),
        "whole.pt": lambda p: torch.save(model, p),
        "script.pt": lambda p: torch.jit.save(torch.jit.script(model), str(p)),
        "model.pt2": lambda p: torch.export.save(torch.export.export(model, (x,)), str(p)),
        "model.onnx": lambda p: torch.onnx.export(model, (x,), str(p), dynamo=False),
    }
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        load_file(path, arch="resnet20", input_shape=SHAPE, trust_pickle=True)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before, name
