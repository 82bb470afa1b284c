"""Export a checkpoint as one GGUF file that stock llama.cpp loads and decodes like scripts/generate.py.

    python scripts/export_gguf.py out/ckpt out/model.gguf                 # follows `latest`, f32 (exact)
    python scripts/export_gguf.py out/ckpt/step_00000400 out/model.gguf --dtype bf16 --overwrite
    llama-completion -m out/model.gguf -p "def main(" -n 64 --temp 0 -no-cnv   # llama.cpp, greedy

Architecture (llama.cpp's name, its tensor names and keys; each checked against its loader and graph):
  qwen3     num_experts 0: Qwen3's attention (grouped-query, q/k RMSNorm, rotary) and SwiGLU MLPs.
  qwen3moe  every layer MoE, softmax routing, top-k weights renormalised, no shared experts, no
            expert bias, groups or scaling factor: llama.cpp's qwen3moe graph fixes all of these.
  glm4moe   everything else that llama.cpp can compute: its graph is our block (same attention with
            q/k norm, no bias) with DeepSeek-V3's MoE: `leading_dense_block_count` dense layers first,
            softmax or sigmoid scores (`expert_gating_func`), the expert bias added for the choice only
            (`exp_probs_b`), expert groups (`expert_group_count` / `_used_count`), renormalisation on or
            off (`expert_weights_norm`), the scaling factor (`expert_weights_scale`) and shared experts.
            glm4moe always adds a shared expert: a model without one gets one whose down projection is
            zero, which adds exactly 0.
All three rotate with llama.cpp's NEOX rope (pairs i and i + Dh/2, as our RotaryEmbedding) over the whole head.
Multi-token prediction modules (`mtp.*`) only add a training loss: llama.cpp decodes without them, so
they are left out with a note.

Refused, one `error:` line and exit 2, because llama.cpp computes something else: expert-choice and
round-robin routing and a capacity factor (an expert's tokens depend on the other tokens of a batch;
llama.cpp routes every token by itself), MoE layers other than "the first k dense, then all MoE", shared
experts whose total width is not a multiple of --moe-ffn-hidden-size, a run whose tokenizer cannot be
found (its --data folder is gone: never bytes in place of a BPE) or has not one token per row of the
model's vocabulary, and a tokenizer.json whose pre-tokenizer or normaliser llama.cpp's "gpt-2" BPE does
not reproduce, or that has no eos (llama.cpp would take id 11).
Checked against llama.cpp b11739 (tests/test_export_gguf.py): prompt logits within 1.2e-6 of ours in f32,
the same 32 greedy tokens, the same token ids.

Tokenizer (the run's, found as generate.py finds it, or --tokenizer): a prepared BPE (byte-level BPE of
`tokenizers`, GPT-2's split regex) is written as tokenizer.ggml.model "gpt2" with pre "gpt-2", whose
regex is that split; the bytes tokenizer as model "rwkv" with token i the escaped byte i: llama.cpp's
rwkv tokenizer matches the longest token, here always one byte, so text becomes its UTF-8 bytes. No
bos is added (add_bos_token false, as generate.py), eos_token_id is the run's eos.
Weights are f32 by default (exact); --dtype f16 or bf16 halves the file (norms, the router and the
expert bias stay f32, as convert_hf_to_gguf.py keeps them). Needs the `gguf` package
(requirements-extras.txt). OUT must be new, or with --overwrite an earlier export of this script (a
GGUF file whose metadata holds its mark, MARK_KEY); anything else (a GGUF from elsewhere, any other
file) is refused even with --overwrite. The file is written beside OUT and renamed over it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint as ckpt_io  # noqa: E402
import data  # noqa: E402
import outputs  # noqa: E402  (claim: whether OUT may be written, and replaced)
import generate  # noqa: E402  (run_tokenizer: the run's tokenizer, as generate.py finds it)
from prepare_data import MAX_PIECE_BYTES  # noqa: E402
from moe_layers import ModelConfig  # noqa: E402
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

DTYPES = ("f32", "f16", "bf16")
# Our per-layer names -> llama.cpp's (gguf-py MODEL_TENSORS); post_attention_layernorm is arch-specific.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.expert_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
# glm4moe calls the norm before the MLP post_attention_norm, qwen3 / qwen3moe ffn_norm
POST_ATTENTION_NORM = {"qwen3": "ffn_norm.weight", "qwen3moe": "ffn_norm.weight",
                       "glm4moe": "post_attention_norm.weight"}
GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
EXPERT_PROJS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                "down_proj": "ffn_down_exps.weight"}
# The pre-tokenizer of our BPE (prepare_data.py): GPT-2's regex, which llama.cpp's "gpt-2" pre type splits by.
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


class Unrepresentable(ValueError):
    """A checkpoint that no llama.cpp architecture computes exactly as our model does."""


def gguf_arch(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """qwen3 for a dense model, qwen3moe where its fixed routing is ours, glm4moe for the rest."""
    if not cfg.moe_layers:
        return "qwen3"
    biased = any(t.any() for name, t in state.items() if name.endswith(".expert_bias"))
    qwen3moe_routing = (cfg.router_score_function == "softmax" and cfg.norm_topk_prob and not biased
                        and not cfg.num_shared_experts and cfg.router_topk_scaling_factor == 1.0
                        and cfg.router_group_topk == cfg.router_num_groups)  # all groups kept: no groups
    if qwen3moe_routing and cfg.moe_layers == list(range(cfg.num_layers)):
        return "qwen3moe"
    return "glm4moe"


def check_representable(cfg: ModelConfig, where: str) -> None:
    """Raise Unrepresentable naming the flag when llama.cpp would compute another function."""
    if cfg.num_experts and cfg.router_type != "topk":
        raise Unrepresentable(f"{where}: --router-type {cfg.router_type}: an expert's tokens depend on the other "
                              f"tokens of a batch, and llama.cpp routes every token by itself (top-k)")
    if cfg.num_experts and cfg.moe_capacity_factor:
        raise Unrepresentable(f"{where}: --moe-capacity-factor {cfg.moe_capacity_factor} drops tokens by what "
                              f"else is in the batch; llama.cpp is dropless (train with 0)")
    if not cfg.moe_layers:
        return
    if cfg.leading_dense_layers is None:
        flag = "--moe-layer-list" if cfg.moe_layer_list else "--moe-layer-interval"
        raise Unrepresentable(f"{where}: MoE layers {cfg.moe_layers} ({flag}) are not 'the first k layers dense, "
                              f"then every layer MoE', the one pattern llama.cpp's MoE architectures load "
                              f"(glm4moe's leading_dense_block_count); train with --first-k-dense-layers k")
    if cfg.shared_ffn_hidden_size % cfg.moe_ffn_hidden_size:
        raise Unrepresentable(f"{where}: shared experts {cfg.shared_ffn_hidden_size} wide in all "
                              f"(--shared-expert-ffn-hidden-size) are not a whole number of "
                              f"--moe-ffn-hidden-size {cfg.moe_ffn_hidden_size}; glm4moe's shared expert is "
                              f"expert_shared_count x expert_feed_forward_length wide")


def layer_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str, i: int) -> dict[str, torch.Tensor]:
    """llama.cpp name -> tensor (our orientation: (out, in), which ggml reads as ne = (in, out)) of layer i."""
    ours, theirs = f"layers.{i}.", f"blk.{i}."
    names = dict(LAYER_NAMES, **{"post_attention_layernorm.weight": POST_ATTENTION_NORM[arch]})
    out = {theirs + gg: state[ours + name] for name, gg in names.items() if ours + name in state}
    if arch == "qwen3moe":
        out.pop(theirs + "exp_probs_b.bias")  # checked zero by gguf_arch: qwen3moe routes without one
    if not cfg.is_moe_layer(i):
        return out
    for proj, gg in EXPERT_PROJS.items():  # (E, F, D) / (E, D, F): ggml's ne = (D, F, E) / (F, D, E)
        out[theirs + gg] = torch.stack([state[f"{ours}mlp.experts.{j}.{proj}.weight"] for j in range(cfg.num_experts)])
    if arch == "glm4moe" and not cfg.num_shared_experts:
        # glm4moe's graph always adds a shared expert; with a zero down projection it adds exactly 0
        f, d = cfg.moe_ffn_hidden_size, cfg.hidden_size
        out.update({theirs + "ffn_gate_shexp.weight": torch.zeros(f, d),
                    theirs + "ffn_up_shexp.weight": torch.zeros(f, d),
                    theirs + "ffn_down_shexp.weight": torch.zeros(d, f)})
    return out


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file, by llama.cpp name; mtp.* left out."""
    out = {gg: state[name] for name, gg in GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        out.update(layer_tensors(cfg, state, arch, i))
    return out


def add_model_keys(writer, cfg: ModelConfig, arch: str) -> None:
    """The hyper-parameters llama.cpp's loader reads for `arch` (llama-model.cpp, src/models/<arch>.cpp)."""
    import gguf
    dh = cfg.attn_head_dim
    writer.add_context_length(cfg.seq_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(dh)  # head_dim may differ from hidden / heads
    writer.add_value_length(dh)
    writer.add_rope_dimension_count(dh)  # rotary over the whole head (glm4moe's releases rotate half)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "qwen3":
        return
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_token)
    writer.add_expert_feed_forward_length(cfg.moe_ffn_hidden_size)
    if arch == "qwen3moe":
        return
    writer.add_leading_dense_block_count(cfg.leading_dense_layers)
    writer.add_expert_shared_count(max(1, cfg.shared_ffn_hidden_size // cfg.moe_ffn_hidden_size))
    sigmoid = cfg.router_score_function == "sigmoid"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_expert_weights_norm(cfg.norm_topk_prob or sigmoid)  # our sigmoid routing always renormalises
    writer.add_expert_weights_scale(cfg.router_topk_scaling_factor)
    if cfg.router_group_topk < cfg.router_num_groups:  # keeping every group is no restriction: no keys
        writer.add_expert_group_count(cfg.router_num_groups)
        writer.add_expert_group_used_count(cfg.router_group_topk)


def rwkv_escape(b: int) -> str:
    """Byte b as llama.cpp's rwkv tokenizer reads a token (llama_unescape_rwkv_token: \\xNN, lower-case hex)."""
    return f"\\x{b:02x}"


def add_byte_vocab(writer) -> None:
    """Token i is byte i; every token NORMAL, so the tokenizer never splits out a special token (ours does not)."""
    import gguf
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list([rwkv_escape(b) for b in range(256)])
    writer.add_token_types([gguf.TokenType.NORMAL] * 256)


def is_piece_cut(pre: dict) -> bool:
    """Whether a pre-tokenizer is prepare_data.py's cut of each word into pieces of at most MAX_PIECE_BYTES."""
    pattern = (pre.get("pattern") or {}).get("Regex")
    return pre.get("type") == "Split" and pattern == f"[\\s\\S]{{1,{MAX_PIECE_BYTES}}}" and pre.get("behavior") == "Isolated"


def check_tokenizer(tokenizer: data.ByteTokenizer | data.TextTokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer llama.cpp would not reproduce: another count than the model's rows, a tokenizer.json
    that is not a byte-level BPE with GPT-2's split, or one without an eos (llama.cpp would take its own)."""
    if tokenizer.vocab_size != vocab_size:
        raise Unrepresentable(f"{where}: the model has {vocab_size} vocabulary rows and the run's tokenizer has "
                              f"{tokenizer.vocab_size} tokens; llama.cpp needs one token per row (give --tokenizer)")
    if isinstance(tokenizer, data.ByteTokenizer):
        return
    spec = json.loads(tokenizer.tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 2 and is_piece_cut(pre["pretokenizers"][1]):
        # prepare_data.py's BPE: GPT-2's split, then each word cut into pieces of at most MAX_PIECE_BYTES
        # (linear training and encoding). llama.cpp has no such cut: the same ids for every word up to that
        # length, which is all text but unbroken runs (base64, minified code) longer than it.
        pre = pre["pretokenizers"][0]
        print(f"note: {tokenizer.name} cuts words longer than {MAX_PIECE_BYTES} bytes into pieces; llama.cpp's gpt-2 "
              f"split does not, so it may encode such runs with other ids (decoding and every logit are the same)")
    same_split = (model.get("type") == "BPE" and spec.get("normalizer") is None
                  and all(pre.get(k) == v for k, v in GPT2_PRE_TOKENIZER.items())
                  and not model.get("byte_fallback") and not model.get("ignore_merges")
                  and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))
    if not same_split:
        raise Unrepresentable(f"{where}: {tokenizer.name} is not a byte-level BPE with GPT-2's split (pre-tokenizer "
                              f"{pre.get('type')}, normalizer {spec.get('normalizer')}); llama.cpp's 'gpt-2' BPE "
                              f"would split text otherwise")
    if tokenizer.eos_id is None:
        raise Unrepresentable(f"{where}: {tokenizer.name} has no end-of-document token; llama.cpp would stop at "
                              f"token 11, its default eos for a GPT-2 vocabulary")


def add_bpe_vocab(writer, tokenizer: data.TextTokenizer) -> None:
    """tokenizer.json's vocabulary and merges under llama.cpp's "gpt2" model with the "gpt-2" pre-tokenizer."""
    import gguf
    spec = json.loads(tokenizer.tokenizer.to_str())
    tokens = [""] * tokenizer.vocab_size
    types = [gguf.TokenType.NORMAL] * tokenizer.vocab_size
    for text, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items():
        tokens[i] = text
    for added in spec.get("added_tokens", []):  # special ones are matched in the text first, as `tokenizers` does
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]  # "a b" or ["a", "b"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def add_tokenizer(writer, tokenizer: data.ByteTokenizer | data.TextTokenizer) -> None:
    """The vocabulary and the special ids; bos / add_* written even when off, or llama.cpp takes its defaults."""
    if isinstance(tokenizer, data.ByteTokenizer):
        add_byte_vocab(writer)
    else:
        add_bpe_vocab(writer, tokenizer)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(False)  # generate.py encodes the prompt without a bos (and training had none)
    writer.add_add_eos_token(False)


def add_weights(writer, tensors: dict[str, torch.Tensor], dtype: str) -> None:
    """f32, or f16 / bf16 for matrices; vectors (norms, expert bias) and the router stay f32 (convert_hf_to_gguf)."""
    import gguf
    for name, t in tensors.items():
        a = t.detach().to(torch.float32).contiguous().numpy()
        if dtype == "f32" or a.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            writer.add_tensor(name, a)
        elif dtype == "f16":
            writer.add_tensor(name, a.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)


def read_model(checkpoint: str) -> tuple[ckpt_io.Checkpoint, ModelConfig, dict[str, torch.Tensor]]:
    """The checkpoint, its validated model config and its whole state (experts one key each)."""
    if not os.path.isdir(checkpoint):
        raise ckpt_io.CheckpointError(f"checkpoint {checkpoint}: no such folder")
    ckpt = ckpt_io.read_checkpoint(checkpoint)
    try:
        cfg = ModelConfig(**ckpt.meta["model"])
        cfg.validate()
    except ValueError as e:
        raise ckpt_io.CheckpointError(f"{ckpt.path}: its model config is invalid ({e})") from None
    state = ckpt_io.full_state_dict(ckpt)
    if cfg.num_layers > len(state) or 3 * cfg.num_experts > len(state):  # before anything lists the layers
        raise Unrepresentable(f"{ckpt.path}: its model config gives more layers or experts than its "
                              f"{len(state)} tensors hold")
    return ckpt, cfg, state


# The mark of this script in the metadata (llama.cpp ignores keys it does not know): --overwrite replaces
# only a file that carries it.
MARK_KEY, MARK = "moe_minimal.written_by", "scripts/export_gguf.py"


def is_earlier_export(path: str) -> bool:
    """A regular GGUF file whose metadata holds MARK_KEY = MARK (read through the memory-mapped header)."""
    import gguf
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        field = gguf.GGUFReader(path).fields.get(MARK_KEY)
        return field is not None and field.contents() == MARK
    except Exception:  # a damaged or foreign file: not ours
        return False


GGUF_EXPORT = outputs.Kind("an earlier export of scripts/export_gguf.py", False, is_earlier_export,
                           replaced_whole=True)


def check_out(out: str, overwrite: bool, inputs: dict[str, str | None]) -> None:
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"OUT {out}: {folder} is not a folder; give a path in an existing folder")
    if os.path.isdir(out):
        raise ValueError(f"OUT {out} is a folder; give a file name such as {os.path.join(out, 'model.gguf')}")
    outputs.claim(out, "OUT", GGUF_EXPORT, overwrite, inputs)  # new, or an earlier export with --overwrite


def export(checkpoint: str, out: str, dtype: str = "f32", overwrite: bool = False,
           tokenizer_path: str | None = None) -> str:
    """Write the GGUF file `out` (through a temporary file renamed at the end, so a refusal or a crash
    leaves nothing); return the llama.cpp architecture written. Everything is checked first."""
    import gguf
    check_out(out, overwrite, {"the checkpoint": checkpoint, "--tokenizer": tokenizer_path})
    ckpt, cfg, state = read_model(checkpoint)
    check_representable(cfg, ckpt.path)
    # the run's tokenizer or --tokenizer; never bytes in place of a BPE whose --data folder is gone
    tokenizer = generate.run_tokenizer(checkpoint, tokenizer_path, cfg.vocab_size, needed=True)
    if tokenizer is None:
        raise Unrepresentable(f"{ckpt.path}: the run's tokenizer has more tokens than the model's {cfg.vocab_size} "
                              f"vocabulary rows; llama.cpp needs one token per row (give --tokenizer)")
    check_tokenizer(tokenizer, cfg.vocab_size, ckpt.path)
    arch = gguf_arch(cfg, state)
    if cfg.mtp_num_layers:
        print(f"note: the {cfg.mtp_num_layers} multi-token prediction module(s) (mtp.*) of {ckpt.path} are not "
              f"exported: they only add a training loss, and llama.cpp decodes without them")
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".tmp-export-gguf-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(os.path.basename(os.path.normpath(ckpt.path)))
        writer.add_string(MARK_KEY, MARK)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
        add_model_keys(writer, cfg, arch)
        add_tokenizer(writer, tokenizer)
        add_weights(writer, gguf_tensors(cfg, state, arch), dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        outputs.swap_in(tmp, out)  # one rename: an earlier export stays whole until this one replaces it
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return arch


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a --save folder (follows `latest`) or one step folder")
    p.add_argument("out", help="the .gguf file to write (new, unless --overwrite)")
    p.add_argument("--dtype", default="f32", choices=DTYPES, help="type of the weight matrices (f32 is exact)")
    p.add_argument("--tokenizer", default=None,
                   help="bytes, a prepared data folder or a tokenizer.json (default: the one the checkpoint carries)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it is an earlier export of this script (nothing else is replaced)")
    args = p.parse_args()
    try:
        import gguf  # noqa: F401  (checked here so that a missing extra is one line, not a traceback)
    except ImportError:
        print("error: the gguf package is not installed; pip install -r requirements-extras.txt", file=sys.stderr)
        sys.exit(2)
    try:
        arch = export(args.checkpoint, args.out, args.dtype, args.overwrite, args.tokenizer)
    except (ValueError, OSError) as e:  # CheckpointError, DataError and Unrepresentable are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, TypeError) as e:  # a meta.json whose model config is not ours
        print(f"error: checkpoint {args.checkpoint}: not a model this code exports ({type(e).__name__}: {e})",
              file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out} (llama.cpp architecture {arch}, {args.dtype})")


if __name__ == "__main__":
    main()
