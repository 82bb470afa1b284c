"""Export a checkpoint of any layout as a transformers folder: config.json + model.safetensors.

    python scripts/export_hf.py --checkpoint out/ckpt --out out/hf            # follows `latest`
    python scripts/export_hf.py --checkpoint out/ckpt/step_00000400 --out out/hf --dtype bfloat16
    python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('out/hf'))"

num_experts > 0 gives Qwen3MoeForCausalLM (model_type qwen3_moe; MoE layers by decoder_sparse_step
and mlp_only_layers), 0 gives Qwen3ForCausalLM (qwen3), and --router-score-function sigmoid (the
DeepSeek-V3 / Kimi-K2 recipe) gives Glm4MoeForCausalLM (glm4_moe): DeepSeek-V3's router (sigmoid,
e_score_correction_bias = our expert_bias, n_group / topk_group, routed_scaling_factor, shared
experts, first_k_dense_replace) on our attention (grouped-query, q/k RMSNorm, full rotary). All three
give the logits of our MoETransformer. Our names are transformers' without the `model.` prefix,
except the router (`mlp.router` is their `mlp.gate`, its `expert_bias` their
`e_score_correction_bias`). Checkpoints already store experts one key per expert in transformers' orientation
(`layers.0.mlp.experts.5.gate_proj.weight`, (F, D)), which is also how the Qwen3-MoE releases on
the Hub store them: transformers 4.x loads them as they are, 5.x fuses them while loading.
Tokenizer: the run's (data.load_tokenizer of the --data stored in the checkpoint) is written as
tokenizer.json (a prepared BPE or tokenizer.json: copied; bytes: built here with `tokenizers`, a
byte-level BPE without merges whose id i is byte i, the eos id named <|endoftext|>), with a
tokenizer_config.json that transformers 4.51+ and 5.x load as the same PreTrainedTokenizerFast
(eos / bos tokens, model_max_length = seq_length) and a generation_config.json with the special
ids, so `transformers.pipeline("text-generation", model=OUT)` runs on the folder and its greedy
text is generate.py's. A run whose tokenizer is unknown (token files without one) gets none, and
the run's data meta.json is copied beside the weights. Needs safetensors and tokenizers
(requirements-extras.txt); writing the folder does not need transformers itself.
Multi-token prediction modules (`--mtp-num-layers`, `mtp.*` weights) are a training aid that
these classes have no place for (Glm4Moe's num_nextn_predict_layers is written 0): they are left
out, and the script says so.
--out must be a new or empty folder outside the checkpoint, or with --overwrite an earlier export of
this script (only the files it writes, and a model.safetensors whose header carries its mark,
MARK): the new export is written into a temporary folder beside it and swapped in, the old one
deleted only then. A folder of anything else (a run, a model from elsewhere, an export from before
the mark) is refused even with --overwrite. Before anything is written, every
tensor's name and shape is checked against what transformers builds from the written config.json;
a mismatch, a model no class expresses (softmax routing with groups, a scaling factor or shared
experts; sigmoid routing with MoE layers other than "first k dense, then all"; shared experts of
another width than the routed ones; capacity or other router types) or a bad checkpoint is one
`error:` line naming the flag, exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import stat
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402
import data  # noqa: E402
import outputs  # noqa: E402
from moe_layers import ModelConfig  # noqa: E402
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Model options neither transformers class has a counterpart for, with the value that means "off"; a
# checkpoint without the field (written before the option existed) has it off. Training-only options
# (router jitter, the kind of aux loss, the bias update rate) do not change the weights' meaning and pass.
NOT_IN_TRANSFORMERS = {"router_type": "topk", "moe_capacity_factor": 0.0}
# ... and those only the DeepSeek-style class (Glm4Moe, sigmoid scores) has: Qwen3-MoE routes by softmax.
NOT_IN_QWEN3 = {"num_shared_experts": 0, "router_topk_scaling_factor": 1.0, "router_num_groups": 1}


# What export() writes into --out, and the mark it puts in model.safetensors' header (transformers reads only
# "format"): --overwrite replaces a folder only when it holds these files alone and carries the mark.
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "meta.json")
MARK = {"format": "pt", "written_by": "moe-minimal scripts/export_hf.py"}


def is_earlier_export(folder: str) -> bool:
    """Only EXPORT_FILES, and a model.safetensors (a regular file: a FIFO would block) that carries MARK."""
    weights = os.path.join(folder, "model.safetensors")
    if not set(os.listdir(folder)) <= set(EXPORT_FILES) or not os.path.lexists(weights):
        return False
    if not stat.S_ISREG(os.lstat(weights).st_mode):
        return False
    try:
        from safetensors import safe_open
        with safe_open(weights, "pt") as f:  # reads the header only
            return (f.metadata() or {}).get("written_by") == MARK["written_by"]
    except Exception:  # not a safetensors file (the Rust side raises its own types)
        return False


HF_EXPORT = outputs.Kind("an earlier export of scripts/export_hf.py", True, is_earlier_export, replaced_whole=True)


class UnsupportedModel(ValueError):
    """A checkpoint whose model no transformers class here can express."""


def is_glm4_moe(cfg: ModelConfig) -> bool:
    """Sigmoid routing goes to Glm4MoeForCausalLM, the class with DeepSeek-V3's router (sigmoid scores,
    e_score_correction_bias, groups, routed_scaling_factor, shared experts) on our attention (grouped-query,
    q/k RMSNorm, no bias); softmax routing to Qwen3MoeForCausalLM, a dense model to Qwen3ForCausalLM."""
    return cfg.num_experts > 0 and cfg.router_score_function == "sigmoid"


def check_expressible(cfg: ModelConfig, where: str) -> None:
    """Raise UnsupportedModel naming the flag when the target class cannot hold this model."""
    for name, off in NOT_IN_TRANSFORMERS.items():
        if getattr(cfg, name) != off:
            raise UnsupportedModel(f"{where}: {name} = {getattr(cfg, name)!r} (--{name.replace('_', '-')}) has no "
                                   f"counterpart in transformers (it needs {off!r})")
    if cfg.num_experts == 0:
        return
    if not is_glm4_moe(cfg):
        for name, off in NOT_IN_QWEN3.items():
            if getattr(cfg, name) != off:
                raise UnsupportedModel(f"{where}: {name} = {getattr(cfg, name)!r} (--{name.replace('_', '-')}) has "
                                       f"no counterpart in transformers' Qwen3-MoE (it needs {off!r}), the class of "
                                       f"softmax routing; Glm4Moe has it but routes by --router-score-function sigmoid")
        return
    if cfg.leading_dense_layers is None:
        flag = "--moe-layer-list" if cfg.moe_layer_list else "--moe-layer-interval"
        raise UnsupportedModel(f"{where}: MoE layers {cfg.moe_layers} ({flag}) are not 'the first k layers dense, "
                               f"then every layer MoE', the one pattern Glm4Moe's first_k_dense_replace expresses; "
                               f"train with --first-k-dense-layers k and --moe-layer-interval 1")
    if cfg.shared_expert_ffn_hidden_size not in (0, cfg.moe_ffn_hidden_size):
        raise UnsupportedModel(f"{where}: --shared-expert-ffn-hidden-size {cfg.shared_expert_ffn_hidden_size} differs "
                               f"from --moe-ffn-hidden-size {cfg.moe_ffn_hidden_size}; Glm4Moe's shared experts are "
                               f"n_shared_experts x moe_intermediate_size wide")
    if cfg.num_experts // cfg.router_num_groups < 2:
        raise UnsupportedModel(f"{where}: --num-experts {cfg.num_experts}: Glm4Moe scores each group of experts by "
                               f"its two best, so it needs at least 2 experts per group")


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' (`layers.1.mlp.router.weight` -> `model.layers.1.mlp.gate.weight`)."""
    if name.startswith("lm_head."):
        return name
    if name.endswith(".mlp.router.weight"):
        name = name[: -len("router.weight")] + "gate.weight"
    if name.endswith(".mlp.router.expert_bias"):  # Glm4Moe / DeepSeek-V3 call the balancing bias this
        name = name[: -len("router.expert_bias")] + "gate.e_score_correction_bias"
    return "model." + name


def hf_config(cfg: ModelConfig, train: dict, dtype: str) -> dict:
    """transformers' config.json for our ModelConfig and TrainConfig (as a dict)."""
    config = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,  # dense layers
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.attn_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_length,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if is_glm4_moe(cfg):
        config.update({
            "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe",
            # Glm4Moe rotates half of each head by default: ours turns all of it (same rotate-half pairing)
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
            # and the same at the top level, which is where 4.x reads them (it ignores rope_parameters and would
            # rotate half of each head, theta 10000); 5.x takes rope_parameters' values first
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": 1.0,
            "use_qk_norm": True,
            "moe_intermediate_size": cfg.moe_ffn_hidden_size,
            "n_routed_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_token,
            "n_shared_experts": cfg.num_shared_experts,
            "first_k_dense_replace": cfg.leading_dense_layers,
            "norm_topk_prob": True,  # our sigmoid routing always renormalises the K weights
            "routed_scaling_factor": cfg.router_topk_scaling_factor,
            "n_group": cfg.router_num_groups,
            "topk_group": cfg.router_group_topk,
            "num_nextn_predict_layers": 0,
        })
        return config
    config.update({
        # rope_theta: read as is by 4.x and turned into rope_parameters by 5.x
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
    })
    if cfg.num_experts == 0:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **config}
    step = 1 if cfg.moe_layer_list else cfg.moe_layer_interval
    config.update({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_token,
        "decoder_sparse_step": step,  # MoE iff (i + 1) % step == 0 and i not in mlp_only_layers
        "mlp_only_layers": [i for i in range(cfg.num_layers) if (i + 1) % step == 0 and not cfg.is_moe_layer(i)],
        "norm_topk_prob": cfg.norm_topk_prob,
        "output_router_logits": False,
        "router_aux_loss_coef": train.get("router_aux_loss_coef", 0.001),
    })
    return config


def hf_moe_layer(config: dict, i: int) -> bool:
    """Whether transformers builds layer i of this config.json as an MoE layer (its rule, not ours)."""
    if config["model_type"] == "glm4_moe":
        return i >= config["first_k_dense_replace"]
    return (config.get("num_experts", 0) > 0 and i not in config["mlp_only_layers"]
            and (i + 1) % config["decoder_sparse_step"] == 0)


def hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor that transformers' Qwen3 / Qwen3-MoE / Glm4Moe builds from this config.json:
    the folder is refused unless the weights match it exactly, so transformers never refuses it."""
    d, v, hd = config["hidden_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if hf_moe_layer(config, i):
            f, e = config["moe_intermediate_size"], config.get("num_experts", config.get("n_routed_experts"))
            shapes[p + "mlp.gate.weight"] = (e, d)
            for j in range(e):
                shapes.update({f"{p}mlp.experts.{j}.gate_proj.weight": (f, d),
                               f"{p}mlp.experts.{j}.up_proj.weight": (f, d),
                               f"{p}mlp.experts.{j}.down_proj.weight": (d, f)})
            if config["model_type"] == "glm4_moe":
                s = f * config["n_shared_experts"]  # all shared experts side by side (0 wide when there are none)
                shapes.update({p + "mlp.gate.e_score_correction_bias": (e,),
                               p + "mlp.shared_experts.gate_proj.weight": (s, d),
                               p + "mlp.shared_experts.up_proj.weight": (s, d),
                               p + "mlp.shared_experts.down_proj.weight": (d, s)})
        else:
            f = config["intermediate_size"]
            shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                           p + "mlp.down_proj.weight": (d, f)})
    return shapes


def byte_to_char() -> list[str]:
    """GPT-2's byte -> printable character map, the one the ByteLevel pre-tokenizer applies (byte i -> [i])."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]  # bytes that stand for themselves
    chars, shifted = [""] * 256, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)  # the others move past Latin-1, in byte order
            shifted += 1
    return chars


def byte_tokenizer(eos_id: int | None):
    """A tokenizers.Tokenizer of our byte ids: a BPE without merges over the 256 byte characters,
    so id i is byte i; the eos byte (prepared data: NUL) is the special token <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    names = byte_to_char()
    if eos_id is not None:
        names[eos_id] = data.EOS_NAMES[0]
    tokenizer = Tokenizer(models.BPE({name: i for i, name in enumerate(names)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    if eos_id is not None:
        tokenizer.add_special_tokens([AddedToken(names[eos_id], special=True, normalized=False)])
    return tokenizer


def tokenizer_files(ours: data.ByteTokenizer | data.TextTokenizer | None, vocab: int,
                    seq_length: int) -> dict[str, str] | None:
    """tokenizer.json, tokenizer_config.json and generation_config.json of the run's tokenizer
    (file name -> text), or None when the run has none that fits the model's vocabulary."""
    if ours is None or ours.vocab_size > vocab:
        return None
    if isinstance(ours, data.ByteTokenizer):
        tokenizer = byte_tokenizer(ours.eos_id)
    else:
        tokenizer = data.import_tokenizers().Tokenizer.from_file(ours.name)
    special = {key: tokenizer.id_to_token(i) if i is not None else None
               for key, i in (("eos_token", ours.eos_id), ("bos_token", ours.bos_id))}
    # model_input_names: 4.x's PreTrainedTokenizerFast also returns token_type_ids by default, which
    # model.generate(**tokenizer(text)) refuses ("model_kwargs are not used by the model"); 5.x returns these two
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_length,
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"], **special}
    generation = {"bos_token_id": ours.bos_id, "eos_token_id": ours.eos_id, "pad_token_id": ours.eos_id}
    return {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": json.dumps(config, indent=2),
            "generation_config.json": json.dumps(generation, indent=2)}


def export(checkpoint: str, out: str, dtype: str = "float32", overwrite: bool = False) -> list[str]:
    """Write config.json, model.safetensors, the tokenizer's three files (when the run has one) and a copied
    data meta.json into `out`, a new or empty folder or (`overwrite`) an earlier export; return their paths.
    Everything is checked before anything is written, and the files are written into a temporary folder
    swapped in for `out` at the end, so a refusal or a crash leaves `out` as it was."""
    from safetensors.torch import save_file
    if not os.path.isdir(checkpoint):  # (checkpoint.resolve words this for the trainer's --load)
        raise ckpt_io.CheckpointError(f"--checkpoint {checkpoint}: no such folder")
    outputs.claim(out, "--out", HF_EXPORT, overwrite, inputs={"the checkpoint": checkpoint})
    ckpt = ckpt_io.read_checkpoint(checkpoint)
    meta = ckpt.meta
    try:
        cfg = ModelConfig(**meta["model"])  # fields the checkpoint predates take their default, which means "off"
        cfg.validate()  # a checkpoint of another kind fails here, not in transformers
    except ValueError as e:
        raise ckpt_io.CheckpointError(f"{ckpt.path}: its model config is invalid ({e})") from None
    state = ckpt_io.full_state_dict(ckpt)
    if cfg.num_layers > len(state) or 3 * cfg.num_experts > len(state):  # before anything lists the layers
        raise UnsupportedModel(f"{ckpt.path}: its model config gives more layers or experts than its "
                               f"{len(state)} tensors hold")
    check_expressible(cfg, ckpt.path)
    weights = {}
    if cfg.mtp_num_layers:
        print(f"note: the {cfg.mtp_num_layers} multi-token prediction module{'s' if cfg.mtp_num_layers > 1 else ''} "
              f"(mtp.*) of {ckpt.path} are not exported: they only add a training loss, and the exported model "
              f"predicts the next token without them")
    for name, t in state.items():
        if name.startswith("mtp."):
            continue
        if name.endswith(".expert_bias") and not is_glm4_moe(cfg):  # Qwen3 routes without a balancing bias
            if t.any():
                raise UnsupportedModel(f"{ckpt.path}: {name} is non-zero; Qwen3-MoE routing has no expert bias "
                                       f"(Glm4Moe has one, for --router-score-function sigmoid)")
            continue
        # the bias stays fp32 whatever --dtype: transformers keeps e_score_correction_bias in fp32
        t = t if name.endswith(".expert_bias") else t.to(DTYPES[dtype])
        weights[hf_name(name)] = t.contiguous()  # per-expert tensors are transposed views
    if is_glm4_moe(cfg) and not cfg.num_shared_experts:  # Glm4Moe always builds shared experts: 0 wide here
        for layer in cfg.moe_layers:
            for proj, shape in (("gate_proj", (0, cfg.hidden_size)), ("up_proj", (0, cfg.hidden_size)),
                                ("down_proj", (cfg.hidden_size, 0))):
                name = f"model.layers.{layer}.mlp.shared_experts.{proj}.weight"
                weights[name] = torch.zeros(shape, dtype=DTYPES[dtype])
    config = hf_config(cfg, meta.get("train", {}), dtype)
    want = hf_shapes(config)
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        raise UnsupportedModel(f"{ckpt.path}: the weights do not fit the exported config.json: missing {missing[:3]}, "
                               f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise UnsupportedModel(f"{ckpt.path}: {name} has shape {tuple(weights[name].shape)}, the exported "
                                   f"config.json gives {shape}")
    tokenizer = tokenizer_files(ckpt_io.carried_tokenizer(ckpt.path, ckpt.meta), config["vocab_size"], config["max_position_embeddings"])
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".tmp-export-{os.getpid()}")
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata=MARK)  # transformers wants "format"
        names = ["config.json", "model.safetensors"]
        for name, text in (tokenizer or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
            names.append(name)
        data = meta.get("train", {}).get("data", "")
        if data and os.path.isfile(os.path.join(data, "meta.json")):  # a regular file: never a FIFO
            names.append(os.path.basename(shutil.copy(os.path.join(data, "meta.json"), os.path.join(tmp, "meta.json"))))
        outputs.swap_in(tmp, out)  # an earlier export (--overwrite) is deleted only once this one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out, n) for n in names]


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a --save folder (follows `latest`) or one step folder")
    p.add_argument("--out", required=True, help="new or empty folder to write the model and its tokenizer into")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier export of this "
                                                            "script (nothing else is replaced)")
    args = p.parse_args()
    for extra in ("safetensors", "tokenizers"):
        if importlib.util.find_spec(extra) is None:
            print(f"error: {extra} is not installed; pip install -r requirements-extras.txt", file=sys.stderr)
            sys.exit(2)
    try:
        written = export(args.checkpoint, args.out, args.dtype, args.overwrite)
    except (ValueError, OSError) as e:  # CheckpointError and UnsupportedModel are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, TypeError) as e:  # a meta.json whose model config is not ours
        print(f"error: --checkpoint {args.checkpoint}: not a model this code exports ({type(e).__name__}: {e})",
              file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
