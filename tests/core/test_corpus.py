"""Real-world architectures from other exporters (issue 19): every corpus model, exported by
torch.onnx as their projects export them, loads, loses at least a quarter of its MACs to
structured pruning, and goes back out as ONNX that ONNX Runtime runs with the original's input
and output names, dynamic dimensions and output shapes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from studio.core import isolation
from studio.core.errors import StudioError
from studio.core.models import corpus, graph
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.models.pruned_file import save_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in corpus.NAMES:
        corpus.export(name, folder / f"{name}.onnx")
    return folder


def uniform(model: LoadedModel, ratio: float) -> PruningPlan:
    return PruningPlan(
        "structured", ratios=dict.fromkeys(prune_targets(model, "structured"), ratio)
    )


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", corpus.NAMES)
def test_corpus_model_prunes_structurally_and_goes_back_out_as_onnx(corpus_dir, tmp_path, name):
    spec = corpus.MODELS[name]
    source = corpus_dir / f"{name}.onnx"
    model = load_model(str(source), input_shape=spec.input_shape)
    result = prune(model, uniform(model, 0.4))
    assert result.macs_after <= 0.75 * result.macs_before
    assert result.params_after < result.params_before
    # nothing is skipped without a reason a user can read
    assert all(r.startswith(("rolled back:", "left whole:")) for _, r in result.skipped)
    out = save_model(result.model, tmp_path / f"{name}-pruned.onnx")
    original, pruned = onnx.load(str(source)), onnx.load(str(out))
    assert [i.name for i in pruned.graph.input] == [spec.input_name]
    assert [o.name for o in pruned.graph.output] == [spec.output_name]
    assert dims(pruned.graph.input[0]) == dims(original.graph.input[0])
    opset = {o.domain: o.version for o in pruned.opset_import}.get("", 0)
    assert opset == max(spec.opset, 11)
    assert out.stat().st_size < 0.8 * source.stat().st_size
    # operations go back out as they came in (a HardSigmoid written as Mul, Add and Clip made
    # the re-exported MobileNetV3 1.3x slower in ONNX Runtime)
    ops = {n.op_type for n in pruned.graph.node}
    if "HardSigmoid" in {n.op_type for n in original.graph.node}:
        assert "HardSigmoid" in ops and "Clip" not in ops
    # the same input gives outputs of the same shape, at a second batch size too (and another
    # image size where the file allows one), and the pruned file runs as the pruned module
    before, after = session(source), session(out)
    for batch in (1, 3):
        x = corpus.synthetic_input(name, batch).numpy()
        want = before.run(None, {spec.input_name: x})[0]
        got = after.run(None, {spec.input_name: x})[0]
        assert got.shape == want.shape
        with torch.no_grad():
            mine = result.module(torch.from_numpy(x))
        assert np.allclose(got, mine.numpy(), atol=1e-4 * max(1.0, float(np.abs(got).max())))
    if 2 in spec.dynamic[spec.input_name] or 3 in spec.dynamic[spec.input_name]:
        shape = list(spec.input_shape)
        for axis in (2, 3):
            if axis in spec.dynamic[spec.input_name]:
                shape[axis] *= 2
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        want, got = (
            before.run(None, {spec.input_name: x})[0],
            after.run(None, {spec.input_name: x})[0],
        )
        assert got.shape == want.shape


def test_c2f_splits_and_attention_heads_become_prunable_groups(corpus_dir):
    yolo = load_model(str(corpus_dir / "yolo.onnx"), input_shape=(1, 3, 64, 64))
    assert any("split as one per part" in note for note in yolo.notes)
    result = prune(yolo, uniform(yolo, 0.4))
    assert result.skipped == []  # every C2f part prunes, the heads' output convs are left alone
    recogniser = load_model(str(corpus_dir / "recogniser.onnx"), input_shape=(1, 3, 32, 128))
    assert any("MatMul" in note for note in recogniser.notes)
    marked = {
        n: graph.head_layout(recogniser.module, n) for n, _ in recogniser.module.named_modules()
    }
    marked = {n: layout for n, layout in marked.items() if layout}
    assert len(marked) == 3 * 6 and set(marked.values()) == {(1, 4)}  # q, k and v of 6 blocks
    result = prune(recogniser, uniform(recogniser, 0.4))
    assert result.skipped == []
    for name in marked:  # every head keeps the same dimensions
        layer = dict(result.module.named_modules())[name]
        assert layer.out_features % 4 == 0 and layer.out_features < 96


def test_eager_split_concat_groups_are_left_whole_with_the_reason():
    # Torch-Pruning cannot follow channel indices through a chunk whose parts meet in a concat
    # (eager C2f): those groups are left whole and said so, the rest of the model is pruned
    module = corpus.build("yolo")
    model = LoadedModel(module, "yolo", "yolo", EAGER, (1, 3, 64, 64))
    result = prune(model, uniform(model, 0.4))
    assert result.macs_after < 0.75 * result.macs_before
    whole = {n: r for n, r in result.skipped if r.startswith("left whole:")}
    assert whole and all("channels" in r for r in whole.values())
    # the Layers table says why, for a layer no other group prunes (one whose input channels
    # another group removes is listed in that group)
    layers = {layer.name: layer for layer in build_inventory(model).layers}
    assert all(
        layers[name].reason == reason if layers[name].group is None else not layers[name].reason
        for name, reason in whole.items()
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert result.module(x).shape == module(x).shape == (2, 12, 80)  # 4 box sides + 8 classes


def test_eager_attention_reshaped_into_heads_prunes_per_head():
    module = corpus.build("recogniser")
    model = LoadedModel(module, "recogniser", "recogniser", EAGER, (1, 3, 32, 128))
    result = prune(model, uniform(model, 0.4))
    assert result.skipped == []
    q = result.module.blocks[0].attn.q
    assert q.out_features % 4 == 0 and q.out_features < 96
    with torch.no_grad():
        assert result.module(torch.randn(2, 3, 32, 128)).shape == (2, 32, 40)


def test_deep_model_info_is_bounded_and_a_graph_over_budget_refuses_in_one_line(
    corpus_dir, monkeypatch
):
    model = load_model(str(corpus_dir / "recogniser.onnx"), input_shape=(1, 3, 32, 128))
    began = time.monotonic()
    inventory = build_inventory(model)
    assert time.monotonic() - began < 60
    assert inventory.groups
    # a graph that takes longer than the budget: refused in one line, and the inventory still
    # lists the layers (without groups) instead of hanging
    monkeypatch.setattr(graph, "GRAPH_BUDGET_S", 0.0)
    monkeypatch.setattr(graph, "_traced_groups", lambda *a: time.sleep(5))
    with pytest.raises(StudioError, match=r"took longer than 0 s") as error:
        graph.traced_groups(model.module, model.example_input())
    assert "\n" not in str(error.value)
    inventory = build_inventory(model)
    assert not inventory.groups and inventory.layers


@pytest.mark.skipif(not isolation.available(), reason="no forkserver here")
def test_an_onnx_import_runs_in_an_isolated_job(corpus_dir):
    # the job's child unpickles onnx2torch modules; onnx2torch imports torchvision, which the
    # studio stands in for (the window's jobs failed with "No module named 'torchvision'")
    model = load_model(str(corpus_dir / "efficientnet.onnx"))
    x = corpus.synthetic_input("efficientnet", 2)

    def job(progress, cancel):
        with torch.no_grad():
            return model.module(x)

    out = isolation.run_isolated("evaluation", job)
    with torch.no_grad():
        assert torch.allclose(out, model.module(x))


def test_folded_batch_norms_are_re_estimated_by_matching_channel_statistics(tmp_path):
    # an exporter folds batch norms into the convolutions; after pruning, the studio gives
    # each convolution's channels the unpruned model's mean and deviation on the data, as
    # re-estimating the batch norms would (without it, the pruned demo falls to chance)
    import warnings

    from studio.core.models.data import demo_splits

    demo = load_model("demo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            demo.module, (demo.example_input(),), tmp_path / "folded.onnx", dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        )  # fmt: skip
    model = load_model(str(tmp_path / "folded.onnx"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.module.modules())
    train, val = demo_splits()
    ratios = dict.fromkeys(prune_targets(model, "structured"), 0.3)
    plain = prune(model, PruningPlan("structured", ratios=ratios, recalibrate_bn=False), val)
    matched = prune(model, PruningPlan("structured", ratios=ratios), val, calibration=train)
    assert any("rescaled to the unpruned model's channel statistics" in n for n in matched.notes)
    assert plain.quality_after.accuracy < 0.3 < 0.5 < matched.quality_after.accuracy
    # a convolution whose channels were pruned now has, on the data, the statistics its kept
    # channels had before
    name = "layers/layers/0/conv1/Conv"
    stats = {}
    for key, module in (("before", model.module), ("after", matched.module)):
        layer = dict(module.named_modules())[name]
        handle = layer.register_forward_hook(lambda m, i, o, key=key: stats.update({key: o}))
        with torch.no_grad():
            module(train.x[:256])
        handle.remove()
    after = stats["after"].transpose(0, 1).flatten(1)
    before = stats["before"].transpose(0, 1).flatten(1)
    assert after.shape[0] < before.shape[0]
    # each kept channel's mean and deviation are one of the unpruned channels' (same data)
    gap = (after.mean(1)[:, None] - before.mean(1)[None, :]).abs() + (
        after.std(1)[:, None] - before.std(1)[None, :]
    ).abs()
    assert float(gap.min(1).values.max()) < 1e-3
