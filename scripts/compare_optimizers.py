"""Train the same small MoE with AdamW and Muon, each under the cosine and the WSD schedule.

    python scripts/compare_optimizers.py --out docs --overwrite --jobs 2   # the committed table
    python scripts/compare_optimizers.py --quick --out /tmp/co             # tiny model, a smoke run

Every run is `minimal_pretrain.py` in a subprocess with the same model, data (the built-in
corpus), batches, steps, --lr and --weight-decay: the runs differ only in --optimizer and
--lr-schedule (WSD with the trainer's defaults: the last 20% of the steps decay as 1 - sqrt).
Muon's update is scaled to AdamW's RMS (Moonlight's rule), so one learning rate serves both;
it is the trainer's default, tuned for AdamW, not for Muon. Each combination runs with
--seeds seeds (default 2; the seed picks the initial weights and the batches), so the table
shows the seed-to-seed spread next to each difference.

Writes DIR/optimizer_comparison.md (the table, and under it what each column means) and
DIR/optimizer_comparison.png (train-loss curves of the first seed and final val loss of every
seed; skipped with a message when matplotlib is missing). As in scripts/compare_routing.py
(whose reproducibility rules this script shares): every run trains on one CPU thread whatever
--jobs, so the numbers repeat to the last digit on the same CPU type, torch and code (the table
names them), and a folder that already holds the table is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import launch  # noqa: E402
from compare_routing import ONE_THREAD, code_version, cpu_name, out_check  # noqa: E402  (scripts/ is on the path)
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

# The trainer's default model (D 128, 4 layers, 8 experts top-2, F 256) on shorter sequences,
# as scripts/compare_routing.py trains it.
FULL = dict(steps=100, log_interval=5,
            flags=["--seq-length", "128", "--micro-batch-size", "4", "--num-microbatches", "2", "--eval-iters", "10"])
QUICK = dict(steps=6, log_interval=1,
             flags=["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-kv-heads", "2",
                    "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--num-experts", "4",
                    "--num-experts-per-token", "2", "--seq-length", "16", "--micro-batch-size", "2",
                    "--num-microbatches", "2", "--eval-iters", "2", "--lr", "1e-2"])
COMBINATIONS = [("adamw", "cosine"), ("adamw", "wsd"), ("muon", "cosine"), ("muon", "wsd")]
OUTPUTS = ("optimizer_comparison.md", "optimizer_comparison.png")  # what a run writes into --out


@dataclass
class Run:
    optimizer: str
    schedule: str
    seed: int
    rc: int = 0
    wall: float = 0.0  # seconds, the whole subprocess (start-up and evaluation included)
    val_loss: float = math.nan
    tokens_per_sec: float = math.nan
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) of every logged step
    error: str = ""  # last line of stderr of a failed run


def train(run: Run, common: list[str], metrics: str) -> Run:
    """One training run in a subprocess; its metrics file parsed into `run`."""
    flags = common + ["--optimizer", run.optimizer, "--lr-schedule", run.schedule, "--seed", str(run.seed),
                      "--metrics-file", metrics]
    env = dict(os.environ, **ONE_THREAD)
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "minimal_pretrain.py")] + flags,
                          capture_output=True, text=True, env=env, cwd=ROOT)
    run.rc, run.wall = proc.returncode, time.time() - t0
    if proc.returncode != 0:
        run.error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        return run
    records = [json.loads(line) for line in open(metrics) if line.strip()]
    trained = [r for r in records if "loss" in r]
    run.val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    run.curve = [(r["step"], r["loss"]) for r in trained]
    speeds = [r["tokens_per_sec"] for r in trained]
    run.tokens_per_sec = statistics.median(speeds[1:] if len(speeds) > 1 else speeds)  # the first step warms up
    return run


def write_markdown(path: str, runs: list[Run], common: list[str], steps: int, total: float, jobs: int) -> None:
    mc, tc, _ = launch.parse_config(common)
    seeds = sorted({r.seed for r in runs})
    tokens = steps * tc.micro_batch_size * tc.num_microbatches * mc.seq_length
    wsd = launch.TrainConfig(**{**vars(tc), "lr_schedule": "wsd"}).schedule()
    lines = [
        "# Optimizers and schedules compared",
        "",
        f"Same model, batches and steps for every run: D {mc.hidden_size}, {mc.num_layers} layers, "
        f"{mc.num_experts} experts of width F {mc.moe_ffn_hidden_size}, top-{mc.num_experts_per_token}, "
        f"T {mc.seq_length}, {tc.num_microbatches} micro-batches x {tc.micro_batch_size} sequences, {steps} steps "
        f"({tokens:,} tokens) of the built-in corpus (byte-level), --lr {tc.lr:g}, --min-lr {tc.min_lr:g}, "
        f"--weight-decay {tc.weight_decay:g}, warm-up {tc.schedule().warmup_steps} steps. WSD: "
        f"{wsd.describe()}. Val loss: nats per byte on {tc.eval_iters} fixed validation batches after the "
        f"last step, one column per --seed.",
        "",
        f"Common flags: `{' '.join(common)}`",
        "",
        "| optimizer | schedule | " + " | ".join(f"val loss, seed {s}" for s in seeds)
        + " | mean | tokens/s | wall s |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for opt, schedule in COMBINATIONS:
        mine = [r for r in runs if (r.optimizer, r.schedule) == (opt, schedule)]
        if any(r.rc != 0 for r in mine):
            failed = next(r for r in mine if r.rc != 0)
            lines.append(f"| {opt} | {schedule} | failed (exit {failed.rc}): {failed.error} |")
            continue
        vals = [r.val_loss for r in mine]
        lines.append(f"| {opt} | {schedule} | " + " | ".join(f"{v:.4f}" for v in vals)
                     + f" | {statistics.fmean(vals):.4f} | {statistics.median(r.tokens_per_sec for r in mine):,.0f} "
                       f"| {statistics.fmean(r.wall for r in mine):.0f} |")
    ok = [r for r in runs if r.rc == 0]
    spreads = [max(v) - min(v) for v in ([r.val_loss for r in ok if (r.optimizer, r.schedule) == c]
                                         for c in COMBINATIONS) if len(v) > 1]
    lines += [
        "",
        "**tokens/s**: median over the logged steps after the first, then over the seeds. **wall s**: the "
        "whole run (start-up and evaluation included), mean over the seeds.",
        "",
    ]
    if spreads:
        lines += [f"Seed-to-seed noise: the spread of val loss between seeds of one combination is "
                  f"{min(spreads):.4f} to {max(spreads):.4f}; a difference between rows smaller than that "
                  f"is not significant.", ""]
    lines += [
        f"Machine: {cpu_name()} (torch kernels: {torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} "
        f"CPU cores, torch {torch.__version__}, Python {platform.python_version()}, code {code_version()}; "
        f"{jobs} run(s) at a time, one thread each. The losses repeat to the last digit on the same CPU type, "
        f"torch and code (the thread count is pinned: it decides how float sums are split); another CPU "
        f"family or torch version may move them by about the seed-to-seed spread. Other jobs may have shared "
        f"these cores, so tokens/s and wall times are noisy. The whole comparison took {total / 60:.1f} minutes.",
        "",
        f"Reproduce: `python scripts/compare_optimizers.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_png(path: str, runs: list[Run]) -> bool:
    """Train-loss curves (first seed) and final val loss per seed; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    colors = {"adamw": "tab:blue", "muon": "tab:red"}
    styles = {"cosine": "-", "wsd": "--"}
    first = min(r.seed for r in runs)
    for r in runs:
        if r.rc == 0 and r.seed == first:
            steps, losses = zip(*r.curve)
            ax1.plot(steps, losses, styles[r.schedule], color=colors[r.optimizer], linewidth=1,
                     label=f"{r.optimizer} {r.schedule}")
    ax1.set(title=f"train loss (seed {first})", xlabel="step", ylabel="nats/byte")
    tail = [loss for r in runs if r.rc == 0 for _, loss in r.curve[len(r.curve) // 3:]]
    if tail:
        ax1.set_ylim(min(tail) - 0.05, max(tail) + 0.05)  # the part after the first fall
    ax1.legend(fontsize=8)
    names = [f"{o} {s}" for o, s in COMBINATIONS]
    for i, combination in enumerate(COMBINATIONS):
        vals = [r.val_loss for r in runs if r.rc == 0 and (r.optimizer, r.schedule) == combination]
        ax2.plot(vals, [i] * len(vals), "o", color=colors[combination[0]], alpha=0.7)
    ax2.set_yticks(range(len(names)), names)
    ax2.set(title="final val loss, one dot per seed (lower is better)", xlabel="nats/byte")
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=8)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/optimizers", help="folder for optimizer_comparison.md and .png")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run; 0: 100 (6 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (a smoke run)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per combination (seed-to-seed noise needs 2 or more)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs trained at the same time, one thread each (changes only the wall time)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the table and PNG that OUT already holds (docs/ holds the committed ones)")
    args = p.parse_args()
    checks = [(args.steps >= 0, f"--steps must be >= 0 (0: the default), got {args.steps}"),
              (args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}"),
              (args.jobs >= 1, f"--jobs must be >= 1, got {args.jobs}"),
              (not os.path.exists(args.out) or os.path.isdir(args.out), f"--out {args.out} is a file; give a folder")]
    checks.append(out_check(args.out, OUTPUTS, args.overwrite))
    for ok, message in checks:
        if not ok:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    setup = QUICK if args.quick else FULL
    steps = args.steps or setup["steps"]
    log_interval = min(setup["log_interval"], steps)
    common = setup["flags"] + ["--max-steps", str(steps), "--log-interval", str(log_interval),
                               "--eval-interval", str(steps), "--no-progress"]
    base_seed = launch.parse_config(common)[1].seed
    runs = [Run(o, s, base_seed + i) for i in range(args.seeds) for o, s in COMBINATIONS]
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        def one(i: int) -> Run:
            run = train(runs[i], common, os.path.join(tmp, f"{i:02d}.jsonl"))
            status = f"val loss {run.val_loss:.4f}" if run.rc == 0 else f"FAILED: {run.error}"
            print(f"[{i + 1}/{len(runs)}] {run.optimizer} {run.schedule} seed {run.seed}: {status} "
                  f"({run.wall:.0f} s)", flush=True)
            return run
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(one, range(len(runs))))
    total = time.time() - start
    md = os.path.join(args.out, "optimizer_comparison.md")
    write_markdown(md, runs, common, steps, total, args.jobs)
    print(f"wrote {md} ({total / 60:.1f} min)")
    png = os.path.join(args.out, "optimizer_comparison.png")
    if write_png(png, runs):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: no optimizer_comparison.png (pip install -r requirements-extras.txt)")
    if any(r.rc != 0 for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
