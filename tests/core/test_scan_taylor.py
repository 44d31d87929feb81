"""The taylor scan's gradient pass: the batch-norm gate identity it relies on, and no trace left."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studio.core.models import graph
from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.scan.sensitivity import scan
from studio.core.scan.taylor import TAYLOR_BATCH, batch_norm_gates, taylor_pass
from studio.core.scan.types import ScanSettings


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def test_gate_terms_equal_activation_times_gradient(demo) -> None:
    """gamma dL/dgamma + beta dL/dbeta of a channel = sum of a dL/da over the batch norm's
    output map: the estimate of zeroing that output, i.e. of removing the channel."""
    data = demo_splits()[1].subset(TAYLOR_BATCH)
    module = demo.module
    x = demo.example_input()
    _, groups = graph.traced_groups(module, x, ignored=graph.output_layers(module, x))
    targets = {info.root: group for info, group in groups}
    _, _, sums = taylor_pass(module, data, targets, structured=True, cancel=None)

    outputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: outputs.__setitem__(mod, out))
        for m in module.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(module(data.x), data.y)
            for out in outputs.values():
                out.retain_grad()
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        module.zero_grad(set_to_none=True)
    checked = 0
    for name, group in targets.items():
        gates = batch_norm_gates(group)
        assert gates, f"{name}: every ResNet-20 group prunes a batch norm"
        direct = torch.zeros_like(sums[name], dtype=torch.float64)
        for bn, idxs, root_idxs in gates:
            a = outputs[bn]
            per_channel = (a * a.grad).sum((0, 2, 3)).double()
            direct.index_add_(0, root_idxs, per_channel[idxs])
        expected = 0.5 * TAYLOR_BATCH * direct**2
        assert torch.allclose(sums[name], expected, rtol=1e-3, atol=1e-9), name
        checked += 1
    assert checked == len(targets) == 12


def test_pass_leaves_the_model_as_it_was(demo) -> None:
    data = demo_splits()[1].subset(80)
    before = {k: v.clone() for k, v in demo.module.state_dict().items()}
    flags = [p.requires_grad for p in demo.module.parameters()]
    report = scan(
        demo, data, ScanSettings(method="taylor", metric="loss", ratios=(0.5,)), use_cache=False
    )
    assert len(report.rows) == 12
    for key, value in demo.module.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert value.is_contiguous(), f"{key} left in channels-last format"
    assert [p.requires_grad for p in demo.module.parameters()] == flags
    assert all(p.grad is None for p in demo.module.parameters())


def test_groups_without_batch_norm_use_their_weights() -> None:
    vit = load_model("zoo:vit")
    data = torch.randn(16, *vit.input_shape[1:])
    from studio.core.models.data import DataSet

    report = scan(
        vit,
        DataSet(data, torch.randint(0, 10, (16,)), "random"),
        ScanSettings(method="taylor", metric="loss", ratios=(0.3, 0.9)),
        use_cache=False,
    )
    assert report.rows and all(r.estimate for r in report.rows)
    for target in report.targets:
        low, high = (report.drop(r) for r in report.rows if r.layer == target.name)
        assert high >= low >= 0
    assert any(report.drop(r) > 0 for r in report.rows)
