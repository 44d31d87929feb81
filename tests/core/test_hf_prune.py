"""Structural pruning of Hugging Face transformers (issue 20): head groups, MLP neurons and
layers cut from BERT, GPT-2, Llama (grouped key/value heads), Qwen2 (q/k/v biases) and ViT built
from tiny random configs; the cut models run, lose exactly the parameters the slices say, compute
the same as before when only zeroed parts go, and save and reload to the same outputs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from studio.core.errors import StudioError  # noqa: E402
from studio.core.models import hf_arch  # noqa: E402
from studio.core.prune import transformer as surgery  # noqa: E402

HIDDEN, LAYERS, INNER, VOCAB = 64, 4, 128, 100
ATTN = "eager"


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=INNER,
        max_position_embeddings=32,
        attn_implementation=ATTN,
    )
    return transformers.BertModel(cfg)


def _gpt2(**extra):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_inner=INNER,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=ATTN,
        **extra,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation=ATTN,
    )
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation=ATTN,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _vit():
    cfg = transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=INNER,
        image_size=32,
        patch_size=8,
        attn_implementation=ATTN,
    )
    return transformers.ViTModel(cfg)


# family -> (builder, what blocks() says: family, heads, kv heads, head size)
FAMILIES = {
    "bert": (_bert, "bert", 4, 4, 16),
    "gpt2": (_gpt2, "gpt2", 4, 4, 16),
    "llama": (_llama, "llama", 8, 2, 8),
    "qwen2": (_qwen2, "llama", 4, 2, 16),
    "vit": (_vit, "vit", 4, 4, 16),
}


def build(fam: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[fam][0]().eval()
    with torch.no_grad():  # non-zero biases and norms, so a wrong slice shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def inputs(model):
    gen = torch.Generator().manual_seed(1)
    if model.main_input_name == "pixel_values":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=gen)}


@torch.no_grad()
def run(model, x):
    out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def module(model, name):
    return dict(model.named_modules())[name]


def linear_like(mod) -> tuple[int, int, bool]:
    """(in, out, has bias) of a Linear or Conv1D."""
    w = mod.weight
    fan_in, fan_out = (w.shape[1], w.shape[0]) if isinstance(mod, torch.nn.Linear) else w.shape
    return int(fan_in), int(fan_out), getattr(mod, "bias", None) is not None


def group_params(model, b: hf_arch.Block) -> int:
    """What one key/value group of ``b`` holds: q rows of its heads, k and v rows, o columns."""
    per = b.heads // b.kv_heads
    out = b.head_dim * per * HIDDEN
    if hf_arch.layout_of(model).qkv:  # fused: q, k and v rows all one head wide
        _, _, bias = linear_like(module(model, f"{b.attention}.c_attn"))
        return 3 * b.head_dim * (HIDDEN + bias) + out
    lay = hf_arch.layout_of(model)
    q, k, v = (linear_like(module(model, f"{b.name}.{p}")) for p in (lay.q, lay.k, lay.v))
    return (
        per * b.head_dim * (HIDDEN + q[2])
        + b.head_dim * (HIDDEN + k[2])
        + b.head_dim * (HIDDEN + v[2])
        + out
    )


def neuron_params(model, b: hf_arch.Block) -> int:
    lay = hf_arch.layout_of(model)
    ins = [linear_like(module(model, f"{b.name}.{p}")) for p in lay.mlp_in]
    return sum(HIDDEN + bias for _, _, bias in ins) + HIDDEN


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_blocks_report_the_layers(fam):
    model = build(fam)
    _, family, heads, kv, head_dim = FAMILIES[fam]
    assert hf_arch.family(model) == family
    bl = hf_arch.blocks(model)
    assert len(bl) == LAYERS
    names = dict(model.named_modules())
    prefix, layers = hf_arch.layer_list(model)
    assert len(layers) == LAYERS and names[prefix] is layers
    for i, b in enumerate(bl):
        assert (b.index, b.heads, b.kv_heads, b.head_dim, b.intermediate) == (
            i,
            heads,
            kv,
            head_dim,
            INNER,
        )
        assert hf_arch.head_groups(b) == kv
        for name in (b.name, b.attention, b.mlp, b.out_proj, b.mlp_down):
            assert name in names
        assert names[b.name] is layers[i]
        assert linear_like(names[b.out_proj])[0] == heads * head_dim
        assert linear_like(names[b.mlp_down])[0] == INNER


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_prune_runs_and_removes_what_the_slices_say(fam):
    model = build(fam)
    x = inputs(model)
    full = run(model, x)
    bl = hf_arch.blocks(model)
    before = count(model)
    expected = group_params(model, bl[0]) + (INNER // 2) * neuron_params(model, bl[1])
    expected += sum(p.numel() for p in hf_arch.layer_list(model)[1][2].parameters())

    surgery.prune_heads(model, 0, range(1, bl[0].kv_heads))  # group 0 goes
    surgery.prune_heads(model, 0, range(bl[0].kv_heads - 1))  # all that is left: no change
    surgery.prune_mlp(model, 1, range(0, INNER, 2))
    surgery.drop_layers(model, [2])

    out = run(model, x)
    assert out.shape == full.shape and torch.isfinite(out).all()
    assert before - count(model) == expected
    after = hf_arch.blocks(model)
    assert len(after) == LAYERS - 1
    assert after[1].intermediate == INNER // 2
    assert after[0].kv_heads == bl[0].kv_heads - 1
    assert after[0].heads == after[0].kv_heads * (bl[0].heads // bl[0].kv_heads)
    assert [b.index for b in after] == [0, 1, 2]
    assert model.config.num_hidden_layers == LAYERS - 1
    idx = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == ([0, 1, 2] if idx else [])


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_removing_zeroed_parts_is_exact(fam):
    """Zero what reads a group (its output-projection columns) and what reads some neurons
    (their down-projection columns): cutting them out must not change the output, which holds
    only if the coupled rows and columns were removed together."""
    model = build(fam)
    x = inputs(model)
    bl = hf_arch.blocks(model)
    per = bl[0].heads // bl[0].kv_heads
    width = per * bl[0].head_dim
    g = 1
    off = [3, 10, 11, 64, 127]
    with torch.no_grad():
        out = module(model, bl[0].out_proj)
        cols = slice(g * width, (g + 1) * width)
        if isinstance(out, torch.nn.Linear):
            out.weight[:, cols] = 0
        else:
            out.weight[cols, :] = 0
        down = module(model, bl[2].mlp_down)
        if isinstance(down, torch.nn.Linear):
            down.weight[:, off] = 0
        else:
            down.weight[off, :] = 0
    zeroed = run(model, x)
    surgery.prune_heads(model, 0, [k for k in range(bl[0].kv_heads) if k != g])
    surgery.prune_mlp(model, 2, [j for j in range(INNER) if j not in off])
    pruned = run(model, x)
    assert torch.allclose(pruned, zeroed, atol=1e-5, rtol=0), (pruned - zeroed).abs().max()
    after = hf_arch.blocks(model)
    assert after[0].kv_heads == bl[0].kv_heads - 1 and after[2].intermediate == INNER - len(off)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_save_and_load_pretrained_reload_exactly(fam, tmp_path):
    model = build(fam)
    x = inputs(model)
    bl = hf_arch.blocks(model)
    surgery.prune_heads(model, 1, [0])
    surgery.prune_mlp(model, 0, range(0, INNER, 3))
    surgery.drop_layers(model, [3])
    want = run(model, x)
    folder = surgery.save_pretrained(model, tmp_path / "pruned")
    assert folder == tmp_path / "pruned" and (folder / "config.json").is_file()
    assert list(folder.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    config = model.config
    sizes = config.studio_layers
    per = bl[0].heads // bl[0].kv_heads
    assert sizes["heads"] == [bl[0].heads, per, bl[0].heads]
    assert sizes["kv_heads"] == [bl[0].kv_heads, 1, bl[0].kv_heads]
    assert sizes["intermediate"] == [len(range(0, INNER, 3)), INNER, INNER]
    assert config.num_hidden_layers == LAYERS - 1
    assert hf_arch.family(model) != "llama" or config.num_key_value_heads == bl[0].kv_heads

    loaded = hf_arch.load_pretrained(folder, attn_implementation=ATTN).eval()
    assert type(loaded) is type(model)
    assert [dataclass_sizes(b) for b in hf_arch.blocks(loaded)] == [
        dataclass_sizes(b) for b in hf_arch.blocks(model)
    ]
    got = run(loaded, x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def dataclass_sizes(b: hf_arch.Block) -> tuple[int, int, int, int]:
    return b.heads, b.kv_heads, b.head_dim, b.intermediate


def test_uniform_llama_reloads_with_vanilla_from_pretrained(tmp_path):
    model = build("llama")
    x = inputs(model)
    for i in range(LAYERS):
        surgery.prune_heads(model, i, [int(surgery.head_scores(model, i).argmax())])
        scores = surgery.neuron_scores(model, i)
        assert scores.shape == (INNER,)
        surgery.prune_mlp(model, i, torch.argsort(scores, descending=True)[:96].tolist())
    surgery.drop_layers(model, [1])
    want = run(model, x)
    folder = surgery.save_pretrained(model, tmp_path / "llama")
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 8)
    assert (cfg.intermediate_size, cfg.num_hidden_layers) == (96, LAYERS - 1)
    assert not hasattr(cfg, "studio_layers")
    vanilla = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation=ATTN)
    assert torch.allclose(run(vanilla.eval(), x), want, atol=1e-5, rtol=0)
    ours = hf_arch.load_pretrained(
        folder, transformers.AutoModelForCausalLM, attn_implementation=ATTN
    )
    assert torch.allclose(run(ours.eval(), x), want, atol=1e-5, rtol=0)


def test_bert_with_fewer_heads_needs_studio_layers(tmp_path):
    """BERT derives its head size from hidden_size // num_attention_heads: a config with fewer
    heads would mean bigger heads, so the count stays and studio_layers says what is there."""
    model = build("bert")
    x = inputs(model)
    for i in range(LAYERS):
        surgery.prune_heads(model, i, [0, 2, 3])
        surgery.prune_mlp(model, i, range(100))
    want = run(model, x)
    folder = surgery.save_pretrained(model, tmp_path / "bert")
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.intermediate_size) == (4, 100)
    assert cfg.studio_layers["heads"] == [3] * LAYERS
    with pytest.raises(RuntimeError, match="mismatch"):  # vanilla refuses the shapes
        transformers.BertModel.from_pretrained(folder)
    loaded = hf_arch.load_pretrained(folder, attn_implementation=ATTN)
    assert torch.allclose(run(loaded.eval(), x), want, atol=1e-5, rtol=0)


def test_uniform_vit_and_gpt2_mlp_reload_with_vanilla_from_pretrained(tmp_path):
    vit = build("vit")
    x = inputs(vit)
    for i in range(LAYERS):
        surgery.prune_heads(vit, i, [1, 3])
        surgery.prune_mlp(vit, i, range(64))
    want = run(vit, x)
    folder = surgery.save_pretrained(vit, tmp_path / "vit")
    assert (vit.config.num_attention_heads, vit.config.head_dim) == (2, 16)
    assert not hasattr(vit.config, "studio_layers")
    vanilla = transformers.ViTModel.from_pretrained(folder, attn_implementation=ATTN)
    assert torch.allclose(run(vanilla.eval(), x), want, atol=1e-5, rtol=0)

    gpt2 = build("gpt2")
    x = inputs(gpt2)
    for i in range(LAYERS):
        surgery.prune_mlp(gpt2, i, range(0, INNER, 2))
    surgery.drop_layers(gpt2, [0])
    want = run(gpt2, x)
    folder = surgery.save_pretrained(gpt2, tmp_path / "gpt2")
    assert (gpt2.config.n_inner, gpt2.config.n_layer, gpt2.config.n_head) == (64, 3, 4)
    assert not hasattr(gpt2.config, "studio_layers")
    vanilla = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation=ATTN)
    assert torch.allclose(run(vanilla.eval(), x), want, atol=1e-5, rtol=0)


def test_gpt2_inverse_layer_scaling_survives_a_dropped_layer(tmp_path):
    """GPT-2 may scale attention by 1/(layer + 1), fixed when the layer is built: after a layer
    is dropped, the model and a copy rebuilt from its config still compute the same."""
    torch.manual_seed(0)
    model = _gpt2(scale_attn_by_inverse_layer_idx=True).eval()
    x = inputs(model)
    full = run(model, x)
    with torch.no_grad():  # layer 1 adds nothing: dropping it must not change the output
        for p in hf_arch.layer_list(model)[1][1].parameters():
            p.zero_()
    zeroed = run(model, x)
    surgery.drop_layers(model, [1])
    assert torch.allclose(run(model, x), zeroed, atol=1e-5, rtol=0)
    assert not torch.allclose(zeroed, full)
    folder = surgery.save_pretrained(model, tmp_path / "gpt2")
    assert not hasattr(model.config, "studio_layers")
    vanilla = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation=ATTN)
    assert torch.allclose(run(vanilla.eval(), x), zeroed, atol=1e-5, rtol=0)


def test_qwen2_layer_types_follow_dropped_layers():
    model = build("qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2
    surgery.drop_layers(model, [0, 2])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


def test_save_pretrained_replaces_a_folder_but_never_a_protected_one(tmp_path):
    model = build("gpt2")
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    surgery.save_pretrained(model, target)
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()
    with pytest.raises(StudioError, match="refusing to write over out"):
        surgery.save_pretrained(model, target, protected=(target / "model.safetensors",))
    with pytest.raises(StudioError, match="refusing to write over"):
        surgery.save_pretrained(model, tmp_path, protected=(target,))
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_one_line_errors():
    model = build("llama")
    with pytest.raises(StudioError) as exc:
        surgery.prune_heads(model, 0, [])
    assert "0 head groups" in one_line(exc) and "remove the whole layer" in one_line(exc)
    with pytest.raises(StudioError) as exc:
        surgery.prune_heads(model, 0, [2])
    assert "2 head groups" in one_line(exc)
    with pytest.raises(StudioError) as exc:
        surgery.prune_mlp(model, LAYERS, [0])
    assert "no layer 4" in one_line(exc)
    with pytest.raises(StudioError) as exc:
        surgery.drop_layers(model, range(LAYERS))
    assert "all 4 layers" in one_line(exc)

    torch.manual_seed(0)
    t5 = transformers.T5Model(
        transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4
        )
    )
    for call in (hf_arch.blocks, hf_arch.family, lambda m: surgery.prune_heads(m, 0, [0])):
        with pytest.raises(StudioError) as exc:
            call(t5)
        assert "t5" in one_line(exc)
