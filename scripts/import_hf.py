"""Import a transformers Qwen3-MoE (or dense Qwen3) folder as a checkpoint the trainer continues from.

    python scripts/import_hf.py --hf path/to/qwen3_moe --out out/imported
    python minimal_pretrain.py --load out/imported --max-steps 100 --save out/continued

Writes `OUT/step_00000000/` (meta.json, rank_00000.pt) and `OUT/latest` with
checkpoint.save_checkpoint, so a crash leaves nothing half written: step 0, layout world 1, the
default TrainConfig, no optimizer state (AdamW starts fresh on `--load`), the routers' expert_bias
buffers at zero (Qwen3 routes without one). The inverse of scripts/export_hf.py: our names are
theirs without `model.`, their `mlp.gate` is our `mlp.router`, experts stay one key per expert.
Weights may be one model.safetensors or shards listed in model.safetensors.index.json; experts
fused as transformers 5.x holds them in memory (`mlp.experts.gate_up_proj` (E, 2F, D),
`mlp.experts.down_proj` (E, D, F)) are split per expert.
Needs safetensors (requirements-extras.txt), not transformers.

--seq-length sets the training sequence length (default: max_position_embeddings); rotary
positions do not depend on it, so the logits of shorter sequences are the same.
What MoETransformer cannot represent is refused with one `error:` line, exit 2: tied embeddings,
attention bias, sliding-window attention, dense layers picked by mlp_only_layers, rope scaling,
an activation other than silu, or a head_dim other than hidden_size / num_attention_heads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402
from minimal_pretrain import TrainConfig  # noqa: E402
from moe_layers import ModelConfig, MoETransformer  # noqa: E402


class UnsupportedModel(ValueError):
    """A transformers model this toolkit cannot hold; the message says what differs."""


def model_config_from_hf(hf: dict, seq_length: int | None = None) -> ModelConfig:
    """transformers' config.json (as a dict) -> our ModelConfig, refusing what we cannot represent."""
    kind = hf.get("model_type")
    if kind not in ("qwen3_moe", "qwen3"):
        raise UnsupportedModel(f"model_type {kind!r}: only qwen3_moe and qwen3 are supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    refusals = [
        (hf.get("tie_word_embeddings", False), "tie_word_embeddings is true; our embedding and LM head are untied"),
        (hf.get("attention_bias", False), "attention_bias is true; our projections have no bias"),
        (hf.get("use_sliding_window", False), "use_sliding_window is true; our attention is full causal"),
        (hf.get("mlp_only_layers"), f"mlp_only_layers {hf.get('mlp_only_layers')} is not empty; our MoE layers "
                                    f"follow decoder_sparse_step only"),
        (rope.get("rope_type", rope.get("type", "default")) != "default",
         f"rope scaling {rope}; only plain rotary embeddings are supported"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}; our MLPs are SwiGLU (silu)"),
        (hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
         != hf["hidden_size"] // hf["num_attention_heads"],
         f"head_dim {hf.get('head_dim')} differs from hidden_size / num_attention_heads = "
         f"{hf['hidden_size'] // hf['num_attention_heads']}; our head dim is derived from them"),
    ]
    for refused, why in refusals:
        if refused:
            raise UnsupportedModel(why)
    moe = kind == "qwen3_moe"
    num_experts = hf.get("num_experts", hf.get("num_local_experts", 0)) if moe else 0
    defaults = ModelConfig()
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        ffn_hidden_size=hf["intermediate_size"],
        moe_ffn_hidden_size=hf.get("moe_intermediate_size", defaults.moe_ffn_hidden_size) if moe
        else defaults.moe_ffn_hidden_size,
        num_experts=num_experts,
        num_experts_per_token=hf.get("num_experts_per_tok", defaults.num_experts_per_token) if moe
        else defaults.num_experts_per_token,
        moe_layer_interval=hf.get("decoder_sparse_step", 1) if moe else 1,
        norm_topk_prob=hf.get("norm_topk_prob", False) if moe else defaults.norm_topk_prob,
        seq_length=seq_length or hf["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", defaults.rope_theta))),
        rms_norm_eps=hf.get("rms_norm_eps", defaults.rms_norm_eps),
        init_std=hf.get("initializer_range", defaults.init_std),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedModel(f"the config maps to an invalid model: {e}") from None
    return cfg


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        tensors = {}
        for shard in sorted(set(json.load(open(index))["weight_map"].values())):
            tensors.update(load_file(os.path.join(folder, shard)))
        return tensors
    raise UnsupportedModel(f"{folder}: no model.safetensors nor model.safetensors.index.json "
                           f"(save it with safe_serialization=True)")


def our_name(name: str) -> str:
    """transformers' name -> ours (inverse of export_hf.hf_name)."""
    name = name.removeprefix("model.")
    if name.endswith(".mlp.gate.weight"):
        name = name[: -len("gate.weight")] + "router.weight"
    return name


def checkpoint_tensors(hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename to checkpoint keys (fp32, as the trainer keeps its weights); split fused experts per expert."""
    out = {}
    for name, t in hf_weights.items():
        name, t = our_name(name), t.float()
        prefix = name.rsplit(".", 1)[0]  # layers.L.mlp.experts
        if name.endswith(".mlp.experts.gate_up_proj"):  # (E, 2F, D): gate rows, then up rows
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()  # (F, D)
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
        elif name.endswith(".mlp.experts.down_proj"):  # (E, D, F)
            for e, down in enumerate(t.unbind(0)):
                out[f"{prefix}.{e}.down_proj.weight"] = down.contiguous()  # (D, F)
        else:
            out[name] = t.contiguous()
    return out


def expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Checkpoint key -> full shape of every weight, and of every persistent buffer, for this config;
    read off a model built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    shapes = {}
    for name, p in model.named_parameters():
        if getattr(p, "shard_kind", None) == "ep":  # stacked (E, in, out) -> per expert (out, in)
            for e in range(p.shape[0]):
                shapes[ckpt_io.expert_key(name, e)] = tuple(p.shape[1:][::-1])
        else:
            shapes[name] = tuple(p.shape)
    buffers = {name: tuple(b.shape) for name, b in ckpt_io.persistent_buffers(model).items()}
    return shapes, buffers


def import_hf(hf_dir: str, out: str, seq_length: int | None = None) -> str:
    """Convert the folder; return the step folder written."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise UnsupportedModel(f"{hf_dir}: no config.json; point --hf at a save_pretrained folder")
    cfg = model_config_from_hf(json.load(open(config_path)), seq_length)
    tensors = checkpoint_tensors(read_safetensors(hf_dir))
    want, buffers = expected_shapes(cfg)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise UnsupportedModel(f"{hf_dir}: weights do not fit the config: missing {missing[:3]}, "
                               f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise UnsupportedModel(f"{hf_dir}: {name} has shape {tuple(tensors[name].shape)}, the config gives {shape}")
    for name, shape in buffers.items():
        tensors[name] = torch.zeros(shape)  # the routers' expert_bias: Qwen3 routes without a bias
    return ckpt_io.save_full_state(out, tensors, dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors (save_pretrained)")
    p.add_argument("--out", required=True, help="checkpoint root to write (then give it to --load)")
    p.add_argument("--seq-length", type=int, default=None, help="training sequence length; "
                                                                "default: max_position_embeddings")
    args = p.parse_args()
    try:
        import safetensors  # noqa: F401
    except ImportError:
        print("error: safetensors is not installed; pip install -r requirements-extras.txt", file=sys.stderr)
        sys.exit(2)
    try:
        path = import_hf(args.hf, args.out, args.seq_length)
    except KeyError as e:
        print(f"error: {args.hf}/config.json lacks {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, OSError) as e:  # UnsupportedModel, unreadable JSON, unreadable files
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} (step 0, no optimizer state); continue with: "
          f"python minimal_pretrain.py --load {args.out} --max-steps N")


if __name__ == "__main__":
    main()
