"""Evaluation: accuracy and loss on labelled data, fidelity to a reference model otherwise."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models.data import DataSet


@dataclass(frozen=True)
class EvalResult:
    """Quality of a model on a data set; fields that do not apply are ``None``."""

    samples: int
    accuracy: float | None = None
    loss: float | None = None
    agreement: float | None = None  # top-1 agreement with the reference model
    kl: float | None = None  # mean KL(reference || model) over samples
    cosine: float | None = None  # mean cosine similarity of output vectors
    perplexity: float | None = None  # causal LMs: exp(mean next-token cross-entropy)

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict(
    model: torch.nn.Module,
    data: DataSet,
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Outputs of ``model`` for every input of ``data``, stacked on the CPU, as float32."""
    device = device or default_device()
    if hasattr(model, "eval"):
        model.eval()
    outputs = []
    n = len(data)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            check(cancel)
            xb = data.x[start : start + batch_size].to(device)
            try:
                out = model(xb)
            except Exception as exc:  # a shape or dtype mismatch between model and data
                raise StudioError(
                    f"the model cannot run on {data.name} (inputs {tuple(xb.shape)}): "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
            if isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise StudioError("the model's output is not a tensor; cannot evaluate it")
            outputs.append(out.detach().float().reshape(out.shape[0], -1).cpu())
            report(progress, min(start + batch_size, n) / n, f"{min(start + batch_size, n)}/{n}")
    return torch.cat(outputs) if outputs else torch.empty(0)


def evaluate(
    model: torch.nn.Module,
    data: DataSet,
    reference: torch.nn.Module | None = None,
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> EvalResult:
    """Accuracy and loss when ``data`` is labelled; agreement, KL and cosine with ``reference``.

    Unlabeled data without a reference cannot be scored and raises a clear error.
    """
    if len(data) == 0:
        raise StudioError(f"data set {data.name} is empty")
    if is_causal_lm(model):
        return evaluate_lm(model, data, reference, progress=progress, cancel=cancel)
    if not data.labelled and reference is None:
        raise StudioError(
            f"{data.name} has no labels: give a reference model to measure fidelity against"
        )
    device = default_device()
    model = model.to(device) if hasattr(model, "to") else model
    share = 0.5 if reference is not None else 1.0
    logits = predict(model, data, batch_size, _slice(progress, 0.0, share), cancel, device)
    result: dict[str, float | None] = {}
    if data.y is not None:
        if logits.shape[1] <= int(data.y.max()):
            raise StudioError(
                f"the model has {logits.shape[1]} outputs but {data.name} has labels up to "
                f"{int(data.y.max())}"
            )
        result["accuracy"] = float((logits.argmax(1) == data.y).float().mean())
        result["loss"] = float(F.cross_entropy(logits, data.y))
    if reference is not None:
        reference = reference.to(device) if hasattr(reference, "to") else reference
        ref = predict(reference, data, batch_size, _slice(progress, share, 1.0), cancel, device)
        if ref.shape != logits.shape:
            raise StudioError(
                f"model and reference disagree in output shape: {tuple(logits.shape[1:])} vs "
                f"{tuple(ref.shape[1:])}"
            )
        result.update(fidelity(logits, ref))
    return EvalResult(samples=len(data), **result)


def fidelity(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, mean KL(reference || model) and mean cosine similarity of outputs."""
    agreement = float((logits.argmax(1) == reference.argmax(1)).float().mean())
    kl = F.kl_div(
        F.log_softmax(logits, 1),
        F.log_softmax(reference, 1),
        log_target=True,
        reduction="batchmean",
    )
    cosine = F.cosine_similarity(logits, reference, dim=1).mean()
    return {"agreement": agreement, "kl": float(kl), "cosine": float(cosine)}


def is_causal_lm(model: object) -> bool:
    """A language model whose output is next-token logits (studio.core.models.hf)."""
    return getattr(model, "studio_task", None) == "causal-lm"


LM_BATCH = 8


def lm_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    reference_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums over the predicted positions of one batch of token ids: next-token
    cross-entropy ("nll"), and with the reference's logits, top-1 agreement and
    KL(reference || model)."""
    logits = model(ids).float()[:, :-1]
    target = ids[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    )
    out = {"nll": nll.view(target.shape).sum(1), "logits": logits}
    if reference_logits is not None:
        ref = reference_logits
        out["agree"] = (logits.argmax(-1) == ref.argmax(-1)).float().sum(1)
        out["kl"] = (
            F.kl_div(
                F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="none"
            )
            .sum(-1)
            .sum(1)
        )
    return out


def evaluate_lm(
    model: torch.nn.Module,
    data: DataSet,
    reference: torch.nn.Module | None = None,
    batch_size: int = LM_BATCH,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> EvalResult:
    """Perplexity of a causal LM on token-id sequences (every position predicts the next
    token); with ``reference``, next-token top-1 agreement and KL against it per token."""
    if data.x.dtype not in (torch.int64, torch.int32):
        raise StudioError(f"{data.name} is not text: a language model needs token ids")
    device = default_device()
    model = model.to(device).eval()
    if reference is not None:
        reference = reference.to(device).eval()
    n = len(data)
    sums = {"nll": 0.0, "agree": 0.0, "kl": 0.0}
    positions = 0
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            check(cancel)
            ids = data.x[start : start + batch_size].to(device)
            ref = None if reference is None else reference(ids).float()[:, :-1]
            try:
                out = lm_losses(model, ids, ref)
            except Exception as exc:  # a vocabulary or length the model does not take
                raise StudioError(
                    f"the model cannot run on {data.name} (tokens {tuple(ids.shape)}): "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
            for key in sums:
                if key in out:
                    sums[key] += float(out[key].sum())
            positions += ids.shape[0] * (ids.shape[1] - 1)
            report(progress, min(start + batch_size, n) / n, f"{min(start + batch_size, n)}/{n}")
    loss = sums["nll"] / max(1, positions)
    result: dict[str, float | None] = {"loss": loss, "perplexity": float(math.exp(min(loss, 50)))}
    if reference is not None:
        result["agreement"] = sums["agree"] / max(1, positions)
        result["kl"] = sums["kl"] / max(1, positions)
    return EvalResult(samples=n, **result)


def _slice(progress: ProgressFn | None, start: float, end: float) -> ProgressFn | None:
    from studio.core.jobs import sub_progress

    return sub_progress(progress, start, end)
