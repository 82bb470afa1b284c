"""Turn a dense checkpoint into an MoE checkpoint whose experts start as copies of the dense MLPs.

    python minimal_pretrain.py --num-experts 0 --save out/dense
    python scripts/upcycle.py --checkpoint out/dense --out out/upcycled --num-experts 8 --num-experts-per-token 2
    python minimal_pretrain.py --load out/upcycled --max-steps 400 --save out/moe

Sparse upcycling (Komatsuzaki et al. 2022): in every MoE layer (layer i with
(i + 1) % --moe-layer-interval == 0) each of the E experts gets the dense layer's
gate/up/down weights (`layers.L.mlp.gate_proj.weight` (F, D) -> `layers.L.mlp.experts.e.gate_proj.weight`
(F, D) for every e; same orientation), the router `layers.L.mlp.router.weight` (E, D) is drawn
fresh from normal(0, --router-init-std) with --seed, and `expert_bias` starts at zero. Every
other tensor is copied. The model config gets E, K, the interval, moe_ffn_hidden_size = the dense
ffn_hidden_size and norm_topk_prob on: the K weights of a token then sum to 1 and K identical
experts give exactly the dense MLP's output, so the upcycled model starts with the dense model's
logits (to rounding). --noise eps multiplies every expert copy by its own 1 + eps * normal(0, 1)
to break the symmetry between experts (default 0: exact copies; the router alone breaks it).

Writes `OUT/step_00000000/` and `OUT/latest` with checkpoint.save_checkpoint: step 0, layout
world 1, no optimizer state (AdamW starts fresh on `--load`) and the dense run's train config,
so `--load` reads the same data stream (--seed, --data, --micro-batch-size), restarted at step 0;
give --seed on the continued run to draw other batches. The dense checkpoint may come from any
layout. Bad input (missing folder, not dense, bad numbers, an OUT that is not a new or empty
folder outside the dense checkpoint, so that an existing run's `latest` never moves) is one
`error:` line, exit 2, and nothing is written. --overwrite replaces an earlier output of this
script (`latest` and step 0 alone, its meta.json marked "upcycled_from") and nothing else; the new
step folder is written beside the old one and renamed over it, so a failure leaves the old.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402
import outputs  # noqa: E402
from moe_layers import ModelConfig  # noqa: E402
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def upcycled_config(dense: ModelConfig, num_experts: int, top_k: int, interval: int) -> ModelConfig:
    """The MoE config whose experts have the dense MLP's width; raises ValueError naming the flag."""
    if dense.num_experts != 0:
        raise ValueError(f"the checkpoint is already an MoE model (num_experts {dense.num_experts}); "
                         f"upcycling needs a dense one (trained with --num-experts 0)")
    cfg = dataclasses.replace(dense, num_experts=num_experts, num_experts_per_token=top_k,
                              moe_layer_interval=interval, moe_ffn_hidden_size=dense.ffn_hidden_size,
                              norm_topk_prob=True)
    if num_experts < 1:
        raise ValueError(f"--num-experts must be >= 1, got {num_experts}")
    cfg.validate()
    # the E copies of every MoE layer's MLP are built in memory, then written: refuse what cannot fit
    need = 4 * num_experts * len(cfg.moe_layers) * 3 * cfg.hidden_size * cfg.ffn_hidden_size
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if 2 * need > memory:
        raise ValueError(f"--num-experts {num_experts}: the experts need {need / 2**30:.1f} GiB, twice that while "
                         f"writing, and this machine has {memory / 2**30:.1f} GiB; choose fewer experts")
    if not cfg.moe_layers:
        raise ValueError(f"--moe-layer-interval {interval} makes no layer of {cfg.num_layers} an MoE layer")
    return cfg


def upcycle_state(dense: dict[str, torch.Tensor], cfg: ModelConfig, router_std: float, seed: int,
                  noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Dense full state dict -> MoE full state dict in checkpoint naming (one key per expert)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(dense)
    for layer in cfg.moe_layers:
        prefix = f"layers.{layer}.mlp"
        for proj in PROJECTIONS:
            if f"{prefix}.{proj}.weight" not in out:
                raise ValueError(f"the checkpoint has no {prefix}.{proj}.weight; it is not a dense model")
            w = out.pop(f"{prefix}.{proj}.weight")  # gate, up (F, D); down (D, F)
            for e in range(cfg.num_experts):
                scale = 1 + noise * torch.randn(w.shape, generator=gen) if noise > 0 else 1.0
                out[f"{prefix}.experts.{e}.{proj}.weight"] = (w * scale).clone()  # same orientation
        out[f"{prefix}.router.weight"] = torch.randn(cfg.num_experts, cfg.hidden_size, generator=gen) * router_std
        out[f"{prefix}.router.expert_bias"] = torch.zeros(cfg.num_experts)  # (E,)
    return out


UPCYCLED = outputs.Kind("an earlier output of scripts/upcycle.py", True, ckpt_io.written_whole_by("upcycled_from"),
                        replaced_whole=True)


def upcycle(checkpoint: str, out: str, num_experts: int, top_k: int, interval: int = 1,
            router_std: float = 0.02, seed: int = 0, noise: float = 0.0, overwrite: bool = False) -> str:
    """Read the dense checkpoint, write the upcycled one (over an earlier one with `overwrite`); return the
    step folder written."""
    if not os.path.isdir(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint}: no such folder")
    outputs.claim(out, "--out", UPCYCLED, overwrite, inputs={"the dense checkpoint": checkpoint})
    ckpt = ckpt_io.read_checkpoint(checkpoint)
    cfg = upcycled_config(ModelConfig(**ckpt.meta["model"]), num_experts, top_k, interval)
    tensors = upcycle_state(ckpt_io.full_state_dict(ckpt), cfg, router_std, seed, noise)
    return ckpt_io.save_full_state(out, tensors, dataclasses.asdict(cfg), ckpt.meta.get("train", {}),
                                   {"upcycled_from": ckpt.path})


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="dense checkpoint (a --save root or one step folder)")
    p.add_argument("--out", required=True, help="new or empty folder: the checkpoint root to write (then --load it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier output of this "
                                                            "script (nothing else is replaced)")
    p.add_argument("--num-experts", type=int, required=True, help="experts per MoE layer, E")
    p.add_argument("--num-experts-per-token", type=int, required=True, help="top-k, K")
    p.add_argument("--moe-layer-interval", type=int, default=1, help="layer i is MoE iff (i + 1) %% interval == 0")
    p.add_argument("--router-init-std", type=float, default=0.02, help="std of the fresh router weights")
    p.add_argument("--seed", type=int, default=0, help="seeds the router weights and the noise")
    p.add_argument("--noise", type=float, default=0.0,
                   help="multiply each expert copy by 1 + noise * normal(0, 1); 0: exact copies")
    args = p.parse_args()
    try:
        for flag, value in (("--router-init-std", args.router_init_std), ("--noise", args.noise)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
        if not 0 <= args.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
        path = upcycle(args.checkpoint, args.out, args.num_experts, args.num_experts_per_token,
                       args.moe_layer_interval, args.router_init_std, args.seed, args.noise, args.overwrite)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, TypeError) as e:  # a meta.json whose model config is not ours
        print(f"error: --checkpoint {args.checkpoint}: not a model this code builds ({type(e).__name__}: {e})",
              file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} (step 0, no optimizer state); continue with: "
          f"python minimal_pretrain.py --load {args.out} --max-steps N")


if __name__ == "__main__":
    main()
