"""INT8 post-training quantization of an exported float ONNX model with ONNX Runtime's tools.

- ``dynamic``: weights stored as 8-bit integers, activations quantized at run time
  (``quantize_dynamic``; no data needed). Convolutions become ConvInteger, which ONNX Runtime's
  CPU provider runs slower than float convolutions (uint8 weights then, the faster of the two):
  the mode suits Linear/LSTM/attention models.
- ``static``: weights and activations quantized with scales calibrated on data
  (``quantize_static``, QDQ format, per-channel weights, uint8 activations / int8 weights).

The float model is first pre-processed as ONNX Runtime recommends (shape inference, graph
optimisation: batch norms folded into convolutions). Float and INT8 are then run side by side in
ONNX Runtime on the data: accuracy of each when the data is labelled, top-1 agreement of the
INT8 model with the float one always, and of each with a reference model (the unpruned
original: fidelity, for unlabeled data) when one is given; file sizes and batch-1 latency.
The INT8 file is written under a temporary name and renamed into place once it loads and runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from studio.core.errors import StudioError, first_line
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import onnx_io as export_onnx
from studio.core.models.data import DataSet
from studio.core.models.evaluate import predict

MODES = ("dynamic", "static")
CALIBRATION_SAMPLES = 256
EVAL_BATCH = 256


@dataclass
class QuantizeResult:
    """Float vs INT8, side by side."""

    path: Path
    mode: str
    bytes_float: int
    bytes_int8: int
    samples: int  # evaluated on (0 without data)
    accuracy_float: float | None = None  # labelled data only
    accuracy_int8: float | None = None
    agreement_int8: float | None = None  # top-1 agreement of INT8 with float
    agreement_float_reference: float | None = None  # float vs the reference model, if given
    agreement_int8_reference: float | None = None  # INT8 vs the reference model
    ort_ms_float: float | None = None  # ONNX Runtime, batch 1, median
    ort_ms_int8: float | None = None
    calibration_samples: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def speedup(self) -> float | None:
        if self.ort_ms_float is None or not self.ort_ms_int8:
            return None
        return self.ort_ms_float / self.ort_ms_int8

    def to_dict(self) -> dict[str, Any]:
        return {
            "path_int8": str(self.path),
            "quantize": self.mode,
            "bytes_float": self.bytes_float,
            "bytes_int8": self.bytes_int8,
            "samples": self.samples,
            "accuracy_float": self.accuracy_float,
            "accuracy_int8": self.accuracy_int8,
            "agreement_int8": self.agreement_int8,
            "agreement_float_reference": self.agreement_float_reference,
            "agreement_int8_reference": self.agreement_int8_reference,
            "ort_ms_float": self.ort_ms_float,
            "ort_ms_int8": self.ort_ms_int8,
            "speedup_int8": self.speedup,
            "calibration_samples": self.calibration_samples,
            "quantize_notes": list(self.notes),
        }


def int8_path(path: str | Path) -> Path:
    """Where the INT8 model of the float ONNX file ``path`` goes: ``NAME.int8.onnx`` beside."""
    path = Path(path)
    return path.with_name(f"{path.stem}.int8.onnx")


def quantize_onnx(
    float_path: str | Path,
    out: str | Path,
    mode: str,
    data: DataSet | None = None,
    calibration: DataSet | None = None,
    *,
    reference: torch.nn.Module | None = None,
    per_channel: bool = True,
    measure_latency: bool = True,
    latency_budget_s: float = 1.0,
    protected: tuple[Path, ...] = (),
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> QuantizeResult:
    """Quantize the float ONNX model in ``float_path`` to INT8 in ``out``, and compare them.

    ``calibration`` (default ``data``, at most CALIBRATION_SAMPLES of it) calibrates static
    quantization; ``data`` is what both models are evaluated on, and ``reference`` (the
    unpruned original) what their predictions are compared with on it.
    """
    start = time.monotonic()
    float_path, out = Path(float_path), Path(out)
    if mode not in MODES:
        raise StudioError(f"unknown quantization {mode!r}: choose {' or '.join(MODES)}")
    calibration = calibration if calibration is not None else data
    if mode == "static" and calibration is None:
        raise StudioError("static quantization needs calibration data: give --data")
    _refuse(out, (*protected, float_path))
    notes: list[str] = []
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with tempfile.TemporaryDirectory(prefix="studio-quant-") as work:
            report(progress, 0.0, "pre-processing")
            source = _preprocess(float_path, Path(work) / "pre.onnx", notes)
            check(cancel)
            report(progress, 0.1, f"{mode} quantization")
            used = _quantize(source, tmp, mode, calibration, per_channel)
        check(cancel)
        report(progress, 0.5, "evaluating float and INT8")
        export_onnx.check(onnx.load(str(tmp)))
        float_session = export_onnx.session(str(float_path))
        int8_session = export_onnx.session(str(tmp))
        result = QuantizeResult(
            out, mode, float_path.stat().st_size, tmp.stat().st_size, 0, calibration_samples=used
        )
        if data is not None:
            _compare(result, float_session, int8_session, data, reference, cancel)
        check(cancel)
        if measure_latency:
            report(progress, 0.8, "measuring latency")
            x1 = _batch_input(float_session, data)
            ms = export_onnx.latencies_ms([float_session, int8_session], x1, latency_budget_s)
            result.ort_ms_float, result.ort_ms_int8 = ms
        if mode == "dynamic" and _has(float_path, "Conv") and not _faster(result):
            notes.append(
                "dynamic quantization turns convolutions into ConvInteger, which ONNX Runtime's "
                "CPU provider runs slower than float convolutions; static quantization is the "
                "one that speeds up convolutional networks"
            )
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a file to ship from others
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    result.notes = notes
    result.seconds = time.monotonic() - start
    report(progress, 1.0, "done")
    return result


def _preprocess(source: Path, target: Path, notes: list[str]) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        return target
    except Exception as error:  # optimisation of an unusual graph: quantize it as it is
        notes.append(f"ONNX Runtime's pre-processing failed ({first_line(error)}); skipped")
        return source


def _quantize(
    source: Path, target: Path, mode: str, calibration: DataSet | None, per_channel: bool
) -> int:
    """Write the INT8 model; the number of calibration samples used."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    try:
        if mode == "dynamic":
            # ConvInteger with uint8 weights runs about twice as fast as with int8 ones in
            # ONNX Runtime's CPU provider (measured on the pruned demo); int8 elsewhere
            weights = QuantType.QUInt8 if _has(source, "Conv") else QuantType.QInt8
            quantize_dynamic(str(source), str(target), weight_type=weights)
            return 0
        assert calibration is not None
        reader = _Reader(export_onnx.session(str(source)), calibration)
        quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return reader.used
    except StudioError:
        raise
    except Exception as error:  # unsupported ops, calibration failures
        raise StudioError(
            f"ONNX Runtime's {mode} quantization failed: {type(error).__name__}: "
            f"{first_line(error)}"
        ) from None


class _Reader:
    """Calibration batches for ``quantize_static`` (its CalibrationDataReader protocol)."""

    def __init__(self, sess: Any, data: DataSet) -> None:
        graph_input = sess.get_inputs()[0]
        fixed = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else 0
        size = fixed or 32
        count = min(len(data), CALIBRATION_SAMPLES)
        count -= count % size
        if count == 0:
            raise StudioError(f"calibration needs at least {size} samples; {data.name} is smaller")
        x = data.x[:count].float().numpy()
        self.used = count
        self._batches = iter([{graph_input.name: x[i : i + size]} for i in range(0, count, size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self):  # quantize_static iterates some readers
        return self._batches


def _outputs(sess: Any, data: DataSet, cancel: CancelToken | None) -> np.ndarray:
    shape = sess.get_inputs()[0].shape
    size = shape[0] if isinstance(shape[0], int) else EVAL_BATCH
    x = data.x.float().numpy()
    usable = len(x) - len(x) % size if isinstance(shape[0], int) else len(x)
    chunks = []
    for i in range(0, usable, size):
        check(cancel)
        try:
            out = export_onnx.run(sess, x[i : i + size])[0]
        except Exception as error:  # data shaped unlike the model's input
            raise StudioError(
                f"ONNX Runtime cannot run the model on {data.name}: {first_line(error)}"
            ) from None
        chunks.append(out.reshape(len(out), -1))
    if not chunks:
        raise StudioError(f"{data.name} has fewer samples than the model's batch size {size}")
    return np.concatenate(chunks)


def _compare(
    result: QuantizeResult,
    float_session: Any,
    int8_session: Any,
    data: DataSet,
    reference: torch.nn.Module | None,
    cancel: CancelToken | None,
) -> None:
    floats = _outputs(float_session, data, cancel).argmax(1)
    quantized = _outputs(int8_session, data, cancel).argmax(1)
    result.samples = len(floats)
    result.agreement_int8 = float((floats == quantized).mean())
    if data.y is not None:
        labels = data.y[: len(floats)].numpy()
        result.accuracy_float = float((floats == labels).mean())
        result.accuracy_int8 = float((quantized == labels).mean())
    if reference is not None:
        subset = data.subset(len(floats))
        expected = predict(reference, subset, cancel=cancel, device=torch.device("cpu"))
        wanted = expected.argmax(1).numpy()
        result.agreement_float_reference = float((floats == wanted).mean())
        result.agreement_int8_reference = float((quantized == wanted).mean())


def _batch_input(sess: Any, data: DataSet | None) -> np.ndarray:
    """One input batch of the model's batch size (1 when dynamic): data when given."""
    graph_input = sess.get_inputs()[0]
    dims = [d if isinstance(d, int) else 1 for d in graph_input.shape]
    if data is not None and len(data) >= dims[0]:
        return data.x[: dims[0]].float().numpy()
    return np.random.default_rng(0).standard_normal(dims).astype(np.float32)


def _has(path: Path, op: str) -> bool:
    return any(n.op_type == op for n in onnx.load(str(path), load_external_data=False).graph.node)


def _faster(result: QuantizeResult) -> bool:
    return result.speedup is not None and result.speedup > 1.0


def _refuse(target: Path, protected: tuple[Path, ...]) -> None:
    for other in protected:
        if target.resolve() == Path(other).resolve():
            raise StudioError(f"refusing to write over {target.name}: it is an input file")
    if not target.parent.is_dir():
        raise StudioError(f"cannot write {target}: folder {target.parent} does not exist")
