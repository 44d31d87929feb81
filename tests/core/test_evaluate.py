from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken
from studio.core.models.data import DataSet
from studio.core.models.evaluate import evaluate


class Pick(nn.Module):
    """Logits = inputs: the predicted class is the argmax of the input vector."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3.0


def _data(labelled: bool = True) -> DataSet:
    x = torch.eye(4).repeat(25, 1)  # 100 samples, class i is one-hot i
    y = torch.arange(4).repeat(25)
    y[:10] = (y[:10] + 1) % 4  # 10 of 100 labels are wrong: accuracy 0.9
    return DataSet(x, y if labelled else None, "onehot")


def test_accuracy_and_loss_are_exact() -> None:
    result = evaluate(Pick(), _data(), batch_size=7)
    assert result.samples == 100
    assert result.accuracy == pytest.approx(0.9)
    expected = nn.functional.cross_entropy(_data().x * 3.0, _data().y).item()
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.agreement is None


def test_fidelity_against_reference() -> None:
    same = evaluate(Pick(), _data(labelled=False), reference=Pick())
    assert same.agreement == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6)
    assert same.cosine == pytest.approx(1.0) and same.accuracy is None
    flipped = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        flipped.weight.copy_(torch.eye(4).flip(0))
    other = evaluate(flipped, _data(labelled=False), reference=Pick())
    assert other.agreement == 0.0 and other.kl > 0.5


def test_unlabeled_without_reference_is_refused() -> None:
    with pytest.raises(StudioError, match="no labels"):
        evaluate(Pick(), _data(labelled=False))


def test_progress_reaches_one_and_cancel_stops() -> None:
    seen: list[float] = []
    evaluate(Pick(), _data(), batch_size=10, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) == 10
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        evaluate(Pick(), _data(), cancel=token)


def test_shape_mismatch_is_one_clear_line() -> None:
    with pytest.raises(StudioError, match="cannot run on") as info:
        evaluate(nn.Linear(7, 2), _data())
    assert "\n" not in str(info.value)
