"""Tokens/s and MFU of full training steps of one model on one device.

    python scripts/bench_train.py --preset small --steps 3 --warmup 1      # CPU is fine
    python scripts/bench_train.py --preset moe-0.5b --steps 10 --json     # one GPU
    python scripts/bench_train.py --preset fine-0.5b --micro-batch-size 4 --compile
    python scripts/bench_train.py --preset moe-0.5b --num-layers 4 --seq-length 4096

A step is the trainer's own step, `minimal_pretrain.train_step` (no second copy of it here):
one micro-batch of random tokens, forward (bf16 weights and activations with fp32 master
weights on CUDA, fp32 on CPU, unless --dtype says otherwise), loss = cross-entropy +
(aux_coef * aux + z_coef * z) / MoE layers with the trainer's default coefficients, backward,
gradient norm, clip, AdamW step. `make_step` builds model, optimizer and gradient sync with
the trainer's functions (`minimal_pretrain.build_model`, so the expert kernel: torch._grouped_mm
where moe_layers.can_use_grouped_mm says so, and --compile: each block, are the trainer's too);
the timing loop below and ../shared/tools/gpu_cost_model.py both run the step it returns.

Presets (any model flag overrides a preset's value):
  small      the trainer's default model (ModelConfig defaults, byte vocabulary)
  moe-0.5b   vocab 32000, D 1024, 12 layers, 16 heads / 8 kv, 8 experts of width 1408, top-2
  fine-0.5b  the same with 64 experts of width 176, top-8: the same total parameters,
             half the active expert width (8 x 176 = 1408 vs 2 x 1408)

MFU = achieved model FLOP/s / the card's peak dense bf16 FLOP/s, with
    FLOPs per token = 6 * N_active + 12 * L * D * T        (PaLM, Chowdhery et al. 2022, app. B)
where N_active counts the parameters a token passes through, without the input embedding:
attention, norms, router, K/E of the expert weights, and the LM head; 12 * L * D * T is the
attention score and value matmuls (forward + backward). Peaks: H100 SXM and H200 989e12,
H100 PCIe 756e12, A100 312e12; any other card prints MFU as n/a unless --peak-tflops is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

# `python scripts/bench_train.py` puts scripts/ on the path, not the repository root.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from launch import TrainConfig, field_kind, resolve_autocast, resolve_device, resolve_layout  # noqa: E402
from minimal_pretrain import (build_grad_reducers, build_model, build_process_groups, peak_bf16_flops,  # noqa: E402
                              train_step)
from moe_layers import ModelConfig, grouped_mm_strides_ok  # noqa: E402
from optim import build_optimizer  # noqa: E402

_HALF_B = dict(vocab_size=32000, hidden_size=1024, num_layers=12, num_attention_heads=16, num_kv_heads=8,
               ffn_hidden_size=2816, seq_length=2048)
# name -> (model fields that differ from ModelConfig's defaults, micro-batch size)
PRESETS = {
    "small": ({}, TrainConfig().micro_batch_size),
    "moe-0.5b": ({**_HALF_B, "num_experts": 8, "num_experts_per_token": 2, "moe_ffn_hidden_size": 1408}, 8),
    "fine-0.5b": ({**_HALF_B, "num_experts": 64, "num_experts_per_token": 8, "moe_ffn_hidden_size": 176}, 8),
}


def make_step(cfg: ModelConfig, micro_batch_size: int, *, device: torch.device, dtype: str = "auto",
              compile: bool = False, cuda_choices: bool | None = None, seed: int = 0
              ) -> tuple[Callable[[int], float], torch.nn.Module]:
    """Model, optimizer and gradient sync for one process, built as the trainer builds them, and
    step(i): training step i (`minimal_pretrain.train_step`) on random (micro_batch_size, T + 1)
    tokens, returning its LM loss. This is what the timing loop below times, and the seam that
    ../shared/tools/gpu_cost_model.py traces (see its README).

    The device decides the device-dependent choices unless `cuda_choices` says otherwise: True
    makes CUDA's whatever `device` is (dtype auto -> bf16 weights with fp32 masters and bf16
    autocast, grouped-GEMM experts where the row strides allow, fused AdamW); False the CPU's
    (auto -> fp32, the expert loop, the reference AdamW)."""
    cuda = device.type == "cuda" if cuda_choices is None else cuda_choices
    # --dtype auto means what the trainer makes of it on CUDA (bfloat16) or on the CPU (float32).
    tc = TrainConfig(device=device.type, dtype=dtype if dtype != "auto" else "bfloat16" if cuda else "float32",
                     micro_batch_size=micro_batch_size, compile=compile, seed=seed, max_steps=1000, warmup_steps=1)
    autocast_dtype = resolve_autocast(tc, device)
    torch.manual_seed(seed)
    pg = build_process_groups(resolve_layout(cfg, tc, 1))  # one process: no groups, no collectives
    model = build_model(cfg, tc, pg, device, autocast_dtype)
    if device.type != "cuda":  # build_model chose by the device; CUDA's choice where the strides allow
        grouped = cuda and hasattr(torch, "_grouped_mm") and grouped_mm_strides_ok(cfg, autocast_dtype or torch.float32)
        for module in model.modules():
            if hasattr(module, "use_grouped_mm"):
                module.use_grouped_mm = grouped
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, fused=cuda, kind=tc.optimizer)
    reducers = build_grad_reducers(model, pg)

    def step(i: int) -> float:
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)  # the tokens of step i, always
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch_size, cfg.seq_length + 1), device=device, generator=gen)
        micro = [(tokens[:, :-1], tokens[:, 1:])]  # one micro-batch: (B, T) inputs, next-token targets
        stats, _, _ = train_step(model, optimizer, reducers, micro, pg, cfg, tc, device, autocast_dtype, i)
        return float(stats.lm_loss)  # summed on the device over the step's micro-batches: one read

    return step, model


def parse_args() -> tuple[argparse.Namespace, ModelConfig, int]:
    """The command line -> (args, the model config: the preset's with any model flag given, micro-batch)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    for f in dataclasses.fields(ModelConfig):  # every model flag, default: the preset's value
        flag = "--" + f.name.replace("_", "-")
        if field_kind(f) is bool:
            p.add_argument(flag, default=None, action=argparse.BooleanOptionalAction,
                           help=f.metadata["help"].replace("%", "%%"))
        else:
            p.add_argument(flag, default=None, type=field_kind(f), help=f.metadata["help"].replace("%", "%%"))
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median step is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "bfloat16-autocast"],
                   help="the trainer's --dtype: auto is bfloat16 (bf16 weights, fp32 masters) on CUDA, "
                        "float32 on CPU; bfloat16-autocast is the older fp32-weight scheme")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU on another card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print one JSON line of results")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile two steps and print the top ROWS operators")
    args = p.parse_args()

    fields, preset_batch = PRESETS[args.preset]
    fields = {**fields, **{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
                           if getattr(args, f.name) is not None}}
    cfg = ModelConfig(**fields)
    batch = args.micro_batch_size or preset_batch
    try:
        cfg.validate()
        if args.steps <= 0 or args.warmup < 0 or batch <= 0:
            raise ValueError("--steps and --micro-batch-size must be positive, --warmup non-negative")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return args, cfg, batch


def time_steps(one_step: Callable[[int], float], device: torch.device, args: argparse.Namespace
               ) -> tuple[list[float], float]:
    """Warm-up steps, then the timed ones (and --profile's two more): (ms of each timed step, last loss)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = one_step(step)
        sync()
        if step >= args.warmup:
            step_ms.append((time.perf_counter() - t0) * 1e3)
    if args.profile:  # where the time goes: the top operators of two more steps
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for step in range(2):
                one_step(args.warmup + args.steps + step)
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile))
    return step_ms, loss


def main() -> None:
    args, cfg, batch = parse_args()
    # The trainer's model, optimizer, gradient sync and step (losses, clip, AdamW), with this
    # benchmark's device, dtype and compile.
    device = resolve_device(TrainConfig(device=args.device), 0)
    one_step, model = make_step(cfg, batch, device=device, dtype=args.dtype, compile=args.compile, seed=args.seed)
    grouped = any(getattr(m, "use_grouped_mm", False) for m in model.modules())
    weight_dtype = str(model.embed_tokens.weight.dtype).replace("torch.", "")
    total = sum(q.numel() for q in model.parameters())
    active = cfg.active_params_per_token()  # without the input embedding (tested against a count)
    embed = model.embed_tokens.weight.numel()
    flops_per_token = cfg.flops_per_token()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model: {json.dumps(dataclasses.asdict(cfg))}")
    print(f"preset {args.preset} | device {device} ({device_name}) | dtype {args.dtype} (weights {weight_dtype}) | "
          f"grouped GEMM {grouped} | compile {args.compile} | micro-batch {batch} x {cfg.seq_length} tokens")
    print(f"parameters: total {total / 1e6:.1f}M | active per token {(active + embed) / 1e6:.1f}M "
          f"({active / 1e6:.1f}M without the input embedding) | {flops_per_token / 1e9:.2f} GFLOP per token")
    try:
        step_ms, loss = time_steps(one_step, device, args)
    except torch.OutOfMemoryError:
        print(f"error: out of memory at micro-batch {batch} x {cfg.seq_length}; try a smaller "
              f"--micro-batch-size", file=sys.stderr)
        sys.exit(1)

    # --------------------------------------------------------------- report
    ms = statistics.median(step_ms)
    tokens_per_sec = batch * cfg.seq_length / (ms / 1e3)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(device)
    mfu = tokens_per_sec * flops_per_token / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"step {ms:.1f} ms (median of {args.steps}) | {tokens_per_sec:,.0f} tokens/s | "
          f"peak memory {f'{mem:.1f} GiB' if mem is not None else 'n/a'} | "
          f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | last loss {loss:.3f}")
    if args.json:
        print(json.dumps({
            "preset": args.preset, "device": str(device), "device_name": device_name,
            "dtype": args.dtype, "weight_dtype": weight_dtype,
            "compile": args.compile, "grouped_mm": grouped, "micro_batch_size": batch,
            "seq_length": cfg.seq_length, "total_params": total, "active_params": active + embed,
            "active_non_embedding_params": active, "flops_per_token": flops_per_token, "step_ms": ms,
            "tokens_per_sec": tokens_per_sec, "peak_mem_gib": mem, "mfu": mfu, "loss": loss,
        }))


if __name__ == "__main__":
    main()
