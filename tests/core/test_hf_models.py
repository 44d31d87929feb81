"""Hugging Face folders: loading (safe, local only), text data, perplexity and cosine, the
head/MLP/layer scan, allocation and pruning through the engine."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from studio.core.errors import StudioError
from studio.core.models import hf_zoo
from studio.core.models.evaluate import evaluate
from studio.core.models.load import load_model
from studio.core.models.loaded import HUGGINGFACE
from studio.core.models.text import load_text_data, split_text


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: hf_zoo.write_folder(f, root / f) for f in hf_zoo.FAMILIES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(hf_zoo.corpus_text()[:60_000])
    return path


def test_each_family_loads_as_one_tensor_in_one_out(folders):
    shapes = {}
    for family, folder in folders.items():
        model = load_model(str(folder))
        assert model.kind == HUGGINGFACE
        with torch.no_grad():
            out = model.module(model.example_input(batch=2))
        shapes[family] = tuple(out.shape)
    assert shapes["llama"] == (2, 128, hf_zoo.VOCAB)  # next-token logits
    assert shapes["gpt2"] == (2, 128, hf_zoo.VOCAB)
    assert shapes["qwen2"] == (2, 128, hf_zoo.VOCAB)
    assert shapes["bert"] == (2, 64)  # mean-pooled embedding
    assert shapes["vit"] == (2, 10)  # classifier logits


def test_sentence_transformers_folder_gives_the_normalized_mean_pooled_embedding(folders):
    import transformers

    model = load_model(str(folders["sentence-bert"]))
    assert model.task == "embedding"
    ids = model.example_input(batch=3)
    bare = transformers.BertModel.from_pretrained(folders["sentence-bert"]).eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            bare(input_ids=ids).last_hidden_state.mean(1), dim=-1
        )
        got = model.module(ids)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5)


def test_hub_names_and_pickled_folders_are_refused_in_one_line(folders, tmp_path):
    with pytest.raises(StudioError, match="never downloads from a model hub") as info:
        load_model("meta-llama/Llama-3.2-1B")
    assert "\n" not in str(info.value)
    pickled = tmp_path / "pickled"
    shutil.copytree(folders["llama"], pickled)
    state = {k: v for k, v in load_model(str(pickled)).module.hf.state_dict().items()}
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(StudioError, match="only pickled weights"):
        load_model(str(pickled))
    remote = tmp_path / "remote"
    shutil.copytree(folders["llama"], remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(StudioError, match="--trust-pickle"):
        load_model(str(remote))


def test_text_data_splits_at_a_line_and_caches(folders, corpus):
    text = corpus.read_text()
    first, last = split_text(text)
    assert first + last == text and first.endswith("\n")
    assert 0.08 < len(last) / len(text) < 0.12
    model = load_model(str(folders["llama"]))
    splits = load_text_data(corpus, model.tokenizer, 64)
    assert splits.calibration.x.dtype == torch.int64 and splits.calibration.x.shape[1] == 64
    again = load_text_data(corpus, model.tokenizer, 64)
    assert torch.equal(again.validation.x, splits.validation.x)
    ids = model.tokenizer(last, add_special_tokens=False)["input_ids"]
    assert splits.validation.x[0].tolist() == ids[:64]  # the held-out text, in order
    bert = load_model(str(folders["bert"]))
    with_cls = load_text_data(corpus, bert.tokenizer, 32)
    assert (with_cls.validation.x[:, 0] == bert.tokenizer.cls_token_id).all()


def test_jsonl_and_bad_text_get_clear_errors(folders, tmp_path):
    model = load_model(str(folders["llama"]))
    good = tmp_path / "d.jsonl"
    good.write_text(
        "\n".join(
            json.dumps({"text": hf_zoo.corpus_text()[i : i + 3000]}) for i in range(0, 30000, 3000)
        )
    )
    assert len(load_text_data(good, model.tokenizer, 32).validation) > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(StudioError, match="line 1 has no 'text'"):
        load_text_data(bad, model.tokenizer, 32)
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    with pytest.raises(StudioError, match="too short"):
        load_text_data(short, model.tokenizer, 32, use_cache=False)


def test_perplexity_is_exp_of_the_next_token_loss(folders, corpus):
    model = load_model(str(folders["llama"]))
    val = load_text_data(corpus, model.tokenizer, 32).validation.subset(4)
    result = evaluate(model.module, val, reference=model.module)
    with torch.no_grad():
        logits = model.module.hf(input_ids=val.x).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), val.x[:, 1:].reshape(-1)
    )
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert result.agreement == pytest.approx(1.0) and abs(result.kl) < 1e-5
    # a random model is about as good as guessing among the vocabulary
    assert 0.5 * hf_zoo.VOCAB < result.perplexity < 2 * hf_zoo.VOCAB


def test_scan_measures_masked_heads_exactly(folders, corpus):
    from studio.core.models import hf_arch
    from studio.core.scan.heads import group_mask, masked_inputs, scan_heads

    model = load_model(str(folders["llama"]))
    data = load_text_data(corpus, model.tokenizer, 32).calibration
    scan = scan_heads(model, data, sequences=4, use_cache=False)
    assert scan.groups == [2, 2, 2, 2] and scan.heads_per_group == [4] * 4
    assert scan.head_drop.shape == (4, 2) and not np.isnan(scan.head_drop).any()
    assert scan.mlp_drop.shape == (4, len(scan.mlp_ratios))
    # a cell equals the loss with that group's query heads cut out of the out projection
    block = hf_arch.blocks(model.module.hf)[1]
    hf = model.module.hf
    x = data.x[:4]
    with (
        torch.no_grad(),
        masked_inputs(model.module, {"hf." + block.out_proj: group_mask(block, [1])}),
    ):
        logits = hf(input_ids=x).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    assert scan.baseline + scan.head_drop[1, 1] == pytest.approx(float(loss), rel=1e-5)
    assert "head group" in scan.to_csv()


def test_allocation_meets_the_parameter_target_and_the_engine_prunes_to_it(folders, corpus):
    from studio.core.plan.transformer import allocate_transformer
    from studio.core.prune.engine import prune
    from studio.core.scan.heads import scan_heads

    model = load_model(str(folders["llama"]))
    splits = load_text_data(corpus, model.tokenizer, 32)
    scan = scan_heads(model, splits.calibration, sequences=4, use_cache=False)
    total = sum(p.numel() for p in model.module.parameters())
    for strategy in ("uniform", "sensitivity"):
        plan = allocate_transformer(model, 0.8, strategy, scan)
        result = prune(model, plan, splits.validation.subset(4))
        assert result.params_after <= 0.8 * total * 1.02
        assert result.params_after < result.params_before
        assert result.quality_after.perplexity > 0
        hf = result.module.hf
        layers = hf.config.to_dict().get("studio_layers")
        sizes = [layer.mlp.down_proj.in_features for layer in hf.model.layers]
        assert (layers or {}).get("intermediate", [hf.config.intermediate_size] * 4) == sizes
    with pytest.raises(StudioError, match="cannot reach"):
        allocate_transformer(model, 0.05, "uniform", scan)


def test_locked_layers_keep_their_ratios_and_count_towards_the_target(folders, corpus):
    from studio.core.plan.plan import PruningPlan
    from studio.core.plan.transformer import allocate_transformer, layer_units, params_removed
    from studio.core.scan.heads import scan_heads

    model = load_model(str(folders["llama"]))
    splits = load_text_data(corpus, model.tokenizer, 32)
    scan = scan_heads(model, splits.calibration, sequences=4, use_cache=False)
    units = layer_units(model)
    total = sum(p.numel() for p in model.module.parameters())
    first, last = units[0], units[-1]
    locks = {first.attention: 0.0, first.mlp: 0.5, last.attention: 0.5}
    base = PruningPlan(
        "structured", ratios=locks, locked=tuple(locks), criterion="activation", cap=1.0
    )
    for strategy in ("uniform", "sensitivity"):
        plan = allocate_transformer(model, 0.8, strategy, scan, base=base)
        assert {n: plan.ratios[n] for n in locks} == locks
        assert plan.locked == tuple(locks)
        kept = total - params_removed(units, plan.ratios)
        assert 0.78 * total <= kept <= 0.8 * total * 1.02
    everything = {k: 0.0 for u in units for k in (u.attention, u.mlp)}
    with pytest.raises(StudioError, match="every layer is locked"):
        allocate_transformer(
            model, 0.8, "uniform", base=PruningPlan("structured", locked=tuple(everything))
        )


def test_heads_and_neurons_are_chosen_on_calibration_and_measured_on_validation(
    folders, corpus, monkeypatch
):
    from studio.core.plan.transformer import allocate_transformer
    from studio.core.prune import hf_prune
    from studio.core.prune.engine import prune

    model = load_model(str(folders["llama"]))
    splits = load_text_data(corpus, model.tokenizer, 32)
    calibration, validation = splits.calibration.subset(4), splits.validation.subset(4)
    chosen_on = []
    real = hf_prune.apply_hf_plan
    monkeypatch.setattr(
        hf_prune, "apply_hf_plan", lambda m, p, d, *a: chosen_on.append(d) or real(m, p, d, *a)
    )
    plan = allocate_transformer(model, 0.8, "uniform")
    result = prune(model, plan, validation, calibration=calibration)
    assert chosen_on == [calibration]
    measured = evaluate(result.module, validation, reference=model.module)
    assert result.quality_after.perplexity == pytest.approx(measured.perplexity, rel=1e-5)
    prune(model, plan, validation)  # without a calibration split: chosen on the data given
    assert chosen_on[1] is validation


def test_an_unpruned_language_model_trains_on_its_own_text_without_a_teacher(folders, corpus):
    from studio.core.train.finetune import FinetuneJob, FinetuneSettings

    model = load_model(str(folders["llama"]), input_shape=(1, 32))
    splits = load_text_data(corpus, model.tokenizer, 32)
    settings = FinetuneSettings.for_text(epochs=2, batch_size=8, lr=3e-3)
    job = FinetuneJob(model, splits.calibration.subset(32), splits.validation.subset(8), settings)
    for _ in job.run():
        pass
    assert job.result is not None
    assert job.result.perplexity_after < 0.8 * job.result.perplexity_before
    encoder = load_model(str(folders["sentence-bert"]), input_shape=(1, 32))
    text = load_text_data(corpus, encoder.tokenizer, 32)
    with pytest.raises(StudioError, match="no labels: give a teacher"):
        FinetuneJob(encoder, text.calibration, text.validation, settings)


def test_depth_pruning_removes_layers_and_updates_the_config(folders):
    from studio.core.plan.plan import PruningPlan
    from studio.core.prune.engine import prune, prune_targets

    model = load_model(str(folders["gpt2"]))
    names = prune_targets(model, "blocks")
    assert len(names) == 4
    plan = PruningPlan("blocks", ratios={names[1]: 1.0, names[2]: 1.0})
    result = prune(model, plan)
    assert result.module.hf.config.n_layer == 2
    with torch.no_grad():
        assert result.module(model.example_input()).shape == (1, 128, hf_zoo.VOCAB)


@pytest.mark.parametrize("strategy", ["uniform", "sensitivity"])
def test_mac_target_is_met_as_the_engine_counts_macs(folders, corpus, strategy):
    from studio.core.plan.transformer import allocate_transformer
    from studio.core.prune.engine import prune
    from studio.core.scan.heads import scan_heads

    model = load_model(str(folders["gpt2"]))
    scan = None
    if strategy == "sensitivity":
        splits = load_text_data(corpus, model.tokenizer, 32)
        scan = scan_heads(model, splits.calibration, sequences=4, use_cache=False)
    plan = allocate_transformer(model, 0.7, strategy, scan, kind="macs")
    result = prune(model, plan)
    assert result.macs_after <= 0.7 * result.macs_before * 1.02
    assert result.macs_after > 0.6 * result.macs_before  # not far below the target either


def test_latency_target_parsing_and_search_steps():
    from studio.core.latency.lm_target import LMCandidate, _next_fraction, parse_target

    assert parse_target("0.6x") == ("fraction", 0.6)
    assert parse_target("300tok/s") == ("tokens_per_s", 300.0)
    for bad in ("1.5", "fast", "-3tok/s"):
        with pytest.raises(StudioError):
            parse_target(bad)

    def tried(*points):
        return [LMCandidate(p, None, m, 1.0, m) for p, m in points]

    # between a candidate that is too slow and one fast enough: interpolated
    assert _next_fraction(tried((0.8, 0.9), (0.4, 0.5)), 0.7) == pytest.approx(0.6)
    # only too slow: prune more, in proportion
    assert _next_fraction(tried((0.6, 0.8)), 0.6) == pytest.approx(0.45)
    # the same fraction again: nothing new to try
    assert _next_fraction(tried((0.6, 0.6001), (0.601, 0.7)), 0.6) is None


@pytest.mark.parametrize("family", ["bert", "gpt2", "qwen2", "vit"])
def test_each_family_scans_prunes_and_exports_verified_onnx(folders, family, tmp_path):
    import onnxruntime as ort

    from studio.core.export.hf_onnx import write_text_onnx
    from studio.core.models.data import DataSet
    from studio.core.models.pruned_file import save_model
    from studio.core.plan.plan import PruningPlan
    from studio.core.prune.engine import prune, prune_targets
    from studio.core.scan.heads import scan_heads

    shape = None if family == "vit" else (1, 48)  # 48 tokens: the scan and export are quicker
    model = load_model(str(folders[family]), input_shape=shape)
    x = torch.cat([model.example_input(batch=2) for _ in range(2)])
    if not model.is_text:
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = DataSet(x, None, "samples")
    scan = scan_heads(model, data, use_cache=False)
    assert not np.isnan(scan.head_drop[:, : min(scan.groups)]).any()
    assert scan.metric == ("perplexity" if model.task == "causal-lm" else "cosine")
    names = prune_targets(model, "structured")
    plan = PruningPlan("structured", "activation", ratios={n: 0.5 for n in names}, cap=1.0)
    result = prune(model, plan, data)
    assert result.params_after < 0.8 * result.params_before
    path = tmp_path / "m.onnx"
    if model.is_text:
        written = write_text_onnx(result.module, path, result.model.example_input(), model.task)
        assert written.max_abs_diff <= 1e-4 * max(1.0, written.output_scale)
        feed = {"input_ids": x[:, :17].numpy()}
    else:
        save_model(result.model, path)
        feed = {"pixel_values": x.numpy()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, feed)
    with torch.no_grad():
        expected = result.module(torch.from_numpy(next(iter(feed.values())))).numpy()
    assert np.abs(out - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_jobs_of_a_transformer_start_with_transformers_imported(folders):
    import sys

    from studio.core import isolation

    if not isolation.available():
        pytest.skip("no forkserver here")
    # the suite's conftest asked for it before any job ran, as `studio gui --model DIR` does
    assert isolation.preload_transformers()
    model = load_model(str(folders["llama"]), input_shape=(1, 16))
    x = model.example_input()

    def imported(progress, cancel):  # carries no model: sees what the child started with
        return sorted(set(isolation.TRANSFORMERS_PRELOAD) - set(sys.modules))

    assert isolation.run_isolated("imports", imported) == []

    def job(progress, cancel):
        with torch.no_grad():
            return model.module(x)

    out = isolation.run_isolated("evaluation", job)
    with torch.no_grad():
        assert torch.allclose(out, model.module(x))
