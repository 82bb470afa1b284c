"""What a run reports, on rank 0: the console log line, the --metrics-file records, TensorBoard
scalars, warnings about dead experts, and the summary at the end.

Kept beside minimal_pretrain.py because the records are a contract of their own, read back by
scripts/plot_metrics.py and scripts/compare_routing.py. The trainer reduces the numbers over
all ranks (a collective); everything here is local to rank 0 and never communicates.

A train record covers the steps since the previous one (the log interval): its losses, gradient
norm, expert load and dropped fraction are means over those steps, its throughput their tokens
over their wall time. The first step after a start is left out of the throughput when the
interval has other steps (it carries the start-up: allocation, compilation).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

# An expert that receives less than DEAD_LOAD of the mean load in DEAD_LOGS logged intervals in a row
# is reported once (again only if it recovers and dies again).
DEAD_LOAD, DEAD_LOGS = 0.01, 3


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


class DeadExperts:
    """Counts, per (layer, expert), the logged intervals in a row below DEAD_LOAD of the mean load."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int], int] = {}

    def update(self, expert_load: dict[str, list[float]]) -> list[str]:
        warnings = []
        for layer, load in expert_load.items():
            mean = 1.0 / len(load)  # fractions of the routed tokens sum to 1
            for e, share in enumerate(load):
                key = (layer, e)
                self.runs[key] = self.runs.get(key, 0) + 1 if share < DEAD_LOAD * mean else 0
                if self.runs[key] == DEAD_LOGS:
                    warnings.append(f"warning: layer {layer} expert {e} is dead: under {DEAD_LOAD:.0%} of the mean "
                                    f"load for {DEAD_LOGS} logged intervals (now {share:.3%} of the tokens, mean "
                                    f"{mean:.1%}); raise --router-aux-loss-coef or use --router-bias-update-rate")
        return warnings


class RunLog:
    """Rank 0's outputs of a run: console lines through `say`, the metrics file, TensorBoard."""

    def __init__(self, metrics_file: str, tensorboard: str, start_step: int, say: Callable[[str], None],
                 mfu_of: Callable[[float], float | None]):
        # A resumed run appends to the metrics of the run it continues, after the records it keeps.
        if metrics_file and start_step:
            drop_metrics_after(metrics_file, start_step)
        self.file = open(metrics_file, "a" if start_step else "w") if metrics_file else None
        self.board = open_tensorboard(tensorboard, start_step) if tensorboard else None
        self.say, self.mfu_of = say, mfu_of
        self.dead = DeadExperts()

    def train(self, step: int, means: dict, lr: float, grad_norm: float, samples_per_sec: float,
              tokens_per_sec: float, skipped: int) -> None:
        """One logged interval: `means` are the trainer's reduced interval means (loss, lm_loss,
        aux_loss, z_loss, expert_load, and dropped_fraction with a capacity factor)."""
        record = {"step": step, "loss": means["loss"], "lm_loss": means["lm_loss"], "aux_loss": means["aux_loss"],
                  "z_loss": means["z_loss"], "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                  "skipped_steps": skipped, "expert_load": means["expert_load"]}
        line = (f"Step {step} | Loss: {means['loss']:.4f} | Aux Loss: {means['aux_loss']:.4f} | "
                f"LR: {lr:.2e} | Throughput: {samples_per_sec:.2f} samples/s | Tokens/s: {tokens_per_sec:.0f} | "
                f"Grad Norm: {grad_norm:.3f} | Z Loss: {means['z_loss']:.4f}")
        if "dropped_fraction" in means:
            record["dropped_fraction"] = means["dropped_fraction"]
            dropped = means["dropped_fraction"].values()
            line += f" | Dropped: {sum(dropped) / max(1, len(dropped)):.2%}"
        mfu = self.mfu_of(tokens_per_sec)
        if mfu is not None:
            record["mfu"] = mfu
            line += f" | MFU: {100 * mfu:.1f}%"
        self.say(line)
        for warning in self.dead.update(means["expert_load"]):
            self.say(warning)
        self.write(record)
        if self.board:
            for name in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
                if name in record:
                    self.board.add_scalar(f"train/{name}", record[name], step)
            for layer, load in means["expert_load"].items():
                mean = 1.0 / len(load)
                self.board.add_scalar(f"expert_load/layer{layer}/max_over_mean", max(load) / mean, step)
                self.board.add_scalar(f"expert_load/layer{layer}/min_over_mean", min(load) / mean, step)
                self.board.add_histogram(f"expert_load/layer{layer}", np.asarray(load), step)
            for layer, fraction in record.get("dropped_fraction", {}).items():
                self.board.add_scalar(f"dropped_fraction/layer{layer}", fraction, step)

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
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.board:
            self.board.flush()

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
    print(f"final train loss {last.get('loss', float('nan')):.4f} (lm {last.get('lm_loss', float('nan')):.4f}; "
          f"mean of the last logged interval)")
    if val_loss is not None:
        print(f"final val loss {val_loss:.4f} nats/token vs unigram entropy {unigram:.4f} nats/token "
              f"({'beats it' if val_loss < unigram else 'worse'} by {abs(unigram - val_loss):.4f})")
    for layer, load in last.get("expert_load", {}).items():
        hi = max(range(len(load)), key=load.__getitem__)
        lo = min(range(len(load)), key=load.__getitem__)
        print(f"layer {layer}: most loaded expert {hi} ({load[hi]:.1%}), least loaded expert {lo} ({load[lo]:.1%})")
    print(f"peak memory per rank ({kind}, MiB): " + ", ".join(f"{m:.0f}" for m in peak))
