"""Idle fraction of each pipeline rank: plain 1F1B vs the interleaved schedule, on CPU ranks (gloo).

    python scripts/bench_pipeline.py                       # PP 4, 8 micro-batches, 2 chunks per rank

Spawns PP processes (one CPU thread each, gloo) and runs the trainer's own step,
`minimal_pretrain.train_step`, first with one chunk of layers per rank (plain 1F1B), then
with --chunks chunks per rank (--num-layers-per-virtual-stage = layers / (PP x chunks)). Each
rank times its pipeline schedule (TimedMicroBatches: every forward, backward and p2p exchange of
the step) and, inside it, the time it waits in p2p; its idle fraction is wait / schedule time,
summed over the timed steps. The measured wait also holds the transfers themselves and the
uneven work of the stages (the first holds the embedding, the last the LM head and the loss),
and CPU ranks that share cores wait for a core too: give each rank a core of its own (PP cores,
or more) for a clean figure.

Two figures that CPU sharing does not blur stand beside it:
  replayed  each forward and backward step also records its CPU time (time.thread_time); the
            schedule is replayed with those times, each step starting when its rank is free and
            its input made, p2p free: the idle fraction with a core per rank and the stages'
            real, uneven costs;
  theory    the bubble when every chunk's forward and backward take equal time (Narayanan et
            al. 2021): plain (PP - 1) / (M + PP - 1), interleaved (PP - 1) / (V M + PP - 1).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp_spawn

# `python scripts/bench_pipeline.py` puts scripts/ on the path, not the repository root.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from launch import TrainConfig, resolve_layout  # noqa: E402
from minimal_pretrain import (MicroBatches, PipeStep, build_grad_reducers, build_model, build_process_groups,  # noqa: E402
                              interleaved_ticks, local_microbatches, step_source, train_step)
from moe_layers import ModelConfig  # noqa: E402
from optim import build_optimizer  # noqa: E402


@dataclass
class PipelineTimer:
    """Seconds one rank spent in its pipeline schedule and, of those, waiting in p2p; and the CPU
    seconds of each forward and backward step."""

    total: float = 0.0  # wall time of every forward, backward and exchange of the schedule
    wait: float = 0.0  # of which in p2p exchanges
    steps: list[tuple[str, int, int, float]] = field(default_factory=list)  # (kind, chunk, micro, CPU s)


class TimedMicroBatches(MicroBatches):
    """The trainer's MicroBatches, each forward, backward and exchange timed into `timer` (the
    trainer itself runs the plain class and pays nothing)."""

    def __init__(self, timer: PipelineTimer, *args: Any):
        super().__init__(*args)
        self.timer = timer

    def timed(self, kind: str, run: Any, i: int, x: torch.Tensor | None, chunk: int) -> Any:
        start, wall = time.thread_time(), time.perf_counter()  # CPU time: not inflated by waiting for a core
        result = run(i, x, chunk)
        self.timer.steps.append((kind, chunk, i, time.thread_time() - start))
        self.timer.total += time.perf_counter() - wall
        return result

    def forward(self, i: int, inp: torch.Tensor | None, chunk: int = 0) -> torch.Tensor:
        return self.timed("F", super().forward, i, inp, chunk)

    def backward(self, i: int, grad_out: torch.Tensor | None, chunk: int = 0) -> torch.Tensor | None:
        return self.timed("B", super().backward, i, grad_out, chunk)

    def exchange(self, **kw: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        start = time.perf_counter()
        received = super().exchange(**kw)
        self.timer.wait += time.perf_counter() - start
        self.timer.total += time.perf_counter() - start
        return received


def idle_fractions(rank: int, args: argparse.Namespace, layers_per_chunk: int) -> tuple[float, float, dict]:
    """(idle fraction, schedule seconds per step, {(kind, chunk, micro): mean CPU seconds}) of this
    rank over the timed steps of one schedule."""
    mc = ModelConfig(vocab_size=256, hidden_size=args.hidden_size, num_layers=args.num_layers,
                     num_attention_heads=8, num_kv_heads=4, ffn_hidden_size=4 * args.hidden_size,
                     moe_ffn_hidden_size=args.hidden_size, num_experts=8, num_experts_per_token=2,
                     seq_length=args.seq_length)
    tc = TrainConfig(pipeline_parallel_size=args.pp, num_layers_per_virtual_stage=layers_per_chunk,
                     num_microbatches=args.num_microbatches, micro_batch_size=args.micro_batch_size,
                     max_steps=args.warmup + args.steps, device="cpu", dtype="float32")
    pg = build_process_groups(resolve_layout(mc, tc, args.pp, rank))
    device = torch.device("cpu")
    model = build_model(mc, tc, pg, device, None)
    reducers = build_grad_reducers(model, pg)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    timer = PipelineTimer()
    gen = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, mc.vocab_size, (args.micro_batch_size * args.num_microbatches, args.seq_length + 1),
                               generator=gen)
        micro = local_microbatches(tokens[:, :-1], tokens[:, 1:], pg, device)
        runner = (lambda *a: TimedMicroBatches(timer, *a)) if step >= args.warmup else MicroBatches
        train_step(model, optimizer, reducers, micro, pg, mc, tc, device, None, step, runner=runner)
    cpu: dict[PipeStep, float] = {}
    for kind, chunk, micro_index, seconds in timer.steps:
        key = PipeStep(kind, chunk, micro_index)
        cpu[key] = cpu.get(key, 0.0) + seconds / args.steps
    return timer.wait / timer.total, timer.total / args.steps, cpu


def plain_order(pp: int, rank: int, m: int) -> list[PipeStep]:
    """1F1B's order on `rank` (run_microbatches): PP - rank - 1 warm-up forwards, then one forward
    and one backward in turn, then the remaining backwards."""
    warmup = min(pp - rank - 1, m)
    order = [PipeStep("F", 0, i) for i in range(warmup)]
    for i in range(warmup, m):
        order += [PipeStep("F", 0, i), PipeStep("B", 0, i - warmup)]
    return order + [PipeStep("B", 0, i) for i in range(m - warmup, m)]


def replayed_idle(orders: list[list[PipeStep]], cpu: list[dict], chunks: int) -> list[float]:
    """Each rank's idle fraction when every step takes its CPU time and p2p is free: a step starts
    when its rank has finished the step before it and the step making its input has finished."""
    pp = len(orders)
    finish: dict[tuple[int, PipeStep], float] = {}
    free, busy, place = [0.0] * pp, [0.0] * pp, [0] * pp
    while any(place[r] < len(orders[r]) for r in range(pp)):
        for r in range(pp):
            while place[r] < len(orders[r]):
                step = orders[r][place[r]]
                source = step_source(pp, chunks, r, step)
                if source is not None and source not in finish:
                    break  # its input comes later: another rank moves first
                free[r] = finish[r, step] = max(free[r], finish[source] if source else 0.0) + cpu[r][step]
                busy[r] += cpu[r][step]
                place[r] += 1
    return [1 - busy[r] / free[r] for r in range(pp)]


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.pp)
    per_chunk = args.num_layers // (args.pp * args.chunks)
    mine = {"1F1B": idle_fractions(rank, args, 0), f"interleaved, {args.chunks} chunks": idle_fractions(rank, args,
                                                                                                      per_chunk)}
    every = [None] * args.pp
    dist.all_gather_object(every, mine)  # each rank's (idle fraction, seconds) per schedule, to rank 0
    if rank == 0:
        print_table(args, every)
    dist.destroy_process_group()


def print_table(args: argparse.Namespace, every: list[dict]) -> None:
    pp, m, v = args.pp, args.num_microbatches, args.chunks
    theory = {"1F1B": (pp - 1) / (m + pp - 1), f"interleaved, {v} chunks": (pp - 1) / (v * m + pp - 1)}
    orders = {"1F1B": ([plain_order(pp, r, m) for r in range(pp)], 1),
              f"interleaved, {v} chunks": ([[s for tick in interleaved_ticks(pp, r, v, m) for s in tick]
                                            for r in range(pp)], v)}
    print(f"PP {pp}, {m} micro-batches of {args.micro_batch_size} x {args.seq_length} tokens, {args.num_layers} layers "
          f"(hidden {args.hidden_size}, 8 experts top-2), one CPU thread per rank, gloo, {args.steps} timed steps "
          f"after {args.warmup}; torch {torch.__version__}, {os.cpu_count()} CPUs, load average now "
          f"{os.getloadavg()[0]:.1f} (above {os.cpu_count()}: ranks wait for a core, not only for each other)")
    header = (["schedule"] + [f"rank {r} idle" for r in range(pp)] + ["mean idle"]
              + [f"rank {r} replayed" for r in range(pp)] + ["mean replayed", "theory", "s / step"])
    rows = []
    for name, bubble in theory.items():
        idle = [every[r][name][0] for r in range(pp)]
        seconds = max(every[r][name][1] for r in range(pp))
        replayed = replayed_idle(orders[name][0], [every[r][name][2] for r in range(pp)], orders[name][1])
        rows.append([name] + [f"{x:.3f}" for x in idle] + [f"{sum(idle) / pp:.3f}"]
                    + [f"{x:.3f}" for x in replayed] + [f"{sum(replayed) / pp:.3f}", f"{bubble:.3f}",
                                                        f"{seconds:.3f}"])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pp", type=int, default=4, help="pipeline ranks (processes)")
    p.add_argument("--num-microbatches", type=int, default=8, help="M, a multiple of --pp")
    p.add_argument("--chunks", type=int, default=2, help="V: model chunks per rank in the interleaved run")
    p.add_argument("--num-layers", type=int, default=8, help="a multiple of PP x chunks")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per schedule")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = p.parse_args()
    if args.pp < 2 or args.num_layers % (args.pp * args.chunks) or args.num_microbatches % args.pp or args.chunks < 2:
        p.error("needs --pp >= 2, --chunks >= 2, --num-layers a multiple of PP x chunks and "
                "--num-microbatches a multiple of PP")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp_spawn.spawn(worker, args=(args, port), nprocs=args.pp, join=True)


if __name__ == "__main__":
    main()
