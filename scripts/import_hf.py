"""Import a transformers Qwen3-MoE, dense Qwen3 or Glm4Moe folder as a checkpoint the trainer continues from.

    python scripts/import_hf.py --hf path/to/qwen3_moe --out out/imported
    python minimal_pretrain.py --load out/imported --max-steps 100 --save out/continued

Writes `OUT/step_00000000/` (meta.json, rank_00000.pt) and `OUT/latest` with
checkpoint.save_checkpoint, so a crash leaves nothing half written: step 0, layout world 1, the
default TrainConfig, no optimizer state (AdamW starts fresh on `--load`), the routers' expert_bias
buffers from Glm4Moe's e_score_correction_bias, or at zero (Qwen3 routes without one). The inverse
of scripts/export_hf.py: our names are theirs without `model.`, their `mlp.gate` is our
`mlp.router`, experts stay one key per expert. Qwen3-MoE's decoder_sparse_step and mlp_only_layers
become --moe-layer-interval, --first-k-dense-layers or --moe-layer-list; Glm4Moe (DeepSeek-V3's
router) becomes sigmoid routing with --router-num-groups, --router-group-topk,
--router-topk-scaling-factor, --num-shared-experts and --first-k-dense-layers.
Weights may be one model.safetensors or shards listed in model.safetensors.index.json; experts
fused as transformers 5.x holds them in memory (`mlp.experts.gate_up_proj` (E, 2F, D),
`mlp.experts.down_proj` (E, D, F)) are split per expert.
Needs safetensors (requirements-extras.txt), not transformers.

--seq-length sets the training sequence length (default: max_position_embeddings); rotary
positions do not depend on it, so the logits of shorter sequences are the same.
A head_dim other than hidden_size / num_attention_heads becomes the model's --head-dim.
What MoETransformer cannot represent is refused with one `error:` line, exit 2: tied embeddings,
attention bias, sliding-window attention, rope scaling, partial rotary (Glm4Moe's default 0.5),
Glm4Moe without q/k norm or without renormalised top-k weights, or an activation other than
silu. So are a config.json with missing or mistyped fields, unreadable or mismatched weights,
and an --out that is not a new or empty folder (an existing run's `latest` is never moved);
nothing is written. --overwrite replaces an earlier import of this script (`latest` and step 0
alone, its meta.json marked "imported_from") and nothing else; the new step folder is written
beside the old one and renamed over it (checkpoint.save_checkpoint), so a failure leaves the old.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import stat
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402
import outputs  # noqa: E402
from launch import TrainConfig  # noqa: E402
from moe_layers import ModelConfig, MoETransformer  # noqa: E402
from parallel_layers import placement  # noqa: E402
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)


class UnsupportedModel(ValueError):
    """A transformers model this toolkit cannot hold; the message says what differs."""


MODEL_TYPES = ("qwen3_moe", "qwen3", "glm4_moe")
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")
# config.json keys read, with the JSON types each may have (None: absent, the default applies)
TYPES = {**{k: (int,) for k in REQUIRED + ("num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts",
                                          "num_local_experts", "num_experts_per_tok", "decoder_sparse_step",
                                          "n_routed_experts", "n_shared_experts", "n_group", "topk_group",
                                          "first_k_dense_replace")},
         **{k: (int, float) for k in ("rope_theta", "rms_norm_eps", "initializer_range", "routed_scaling_factor")},
         **{k: (bool,) for k in ("tie_word_embeddings", "attention_bias", "use_sliding_window", "norm_topk_prob",
                                 "use_qk_norm")}}


def model_config_from_hf(hf: dict, seq_length: int | None = None) -> ModelConfig:
    """transformers' config.json (as a dict) -> our ModelConfig, refusing what we cannot represent."""
    if not isinstance(hf, dict):
        raise UnsupportedModel("config.json is not a JSON object")
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise UnsupportedModel(f"model_type {kind!r}: only {', '.join(MODEL_TYPES)} are supported")
    for key in REQUIRED:
        if key not in hf:
            raise UnsupportedModel(f"config.json lacks {key}")
    for key, kinds in TYPES.items():  # JSON is untyped: "32", 32.0 or true would fail later, unclearly
        value = hf.get(key)
        ok = (bool in kinds) if isinstance(value, bool) else isinstance(value, kinds) and (
            not isinstance(value, float) or math.isfinite(value))
        if value is not None and not ok:
            kind = {(int,): "an integer", (int, float): "a finite number", (bool,): "true or false"}[kinds]
            raise UnsupportedModel(f"config.json: {key} = {value!r}; it must be {kind}")
    if hf["num_attention_heads"] <= 0:
        raise UnsupportedModel(f"config.json: num_attention_heads = {hf['num_attention_heads']}; it must be positive")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UnsupportedModel(f"config.json: rope parameters {rope!r} are not a JSON object")
    glm = kind == "glm4_moe"
    # Glm4Moe rotates half of each head unless told otherwise; ours turns all of it
    rotary = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5 if glm else 1.0))
    mlp_only = hf.get("mlp_only_layers") or []
    refusals = [
        (hf.get("tie_word_embeddings", False), "tie_word_embeddings is true; our embedding and LM head are untied"),
        (hf.get("attention_bias", False), "attention_bias is true; our projections have no bias"),
        (hf.get("use_sliding_window", False), "use_sliding_window is true; our attention is full causal"),
        (not isinstance(mlp_only, list) or not all(isinstance(i, int) and 0 <= i < hf["num_hidden_layers"]
                                                   for i in mlp_only),
         f"mlp_only_layers {mlp_only!r} is not a list of layer numbers"),
        (rotary != 1.0, f"partial_rotary_factor {rotary}; our rotary embedding turns the whole head"),
        (glm and not hf.get("use_qk_norm", False), "use_qk_norm is false; our attention always normalises q and k"),
        (glm and not hf.get("norm_topk_prob", True), "norm_topk_prob is false; our sigmoid routing always "
                                                     "renormalises the top-k weights"),
        (rope.get("rope_type", rope.get("type", "default")) != "default",
         f"rope scaling {rope}; only plain rotary embeddings are supported"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}; our MLPs are SwiGLU (silu)"),
    ]
    for refused, why in refusals:
        if refused:
            raise UnsupportedModel(why)
    moe = kind in ("qwen3_moe", "glm4_moe")
    num_experts = hf.get("n_routed_experts" if glm else "num_experts", hf.get("num_local_experts", 0)) if moe else 0
    defaults = ModelConfig()
    pattern = layer_pattern(hf, num_experts) if moe else {}
    derived_head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=0 if hf.get("head_dim", derived_head_dim) == derived_head_dim else hf["head_dim"],  # 0: derived
        ffn_hidden_size=hf["intermediate_size"],
        moe_ffn_hidden_size=hf.get("moe_intermediate_size", defaults.moe_ffn_hidden_size) if moe
        else defaults.moe_ffn_hidden_size,
        num_experts=num_experts,
        num_experts_per_token=hf.get("num_experts_per_tok", defaults.num_experts_per_token) if moe
        else defaults.num_experts_per_token,
        **pattern,
        norm_topk_prob=hf.get("norm_topk_prob", glm) if moe else defaults.norm_topk_prob,
        seq_length=hf["max_position_embeddings"] if seq_length is None else seq_length,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", defaults.rope_theta))),
        rms_norm_eps=hf.get("rms_norm_eps", defaults.rms_norm_eps),
        init_std=hf.get("initializer_range", defaults.init_std),
        **(deepseek_routing(hf) if glm else {}),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedModel(f"the config maps to an invalid model: {e}") from None
    return cfg


def layer_pattern(hf: dict, num_experts: int) -> dict:
    """Our layer-pattern fields for transformers' rule: Glm4Moe's first_k_dense_replace, or Qwen3-MoE's
    decoder_sparse_step minus mlp_only_layers (kept as an interval when it is one, else as a list)."""
    if hf["model_type"] == "glm4_moe":
        return {"first_k_dense_layers": hf.get("first_k_dense_replace", 1)}
    step, layers = hf.get("decoder_sparse_step", 1), hf["num_hidden_layers"]
    if not isinstance(step, int) or step < 1:
        raise UnsupportedModel(f"config.json: decoder_sparse_step = {step!r}; it must be a positive integer")
    mlp_only = hf.get("mlp_only_layers") or []
    if not mlp_only or num_experts == 0:
        return {"moe_layer_interval": step}
    if layers > len(mlp_only) + 100_000:  # before listing the layers: a config.json may claim a billion of them
        raise UnsupportedModel(f"config.json: num_hidden_layers = {layers} with mlp_only_layers; too many to list")
    moe = [i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0]
    if not moe:
        raise UnsupportedModel(f"mlp_only_layers {mlp_only} leaves no MoE layer; convert it as a dense model")
    for first_k in (0, moe[0]):  # the plainest of our rules that gives the same layers
        if moe == [i for i in range(first_k, layers) if (i + 1) % step == 0]:
            return {"moe_layer_interval": step, "first_k_dense_layers": first_k}
    return {"moe_layer_list": ",".join(map(str, moe))}


def deepseek_routing(hf: dict) -> dict:
    """Our routing fields for Glm4Moe's DeepSeek-V3 router: sigmoid scores, groups, scale, shared experts."""
    return {"router_score_function": "sigmoid", "num_shared_experts": hf.get("n_shared_experts", 1),
            "router_topk_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
            "router_num_groups": hf.get("n_group", 1), "router_group_topk": hf.get("topk_group", 1)}


def regular_file(path: str) -> bool:
    """Whether `path` is a regular file; raises on a folder, a FIFO (which would block) or a device."""
    if not os.path.exists(path):
        return False
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UnsupportedModel(f"{path}: not a regular file")
    return True


def read_json(path: str) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:  # also a file that is not UTF-8
        raise UnsupportedModel(f"{path}: not valid JSON ({e})") from None


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if regular_file(single):
        files = [single]
    elif regular_file(index):
        index_json = read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise UnsupportedModel(f"{index}: no weight_map of tensor name -> shard file")
        files = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
        for f in files:
            if not regular_file(f):
                raise UnsupportedModel(f"{index} lists {f}, which does not exist")
    else:
        raise UnsupportedModel(f"{folder}: no model.safetensors nor model.safetensors.index.json "
                               f"(save it with safe_serialization=True)")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except SafetensorError as e:
            raise UnsupportedModel(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def our_name(name: str) -> str:
    """transformers' name -> ours (inverse of export_hf.hf_name)."""
    name = name.removeprefix("model.")
    if name.endswith(".mlp.gate.weight"):
        name = name[: -len("gate.weight")] + "router.weight"
    if name.endswith(".mlp.gate.e_score_correction_bias"):
        name = name[: -len("gate.e_score_correction_bias")] + "router.expert_bias"
    return name


def checkpoint_tensors(hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename to checkpoint keys (fp32, as the trainer keeps its weights); split fused experts per expert."""
    out = {}
    for name, t in hf_weights.items():
        name, t = our_name(name), t.float()
        prefix = name.rsplit(".", 1)[0]  # layers.L.mlp.experts
        fused = name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))
        if fused and (t.dim() != 3 or name.endswith("gate_up_proj") and t.shape[1] % 2):
            raise UnsupportedModel(f"{name} has shape {tuple(t.shape)}; fused experts are (E, 2F, D) and (E, D, F)")
        if name.endswith(".mlp.experts.gate_up_proj"):  # (E, 2F, D): gate rows, then up rows
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()  # (F, D)
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
        elif name.endswith(".mlp.experts.down_proj"):  # (E, D, F)
            for e, down in enumerate(t.unbind(0)):
                out[f"{prefix}.{e}.down_proj.weight"] = down.contiguous()  # (D, F)
        elif t.numel() or ".shared_experts." not in name:  # Glm4Moe without shared experts holds 0-wide ones
            out[name] = t.contiguous()
    return out


def expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Checkpoint key -> full shape of every weight, and of every persistent buffer, for this config;
    read off a model built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    shapes = {}
    for name, p in model.named_parameters():
        if placement(p).expert:  # stacked (E, in, out) -> per expert (out, in); gate and up apart
            for stacked, view in ckpt_io.stacked_parts(name, p, p).items():
                for e in range(p.shape[0]):
                    shapes[ckpt_io.expert_key(stacked, e)] = tuple(view.shape[1:][::-1])
        else:
            shapes[name] = tuple(p.shape)
    buffers = {name: tuple(b.shape) for name, b in ckpt_io.persistent_buffers(model).items()}
    return shapes, buffers


IMPORTED = outputs.Kind("an earlier import of scripts/import_hf.py", True, ckpt_io.written_whole_by("imported_from"),
                        replaced_whole=True)


def import_hf(hf_dir: str, out: str, seq_length: int | None = None, overwrite: bool = False) -> str:
    """Convert the folder into `out`, a new or empty folder or (`overwrite`) an earlier import; return the
    step folder written. Everything is read and checked before anything is written."""
    outputs.claim(out, "--out", IMPORTED, overwrite, inputs={"--hf": hf_dir})  # e.g. a run's folder: refused
    if not os.path.isdir(hf_dir):
        raise UnsupportedModel(f"--hf {hf_dir}: no such folder")
    config_path = os.path.join(hf_dir, "config.json")
    if not regular_file(config_path):
        raise UnsupportedModel(f"{hf_dir}: no config.json; point --hf at a save_pretrained folder")
    cfg = model_config_from_hf(read_json(config_path), seq_length)
    tensors = checkpoint_tensors(read_safetensors(hf_dir))
    if cfg.num_layers > len(tensors) or 3 * cfg.num_experts > len(tensors):  # before listing what they imply
        raise UnsupportedModel(f"{hf_dir}: config.json gives {cfg.num_layers} layers of {cfg.num_experts} experts, "
                               f"more than the {len(tensors)} tensors of the weights hold")
    want, buffers = expected_shapes(cfg)
    for name, shape in buffers.items():  # the routers' expert_bias: Glm4Moe's e_score_correction_bias, or
        tensors.setdefault(name, torch.zeros(shape))  # zero for Qwen3, which routes without one
    want.update(buffers)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise UnsupportedModel(f"{hf_dir}: weights do not fit the config: missing {missing[:3]}, "
                               f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise UnsupportedModel(f"{hf_dir}: {name} has shape {tuple(tensors[name].shape)}, the config gives {shape}")
    return ckpt_io.save_full_state(out, tensors, dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig()),
                                   {"imported_from": os.path.abspath(hf_dir)})


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors (save_pretrained)")
    p.add_argument("--out", required=True, help="new or empty folder: the checkpoint root to write (then --load it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier import of this "
                                                            "script (nothing else is replaced)")
    p.add_argument("--seq-length", type=int, default=None, help="training sequence length; "
                                                                "default: max_position_embeddings")
    args = p.parse_args()
    try:
        import safetensors  # noqa: F401
    except ImportError:
        print("error: safetensors is not installed; pip install -r requirements-extras.txt", file=sys.stderr)
        sys.exit(2)
    try:
        if args.seq_length is not None and args.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {args.seq_length}")
        path = import_hf(args.hf, args.out, args.seq_length, args.overwrite)
    except (ValueError, OSError) as e:  # UnsupportedModel, unreadable JSON, unreadable files
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, TypeError) as e:  # a nested field of config.json or of the index of another shape
        print(f"error: --hf {args.hf}: not a folder as transformers writes it ({type(e).__name__}: {e})",
              file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} (step 0, no optimizer state); continue with: "
          f"python minimal_pretrain.py --load {args.out} --max-steps N")


if __name__ == "__main__":
    main()
