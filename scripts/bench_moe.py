"""Time forward + backward of one SparseMoELayer against a dense floor and a per-expert loop.

    python scripts/bench_moe.py                           # coarse and fine shapes, auto device
    python scripts/bench_moe.py --shape fine --device cuda --json
    python scripts/bench_moe.py --tokens 512 --repeats 3  # both shapes, 512 tokens each
    python scripts/bench_moe.py --shape coarse --experts 16 --top-k 4

Three implementations of the same feed-forward work run on the same N tokens, in turn, in
every timed round:
  moe          moe_layers.SparseMoELayer (route, sort by expert, experts, index_add combine;
               on the CPU all three in one pass of `ExpertLoop`, one expert at a time).
  dense floor  one dense SwiGLU MLP of hidden width K*F: the same matmul FLOPs with no routing,
               so no sparse MoE layer can beat it on the same hardware.
  loop         the naive reference many implementations use: the same router, then for each
               expert e the tokens with `(indices == e).nonzero()`, its SwiGLU, and index_add
               back. Its experts are separate per-expert weights (as an nn.ModuleList of MLPs
               would hold), copied from the MoE layer's.
One round is forward, then backward of a fixed random output gradient; the input requires
grad in all three. The time is the median over --repeats rounds after --warmup rounds
(torch.cuda.synchronize around each on CUDA). ratio_vs_floor = moe_ms / dense_floor_ms
(expect >= 1; closer to 1 is better), ratio_vs_loop = moe_ms / loop_ms (< 1 means faster than the loop).

Routing: the router has the layer's own random init (normal, std 0.02) and the tokens are
standard normal, which routes roughly evenly; the table prints the busiest expert's load
relative to an even share (1.00 = perfectly even).

Precision: float32 on CPU by default. On CUDA the default is bfloat16, run as bf16
parameters and bf16 tokens (no autocast; the router still computes in fp32 inside), and the
experts use torch._grouped_mm when moe_layers.can_use_grouped_mm says they can.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# `python scripts/bench_moe.py` puts scripts/ on the path, not the repository root.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_layers import ModelConfig, SparseMoELayer, Router, can_use_grouped_mm, layout_free_init_  # noqa: E402
from parallel_layers import ModelParallel  # noqa: E402

# name -> (tokens N, hidden D, expert hidden F, experts E, top-k K)
SHAPES = {
    "coarse": (4096, 512, 1024, 8, 2),
    "fine": (4096, 512, 256, 64, 8),
}


class DenseFloor(nn.Module):
    """SwiGLU MLP of hidden width K*F as three plain matmuls: the FLOPs of the MoE, no routing."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(d, width) * 0.02)
        self.up_proj = nn.Parameter(torch.randn(d, width) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(width, d) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.gate_proj) * (x @ self.up_proj)) @ self.down_proj  # (N, D)


class ExpertLoopMoE(nn.Module):
    """The slow, obvious MoE: for each expert, find its tokens with a mask, run it, index_add back."""

    def __init__(self, moe: SparseMoELayer):
        super().__init__()
        self.router: Router = moe.router  # shared, so both route the same tokens the same way
        self.num_experts = moe.num_experts
        ex = moe.experts
        gate, up = ex.w_gate_up.detach().chunk(2, dim=-1)  # (E, D, F) each: the halves of the fused weight
        self.w_gate = nn.ParameterList([nn.Parameter(w.clone()) for w in gate.unbind(0)])
        self.w_up = nn.ParameterList([nn.Parameter(w.clone()) for w in up.unbind(0)])
        self.w_down = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in ex.w_down.unbind(0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.router(x)  # weights, indices (N, K)
        out = torch.zeros_like(x)  # (N, D)
        for e in range(self.num_experts):
            token, slot = (r.indices == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            if token.numel() == 0:
                continue
            xe = x[token]  # (n_e, D)
            ye = (F.silu(xe @ self.w_gate[e]) * (xe @ self.w_up[e])) @ self.w_down[e]  # (n_e, D)
            w = r.weights[token, slot].to(ye.dtype)  # (n_e,)
            out.index_add_(0, token, ye * w[:, None])
        return out  # (N, D)


def time_rounds(fns: dict[str, Callable[[], None]], warmup: int, repeats: int,
                device: torch.device) -> dict[str, float]:
    """Median milliseconds of each function; the functions take turns in every round."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_shape(name: str, n: int, d: int, f: int, e: int, k: int, device: torch.device,
                dtype: torch.dtype, warmup: int, repeats: int, seed: int) -> tuple[dict, float, bool]:
    """Build the three layers for one shape and time them.

    Returns the result row, the busiest expert's load over an even share, and whether the
    experts ran torch._grouped_mm."""
    cfg = ModelConfig(hidden_size=d, moe_ffn_hidden_size=f, num_experts=e, num_experts_per_token=k,
                      num_layers=1, num_attention_heads=1, num_kv_heads=1)
    moe = SparseMoELayer(cfg, ModelParallel())
    layout_free_init_(moe, seed)
    loop = ExpertLoopMoE(moe)
    torch.manual_seed(seed)
    floor = DenseFloor(d, k * f)
    moe, loop, floor = (m.to(device=device, dtype=dtype) for m in (moe, loop, floor))
    moe.experts.use_grouped_mm = can_use_grouped_mm(device, cfg, dtype)

    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)  # (N, D)
    grad_out = torch.randn(n, d, device=device, dtype=dtype)  # (N, D)

    def run(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            forward(x).backward(grad_out)
        return step

    fns = {
        "moe": run(lambda t: moe(t.view(1, n, d))[0].view(n, d), moe),  # B=1, T=N
        "dense_floor": run(floor, floor),
        "loop": run(loop, loop),
    }
    ms = time_rounds(fns, warmup, repeats, device)

    with torch.no_grad():
        counts = torch.bincount(moe.router(x).indices.reshape(-1), minlength=e).float()  # (E,)
    return {
        "shape": f"{name} N={n} D={d} F={f} E={e} K={k}",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "moe_ms": ms["moe"],
        "dense_floor_ms": ms["dense_floor"],
        "loop_ms": ms["loop"],
        "ratio_vs_floor": ms["moe"] / ms["dense_floor"],
        "ratio_vs_loop": ms["moe"] / ms["loop"],
        "tokens_per_sec": n / (ms["moe"] / 1e3),
    }, (counts.max() / counts.mean()).item(), moe.experts.use_grouped_mm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="all", choices=["all", *SHAPES], help="preset sizes")
    p.add_argument("--tokens", type=int, help="N; overrides the preset's")
    p.add_argument("--hidden", type=int, help="D; overrides the preset's")
    p.add_argument("--ffn", type=int, help="F, hidden width of each expert; overrides the preset's")
    p.add_argument("--experts", type=int, help="E; overrides the preset's")
    p.add_argument("--top-k", type=int, help="K; overrides the preset's")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per shape instead of a table")
    args = p.parse_args()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "auto": torch.bfloat16 if use_cuda else torch.float32}[args.dtype]

    names = list(SHAPES) if args.shape == "all" else [args.shape]
    rows = []
    for name in names:
        n, d, f, e, k = (o if o is not None else v for o, v in
                         zip((args.tokens, args.hidden, args.ffn, args.experts, args.top_k), SHAPES[name]))
        if min(n, d, f, e, k) <= 0 or k > e:
            print(f"error: need positive sizes and --top-k <= --experts, got N={n} D={d} F={f} E={e} K={k}",
                  file=sys.stderr)
            sys.exit(2)
        row, busiest, grouped = bench_shape(name, n, d, f, e, k, device, dtype, args.warmup, args.repeats,
                                            args.seed)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            rows.append((row, busiest, grouped))

    if not args.json:
        print(f"device {device} ({torch.cuda.get_device_name(device) if use_cuda else 'cpu'}, "
              f"{torch.get_num_threads()} threads) | dtype {dtype} | median of {args.repeats} after "
              f"{args.warmup} warm-up | forward + backward | load average {os.getloadavg()[0]:.2f} at the end")
        head = (f"{'shape':<36} {'moe ms':>9} {'floor ms':>9} {'loop ms':>9} {'moe/floor':>9} "
                f"{'moe/loop':>9} {'tokens/s':>11} {'busiest':>8} {'grouped':>7}")
        print(head)
        print("-" * len(head))
        for row, busiest, grouped in rows:
            print(f"{row['shape']:<36} {row['moe_ms']:>9.2f} {row['dense_floor_ms']:>9.2f} "
                  f"{row['loop_ms']:>9.2f} {row['ratio_vs_floor']:>9.2f} {row['ratio_vs_loop']:>9.2f} "
                  f"{row['tokens_per_sec']:>11.0f} {busiest:>8.2f} {str(grouped):>7}")
        print("busiest: the busiest expert's load / an even share; grouped: experts use torch._grouped_mm")


if __name__ == "__main__":
    main()
