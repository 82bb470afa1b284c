"""ONNX Runtime through optimum, from the transformers export (README_MOE.md, "Run it outside PyTorch"):
optimum's exporter turns export_hf.py's Qwen3 / Qwen3-MoE folder into an ONNX decoder with a KV cache,
and ORTModelForCausalLM gives our prompt logits and generate.py's greedy tokens.

Skipped where optimum.onnxruntime is not importable: `pip install "optimum-onnx[onnxruntime]"` (0.1.0)
pins transformers < 4.58, so it is not in requirements*.txt; run it from a venv that has it, e.g.
`python -m venv --system-site-packages /tmp/onnxvenv && /tmp/onnxvenv/bin/pip install "optimum-onnx[onnxruntime]"`,
then `/tmp/onnxvenv/bin/python -m pytest tests/test_onnx.py`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import checkpoint as ckpt_io
import data
import export_hf
import sampling
from moe_layers import ModelConfig, MoETransformer
from parallel_layers import Layout

try:
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM
except ImportError as e:  # the main environment: optimum-onnx would change its transformers
    pytest.skip(f"optimum.onnxruntime is not importable ({e}); see this file's docstring", allow_module_level=True)
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

PROMPT = "def héllo(x): return"
KINDS = {"dense_qwen3": ("Qwen3ForCausalLM", dict(num_experts=0)),
         "qwen3_moe": ("Qwen3MoeForCausalLM", dict())}


def model_of(**kw) -> MoETransformer:
    cfg = ModelConfig(**{**dict(vocab_size=256, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                                ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=4, num_experts_per_token=2,
                                seq_length=64, init_std=0.1),  # wide enough that greedy choices are not near-ties
                         **kw})
    return MoETransformer(cfg, seed=3).eval()


def save(model: MoETransformer, root) -> str:
    """A one-rank checkpoint of `model` as the trainer writes it (bytes, the built-in corpus)."""
    payload = ckpt_io.rank_payload(model, torch.optim.AdamW(model.parameters()), Layout())
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 0, "skipped_steps": 0,
            "model": dataclasses.asdict(model.cfg), "train": {"data": ""},
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    return ckpt_io.save_checkpoint(str(root), 0, payload, meta, 0, 1)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_onnx_runtime_gives_our_logits_and_generate_greedy_tokens(kind, tmp_path):
    arch, kw = KINDS[kind]
    model = model_of(**kw)
    export_hf.export(save(model, tmp_path / "ck"), str(tmp_path / "hf"))
    # what `optimum-cli export onnx --model HF --task text-generation-with-past ONNX` runs
    main_export(str(tmp_path / "hf"), str(tmp_path / "onnx"), task="text-generation-with-past", do_validation=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ort = ORTModelForCausalLM.from_pretrained(str(tmp_path / "onnx"))
    assert ort.config.architectures == [arch]
    inputs = tokenizer(PROMPT, return_tensors="pt")
    assert list(inputs) == ["input_ids", "attention_mask"]  # what generate() takes (no token_type_ids)
    prompt = data.ByteTokenizer().encode(PROMPT)
    assert inputs["input_ids"][0].tolist() == prompt
    with torch.no_grad():
        diff = (ort(**inputs).logits - model(torch.tensor([prompt])).output).abs().max().item()
    out = ort.generate(**inputs, max_new_tokens=32, do_sample=False)[0].tolist()
    want, _ = sampling.generate(model, prompt, 32, temperature=0)
    print(f"{kind}: ORT prompt logits max |diff| {diff:.2e}, 32 greedy tokens equal: {out[len(prompt):] == want}")
    assert diff < 1e-4
    assert out[len(prompt):] == want
    assert tokenizer.decode(out) == sampling.decode_text(data.ByteTokenizer(), prompt, want)  # generate.py's text
