"""The speed check after Apply and fine-tuning: each new variant is timed against the original
in the background (:func:`studio.core.latency.speed_check.check_speed`, ONNX Runtime, batch 1,
side by side), the result is logged (a warning when the variant is not faster) and shown in one
line by the Result and Training tabs (:class:`studio.ui.widgets.speed_line.SpeedLine`), with the
fix, re-planning with runtime channels, one click away.

A language model from a Hugging Face folder is timed as it is used: prefill and decode with the
KV cache in PyTorch, in alternating turns with the original
(:func:`studio.core.latency.decode.compare_lm_latency`), shown through :class:`LMSpeedCheck`.
A check that fails hides the line (the log says why)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, Signal

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.decode import LMComparison, compare_lm_latency
from studio.core.latency.measure import default_threads
from studio.core.latency.speed_check import SpeedCheck, check_speed
from studio.ui.runner import Job, JobRunner
from studio.ui.session import INFO, WARNING, Session

KINDS = ("pruned", "fine-tuned")
NEW_TOKENS = 16  # generated per timed decode


@dataclass(frozen=True)
class LMSpeedCheck:
    """A language model's prefill and decode time against the original's, read by
    :class:`~studio.ui.widgets.speed_line.SpeedLine` as it reads a :class:`SpeedCheck`."""

    comparison: LMComparison
    off_path: tuple = ()  # no channel fix to offer

    @property
    def speedup(self) -> float:
        """The smaller of the prefill and decode speed-ups: faster only if both are."""
        c = self.comparison
        return min(c.prefill_speedup, c.decode_speedup or c.prefill_speedup)

    @property
    def faster(self) -> bool:
        return self.speedup >= 1.0

    def settings(self) -> str:
        a = self.comparison.after
        threads = f"{a.threads} thread{'s' * (a.threads != 1)}"
        return f"PyTorch with the KV cache, batch {a.batch}, {a.prompt_len}-token prompt, {threads}"

    def reason(self) -> str:
        if self.faster:
            return ""
        return (
            "the heads and neurons removed were not where the time goes at this size "
            "(embeddings, norms, the output layer and per-token overhead stay)"
        )

    def line(self) -> str:
        c = self.comparison
        b, a = c.before, c.after
        text = f"prefill {c.prefill_speedup:.2f}x ({b.prefill_ms:.3g} → {a.prefill_ms:.3g} ms)"
        if c.decode_speedup is not None and a.decode_ms is not None and b.decode_ms is not None:
            ms = f"{b.decode_ms:.3g} → {a.decode_ms:.3g} ms a token"
            text += f", decode {c.decode_speedup:.2f}x ({ms})"
        head = "faster than the original" if self.faster else "not faster than the original"
        return f"{head}: {text}; {self.settings()}"


class SpeedWatch(QObject):
    """Times every new pruned and fine-tuned model against the session's original."""

    checked = Signal(str, object)  # kind ("pruned" / "fine-tuned"), SpeedCheck | None (stale)
    checking = Signal(str)  # kind: a check started

    def __init__(self, session: Session, runner: JobRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.enabled = True
        self.results: dict[str, SpeedCheck] = {}
        self.jobs: dict[str, Job] = {}
        session.pruned_changed.connect(lambda r: self._changed("pruned", r))
        session.finetuned_changed.connect(lambda r: self._changed("fine-tuned", r))
        session.model_changed.connect(lambda _m: self._changed("pruned", None))
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)

    def _changed(self, kind: str, result: Any) -> None:
        stale = KINDS[KINDS.index(kind) :]  # a new pruned model makes its fine-tuning stale
        for key in stale:
            job = self.jobs.pop(key, None)
            if job is not None and not job.done:
                job.cancel()
            self.results.pop(key, None)
            self.checked.emit(key, None)
        if result is not None and self.enabled:
            self.check(kind, result.model)

    def check(self, kind: str, variant: Any) -> Job | None:
        """Time ``variant`` (a LoadedModel) against the session's model in the background."""
        original = self.session.model
        if original is None or variant is None:
            return None
        if getattr(self.session.pruned, "plan", None) is not None:
            if self.session.pruned.plan.method in ("unstructured", "nm"):
                return None  # zeros: a dense runtime is not faster, and nobody expects it

        if original.is_text and hasattr(original.module, "hf"):  # a language model
            prompt, threads = int(original.input_shape[-1]), default_threads()

            def work(progress: ProgressFn, cancel: CancelToken) -> Any:
                progress(0.0, "timing prefill and decode against the original")
                return compare_lm_latency(
                    original.module, variant.module, prompt_len=prompt, new_tokens=NEW_TOKENS,
                    threads=threads, progress=progress, cancel=cancel,
                )  # fmt: skip

            self.jobs[kind] = self.runner.start(f"Speed check ({kind})", work)
            self.checking.emit(kind)
            return self.jobs[kind]

        def work(progress: ProgressFn, cancel: CancelToken) -> SpeedCheck:
            progress(0.0, "timing against the original")
            return check_speed(original, variant, progress=progress, cancel=cancel)

        self.jobs[kind] = self.runner.start(f"Speed check ({kind})", work)
        self.checking.emit(kind)
        return self.jobs[kind]

    def _kind(self, job: Job) -> str | None:
        return next((k for k, j in self.jobs.items() if j is job), None)

    def _on_finished(self, job: Job, result: object) -> None:
        kind = self._kind(job)
        if isinstance(result, LMComparison):
            result = LMSpeedCheck(result)
        if kind is None or not isinstance(result, SpeedCheck | LMSpeedCheck):
            return
        self.results[kind] = result  # type: ignore[assignment]
        level = INFO if result.faster else WARNING
        self.session.log(f"Speed check, {kind}: {result.line()}", level)
        self.checked.emit(kind, result)

    def _on_failed(self, job: Job, message: str) -> None:
        kind = self._kind(job)
        if kind is not None:
            self.session.log(f"Speed check, {kind}, failed: {message}", WARNING)
            self.checked.emit(kind, None)  # no "timing…" line left behind
