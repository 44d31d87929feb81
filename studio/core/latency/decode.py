"""Latency of Hugging Face text models on this machine: prefill (one forward pass over the
prompt) and decode (per generated token, greedy, with the KV cache), and the two side by side.

A causal LM (a transformers model that can generate, bare or as the studio's wrapper that keeps
it as ``.hf``) is timed in torch as generation runs it: the prompt ``[batch, prompt_len]`` in one
forward pass that fills the cache (``prefill_ms``), then ``new_tokens`` forward passes of one
token each (``use_cache=True`` with ``past_key_values``), each token the argmax of the last
logits (``decode_ms``, per token; ``tokens_per_s = batch * 1000 / decode_ms``). Other models
(encoders, classifiers) have a prefill only: ``module(input_ids)`` over the sequence, and
``sequences_per_s = batch * 1000 / prefill_ms``.

With ``backend="onnxruntime"`` the prefill is the exported file (``studio.core.export.hf_onnx``:
``input_ids`` in, no cache) run in ONNX Runtime; decoding without a cache would recompute the
whole sequence for every token, which is not what a runtime with a cache does, so ``decode_ms``
is None and a note says so.

Timing follows :mod:`studio.core.latency.measure`: warm-up first, then the median over
``repeats`` (each one a prefill and, for causal LMs, a whole decode), at a given number of threads
(torch's intra-op threads set and restored; ONNX Runtime's ``intra_op_num_threads``).
:func:`compare_lm_latency` times two models in alternating turns (A B B A A B ...) so that both
see the same machine load, and gives the speed-ups.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.latency.measure import torch_threads
from studio.core.models import onnx_io

__all__ = [
    "BACKENDS",
    "LMComparison",
    "LMLatency",
    "compare_lm_latency",
    "max_positions",
    "measure_lm_latency",
    "transformers_model",
]

BACKENDS = ("torch", "onnxruntime")
CAUSAL, ENCODER = "causal-lm", "encoder"
REPEATS = 5
WARMUP = 2  # untimed repeats before the timed ones
NO_CACHE_NOTE = (
    "decode latency is not measured in ONNX Runtime: the exported file has no KV cache, so each "
    "token would recompute the whole sequence; measure decode with the torch backend"
)


@dataclass(frozen=True)
class LMLatency:
    """Prefill and decode latency of one text model (medians over ``repeats``)."""

    kind: str  # causal-lm (prefill and decode) or encoder (prefill only)
    backend: str
    prefill_ms: float  # one forward pass over [batch, prompt_len]
    decode_ms: float | None  # per generated token, with the KV cache; None: not measured
    tokens_per_s: float | None  # batch * 1000 / decode_ms
    sequences_per_s: float  # batch * 1000 / prefill_ms
    batch: int
    prompt_len: int
    new_tokens: int  # 0 where decode is not measured
    threads: int
    repeats: int
    prefill_runs: tuple[float, ...] = ()  # every timed prefill, ms
    decode_runs: tuple[float, ...] = ()  # every timed decode, ms per token
    seconds: float = 0.0  # wall time of the measurement, warm-up included
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        text = (
            f"prefill {self.prefill_ms:.3g} ms ({self.batch} x {self.prompt_len} tokens, "
            f"{self.sequences_per_s:.3g} sequences/s)"
        )
        if self.decode_ms is not None and self.tokens_per_s is not None:
            text += f", decode {self.decode_ms:.3g} ms/token ({self.tokens_per_s:.3g} tokens/s)"
        return f"{text}, {self.backend}, {self.threads} thread{'s' * (self.threads != 1)}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LMComparison:
    """Two models timed in alternating turns; speed-ups are before / after (above 1: faster)."""

    before: LMLatency
    after: LMLatency
    prefill_speedup: float
    decode_speedup: float | None
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        text = f"prefill {self.prefill_speedup:.2f}x"
        if self.decode_speedup is not None:
            text += f", decode {self.decode_speedup:.2f}x"
        threads = self.after.threads
        return f"{text} faster ({self.after.backend}, {threads} thread{'s' * (threads != 1)})"

    def to_dict(self) -> dict[str, Any]:
        """Both measurements and the speed-ups, with the conditions they share at the top."""
        shared = {k: getattr(self.after, k) for k in ("backend", "threads", "batch", "prompt_len")}
        return {**asdict(self), **shared}


def measure_lm_latency(
    module: nn.Module,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch: int = 1,
    threads: int = 1,
    repeats: int = REPEATS,
    backend: str = "torch",
    onnx_path: str | Path | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> LMLatency:
    """Prefill and decode latency of ``module`` (see the module docstring); ``onnx_path`` is the
    exported file, for ``backend="onnxruntime"``."""
    began = time.perf_counter()
    _check_counts(prompt_len, new_tokens, batch, threads, repeats)
    with torch_threads(threads):
        runner = _Runner(module, backend, onnx_path, prompt_len, new_tokens, batch, threads)
        report(progress, 0.0, "warming up")
        for _ in range(WARMUP):
            check(cancel)
            runner.once()
        for i in range(repeats):
            check(cancel)
            runner.record(runner.once())
            report(progress, (i + 1) / repeats, "timing")
    return runner.result(time.perf_counter() - began)


def compare_lm_latency(
    before: nn.Module,
    after: nn.Module,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch: int = 1,
    threads: int = 1,
    repeats: int = REPEATS,
    backend: str = "torch",
    before_onnx: str | Path | None = None,
    after_onnx: str | Path | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> LMComparison:
    """:func:`measure_lm_latency` of two models, in turns (A B, then B A, ...: neither always
    goes first), so that a machine whose load changes slows both alike."""
    began = time.perf_counter()
    _check_counts(prompt_len, new_tokens, batch, threads, repeats)
    with torch_threads(threads):
        args = (prompt_len, new_tokens, batch, threads)
        runners = [
            _Runner(before, backend, before_onnx, *args),
            _Runner(after, backend, after_onnx, *args),
        ]
        if runners[0].kind != runners[1].kind:
            raise StudioError("compare two models of one kind: a causal LM with a causal LM")
        report(progress, 0.0, "warming up")
        for _ in range(WARMUP):
            for runner in runners:
                check(cancel)
                runner.once()
        for i in range(repeats):
            for runner in runners if i % 2 == 0 else runners[::-1]:
                check(cancel)
                runner.record(runner.once())
            report(progress, (i + 1) / repeats, "timing")
    seconds = time.perf_counter() - began
    a, b = (runner.result(seconds) for runner in runners)
    decode = None
    if a.decode_ms is not None and b.decode_ms is not None and b.decode_ms > 0:
        decode = a.decode_ms / b.decode_ms
    return LMComparison(a, b, a.prefill_ms / b.prefill_ms if b.prefill_ms > 0 else 0.0, decode)


def transformers_model(module: nn.Module | None) -> nn.Module | None:
    """The transformers model in ``module``: itself, or the wrapper's ``.hf``; None if neither."""
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return module
    hf = getattr(module, "hf", None)
    return hf if isinstance(hf, PreTrainedModel) else None


def max_positions(hf: nn.Module | None) -> int | None:
    """The longest sequence the model's position embeddings allow (None: not known)."""
    config = getattr(hf, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(hf: nn.Module | None) -> int | None:
    """Token ids the model takes: ``0 .. vocab_size - 1`` (None: not known)."""
    value = getattr(getattr(hf, "config", None), "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


# ---- one model's runs -------------------------------------------------------------------------


class _Runner:
    """One model, ready to time: ``once()`` is one repeat (prefill ms, decode ms per token)."""

    def __init__(
        self,
        module: nn.Module,
        backend: str,
        onnx_path: str | Path | None,
        prompt_len: int,
        new_tokens: int,
        batch: int,
        threads: int,
    ) -> None:
        if backend not in BACKENDS:
            raise StudioError(f"unknown backend {backend!r}: choose {' or '.join(BACKENDS)}")
        self.hf = transformers_model(module)
        self.kind = CAUSAL if self.hf is not None and self.hf.can_generate() else ENCODER
        self.backend, self.batch, self.threads = backend, batch, threads
        self.prompt_len = prompt_len
        self.new_tokens = new_tokens if self.kind == CAUSAL and backend == "torch" else 0
        self.notes: list[str] = []
        if self.kind == CAUSAL and backend == "onnxruntime":
            self.notes.append(NO_CACHE_NOTE)
        limit = max_positions(self.hf)
        if limit is not None and prompt_len + self.new_tokens > limit:
            raise StudioError(
                f"the model takes at most {limit} positions: {prompt_len} prompt tokens and "
                f"{self.new_tokens} new ones do not fit"
            )
        generator = torch.Generator().manual_seed(0)
        vocab = vocab_size(self.hf) or 2
        self.ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator)
        self.prefill_runs: list[float] = []
        self.decode_runs: list[float] = []
        self.once: Callable[[], tuple[float, float | None]]
        if backend == "onnxruntime":
            self.once = self._onnx(onnx_path)
        elif self.kind == CAUSAL:
            self.once = self._generate
        else:
            self.once = _forward(module, self.ids)

    def _onnx(self, onnx_path: str | Path | None) -> Callable[[], tuple[float, None]]:
        if onnx_path is None:
            raise StudioError("the onnxruntime backend needs the exported ONNX file (onnx_path)")
        if not Path(onnx_path).is_file():
            raise StudioError(f"ONNX file {onnx_path} does not exist")
        sess = onnx_io.session(str(onnx_path), self.threads)
        feed = {sess.get_inputs()[0].name: self.ids.numpy().astype(np.int64)}

        def once() -> tuple[float, None]:
            start = time.perf_counter()
            sess.run(None, feed)
            return (time.perf_counter() - start) * 1e3, None

        return once

    def _generate(self) -> tuple[float, float]:
        """Prefill, then ``new_tokens`` greedy steps with the cache."""
        hf = self.hf
        assert hf is not None
        name = cache_argument(hf)
        with torch.inference_mode():
            start = time.perf_counter()
            out = hf(input_ids=self.ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            prefilled = time.perf_counter()
            cache = getattr(out, name)
            for _ in range(self.new_tokens):
                out = hf(input_ids=token, use_cache=True, **{name: cache})
                cache = getattr(out, name)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            done = time.perf_counter()
        return (prefilled - start) * 1e3, (done - prefilled) * 1e3 / self.new_tokens

    def record(self, times: tuple[float, float | None]) -> None:
        prefill, decode = times
        self.prefill_runs.append(prefill)
        if decode is not None:
            self.decode_runs.append(decode)

    def result(self, seconds: float) -> LMLatency:
        prefill = statistics.median(self.prefill_runs)
        decode = statistics.median(self.decode_runs) if self.decode_runs else None
        return LMLatency(
            kind=self.kind,
            backend=self.backend,
            prefill_ms=prefill,
            decode_ms=decode,
            tokens_per_s=self.batch * 1e3 / decode if decode else None,
            sequences_per_s=self.batch * 1e3 / prefill if prefill > 0 else 0.0,
            batch=self.batch,
            prompt_len=self.prompt_len,
            new_tokens=self.new_tokens,
            threads=self.threads,
            repeats=len(self.prefill_runs),
            prefill_runs=tuple(self.prefill_runs),
            decode_runs=tuple(self.decode_runs),
            seconds=seconds,
            notes=tuple(self.notes),
        )


def _forward(module: nn.Module, ids: torch.Tensor) -> Callable[[], tuple[float, None]]:
    """One timed ``module(ids)``: the prefill of a model without a decode."""

    def once() -> tuple[float, None]:
        with torch.inference_mode():
            start = time.perf_counter()
            module(ids)
            return (time.perf_counter() - start) * 1e3, None

    return once


def _check_counts(prompt_len: int, new_tokens: int, batch: int, threads: int, repeats: int) -> None:
    for name, value, least in (
        ("prompt length", prompt_len, 1),
        ("number of new tokens", new_tokens, 1),
        ("batch size", batch, 1),
        ("thread count", threads, 1),
        ("number of repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise StudioError(f"the {name} must be a positive integer, not {value!r}")


def cache_argument(hf: torch.nn.Module) -> str:
    """What the model's forward calls its KV cache: ``cache`` since transformers 5.2x (where
    ``past_key_values`` still works but warns that it will go), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
