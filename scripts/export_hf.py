"""Export a checkpoint of any layout as a transformers folder: config.json + model.safetensors.

    python scripts/export_hf.py --checkpoint out/ckpt --out out/hf            # follows `latest`
    python scripts/export_hf.py --checkpoint out/ckpt/step_00000400 --out out/hf --dtype bfloat16
    python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('out/hf'))"

num_experts > 0 gives Qwen3MoeForCausalLM (model_type qwen3_moe), 0 gives Qwen3ForCausalLM
(qwen3); both give the logits of our MoETransformer. Our names are transformers' without the
`model.` prefix, except the router (`mlp.router` is their `mlp.gate`). Checkpoints already
store experts one key per expert in transformers' orientation
(`layers.0.mlp.experts.5.gate_proj.weight`, (F, D)), which is also how the Qwen3-MoE releases on
the Hub store them: transformers 4.x loads them as they are, 5.x fuses them while loading.
Byte-level models (vocab 256) need no tokenizer files; when the run's --data folder holds a
meta.json it is copied beside the weights. Needs safetensors (requirements-extras.txt); writing
the folder does not need transformers itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Model options Qwen3 has no counterpart for, with the value that means "off"; a checkpoint
# without the field (written before the option existed) has it off. Training-only options
# (router jitter, the kind of aux loss) do not change the weights' meaning and pass.
NOT_IN_QWEN3 = {"num_shared_experts": 0, "router_score_function": "softmax", "router_type": "topk",
                "moe_capacity_factor": 0.0}


class UnsupportedModel(ValueError):
    """A checkpoint whose model transformers' Qwen3 classes cannot express."""


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' (`layers.1.mlp.router.weight` -> `model.layers.1.mlp.gate.weight`)."""
    if name.startswith("lm_head."):
        return name
    if name.endswith(".mlp.router.weight"):
        name = name[: -len("router.weight")] + "gate.weight"
    return "model." + name


def hf_config(model: dict, train: dict, dtype: str) -> dict:
    """transformers' config.json for our ModelConfig (as a dict) and TrainConfig (as a dict)."""
    moe = model["num_experts"] > 0
    config = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": model["vocab_size"],
        "hidden_size": model["hidden_size"],
        "intermediate_size": model["ffn_hidden_size"],  # dense layers
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model["num_kv_heads"],
        "head_dim": model["hidden_size"] // model["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": model["seq_length"],
        "initializer_range": model["init_std"],
        "rms_norm_eps": model["rms_norm_eps"],
        # rope_theta: read as is by 4.x and turned into rope_parameters by 5.x
        "rope_theta": model["rope_theta"],
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model["num_layers"],
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if moe:
        config.update({
            "moe_intermediate_size": model["moe_ffn_hidden_size"],
            "num_experts": model["num_experts"],
            "num_experts_per_tok": model["num_experts_per_token"],
            "decoder_sparse_step": model["moe_layer_interval"],  # same rule: MoE iff (i + 1) % step == 0
            "mlp_only_layers": [],
            "norm_topk_prob": model["norm_topk_prob"],
            "output_router_logits": False,
            "router_aux_loss_coef": train.get("router_aux_loss_coef", 0.001),
        })
    return config


def export(checkpoint: str, out: str, dtype: str = "float32") -> list[str]:
    """Write config.json and model.safetensors (and a copied data meta.json) into `out`; return their paths."""
    from safetensors.torch import save_file
    if not os.path.isdir(checkpoint):  # (checkpoint.resolve words this for the trainer's --load)
        raise ckpt_io.CheckpointError(f"--checkpoint {checkpoint}: no such folder")
    ckpt = ckpt_io.read_checkpoint(checkpoint)
    meta = ckpt.meta
    for name, off in NOT_IN_QWEN3.items():
        if meta["model"].get(name, off) != off:
            raise UnsupportedModel(f"{ckpt.path}: {name} = {meta['model'][name]!r} has no counterpart in "
                                   f"transformers' Qwen3-MoE (it needs {off!r})")
    weights = {}
    for name, t in ckpt_io.full_state_dict(ckpt).items():
        if name.endswith(".expert_bias"):  # aux-loss-free balancing bias: Qwen3 routes without one
            if t.any():
                raise UnsupportedModel(f"{ckpt.path}: {name} is non-zero; Qwen3-MoE routing has no expert bias")
            continue
        weights[hf_name(name)] = t.to(DTYPES[dtype]).contiguous()  # per-expert tensors are transposed views
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "config.json"), os.path.join(out, "model.safetensors")]
    with open(written[0], "w") as f:
        json.dump(hf_config(meta["model"], meta.get("train", {}), dtype), f, indent=2)
    save_file(weights, written[1], metadata={"format": "pt"})  # transformers wants the "format" entry
    data = meta.get("train", {}).get("data", "")
    if data and os.path.isfile(os.path.join(data, "meta.json")):
        written.append(shutil.copy(os.path.join(data, "meta.json"), os.path.join(out, "meta.json")))
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a --save folder (follows `latest`) or one step folder")
    p.add_argument("--out", required=True, help="folder to write config.json and model.safetensors into")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    args = p.parse_args()
    try:
        import safetensors  # noqa: F401
    except ImportError:
        print("error: safetensors is not installed; pip install -r requirements-extras.txt", file=sys.stderr)
        sys.exit(2)
    try:
        written = export(args.checkpoint, args.out, args.dtype)
    except (ckpt_io.CheckpointError, UnsupportedModel, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
