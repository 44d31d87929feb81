"""Hugging Face text models to ONNX and their prefill/decode latency (issue 20, part 6): a Llama
decoder with grouped-query attention, GPT-2 and a mean-pooled BERT encoder, built from tiny
random configs, export with ``input_ids`` of dynamic batch and sequence and match torch in ONNX
Runtime at two shapes; a Llama whose layers keep different numbers of heads exports too; a file
that does not verify is never written. Latency: figures are positive and consistent, and a model
with four times the layers takes longer (measured in turns, so the machine's load cannot flip
it)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from studio.core.errors import StudioError  # noqa: E402
from studio.core.export.exporter import export_model  # noqa: E402
from studio.core.export.hf_onnx import export_text_onnx, write_text_onnx  # noqa: E402
from studio.core.latency.decode import compare_lm_latency, measure_lm_latency  # noqa: E402
from studio.core.models.hf import HFModule  # noqa: E402
from studio.core.models.loaded import HUGGINGFACE, LoadedModel  # noqa: E402

HIDDEN, VOCAB, POSITIONS = 64, 128, 96
SHAPES = ((1, 16), (2, 37))
TOLERANCE = 1e-4

transformers.logging.set_verbosity_error()  # tiny configs: token ids outside the vocab, etc.


def _llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
    )
    return HFModule(transformers.LlamaForCausalLM(cfg).eval(), "causal-lm").eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()  # bare: exported through its own wrapper


def _bert() -> nn.Module:
    torch.manual_seed(2)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=POSITIONS,
    )
    return HFModule(transformers.BertModel(cfg).eval(), "embedding", pooling="mean").eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _check_file(path, module: nn.Module, output: str) -> float:
    """The file's input is int64 ``input_ids`` with symbolic batch and sequence dims, and its
    output matches torch at both SHAPES; the largest difference."""
    proto = onnx.load(str(path))
    (graph_input,) = proto.graph.input
    assert graph_input.name == "input_ids"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    dims = graph_input.type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert all(not d.HasField("dim_value") for d in dims)
    assert [o.name for o in proto.graph.output] == [output]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, shape in enumerate(SHAPES):
        ids = _ids(*shape, seed=10 + i)
        with torch.no_grad():
            out = module(ids)
        want = (out if isinstance(out, torch.Tensor) else out.logits).numpy()  # bare: .logits
        (got,) = sess.run(None, {"input_ids": ids.numpy()})
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= TOLERANCE
    return worst


@pytest.mark.parametrize(
    ("build", "kind", "output"),
    [
        (_llama, "causal-lm", "logits"),
        (_gpt2, "causal-lm", "logits"),
        (_bert, "embedding", "embedding"),
    ],
    ids=["llama-gqa", "gpt2", "bert-mean-pooled"],
)
def test_text_models_export_with_dynamic_batch_and_sequence(
    tmp_path, one_thread, build, kind, output
):
    module = build()
    hf = getattr(module, "hf", module)
    attention = hf.config._attn_implementation
    path = tmp_path / "model.onnx"
    done = write_text_onnx(module, path, _ids(2, 16), kind)
    assert done.path == path and path.is_file()
    assert done.shapes == SHAPES and done.output_name == output
    assert done.max_abs_diff <= TOLERANCE * max(1.0, done.output_scale)
    assert hf.config._attn_implementation == attention  # switched for the export only
    _check_file(path, module, output)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left


def _keep_heads(attn: nn.Module, q_rows: slice, kv_rows: slice) -> None:
    """Cut one attention block to the q rows / kv rows kept (o_proj loses the same columns)."""

    def rows(linear: nn.Linear, keep: slice) -> nn.Linear:
        new = nn.Linear(linear.in_features, len(range(*keep.indices(linear.out_features))), False)
        new.weight.data = linear.weight.data[keep].clone()
        return new

    attn.q_proj, attn.k_proj, attn.v_proj = (
        rows(attn.q_proj, q_rows),
        rows(attn.k_proj, kv_rows),
        rows(attn.v_proj, kv_rows),
    )
    o = nn.Linear(attn.q_proj.out_features, attn.o_proj.out_features, False)
    o.weight.data = attn.o_proj.weight.data[:, q_rows].clone()
    attn.o_proj = o


def test_layers_with_different_head_counts_export_and_decode(tmp_path, one_thread):
    module = _llama(layers=2)
    layers = module.hf.model.layers
    head = HIDDEN // 8
    # layer 0 keeps kv group 0 of 2 (kv head 0 and the 4 query heads that read it)
    _keep_heads(layers[0].self_attn, slice(0, 4 * head), slice(0, head))
    mlp = layers[1].mlp  # layer 1 keeps 80 of 128 MLP neurons
    keep = slice(0, 80)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(HIDDEN, 80, bias=False)
        new.weight.data = old.weight.data[keep].clone()
        setattr(mlp, name, new)
    down = nn.Linear(80, HIDDEN, bias=False)
    down.weight.data = mlp.down_proj.weight.data[:, keep].clone()
    mlp.down_proj = down
    assert layers[0].self_attn.k_proj.out_features == head
    assert layers[1].self_attn.k_proj.out_features == 2 * head
    path = export_text_onnx(module, tmp_path / "pruned.onnx", _ids(1, 16), "causal-lm")
    _check_file(path, module, "logits")
    speed = measure_lm_latency(module, prompt_len=16, new_tokens=4, repeats=2)
    assert speed.decode_ms is not None and speed.decode_ms > 0


class _BakedLength(nn.Module):
    """Scales the logits by the traced sequence length, which tracing turns into a constant:
    the file is wrong at every other length."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.hf = inner.hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, use_cache=False).logits * float(ids.shape[1])


def test_a_file_that_does_not_verify_is_not_written(tmp_path, one_thread):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the user's older file")
    with pytest.raises(StudioError, match="does not reproduce|fails on an input") as caught:
        export_text_onnx(_BakedLength(_llama()), path, _ids(2, 16), "causal-lm")
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == b"the user's older file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_bad_requests_are_one_line_errors(tmp_path):
    module = _llama()
    bad = [
        (lambda: export_text_onnx(module, tmp_path / "m.onnx", _ids(1, 8), "seq2seq"), "kind"),
        (lambda: export_text_onnx(module, tmp_path / "m.pt", _ids(1, 8), "causal-lm"), ".onnx"),
        (
            lambda: export_text_onnx(module, tmp_path / "m.onnx", _ids(1, 8).float(), "causal-lm"),
            "int64",
        ),
        (lambda: measure_lm_latency(module, prompt_len=90, new_tokens=10), "96 positions"),
        (lambda: measure_lm_latency(module, prompt_len=8, backend="onnxruntime"), "onnx_path"),
        (lambda: measure_lm_latency(module, prompt_len=8, threads=0), "thread count"),
    ]
    for call, words in bad:
        with pytest.raises(StudioError, match=words) as caught:
            call()
        assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_export_model_hands_text_models_to_the_text_exporter(tmp_path, one_thread):
    module = _llama()
    model = LoadedModel(
        module, "tiny llama", "tiny", HUGGINGFACE, (1, 16), vocab_size=VOCAB, task="causal-lm"
    )
    result = export_model(model, "onnx", tmp_path / "llama.onnx")
    assert result.input_names == ("input_ids",) and result.output_names == ("logits",)
    assert result.batch_sizes == (1, 2) and result.dynamic_batch
    assert (
        result.max_abs_diff <= TOLERANCE
        and result.bytes == (tmp_path / "llama.onnx").stat().st_size
    )
    _check_file(tmp_path / "llama.onnx", module, "logits")


def test_decode_latency_figures_are_consistent():
    threads = torch.get_num_threads()
    module = _llama()
    for batch in (1, 2):
        speed = measure_lm_latency(module, prompt_len=24, new_tokens=6, batch=batch, repeats=3)
        assert speed.kind == "causal-lm" and speed.backend == "torch" and speed.threads == 1
        assert speed.prefill_ms > 0 and speed.decode_ms is not None and speed.decode_ms > 0
        assert speed.tokens_per_s == pytest.approx(1000 / speed.decode_ms * batch)
        assert speed.sequences_per_s == pytest.approx(1000 / speed.prefill_ms * batch)
        assert len(speed.prefill_runs) == len(speed.decode_runs) == 3
        assert speed.new_tokens == 6 and speed.prompt_len == 24
    assert torch.get_num_threads() == threads  # set to 1 for the measurement, then restored


def test_encoders_have_a_prefill_only():
    speed = measure_lm_latency(_bert(), prompt_len=32, batch=2, repeats=3)
    assert speed.kind == "encoder" and speed.prefill_ms > 0
    assert speed.decode_ms is None and speed.tokens_per_s is None and speed.new_tokens == 0
    assert speed.sequences_per_s == pytest.approx(2000 / speed.prefill_ms)


def test_onnxruntime_prefill_of_the_exported_file(tmp_path, one_thread):
    module = _llama()
    path = export_text_onnx(module, tmp_path / "llama.onnx", _ids(1, 16), "causal-lm")
    speed = measure_lm_latency(
        module, prompt_len=32, threads=1, repeats=3, backend="onnxruntime", onnx_path=path
    )
    assert speed.backend == "onnxruntime" and speed.prefill_ms > 0
    assert speed.decode_ms is None and speed.tokens_per_s is None
    assert any("KV cache" in note for note in speed.notes)


def test_four_times_the_layers_take_longer_side_by_side():
    small, large = _llama(layers=2), _llama(layers=8)
    result = compare_lm_latency(small, large, prompt_len=48, new_tokens=6, repeats=5)
    assert result.after.prefill_ms > result.before.prefill_ms
    assert result.prefill_speedup == pytest.approx(
        result.before.prefill_ms / result.after.prefill_ms
    )
    assert result.decode_speedup is not None and result.decode_speedup < 1
    assert result.to_dict()["threads"] == 1
