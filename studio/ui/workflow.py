"""Load, inspect and evaluate as background jobs, feeding their results into the session.

The chain for a model is load -> inventory -> evaluation (when data is set). The steps run one
after another, never side by side, because inspection hooks into the very module that
evaluation runs. Opening another model cancels whatever is still running for the previous one.

Text data is tokenized with the language model's tokenizer (studio.ui.text_data): opened
before the model is in, it waits for it; opening another language model tokenizes it again.
Data that does not go with the model (text for a CNN, images for a language model) is a
one-line error, and the session keeps no data that does not fit its model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from PySide6.QtCore import QObject, Signal

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.models import data as core_data
from studio.core.models import evaluate as core_evaluate
from studio.core.models import inventory as core_inventory
from studio.core.models import load as core_load
from studio.core.models import loaded as core_models
from studio.core.models.evaluate import is_causal_lm
from studio.core.models.loaders import UntrustedPickleError
from studio.core.models.text import TextSplits
from studio.ui import text_data
from studio.ui.runner import Job, JobRunner
from studio.ui.session import DETAIL, ERROR, WARNING, Session

UNTRUSTED_TEXT = (
    "This file can run code on your computer when loaded: it is a pickled Python object, "
    "not plain weights. Only load files from sources you trust.\n\n{path}\n\nLoad it anyway?"
)
ARCH, SHAPE = "architecture", "input shape"


@dataclass(frozen=True)
class ModelRequest:
    """What to load and with which extra facts the user supplied (for retries)."""

    spec: str
    arch: str | None = None
    input_shape: tuple[int, ...] | None = None
    trust_pickle: bool = False


def missing_fact(message: str, request: ModelRequest) -> str | None:
    """``ARCH`` or ``SHAPE`` when the loader asked for a fact the user can supply in a dialog.

    The loaders phrase these as CLI hints (``pass --arch NAME``, ``--input-shape``).
    """
    if "--arch" in message and request.arch is None:
        return ARCH
    if "--input-shape" in message and "contradicts" not in message:
        return SHAPE
    return None


class Workflow(QObject):
    """Starts the session's jobs on ``runner`` and applies their results to ``session``."""

    error = Signal(str, str)  # dialog title, one-line message
    model_loaded = Signal(str)  # the spec that was loaded (for recent files)
    confirm_untrusted = Signal(object, str)  # ModelRequest, question to ask before trusting
    needs_fact = Signal(object, str, str)  # ModelRequest, ARCH or SHAPE, the loader's message

    def __init__(self, session: Session, runner: JobRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self._handlers: dict[Job, tuple[str, Callable[[Any], None], str]] = {}
        self._load_job: Job | None = None
        self._load_request = ModelRequest("")
        self._inventory_job: Job | None = None
        self._eval_job: Job | None = None
        self._data_job: Job | None = None
        self._waiting_for_data: str | None = None  # a load that failed for want of a shape
        self._waiting_for_model: str | None = None  # text data opened before its model
        self._tokenizing: tuple[Job, str] | None = None  # the tokenization running, its spec
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)

    # --- commands ------------------------------------------------------------------------

    def open_model(self, spec: str | ModelRequest, trust_pickle: bool = False) -> Job:
        """Load ``spec`` ("demo", "zoo:NAME", a path, or a full request), then inspect and
        evaluate it."""
        request = spec if isinstance(spec, ModelRequest) else ModelRequest(spec)
        if trust_pickle:
            request = replace(request, trust_pickle=True)
        spec = request.spec
        for job in self.runner.jobs:  # scans, plans and pruning of the old model are of no use
            if job is not self._data_job:
                job.cancel()
        if self._tokenizing is not None and not self._tokenizing[0].done:
            job, text = self._tokenizing  # with the old model's tokenizer: again with the new
            job.cancel()
            self._waiting_for_model = text

        def load(progress: ProgressFn, cancel: CancelToken) -> core_models.LoadedModel:
            progress(0.0, f"reading {spec}")
            model = core_load.load_model(
                spec,
                arch=request.arch,
                input_shape=request.input_shape,
                trust_pickle=request.trust_pickle,
                progress=progress,
            )
            cancel.check()
            return model

        extras = [f"architecture {request.arch}"] if request.arch else []
        extras += [f"input {request.input_shape}"] if request.input_shape else []
        extras += ["trusting its pickled code"] if request.trust_pickle else []
        self.session.log(f"Loading model {spec}" + (f" ({', '.join(extras)})" if extras else ""))
        self._load_job = self._start(
            "Loading model",
            load,
            "Could not load the model",
            lambda m: self._on_model(spec, m),
            spec,
        )
        self._load_request = request
        return self._load_job

    def open_data(self, spec: str) -> Job | None:
        """Load a data set ("demo", a folder or an .npz; for a language model "demo-lm" or a
        text file) and evaluate the model on it. None when it waits for the model or does not
        go with it (an error)."""
        is_text = text_data.is_text_spec(spec)
        loading = self._load_job is not None and not self._load_job.done
        model = None if loading else self.session.model
        self._waiting_for_model = None
        if is_text and model is None:  # tokenized with the model's tokenizer, once it is in
            self._waiting_for_model = spec
            self.session.log(f"Text data {spec}: waiting for a language model to tokenize it")
            return None
        problem = text_data.pairing_problem(model, spec, is_text) if model else None
        if problem is not None:
            self._refuse_data(problem)
            return None
        for job in self.runner.jobs:  # everything measured on the old data is of no use
            if job not in (self._load_job, self._inventory_job):
                job.cancel()
        if is_text:
            assert model is not None
            return self._tokenize(model, spec)

        def load(progress: ProgressFn, cancel: CancelToken) -> core_data.DataSet:
            progress(0.0, f"reading {spec}")
            data = core_data.load_data(spec)
            cancel.check()
            return data

        self.session.log(f"Loading data {spec}")
        self._data_job = self._start(
            "Loading data", load, "Could not load the data", partial(self._on_data, spec), spec
        )
        return self._data_job

    def _tokenize(self, model: core_models.LoadedModel, spec: str) -> Job:
        seq_len = int(model.input_shape[-1])
        self.session.log(f"Tokenizing {spec} for {model.name} ({seq_len} tokens a sequence)")
        self._data_job = self._start(
            "Tokenizing text",
            text_data.tokenize_job(model, spec),
            "Could not load the text",
            lambda splits: self._on_text(model, spec, splits),
            spec,
            # no model runs, and the tokenizer is already here: a process of its own would
            # import transformers again to unpickle it (seconds), for a second's work
            isolate=False,
        )
        self._tokenizing = (self._data_job, spec)
        return self._data_job

    def _refuse_data(self, message: str) -> None:
        self.session.log(f"Could not use the data: {message}", ERROR)
        self.error.emit("Data does not fit the model", message)

    def evaluate(self) -> Job | None:
        """Evaluate the current model on the current data (after a running inspection)."""
        s = self.session
        if s.model is None or s.data is None:
            return None
        for pending in (self._load_job, self._inventory_job, self._data_job):
            if pending is not None and not pending.done:
                return None  # resumed when the new model's inventory (or the data) is in
        if self._eval_job is not None and not self._eval_job.done:
            self._eval_job.cancel()
        model, data = s.model, s.data
        # a causal LM's perplexity needs no reference (the model itself would agree 100 %)
        reference = None if data.labelled or is_causal_lm(model.module) else s.reference

        def run(progress: ProgressFn, cancel: CancelToken) -> core_evaluate.EvalResult:
            return core_evaluate.evaluate(
                model.module, data, reference=reference, progress=progress, cancel=cancel
            )

        self._eval_job = self._start(
            "Evaluating",
            run,
            "Evaluation failed",
            lambda r: self._on_evaluation(model, data, r),
            f"{model.name} on {data.name}",
        )
        return self._eval_job

    # --- results -------------------------------------------------------------------------

    def _on_model(self, spec: str, model: core_models.LoadedModel) -> None:
        s = self.session
        s.set_model(model)
        s.log(f"Loaded {model.name} ({model.kind}, input {model.input_shape})")
        for note in model.notes:
            s.log(note)
        if model.onnx_max_diff is not None:
            s.log(
                f"ONNX conversion checked against onnxruntime: max difference "
                f"{model.onnx_max_diff:.3g}"
            )
        for operation, reason in model.unsupported.items():
            s.log(f"{operation} is not available: {reason}", WARNING)
        self.model_loaded.emit(spec)
        self._fit_data(model)

        replica = model.replica()  # hooks go on a private copy: other jobs run the model

        def inspect(progress: ProgressFn, cancel: CancelToken) -> core_inventory.Inventory:
            return core_inventory.build_inventory(replica, progress=progress, cancel=cancel)

        self._inventory_job = self._start(
            "Inspecting layers",
            inspect,
            "Could not inspect the model",
            lambda inv: self._on_inventory(model, inv),
            model.name,
        )

    def _on_inventory(self, model: core_models.LoadedModel, inventory: Any) -> None:
        s = self.session
        if s.model is not model:
            return
        s.set_inventory(inventory)
        prunable = sum(1 for layer in inventory.layers if layer.prunable)
        s.log(
            f"Inventory: {len(inventory.layers)} layers, {prunable} prunable, "
            f"{len(inventory.groups)} dependency groups, {inventory.params:,} parameters, "
            f"{inventory.macs:,} MACs"
        )
        if inventory.graph_error:
            s.log(f"Structured pruning unavailable: {inventory.graph_error}", WARNING)

    def _fit_data(self, model: core_models.LoadedModel) -> None:
        """The data for a newly loaded model: text waiting for it is tokenized, text data of
        another language model is tokenized again, data that does not fit is dropped."""
        s = self.session
        waiting, self._waiting_for_model = self._waiting_for_model, None
        spec = waiting or (s.data_spec if s.is_text_data else None)
        if spec is not None and waiting is None:
            s.set_data(None)  # token ids of another tokenizer
        if spec is not None:
            problem = text_data.pairing_problem(model, spec, is_text=True)
            if problem is None:
                self._tokenize(model, spec)
            else:
                self._refuse_data(problem)
            return
        if s.data is not None and model.is_text:
            problem = text_data.pairing_problem(model, s.data_spec or s.data.name, is_text=False)
            s.set_data(None)
            if problem is not None:
                self._refuse_data(problem)

    def _on_text(self, model: core_models.LoadedModel, spec: str, splits: TextSplits) -> None:
        s = self.session
        if s.model is not model:
            return  # another model came in meanwhile: it tokenizes the text itself
        calibration, validation = splits.calibration, splits.validation
        s.set_data(validation, calibration, spec)
        s.log(
            f"Loaded text {text_data.display_name(spec)}: {len(validation):,} validation and "
            f"{len(calibration):,} calibration sequences of {validation.x.shape[1]} tokens "
            "(evaluation on validation; scans and training on calibration)"
        )
        self.evaluate()

    def _on_data(self, spec: str, data: core_data.DataSet) -> None:
        model, loading = self.session.model, self._load_job is not None and not self._load_job.done
        if model is not None and not loading:
            problem = text_data.pairing_problem(model, spec, is_text=False)
            if problem is not None:
                self._refuse_data(problem)
                return
        self.session.set_data(data, spec=spec)
        labels = f"{len(data.classes)} classes" if data.labelled else "unlabeled"
        self.session.log(f"Loaded data {data.name}: {len(data):,} samples, {labels}")
        waiting, self._waiting_for_data = self._waiting_for_data, None
        if waiting is not None and self.session.model is None:
            self._shape_from_data(waiting)
            return
        self.evaluate()

    def _shape_from_data(self, message: str) -> bool:
        """A model with dynamic inputs takes its input shape from the data (one sample, batch
        1), as the CLI does: loaded again at once if the data is in, or when it arrives if it
        is being read; False (ask the user) when there is no data."""
        data = self.session.data
        if data is None:
            pending = self._data_job is not None and not self._data_job.done
            if pending:
                self._waiting_for_data = message
                self.session.log(f"{message}: waiting for the data to say", WARNING)
            return pending
        shape = (1, *(int(d) for d in data.x.shape[1:]))
        self.session.log(
            f"The model's inputs are dynamic; input shape {','.join(map(str, shape))} "
            f"from the data ({data.name})"
        )
        self.open_model(replace(self._load_request, input_shape=shape))
        return True

    def _on_evaluation(self, model: Any, data: Any, result: Any) -> None:
        s = self.session
        if s.model is not model or s.data is not data:
            return
        s.set_evaluation(result)
        if result.perplexity is not None:
            s.log(
                f"Perplexity {result.perplexity:.3f} (loss {result.loss:.4f} nats a token) "
                f"on {result.samples:,} sequences"
            )
        elif result.accuracy is not None:
            s.log(
                f"Accuracy {result.accuracy:.2%}, loss {result.loss:.4f} "
                f"on {result.samples:,} samples"
            )
        else:
            s.log(
                f"Fidelity: agreement {result.agreement:.2%}, KL {result.kl:.4g}, "
                f"cosine {result.cosine:.4f} on {result.samples:,} samples"
            )

    # --- plumbing ------------------------------------------------------------------------

    def _start(
        self,
        name: str,
        fn: Callable[[ProgressFn, CancelToken], Any],
        title: str,
        on_result: Callable[[Any], None],
        subject: str,
        isolate: bool = True,
    ) -> Job:
        job = self.runner.start(name, fn, isolate=isolate)
        self._handlers[job] = (title, on_result, subject)
        return job

    def _on_finished(self, job: Job, result: object) -> None:
        entry = self._handlers.pop(job, None)
        if entry is not None:
            entry[1](result)
        if job is self._inventory_job:
            self._resume()

    def _resume(self) -> None:
        """Evaluate if the model and data are in but the evaluation is not."""
        if self.session.evaluation is None:
            self.evaluate()

    def _on_failed(self, job: Job, message: str) -> None:
        entry = self._handlers.pop(job, None)
        if entry is None:
            return
        title, _, subject = entry
        if job is self._load_job and isinstance(job.error, UntrustedPickleError):
            self.session.log(message, WARNING)
            self.confirm_untrusted.emit(self._load_request, UNTRUSTED_TEXT.format(path=subject))
            self._resume()
            return
        fact = missing_fact(message, self._load_request) if job is self._load_job else None
        if fact == SHAPE and self._shape_from_data(message):
            return
        if fact is not None:
            self.session.log(message, WARNING)
            self.needs_fact.emit(self._load_request, fact, message)
            self._resume()
            return
        self.session.log(f"{title}: {message}", ERROR)
        if job.traceback:
            self.session.log(job.traceback, DETAIL)
        self.error.emit(title, message)
        if job is self._inventory_job or job is self._load_job:
            self._resume()

    def _on_cancelled(self, job: Job) -> None:
        entry = self._handlers.pop(job, None)
        if entry is not None:
            self.session.log(f"{job.name} cancelled ({entry[2]})", WARNING)
        if job is self._load_job:
            self._resume()
