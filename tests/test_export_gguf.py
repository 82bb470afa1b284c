"""scripts/export_gguf.py: every tensor and key of the file, its tokenizers, the refusals, and (where
llama-cpp-py-sync, a prebuilt llama.cpp, is installed) llama.cpp decoding the file as scripts/generate.py does."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ckpt_io
import data
import export_gguf
import export_hf
import generate
from moe_layers import ModelConfig, MoETransformer
from parallel_layers import Layout

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "export_gguf.py"
SAMPLE = "def héllo(x):\n    return x + 42  # it's Ωμέγα, don't 🚀\n\n\t  done   \r\n"

# Model kinds, the llama.cpp architecture each must become, and the config that makes it so.
KINDS = {
    "dense": ("qwen3", dict(num_experts=0)),
    "qwen3_moe": ("qwen3moe", dict()),
    # DeepSeek-V3's recipe: a leading dense layer, a shared expert, sigmoid scores with a balancing bias,
    # groups and a scaling factor
    "deepseek": ("glm4moe", dict(first_k_dense_layers=1, num_shared_experts=1, router_score_function="sigmoid",
                                 num_experts=8, router_num_groups=4, router_group_topk=2,
                                 router_topk_scaling_factor=2.5)),
    "softmax_not_renormalised": ("glm4moe", dict(norm_topk_prob=False)),
}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=4, num_experts_per_token=2,
                seq_length=64, init_std=0.1)  # wide enough init that greedy choices are not near-ties
    base.update(kw)
    return ModelConfig(**base)


def make_model(kind: str, seed: int = 0, **kw) -> MoETransformer:
    model = MoETransformer(tiny(**{**KINDS[kind][1], **kw}), seed=seed).eval()
    with torch.no_grad():
        for layer in model.moe_layers().values():  # as aux-loss-free balancing leaves it: non-zero
            if model.cfg.router_score_function == "sigmoid":
                layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, model.cfg.num_experts))
    return model


def save(model: MoETransformer, root: Path, data_path: str = "") -> str:
    """A one-rank checkpoint of `model` as the trainer writes it, trained on `data_path` (the built-in corpus)."""
    payload = ckpt_io.rank_payload(model, torch.optim.AdamW(model.parameters()), Layout())
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 0, "skipped_steps": 0,
            "model": dataclasses.asdict(model.cfg), "train": {"data": data_path},
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    return ckpt_io.save_checkpoint(str(root), 0, payload, meta, 0, 1)


def fields(path: Path) -> dict:
    return {name: f.contents() for name, f in gguf.GGUFReader(str(path)).fields.items()}


def expected_tensors(model: MoETransformer, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp name -> tensor, written out from the model's own parameters (stacked experts (E, D, F))."""
    sd, cfg = model.state_dict(), model.cfg
    want = {"token_embd.weight": sd["embed_tokens.weight"], "output_norm.weight": sd["norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        want.update({b + "attn_norm.weight": sd[p + "input_layernorm.weight"],
                     b + ("post_attention_norm.weight" if arch == "glm4moe" else "ffn_norm.weight"):
                         sd[p + "post_attention_layernorm.weight"]})
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                             ("o_proj", "attn_output"), ("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            want[f"{b}{theirs}.weight"] = sd[f"{p}self_attn.{ours}.weight"]
        if not cfg.is_moe_layer(i):
            for proj in ("gate", "up", "down"):
                want[f"{b}ffn_{proj}.weight"] = sd[f"{p}mlp.{proj}_proj.weight"]
            continue
        want[b + "ffn_gate_inp.weight"] = sd[p + "mlp.router.weight"]
        gate, up = sd[f"{p}mlp.experts.w_gate_up"].chunk(2, dim=-1)  # (E, D, F) each: the fused weight's halves
        for proj, w in (("gate", gate), ("up", up), ("down", sd[f"{p}mlp.experts.w_down"])):
            want[f"{b}ffn_{proj}_exps.weight"] = w.transpose(1, 2)  # x @ w (E, D, F) -> (E, F, D) out x in
        if arch != "glm4moe":
            continue
        want[b + "exp_probs_b.bias"] = sd[p + "mlp.router.expert_bias"]
        if cfg.num_shared_experts:
            for proj in ("gate", "up", "down"):
                want[f"{b}ffn_{proj}_shexp.weight"] = sd[f"{p}mlp.shared_experts.{proj}_proj.weight"]
        else:  # the zero shared expert: it adds 0
            f, d = cfg.moe_ffn_hidden_size, cfg.hidden_size
            want[b + "ffn_gate_shexp.weight"] = want[b + "ffn_up_shexp.weight"] = torch.zeros(f, d)
            want[b + "ffn_down_shexp.weight"] = torch.zeros(d, f)
    return want


# ------------------------------------------------------------------------ tensors and keys
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_tensor_is_the_checkpoints_under_its_llama_cpp_name(kind, tmp_path):
    arch = KINDS[kind][0]
    model = make_model(kind)
    assert export_gguf.export(save(model, tmp_path / "ck"), str(tmp_path / "m.gguf")) == arch
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    got = {t.name: t for t in reader.tensors}
    want = expected_tensors(model, arch)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        t = got[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert tuple(t.shape) == tuple(reversed(w.shape)), name  # ggml's ne: innermost first
        assert np.array_equal(np.asarray(t.data).reshape(w.shape), w.numpy()), name


KEYS = {
    "dense": {"qwen3.block_count": 2, "qwen3.feed_forward_length": 64},
    "qwen3_moe": {"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
                  "qwen3moe.expert_feed_forward_length": 24},
    "deepseek": {"glm4moe.expert_count": 8, "glm4moe.expert_used_count": 2, "glm4moe.leading_dense_block_count": 1,
                 "glm4moe.expert_shared_count": 1, "glm4moe.expert_gating_func": 2, "glm4moe.expert_weights_norm": True,
                 "glm4moe.expert_weights_scale": 2.5, "glm4moe.expert_group_count": 4,
                 "glm4moe.expert_group_used_count": 2, "glm4moe.feed_forward_length": 64},
    "softmax_not_renormalised": {"glm4moe.leading_dense_block_count": 0, "glm4moe.expert_gating_func": 1,
                                 "glm4moe.expert_weights_norm": False, "glm4moe.expert_weights_scale": 1.0,
                                 "glm4moe.expert_shared_count": 1},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_keys_give_llama_cpp_our_hyper_parameters(kind, tmp_path):
    arch = KINDS[kind][0]
    export_gguf.export(save(make_model(kind, head_dim=16), tmp_path / "ck"), str(tmp_path / "m.gguf"))
    got = fields(tmp_path / "m.gguf")
    want = {"general.architecture": arch, f"{arch}.context_length": 64, f"{arch}.embedding_length": 32,
            f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
            f"{arch}.attention.key_length": 16, f"{arch}.attention.value_length": 16,
            f"{arch}.rope.dimension_count": 16, f"{arch}.rope.freq_base": 10000.0, "general.file_type": 0, **KEYS[kind]}
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    if kind == "softmax_not_renormalised":  # all groups kept is no grouping: llama.cpp asserts used < count
        assert f"{arch}.expert_group_count" not in got


@pytest.mark.parametrize("dtype,qtype", [("f16", "F16"), ("bf16", "BF16")])
def test_half_dtypes_round_the_matrices_and_keep_vectors_and_router_f32(dtype, qtype, tmp_path):
    model = make_model("deepseek")
    export_gguf.export(save(model, tmp_path / "ck"), str(tmp_path / "m.gguf"), dtype=dtype)
    want = expected_tensors(model, "glm4moe")
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors:
        w = want[t.name]
        f32 = w.dim() == 1 or t.name.endswith("ffn_gate_inp.weight")
        assert t.tensor_type.name == ("F32" if f32 else qtype), t.name
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        rounded = w if f32 else w.to(torch_dtype).float()
        assert np.array_equal(values, rounded.numpy()), t.name
    assert fields(tmp_path / "m.gguf")["general.file_type"] == {"f16": 1, "bf16": 32}[dtype]


def test_mtp_modules_are_left_out_with_a_note(tmp_path, capsys):
    model = make_model("deepseek", mtp_num_layers=1)
    export_gguf.export(save(model, tmp_path / "ck"), str(tmp_path / "m.gguf"))
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors]
    assert "multi-token prediction" in capsys.readouterr().out
    assert not any("nextn" in n or n.startswith("blk.2.") for n in names)
    assert fields(tmp_path / "m.gguf")["glm4moe.block_count"] == 2


# ----------------------------------------------------------------------------- tokenizers
def rwkv_tokenize(tokens: list[str], text: bytes) -> list[int]:
    """llama.cpp's rwkv tokenizer: unescape every token (\\xNN, \\n, \\t, \\r, \\c), then take the longest
    token that the text starts with, again and again (llm_tokenizer_rwkv_session)."""
    def unescape(s: str) -> bytes:
        out, i = bytearray(), 0
        while i < len(s):
            if s[i] == "\\" and s[i + 1] == "x":  # two hex digits read as llama.cpp does: lower case only
                out.append(sum((ord(c) - (ord("a") - 10 if c >= "a" else ord("0"))) << 4 * (1 - k)
                               for k, c in enumerate(s[i + 2:i + 4])) & 0xFF)
                i += 4
            elif s[i] == "\\":
                out += {"n": b"\n", "t": b"\t", "r": b"\r"}.get(s[i + 1], s[i + 1].encode())
                i += 2
            else:
                out += s[i].encode()
                i += 1
        return bytes(out)
    vocab = {unescape(t): i for i, t in enumerate(tokens)}
    ids, at = [], 0
    while at < len(text):
        n = max(n for n in range(1, len(text) - at + 1) if text[at:at + n] in vocab)
        ids.append(vocab[text[at:at + n]])
        at += n
    return ids


@pytest.mark.parametrize("eos_id", [None, 0])
def test_byte_vocabulary_tokenises_any_text_byte_for_byte(eos_id, tmp_path, monkeypatch):
    ours = data.ByteTokenizer(eos_id=eos_id)
    monkeypatch.setattr(generate, "run_tokenizer", lambda *a, **k: ours)  # raw text (no eos) or prepared (NUL)
    export_gguf.export(save(make_model("dense"), tmp_path / "ck"), str(tmp_path / "m.gguf"))
    got = fields(tmp_path / "m.gguf")
    assert got["tokenizer.ggml.model"] == "rwkv"
    text = (SAMPLE + "\x00\x7f").encode()
    assert rwkv_tokenize(got["tokenizer.ggml.tokens"], text) == ours.encode(SAMPLE + "\x00\x7f") == list(text)
    assert set(got["tokenizer.ggml.token_type"]) == {gguf.TokenType.NORMAL}  # nothing split out as special
    assert (got["tokenizer.ggml.add_bos_token"], got["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert got.get("tokenizer.ggml.eos_token_id") == eos_id  # rwkv's default is none
    assert "tokenizer.ggml.bos_token_id" not in got


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    """A 300-token BPE prepared by scripts/prepare_data.py from a small multilingual corpus."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "text").mkdir()
    words = ["the", "model", "routes", "tokens", "héllo", "Ωμέγα", "日本語", "🚀", "don't", "it's", "x + 42",
             "def", "return", "\n", "\t", "  ", "1234", "über", "naïve", "(x):"]
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / "text" / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 400)), encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), str(root / "text"), "--out",
                        str(root / "prepared"), "--tokenizer", "bpe", "--vocab-size", "300"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return root / "prepared"


def gpt2_bpe(tokens: list[str], merges: list[str], text: str) -> list[int]:
    """llama.cpp's "gpt-2" BPE: GPT-2's regex split (unicode_regex_split_custom_gpt2), bytes to GPT-2's
    characters, then the lowest-ranked merge first until none applies (llm_tokenizer_bpe_session)."""
    import regex
    split = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    chars, vocab = export_hf.byte_to_char(), {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    ids = []
    for word in split.findall(text):
        parts = [chars[b] for b in word.encode()]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), len(rank)))
            if (parts[best], parts[best + 1]) not in rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def test_bpe_vocabulary_splits_and_merges_as_ours(bpe_data, tmp_path):
    ours = data.load_tokenizer(str(bpe_data))
    model = MoETransformer(tiny(vocab_size=ours.vocab_size), seed=0)
    export_gguf.export(save(model, tmp_path / "ck", str(bpe_data)), str(tmp_path / "m.gguf"))
    got = fields(tmp_path / "m.gguf")
    assert (got["tokenizer.ggml.model"], got["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    spec = json.loads(ours.tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    assert got["tokenizer.ggml.merges"] == merges and merges  # in rank order: the first merge applies first
    assert [got["tokenizer.ggml.tokens"][i] for i in spec["vocab"].values()] == list(spec["vocab"])  # each at its id
    for text in (SAMPLE, "the model routes tokens héllo Ωμέγα 日本語 🚀", "  leading and trailing  \n\n"):
        assert gpt2_bpe(got["tokenizer.ggml.tokens"], got["tokenizer.ggml.merges"], text) == ours.encode(text)
    assert got["tokenizer.ggml.eos_token_id"] == ours.eos_id
    assert got["tokenizer.ggml.token_type"][ours.eos_id] == gguf.TokenType.CONTROL
    assert (got["tokenizer.ggml.add_bos_token"], got["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert "tokenizer.ggml.bos_token_id" not in got  # ours has none; add_bos false keeps llama.cpp's 11 unused


# ------------------------------------------------------------------------------- refusals
def other_pre_tokenizer(tmp: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.BPE({chr(i): i for i in range(256)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp / "other.json"))
    return str(tmp / "other.json")


def refusal(tmp: Path, case: str) -> tuple[str, str, dict]:
    """(checkpoint, out, export keywords) of one bad input."""
    configs = {"expert_choice": dict(router_type="expert-choice"), "round_robin": dict(router_type="round-robin"),
               "capacity": dict(moe_capacity_factor=1.25), "moe_layers_not_leading_dense": dict(moe_layer_list="0"),
               "shared_width_not_a_multiple": dict(num_shared_experts=1, shared_expert_ffn_hidden_size=16),
               "vocab_rows_without_tokens": dict(vocab_size=300),
               "data_gone": dict(vocab_size=300)}  # (a byte model's tokenizer is bytes, data folder or not)
    ck = save(make_model("qwen3_moe", **configs.get(case, {})), tmp / "ck",
              str(tmp / "gone") if case == "data_gone" else "")
    (tmp / "file").write_text("x")
    out = {"out_under_a_file": tmp / "file" / "m.gguf", "out_exists": tmp / "file", "out_is_a_folder": tmp,
           "out_inside_checkpoint": Path(ck) / "m.gguf"}.get(case, tmp / "m.gguf")
    kw = {"tokenizer_path": other_pre_tokenizer(tmp)} if case == "tokenizer_splits_otherwise" else {}
    return (str(tmp / "none") if case == "missing_checkpoint" else ck), str(out), kw


REFUSALS = {
    "expert_choice": "routes every token by itself", "round_robin": "routes every token by itself",
    "capacity": "llama.cpp is dropless", "moe_layers_not_leading_dense": "first k layers dense",
    "shared_width_not_a_multiple": "not a whole number", "vocab_rows_without_tokens": "one token per row",
    "tokenizer_splits_otherwise": "GPT-2's split", "data_gone": "is gone", "missing_checkpoint": "no such folder",
    "out_under_a_file": "is not a folder", "out_exists": "not this tool's to replace", "out_is_a_folder": "is a folder",
    "out_inside_checkpoint": "inside the checkpoint",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_with_the_reason_and_nothing_written(case, tmp_path):
    checkpoint, out, kw = refusal(tmp_path, case)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=REFUSALS[case]):
        export_gguf.export(checkpoint, out, **kw)
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "file").read_text() == "x"


def run_main(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """main() as the command line calls it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)] + [str(a) for a in args])
    try:
        export_gguf.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, words: str) -> None:
    """Exit 2 and one `error:` line holding `words` (argparse prints its usage before it), no traceback."""
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err


def test_cli_writes_refuses_to_overwrite_and_overwrites_on_request(tmp_path, monkeypatch, capsys):
    ck = save(make_model("qwen3_moe"), tmp_path / "ck")
    code, out, err = run_main(monkeypatch, capsys, ck, tmp_path / "m.gguf")
    assert code == 0 and "qwen3moe" in out, err
    first = (tmp_path / "m.gguf").read_bytes()
    assert_one_error_line(*run_main(monkeypatch, capsys, ck, tmp_path / "m.gguf", "--dtype", "f16")[::2],
                          "--overwrite")
    assert (tmp_path / "m.gguf").read_bytes() == first
    assert run_main(monkeypatch, capsys, ck, tmp_path / "m.gguf", "--dtype", "f16", "--overwrite")[0] == 0
    assert fields(tmp_path / "m.gguf")["general.file_type"] == 1
    assert_one_error_line(*run_main(monkeypatch, capsys, ck, tmp_path / "n.gguf", "--over")[::2],
                          "unrecognized arguments: --over")  # allow_abbrev=False
    assert_one_error_line(*run_main(monkeypatch, capsys, ck, tmp_path / "ck" / "latest" / "m.gguf")[::2],
                          "not a folder")


def test_cli_without_gguf_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    ck = save(make_model("dense"), tmp_path / "ck")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    assert_one_error_line(*run_main(monkeypatch, capsys, ck, tmp_path / "m.gguf")[::2],
                          "pip install -r requirements-extras.txt")
    assert not (tmp_path / "m.gguf").exists()


def test_a_bad_checkpoint_ends_the_process_with_status_2_and_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none"), str(tmp_path / "m.gguf")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_one_error_line(r.returncode, r.stderr, "no such folder")
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------------ llama.cpp itself
def llama_cpp_or_skip():
    """llama.cpp's own library, prebuilt (PyPI's llama-cpp-py-sync: libllama from upstream, bound by CFFI)."""
    lcp = pytest.importorskip("llama_cpp_py_sync", reason="llama.cpp is not installed (pip install llama-cpp-py-sync)")
    try:
        lcp._cffi_bindings.get_lib()
    except RuntimeError as e:  # its wheel's libllama wants glibc 2.38 (Debian 13, Ubuntu 24.04)
        pytest.skip(f"llama.cpp's library does not load here: {e}")
    return lcp


def llama_cpp_decode(path: Path, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """The prompt's logits (T, V) and `steps` greedy tokens from llama.cpp: f32 KV cache, no flash attention.
    Through llama.h itself (llama_decode, llama_get_logits_ith): the Llama class keeps only the last logits."""
    lcp = llama_cpp_or_skip()
    llm = lcp.Llama(str(path), n_ctx=64, n_batch=64, n_threads=1, seed=0, flash_attn_type=0, type_k="f32",
                    type_v="f32")
    lib, ffi, ctx, vocab = llm._lib, llm._ffi, llm._ctx, llm.n_vocab

    def decode(tokens: list[int], start: int) -> np.ndarray:  # (len(tokens), V), one row per position
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, 1
            batch.seq_id[i][0] = 0
        assert lib.llama_decode(ctx, batch) == 0
        lib.llama_batch_free(batch)
        return np.stack([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * vocab), dtype=np.float32)
                         for i in range(len(tokens))])

    logits = decode(prompt, 0)
    new = [int(logits[-1].argmax())]
    while len(new) < steps:  # each new token alone at its position, the cache holding the rest (as generate.py)
        new.append(int(decode([new[-1]], len(prompt) + len(new) - 1)[0].argmax()))
    llm.close()
    return logits, new


E2E = {"bytes_qwen3moe": ("qwen3_moe", False), "bpe_qwen3moe": ("qwen3_moe", True),
       "bytes_deepseek_glm4moe": ("deepseek", False), "bytes_dense_qwen3": ("dense", False),
       "bytes_softmax_not_renormalised_glm4moe": ("softmax_not_renormalised", False)}


@pytest.mark.parametrize("case", sorted(E2E))
def test_llama_cpp_decodes_the_file_as_generate_does(case, bpe_data, tmp_path):
    lcp = llama_cpp_or_skip()
    kind, bpe = E2E[case]
    ours = data.load_tokenizer(str(bpe_data)) if bpe else data.ByteTokenizer()
    model = make_model(kind, seed=3, vocab_size=ours.vocab_size)
    export_gguf.export(save(model, tmp_path / "ck", str(bpe_data) if bpe else ""), str(tmp_path / "m.gguf"))
    prompt_text = "def héllo(x): return"
    prompt = ours.encode(prompt_text)
    llm = lcp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1)
    assert llm.tokenize(prompt_text, add_special=True) == prompt  # add_bos false: nothing added
    assert llm.tokenize(SAMPLE, add_special=False) == ours.encode(SAMPLE)
    llm.close()
    logits, new = llama_cpp_decode(tmp_path / "m.gguf", prompt, 32)
    want, _ = generate.generate(model, prompt, 32, temperature=0)
    with torch.no_grad():
        ours_logits = model(torch.tensor([prompt])).output[0].numpy()
    diff = float(np.abs(logits - ours_logits).max())
    print(f"{case}: llama.cpp {lcp.__llama_cpp_tag__}, max |dlogit| {diff:.2e} over {len(prompt)} prompt tokens, "
          f"32 greedy tokens equal: {new == want}")
    assert diff < 1e-3
    assert new == want
