"""Writing one export: temporary files beside the target, each loaded back in its own runtime
and compared with the model, renamed into place only once all pass (see
:mod:`studio.core.export.exporter`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from studio.core.errors import StudioError, first_line
from studio.core.export.types import ExportResult
from studio.core.export.verify import (
    BatchShapeError,
    max_abs_diff,
    module_params,
    require_match,
    require_params,
    torch_outputs,
)
from studio.core.models import onnx_io as export_onnx
from studio.core.models import zoo
from studio.core.models.loaded import EAGER, LoadedModel, shape_text


class Exporter:
    """One export: writes temporary files, verifies them, renames them into place."""

    def __init__(
        self,
        model: LoadedModel,
        fmt: str,
        path: Path,
        x: np.ndarray,
        dynamic: bool,
        protected: tuple[Path, ...],
    ) -> None:
        self.model, self.fmt, self.path, self.x = model, fmt, path, x
        self.dynamic, self.protected = dynamic, protected
        self.names: tuple[tuple[str, ...], tuple[str, ...]] = (("input",), ("output",))
        self.axes: dict[str, dict[int, str]] = {}  # ONNX: the file's dynamic dims when dynamic
        self.kept_axes = False  # ONNX: the file has them (not fixed after all)
        self.temps: list[tuple[Path, Path]] = []  # (temporary file, final path)
        self.result: ExportResult
        self.session: Any = None

    def batches(self, dynamic: bool) -> list[np.ndarray]:
        if dynamic:
            return [self.x, self.x[:1]]
        fixed = self.model.input_shape[0]
        return [self.x[i : i + fixed] for i in range(0, len(self.x) - fixed + 1, fixed)][:3]

    def temp(self, final: Path) -> Path:
        refuse_protected(final, self.protected)
        fd, name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=f".tmp{final.suffix}", dir=final.parent
        )
        os.close(fd)
        self.temps.append((Path(name), final))
        return Path(name)

    def verify(self, run: Callable[[np.ndarray], Any], loaded_params: int, dynamic: bool) -> None:
        batches = self.batches(dynamic)
        what = f"{self.fmt} file"
        diff, scale = max_abs_diff(self.expected, run, batches, what)
        require_match(diff, scale, what)
        self.record(diff, scale, loaded_params, batches, dynamic)

    def record(
        self,
        diff: float,
        scale: float,
        loaded_params: int,
        batches: list[np.ndarray],
        dynamic: bool,
    ) -> None:
        """Check the parameter count of a file whose outputs matched; keep what was proved."""
        model_params = module_params(self.model.module)
        require_params(loaded_params, model_params, f"{self.fmt} file")
        sizes = tuple(dict.fromkeys(len(b) for b in batches))
        self.result = ExportResult(
            path=self.path,
            format=self.fmt,
            params=loaded_params,
            params_model=model_params,
            max_abs_diff=diff,
            output_scale=scale,
            bytes=0,
            batch_sizes=sizes,
            dynamic_batch=dynamic,
            extra_files=tuple(final for _, final in self.temps[1:]),
        )

    def expected(self, x: np.ndarray) -> list[np.ndarray]:
        return torch_outputs(self.model.module, x)

    def fixed_fallback(self, attempt: Callable[[bool], None]) -> None:
        """``attempt(dynamic)``; when the file fails at another batch size than the one it was
        traced at, again with the model's own fixed batch size, and say so."""
        if not self.dynamic:
            attempt(False)
            return
        try:
            attempt(True)
        except BatchShapeError:
            attempt(False)
            shape = self.model.input_shape
            fixed = (
                f"a fixed input shape of {shape_text(shape)}"
                if any(i for axes in self.axes.values() for i in axes)
                else f"a fixed batch size of {shape[0]}"
            )
            self.result.notes.append(
                f"the {self.fmt} file has {fixed}: the model computes shapes from its input, "
                "which tracing records as constants"
            )

    def onnx(self, opset: int) -> None:
        """The file declares the dynamic dims ``self.axes`` (none when not dynamic) and is
        checked at another size of each (:func:`export_onnx.probe_inputs`)."""
        inputs, outputs = self.names
        tmp = self.temp(self.path)

        def attempt(dynamic: bool) -> None:
            axes = self.axes if dynamic else {}
            input_axes = axes.get(inputs[0], {})
            batch = 0 in input_axes
            first = self.x if batch else self.batches(False)[0]
            batches = [first, *export_onnx.probe_inputs(first, input_axes)]
            if not batch:  # the file's own batch size, on each sample
                batches[1:1] = self.batches(False)[1:]
            example = torch.from_numpy(first[:2] if batch else first)
            module = self.model.module
            data, self.session, diff, scale = export_onnx.verified_onnx(
                module, example, batches, opset, inputs, outputs, axes, f"{self.fmt} file"
            )
            self.kept_axes = dynamic
            tmp.write_bytes(data)
            proto = onnx.load(str(tmp))
            self.record(diff, scale, export_onnx.file_params(proto), batches, batch)
            spatial = [b for b in batches if b.shape[1:] != first.shape[1:]]
            if spatial:
                self.result.notes.append(
                    f"checked at input shape {shape_text(spatial[0].shape)} too: its "
                    f"{', '.join(input_axes[i] for i in input_axes if i)} dims are dynamic"
                )

        self.fixed_fallback(attempt)
        if self.model.input_names:
            declared = self.model.onnx_dynamic_axes is not None and self.kept_axes
            kept = "names and dynamic dims are" if declared else "names are"
            self.result.notes.append(f"the original input and output {kept} kept")
        odd, convs = export_onnx.unaligned_convs(onnx.load(str(tmp)))
        if odd:
            self.result.notes.append(
                f"{odd} of {convs} convolutions have output channels that are not a multiple "
                "of 8: ONNX Runtime's CPU layout optimisation (NCHWc) skips them, so they run "
                "slower than their MACs suggest"
            )

    def torchscript(self) -> None:
        tmp = self.temp(self.path)

        def attempt(dynamic: bool) -> None:
            self._trace(tmp, dynamic)
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
            self.verify(partial(torch_outputs, loaded), module_params(loaded), dynamic)

        self.fixed_fallback(attempt)

    def _trace(self, tmp: Path, dynamic: bool) -> None:
        example = torch.from_numpy(self.x[:2] if dynamic else self.batches(False)[0])
        try:
            with torch.no_grad():
                traced = torch.jit.trace(self.model.module, (example,), check_trace=False)
            torch.jit.save(traced, str(tmp))
        except Exception as error:  # untraceable Python control flow and more
            raise StudioError(
                f"the model could not be traced to TorchScript: {type(error).__name__}: "
                f"{first_line(error)}"
            ) from None

    def pt2(self) -> None:
        from studio.core.models.loaders import load_file
        from studio.core.models.pruned_file import save_model

        tmp = self.temp(self.path)
        save_model(self.model, tmp)
        loaded = load_file(tmp, input_shape=self.model.input_shape)
        fixed = any("fixed batch size" in note for note in loaded.notes)
        self.verify(
            lambda b: torch_outputs(loaded.module, b),
            module_params(loaded.module),
            self.dynamic and not fixed,
        )
        if fixed:
            fixed_at = loaded.input_shape[0]
            self.result.notes.append(f"torch.export fixed the batch size at {fixed_at}")

    def pytorch(self) -> None:
        from studio.core.models.loaders import load_file
        from studio.core.models.pruned_file import save_model

        rebuildable = self.model.kind == EAGER and self.model.arch in zoo.NAMES
        tmp = self.temp(self.path)
        if rebuildable:
            save_model(self.model, tmp)
            loaded = load_file(tmp).module
            whole = self.temp(self.path.with_name(self.path.stem + ".module" + self.path.suffix))
        else:
            whole = tmp
        torch.save(self.model.module, str(whole))
        # our own file, just written: unpickling it runs no code but the studio's
        module = torch.load(str(whole), map_location="cpu", weights_only=False).eval()
        if not rebuildable:
            loaded = module
        else:
            diff, scale = max_abs_diff(
                self.expected,
                lambda b: torch_outputs(module, b),
                self.batches(True),
                "whole-module file",
            )
            require_match(diff, scale, "whole-module file")
        self.verify(lambda b: torch_outputs(loaded, b), module_params(loaded), True)
        if not rebuildable:
            self.result.notes.append(
                f"{self.model.name} is not a built-in architecture: the file is the whole pickled "
                "module, which loads only with --trust-pickle (pt2 or onnx load without it)"
            )

    def commit(self) -> None:
        """Rename every verified temporary file into place."""
        try:
            for tmp, final in self.temps:
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a file to ship from others
                os.replace(tmp, final)
        except OSError as error:
            raise StudioError(f"cannot write {self.path}: {error.strerror or error}") from None
        finally:
            self.cleanup()
        self.result.bytes = self.path.stat().st_size

    def cleanup(self) -> None:
        for tmp, _ in self.temps:
            tmp.unlink(missing_ok=True)


def refuse_protected(target: Path, protected: tuple[Path, ...]) -> None:
    for other in protected:
        if target.resolve() == Path(other).resolve():
            raise StudioError(f"refusing to write over {target.name}: it is an input file")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise StudioError(f"cannot write {target}: folder {folder} does not exist")
