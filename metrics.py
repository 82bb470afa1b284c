"""What a run reports, on rank 0: the console log line, the --metrics-file records, TensorBoard
scalars, warnings about dead experts, and the summary at the end.

Kept beside minimal_pretrain.py because the records are a contract of their own, read back by
scripts/plot_metrics.py and scripts/compare_routing.py. The trainer reduces the numbers over
all ranks (a collective); everything here is local to rank 0 and never communicates.

A train record covers the steps since the previous one (the log interval): its losses, gradient
norm, expert load and dropped fraction are means over those steps, its throughput their tokens
over their wall time. The load-health figures (`load_health`) are read off the expert-row counts
summed over the interval's steps and all ranks, so they describe the interval's whole load, not
a mean of per-step figures. The first step after a start is left out of the throughput when the
interval has other steps (it carries the start-up: allocation, compilation).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

# Per-layer load-health fields of a train record (see load_health); ep_rank_rows only under EP.
HEALTH_FIELDS = ("max_over_mean_load", "load_cv", "dead_experts", "ep_rank_rows")

# An expert that receives less than DEAD_LOAD of the mean load in DEAD_LOGS logged intervals in a row
# is reported once (again only if it recovers and dies again).
DEAD_LOAD, DEAD_LOGS = 0.01, 3

# Console lines of a run (banner, warnings, summary) stay within this many characters; the log line
# keeps its documented fields on one line (one grep, one record) and may be longer.
LINE_WIDTH = 120


def drop_metrics_after(path: str, step: int) -> None:
    """Keep the records of steps <= `step` (and drop a half-written last line): a run restarted
    from a checkpoint redoes the steps after it, which must not appear twice in the file."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".part", "w") as f:
        f.writelines(kept)
    os.replace(path + ".part", path)


def open_tensorboard(log_dir: str, start_step: int) -> Any:
    """A SummaryWriter; a resumed run hides the events of the steps it redoes (purge_step).
    The trainer has checked at start that the tensorboard package is there."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)


def is_dead(load: float, mean: float) -> bool:
    """The one definition of a dead expert in an interval: under DEAD_LOAD of the mean load (zero rows included)."""
    return load < DEAD_LOAD * mean


def load_health(counts: list[float], ep: int, ep_groups: int, steps: int) -> dict:
    """Load-balance figures of one MoE layer from `counts` (E,): rows each expert computed, summed over
    the interval's `steps` and every rank (so the same whatever the layout).

    max_over_mean_load  max_e c_e / mean_e c_e: 1 is perfect balance, E is all rows on one expert; the
                        busiest expert's GEMM sets the layer's time, so this is its slowdown over balance
    load_cv             std_e c_e / mean_e c_e (population std): 0 is perfect balance
    dead_experts        experts under DEAD_LOAD of the mean load in the interval (`is_dead`)
    ep_rank_rows        with EP > 1: rows one rank at each EP index received per step (expert e lives on
                        EP index e // (E / EP)), a mean over the steps and the `ep_groups` EP groups of
                        the stage. The most loaded rank is the straggler the all-to-all waits for."""
    e = len(counts)
    mean = sum(counts) / e
    std = (sum((c - mean) ** 2 for c in counts) / e) ** 0.5
    health = {"max_over_mean_load": max(counts) / mean if mean > 0 else float("nan"),
              "load_cv": std / mean if mean > 0 else float("nan"),
              "dead_experts": sum(is_dead(c, mean) for c in counts)}
    if ep > 1:
        per_rank = e // ep
        health["ep_rank_rows"] = [sum(counts[r * per_rank:(r + 1) * per_rank]) / (steps * ep_groups)
                                  for r in range(ep)]
    return health


class DeadExperts:
    """Counts, per (layer, expert), the logged intervals in a row in which the expert was dead (`is_dead`)."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int], int] = {}

    def update(self, expert_load: dict[str, list[float]]) -> dict[str, list[int]]:
        """The experts, by layer, that have just been dead for DEAD_LOGS intervals in a row."""
        newly: dict[str, list[int]] = {}
        for layer, load in expert_load.items():
            mean = 1.0 / len(load)  # fractions of the routed tokens sum to 1
            for e, share in enumerate(load):
                key = (layer, e)
                self.runs[key] = self.runs.get(key, 0) + 1 if is_dead(share, mean) else 0
                if self.runs[key] == DEAD_LOGS:
                    newly.setdefault(layer, []).append(e)
        return newly


def dead_warning(newly: dict[str, list[int]]) -> str:
    """One console line for every expert that died in an interval, layer by layer, cut at LINE_WIDTH
    (`...`): a collapsed model has dozens. Each expert's load stays in --metrics-file (expert_load)."""
    n = sum(len(experts) for experts in newly.values())
    line = f"warning: {n} dead expert{'s' if n > 1 else ''} (under {DEAD_LOAD:.0%} of the mean load, {DEAD_LOGS} intervals in a row):"
    pieces = []  # the line grows by these; it is cut between two of them
    for layer, experts in newly.items():
        pieces.append(f"{';' if pieces else ''} layer {layer}: {experts[0]}")
        pieces += [f",{e}" for e in experts[1:]]
    for k, piece in enumerate(pieces):
        if len(line) + len(piece) + (4 if k < len(pieces) - 1 else 0) > LINE_WIDTH:  # room for " ..."
            return line + " ..."
        line += piece
    return line


class RunLog:
    """Rank 0's outputs of a run: console lines through `say`, the metrics file, TensorBoard."""

    def __init__(self, metrics_file: str, tensorboard: str, start_step: int, say: Callable[[str], None],
                 mfu_of: Callable[[float], float | None]):
        self.say, self.mfu_of = say, mfu_of
        self.dead = DeadExperts()
        self.file = None
        try:  # a resumed run appends to the metrics of the run it continues, after the records it keeps
            if metrics_file and start_step:
                drop_metrics_after(metrics_file, start_step)
            self.file = open(metrics_file, "a" if start_step else "w") if metrics_file else None
        except OSError as e:
            self.lost("--metrics-file", metrics_file, e)
        self.board = open_tensorboard(tensorboard, start_step) if tensorboard else None

    def lost(self, flag: str, path: str, e: OSError) -> None:
        """A metrics output that cannot be written (a full disk): said once, then training goes on
        without it; losing a log is no reason to lose the run."""
        self.say(f"warning: {flag} {path}: writing failed ({e.strerror or e}); the run goes on without it")

    def train(self, step: int, means: dict, lr: float, grad_norm: float, samples_per_sec: float,
              tokens_per_sec: float, skipped: int) -> None:
        """One logged interval: `means` are the trainer's reduced interval means (loss, lm_loss,
        aux_loss, z_loss, expert_load, the load-health figures per layer, and dropped_fraction with
        a capacity factor)."""
        record = {"step": step, "loss": means["loss"], "lm_loss": means["lm_loss"], "aux_loss": means["aux_loss"],
                  "z_loss": means["z_loss"], "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                  "skipped_steps": skipped, "expert_load": means["expert_load"]}
        for name in ("mtp_loss",) + HEALTH_FIELDS:
            if name in means:
                record[name] = means[name]
        line = (f"Step {step} | Loss: {means['loss']:.4f} | Aux Loss: {means['aux_loss']:.4f} | "
                f"LR: {lr:.2e} | Throughput: {samples_per_sec:.2f} samples/s | Tokens/s: {tokens_per_sec:.0f} | "
                f"Grad Norm: {grad_norm:.3f} | Z Loss: {means['z_loss']:.4f}")
        if "mtp_loss" in means:
            line += f" | MTP Loss: {means['mtp_loss']:.4f}"
        if means.get("max_over_mean_load"):
            worst = max(means["max_over_mean_load"], key=means["max_over_mean_load"].get)
            line += f" | Max/Mean Load: {means['max_over_mean_load'][worst]:.2f} (layer {worst})"
        if "dropped_fraction" in means:
            record["dropped_fraction"] = means["dropped_fraction"]
            dropped = means["dropped_fraction"].values()
            line += f" | Dropped: {sum(dropped) / max(1, len(dropped)):.2%}"
        mfu = self.mfu_of(tokens_per_sec)
        if mfu is not None:
            record["mfu"] = mfu
            line += f" | MFU: {100 * mfu:.1f}%"
        self.say(line)
        newly_dead = self.dead.update(means["expert_load"])
        if newly_dead:
            self.say(dead_warning(newly_dead))
        self.write(record)
        if self.board:
            for name in ("loss", "lm_loss", "mtp_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec",
                         "mfu"):
                if name in record:
                    self.board.add_scalar(f"train/{name}", record[name], step)
            for layer, load in means["expert_load"].items():
                mean = 1.0 / len(load)
                self.board.add_scalar(f"expert_load/layer{layer}/max_over_mean", max(load) / mean, step)
                self.board.add_scalar(f"expert_load/layer{layer}/min_over_mean", min(load) / mean, step)
                self.board.add_histogram(f"expert_load/layer{layer}", np.asarray(load), step)
            for layer, fraction in record.get("dropped_fraction", {}).items():
                self.board.add_scalar(f"dropped_fraction/layer{layer}", fraction, step)
            for layer, cv in record.get("load_cv", {}).items():
                self.board.add_scalar(f"expert_load/layer{layer}/cv", cv, step)
                self.board.add_scalar(f"expert_load/layer{layer}/dead", record["dead_experts"][layer], step)

    def eval(self, step: int, val_loss: float, bits_per_byte: float | None) -> None:
        record = {"step": step, "val_loss": val_loss}
        line = f"Step {step} | Val Loss: {val_loss:.4f}"
        if bits_per_byte is not None:
            record["val_bpb"] = bits_per_byte
            line += f" | {bits_per_byte:.4f} bits per byte"
        self.say(line)
        self.write(record)
        if self.board:
            for name, value in record.items():
                if name != "step":
                    self.board.add_scalar(f"eval/{name}", value, step)

    def write(self, record: dict) -> None:
        if self.file:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                self.lost("--metrics-file", self.file.name, e)
                self.file, lost = None, self.file
                try:  # closes the descriptor even when the flush of what is buffered fails again
                    lost.close()
                except OSError:
                    pass
        if self.board:
            try:
                self.board.flush()
            except OSError as e:
                self.lost("--tensorboard", self.board.log_dir, e)
                self.board = None

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()


def print_run_summary(steps: int, tokens: int, wall: float, last: dict, val_loss: float | None, unigram: float,
                      peak: list[float], kind: str) -> None:
    """The end of a run at a glance. `last` is the last logged interval's means."""
    print("=" * 24 + " run summary " + "=" * 24)
    print(f"steps {steps} | tokens {tokens:,} | wall time {wall:.1f}s | {tokens / max(wall, 1e-9):,.0f} tokens/s")
    mtp = f", mtp {last['mtp_loss']:.4f}" if "mtp_loss" in last else ""
    if "loss" in last:
        print(f"final train loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}{mtp}; mean of the last logged interval)")
    else:
        print("final train loss: none logged (the run stopped before its first log)")
    if val_loss is not None:
        print(f"final val loss {val_loss:.4f} nats/token vs unigram entropy {unigram:.4f} nats/token "
              f"({'beats it' if val_loss < unigram else 'worse'} by {abs(unigram - val_loss):.4f})")
    for layer, load in last.get("expert_load", {}).items():
        hi = max(range(len(load)), key=load.__getitem__)
        lo = min(range(len(load)), key=load.__getitem__)
        line = f"layer {layer}: most loaded expert {hi} ({load[hi]:.1%}), least loaded expert {lo} ({load[lo]:.1%})"
        if layer in last.get("load_cv", {}):
            line += (f" | max/mean {last['max_over_mean_load'][layer]:.2f}, cv {last['load_cv'][layer]:.2f}, "
                     f"{last['dead_experts'][layer]} dead")
        if layer in last.get("ep_rank_rows", {}):
            line += "\n    rows per EP rank per step " + ", ".join(f"{r:.0f}" for r in last["ep_rank_rows"][layer])
        print(line)
    if any(last.get("dead_experts", {}).values()):
        print(f"dead experts (under {DEAD_LOAD:.0%} of the mean load): raise --router-aux-loss-coef or use "
              f"--router-bias-update-rate")
    print(f"peak memory per rank ({kind}, MiB): " + ", ".join(f"{m:.0f}" for m in peak))
