"""What the commands share: the model and data options and their loading, the terminal
progress bar (which also names the step for crash containment), and the latency predictor
for a --target-latency. Uses studio.core only."""

from __future__ import annotations

import argparse
import sys
import time

from studio.core.command_guard import note_step
from studio.core.errors import StudioError


class TerminalProgress:
    """A one-line progress bar with ETA on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.monotonic()
        self.enabled = sys.stderr.isatty()
        self._last = -1.0
        self._message: str | None = None
        note_step(label)

    def __call__(self, fraction: float, message: str) -> None:
        if message != self._message:
            self._message = message
            note_step(f"{self.label}: {message}" if message else self.label)
        if not self.enabled or (fraction - self._last < 0.01 and fraction < 1.0):
            return
        self._last = fraction
        elapsed = time.monotonic() - self.start
        eta = f" ETA {elapsed / fraction - elapsed:4.0f}s" if 0.02 < fraction < 1.0 else ""
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:4.0%}{eta} {message[:30]:<30}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="SPEC",
        help="'demo', 'demo-lm', 'zoo:NAME', a model file (.pt .pth .pt2 .onnx) or a Hugging "
        "Face model folder (config.json + *.safetensors)",
    )
    p.add_argument("--arch", metavar="NAME", help="architecture of a state_dict file")
    p.add_argument("--input-shape", metavar="S", help="input shape, e.g. 1,3,32,32")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled model file, or a model folder's own code, to run while loading "
        "(trusted files only)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        help="tokens per sequence for language models and text data (default 128)",
    )


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        metavar="SPEC",
        help="'demo', an image folder (one subfolder per class), an .npz (x, y); for a language "
        "model 'demo-lm' or a .txt/.jsonl text file",
    )
    p.add_argument("--image-size", metavar="HxW", help="resize images of a folder, e.g. 32x32")
    p.add_argument("--unlabeled", action="store_true", help="ignore labels (fidelity only)")


def load_model_arg(args: argparse.Namespace, spec: str | None = None):
    from pathlib import Path

    from studio.core.models.load import load_model
    from studio.core.models.loaded import parse_shape

    progress = TerminalProgress("loading")
    progress(0.0, spec or args.model)
    given = parse_shape(args.input_shape)
    name = spec or args.model
    seq_len = getattr(args, "seq_len", None)
    if seq_len is not None and given is None and (name == "demo-lm" or Path(name).is_dir()):
        given = (1, seq_len)
    try:
        model = load_model(
            name, arch=args.arch, input_shape=given, trust_pickle=args.trust_pickle,
            progress=progress,
        )  # fmt: skip
    except StudioError as exc:  # a model with dynamic inputs: the data says what they are
        shape = None if given or spec else _shape_from_data(args, str(exc))
        if shape is None:
            raise
        model = load_model(
            args.model, arch=args.arch, input_shape=shape, trust_pickle=args.trust_pickle
        )
        model.notes.append(f"input shape {','.join(map(str, shape))} from --data")
    progress(1.0, "")
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    if spec is None:
        args._loaded_model = model  # text data is tokenized with its tokenizer
    return model


def _shape_from_data(args: argparse.Namespace, message: str) -> tuple[int, ...] | None:
    """One sample of ``--data`` as the model's input shape (batch 1), when loading failed
    for want of a shape and there is data to read it from."""
    if not getattr(args, "data", None) or "--input-shape" not in message:
        return None
    data = load_data_arg(args)
    return (1, *tuple(int(d) for d in data.x.shape[1:]))


def load_data_arg(args: argparse.Namespace):
    """``--data`` (read once per command: the model's input shape may have come from it)."""
    from studio.core.models.data import load_data
    from studio.core.models.loaded import parse_shape

    cached = getattr(args, "_loaded_data", None)
    if cached is not None:
        return cached
    text = _text_data(args)
    if text is not None:
        args._loaded_data, args._calibration = text.validation, text.calibration
        return text.validation
    size = parse_shape(args.image_size) if args.image_size else None
    if size is not None and len(size) != 2:
        raise StudioError(f"--image-size takes HxW, got {args.image_size}")
    data = load_data(args.data, image_size=size, unlabeled=args.unlabeled)  # type: ignore[arg-type]
    args._loaded_data = data
    return data


def _text_data(args: argparse.Namespace):  # -> TextSplits | None
    """``--data`` as text for a language model: ``demo-lm`` (the demo LM's corpus) or a
    .txt/.jsonl file, tokenized with the model's tokenizer (cached)."""
    from studio.core.models.text import DEFAULT_SEQ_LEN, is_text_file, load_text_data
    from studio.core.paths import DEMO_LM_DIR

    spec = args.data
    if spec != "demo-lm" and not is_text_file(spec):
        return None
    model = getattr(args, "_loaded_model", None)
    if model is None or not model.is_text:
        raise StudioError(
            f"--data {spec} is text: it goes with a language model from a Hugging Face folder "
            "(--model DIR or demo-lm)"
        )
    path = DEMO_LM_DIR / "corpus.txt" if spec == "demo-lm" else spec
    seq_len = getattr(args, "seq_len", None) or int(model.input_shape[-1]) or DEFAULT_SEQ_LEN
    return load_text_data(
        path, model.tokenizer, seq_len, name="demo-lm corpus" if spec == "demo-lm" else None
    )


def calibration_arg(args: argparse.Namespace):  # -> DataSet | None
    """The calibration split of text ``--data`` (read by load_data_arg), else None."""
    return getattr(args, "_calibration", None)


def existing_path(spec: str | None):
    from pathlib import Path

    return Path(spec) if spec and Path(spec).exists() else None


def channel_multiple_arg(args: argparse.Namespace) -> int:
    """``--round-to`` (default: runtime) as a multiple of channels, for ``--runtime``."""
    from studio.core.latency.alignment import parse_round_to

    runtime = getattr(args, "runtime", None) or "onnxruntime"
    return parse_round_to(args.round_to or "runtime", runtime)


def scan_for_allocation(args: argparse.Namespace, model, data, mode: str):  # -> ScanReport
    """The sensitivity scan that ``--allocate sensitivity`` needs: ``--scan FILE``, else the
    default scan of the model on ``--data`` (resumed from, or read whole from, the cache)."""
    from studio.core.plan.drops import load_scan

    if args.scan:
        return load_scan(args.scan)
    if data is None:
        raise StudioError(
            "sensitivity allocation scans the model on data: give --data (or --scan FILE)"
        )
    from studio.core.scan.sensitivity import SensitivityScan
    from studio.core.scan.types import ScanSettings

    settings = ScanSettings.for_allocation(mode, data.labelled)
    job = SensitivityScan(model, data, settings)
    job.prepare(progress=TerminalProgress("preparing the scan"))
    for _ in job.run(progress=TerminalProgress("scanning")):
        pass
    assert job.report is not None
    return job.report


def latency_target(args: argparse.Namespace, model, cost):  # -> (LatencyPredictor, fraction)
    """``--target-latency F`` or ``MSms``: a predictor and the fraction of its unpruned
    latency to allocate to."""
    from studio.core.latency.predict import LatencyPredictor

    text = str(args.target_latency).strip().lower().removesuffix("x")
    try:
        value = float(text[:-2]) if text.endswith("ms") else float(text)
    except ValueError:
        raise StudioError(
            f"bad --target-latency {args.target_latency!r}: a fraction like 0.6 or ms like 2.5ms"
        ) from None
    if (args.method or "structured") != "structured":
        raise StudioError("--target-latency needs --method structured")
    predictor = LatencyPredictor.build(
        model,
        args.runtime or "onnxruntime",
        args.batch,
        args.threads,
        progress=TerminalProgress("calibrating"),
        cost=cost,
    )
    if text.endswith("ms"):
        if value <= 0 or value > predictor.original_ms:
            raise StudioError(
                f"--target-latency {value:g} ms: the unpruned model is predicted at "
                f"{predictor.original_ms:.3f} ms, give a smaller positive value"
            )
        return predictor, value / predictor.original_ms
    return predictor, value
