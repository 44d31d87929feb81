from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from studio.core.errors import StudioError
from studio.core.models import graph, zoo
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.core.models.loaded import EAGER, LoadedModel


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


def _tiny() -> LoadedModel:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Block(8),
        Block(8),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    return LoadedModel(net.eval(), "tiny", "tiny", EAGER, (1, 3, 10, 12))


def test_macs_params_and_shapes_by_hand() -> None:
    inv = build_inventory(_tiny())
    by = {layer.name: layer for layer in inv.layers}
    assert by["0"].macs == 8 * 10 * 12 * 3 * 3 * 3 and by["0"].output_shape == (1, 8, 10, 12)
    assert by["3.conv"].macs == 8 * 10 * 12 * 8 * 9 and by["3.conv"].params == 8 * 8 * 9
    assert by["1"].macs == 8 * 10 * 12  # batch norm: one MAC per element
    assert by["8"].macs == 4 * 5 and by["8"].output_shape == (1, 5)
    assert inv.params == sum(p.numel() for p in _tiny().module.parameters())
    assert inv.params == sum(layer.params for layer in inv.layers)
    assert inv.macs == sum(layer.macs for layer in inv.layers)


def test_residual_layers_share_one_group_and_output_layer_is_not_a_root() -> None:
    inv = build_inventory(_tiny())
    by = {layer.name: layer for layer in inv.layers}
    # conv 0, both residual convs and their batch norms are tied by the adds
    assert by["0"].group == by["3.conv"].group == by["4.bn"].group is not None
    assert by["5"].group != by["0"].group and by["5"].prunable
    assert "8" not in inv.groups[by["8"].group].members  # classes are never removed
    assert "8" in inv.groups[by["8"].group].consumers
    assert not by["2"].prunable and by["2"].reason == "no weights"


def test_sparsity_counts_exact_zeros() -> None:
    model = _tiny()
    with torch.no_grad():
        model.module[3].conv.weight[:4] = 0.0
    inv = build_inventory(model)
    assert {layer.name: layer for layer in inv.layers}["3.conv"].sparsity == pytest.approx(0.5)
    assert 0 < inv.sparsity < 0.5


def test_graph_failure_still_gives_inventory(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise StudioError("the dependency graph could not be built: boom")

    monkeypatch.setattr(graph, "build_graph", broken)
    inv = build_inventory(_tiny())
    assert inv.graph_error and "boom" in inv.graph_error
    assert inv.params > 0 and not any(layer.prunable for layer in inv.layers)
    assert all("boom" in layer.reason for layer in inv.layers if layer.params)


def test_lstm_macs_follow_gate_equations() -> None:
    inv = build_inventory(load_model("zoo:lstm"))
    lstm = next(layer for layer in inv.layers if layer.type == "LSTM")
    mod = dict(load_model("zoo:lstm").module.named_modules())[lstm.name]
    steps, h = 32, mod.hidden_size
    expected, size = 0, mod.input_size
    for _ in range(mod.num_layers):
        expected += 4 * h * (size + h) * steps
        size = h
    assert lstm.macs == expected


@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_architecture_gets_a_consistent_inventory(name: str) -> None:
    model = load_model(f"zoo:{name}")
    inv = build_inventory(model)
    assert inv.params == sum(p.numel() for p in model.module.parameters())
    assert inv.params == sum(layer.params for layer in inv.layers)
    assert inv.macs == sum(layer.macs for layer in inv.layers) > 0
    weighted = [m for m in model.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len([layer for layer in inv.layers if layer.type in ("Conv2d", "Linear")]) == len(
        weighted
    )
    for layer in inv.layers:
        assert layer.prunable == (layer.group is not None)
        assert layer.prunable or layer.reason


def test_vit_attention_products_are_counted() -> None:
    inv = build_inventory(load_model("zoo:vit"))
    linear = sum(layer.macs for layer in inv.layers if layer.type == "Linear")
    conv = sum(layer.macs for layer in inv.layers if layer.type == "Conv2d")
    norms = sum(layer.macs for layer in inv.layers if layer.type == "LayerNorm")
    assert inv.macs - linear - conv - norms > 0  # q@k^T and attn@v live in the attention module


def test_lstm_is_reported_not_prunable_with_reason_and_vit_tokens_are_grouped() -> None:
    lstm = {layer.type: layer for layer in build_inventory(load_model("zoo:lstm")).layers}
    assert not lstm["LSTM"].prunable and "unstructured" in lstm["LSTM"].reason
    vit = build_inventory(load_model("zoo:vit"))
    tokens = next(layer for layer in vit.layers if layer.name == "(model)")
    embed = next(layer for layer in vit.layers if layer.name == "patch_embed")
    assert tokens.group == embed.group is not None  # class token and embedding share channels


def test_mac_count_ignores_forward_passes_in_other_threads() -> None:
    import threading

    from studio.core.models.load import load_model

    model = load_model("zoo:resnet20")
    alone = build_inventory(model).macs
    other = model.replica().module.eval()  # same names: FlopCounterMode would mix them up
    stop = threading.Event()

    def busy() -> None:
        with torch.no_grad():
            while not stop.is_set():
                other(torch.randn(2, *model.input_shape[1:]))

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        counts = [build_inventory(model.replica()).macs for _ in range(3)]
    finally:
        stop.set()
        worker.join()
    assert counts == [alone] * 3
