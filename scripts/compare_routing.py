"""Train the same small MoE once per routing method and tabulate quality, balance and speed.

    # the committed table, about 6 minutes on 2 cores:
    python scripts/compare_routing.py --out docs --overwrite --steps 150 --jobs 2 --keep-metrics
    python scripts/compare_routing.py --quick --out /tmp/rc             # tiny model, seconds (the test)

Every method runs `minimal_pretrain.py` in a subprocess with the same model, seed, data
(the built-in corpus), batches and steps, and the same active parameters per token (checked
before any run): the methods differ only in the flags of the table. The baseline is dropless
top-2 of 8 experts, softmax, Switch aux loss 0.01 and z-loss 0.001 (the trainer's defaults).
All runs use 2 micro-batches of 4 sequences, so that global-batch balancing (f_i over the
global batch) differs from micro-batch balancing. The baseline also runs with --noise-seeds
other seeds (default 2): their spread of val loss says which differences are noise.

Writes DIR/routing_comparison.md (a Markdown table; the definitions of every column are
written under it) and DIR/routing_comparison.png (bar charts of the final val loss and of
max/mean expert load; skipped with a message when matplotlib is missing). --keep-metrics
keeps each run's --metrics-file in DIR/runs/. A DIR that already holds any of these files is
refused before anything runs unless --overwrite is given: the committed table in docs/ is
replaced only on purpose.

Reproducible: every run trains on exactly one CPU thread (OMP_NUM_THREADS=1 and
MKL_NUM_THREADS=1 in its environment, whatever the caller's), because the number of intra-op
threads changes how torch splits its float sums and so the bits of every step; two threads
instead of one already change the gradient norm within 10 steps and which experts die within
300. --jobs N runs N methods at a time and changes nothing but the wall time. The same command
on the same CPU type with the same torch gives the same table, losses and loads to the last
digit (tokens/s and wall times excepted); another CPU family (its math kernels take other
vector paths) or another torch version may give other numbers, within the seed-to-seed noise
that the table reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import launch  # noqa: E402
import outputs  # noqa: E402
from metrics import DEAD_LOAD, is_dead  # noqa: E402  (the trainer's one definition of a dead expert)
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

# The trainer's default model (D 128, 4 layers, 8 experts top-2, F 256) on shorter sequences.
FULL = dict(steps=300, log_interval=10, window=5, experts=8, top_k=2,
            flags=["--seq-length", "128", "--micro-batch-size", "4", "--num-microbatches", "2",
                   "--eval-iters", "10"])
QUICK = dict(steps=6, log_interval=1, window=3, experts=4, top_k=2,
             flags=["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-kv-heads", "2",
                    "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--num-experts", "4",
                    "--num-experts-per-token", "2", "--seq-length", "16", "--micro-batch-size", "2",
                    "--num-microbatches", "2", "--eval-iters", "2", "--lr", "1e-2"])
# One intra-op thread per run, whatever --jobs and the caller's environment: the thread count
# decides how torch splits float reductions, so it is part of what the numbers depend on.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OUTPUTS = ("routing_comparison.md", "routing_comparison.png", "runs")  # what a run writes into --out


def methods(top_k: int) -> list[tuple[str, list[str]]]:
    """(name, flags added to the common ones) of every method compared, baseline first."""
    return [
        ("top-k softmax + aux (baseline)", []),
        ("no balancing", ["--router-aux-loss-coef", "0", "--router-z-loss-coef", "0"]),
        ("z-loss only", ["--router-aux-loss-coef", "0"]),
        ("sigmoid + aux-loss-free bias", ["--router-score-function", "sigmoid", "--router-bias-update-rate", "1e-3",
                                          "--router-aux-loss-coef", "0"]),
        ("global-batch aux", ["--router-aux-loss-type", "global-batch"]),
        ("sequence aux", ["--router-aux-loss-type", "sequence"]),
        ("capacity factor 1.0 (drops)", ["--moe-capacity-factor", "1.0"]),
        # balanced by construction, so no aux loss (Zhou et al. 2022)
        ("expert choice", ["--router-type", "expert-choice", "--router-aux-loss-coef", "0"]),
        (f"1 shared + top-{top_k - 1} routed",
         ["--num-shared-experts", "1", "--num-experts-per-token", str(top_k - 1)]),
        ("jitter 0.01", ["--router-jitter-noise", "0.01"]),
        ("round-robin (forced balance)", ["--router-type", "round-robin"]),
    ]


@dataclass
class Result:
    name: str
    flags: list[str]
    rc: int = 0
    wall: float = 0.0  # seconds, the whole subprocess (start-up and evaluation included)
    val_loss: float = math.nan
    max_over_mean: float = math.nan
    cv: float = math.nan
    dead: int = 0
    slots: int = 0  # (MoE layer, expert) pairs
    dropped: float | None = None  # None: the trainer does not report drops for this method
    tokens_per_sec: float = math.nan
    error: str = ""  # last line of stderr of a failed run


def load_stats(train: list[dict], window: int) -> tuple[float, float, int, int, float | None]:
    """(max/mean load, coefficient of variation, dead experts, layer-expert slots, dropped fraction)
    over the last `window` logged steps; see the definitions written under the table."""
    last = train[-window:]
    ratios, cvs, dropped = [], [], []
    for r in last:
        for load in r["expert_load"].values():  # fractions of the layer's assignments, sum to 1
            mean = sum(load) / len(load)
            ratios.append(max(load) / mean)
            cvs.append(statistics.pstdev(load) / mean)
        if "dropped_fraction" in r:
            dropped.extend(r["dropped_fraction"].values())
    dead, slots = 0, 0
    for layer in last[0]["expert_load"]:
        avg = [sum(col) / len(last) for col in zip(*(r["expert_load"][layer] for r in last))]  # (E,)
        mean = sum(avg) / len(avg)
        dead += sum(is_dead(x, mean) for x in avg)
        slots += len(avg)
    return (statistics.fmean(ratios), statistics.fmean(cvs), dead, slots,
            statistics.fmean(dropped) if dropped else None)


def run_method(name: str, flags: list[str], common: list[str], metrics: str, window: int) -> Result:
    """One training run in a subprocess; its metrics file parsed into a Result."""
    cmd = [sys.executable, os.path.join(ROOT, "minimal_pretrain.py")] + common + flags + ["--metrics-file", metrics]
    env = dict(os.environ, **ONE_THREAD)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    res = Result(name, flags, proc.returncode, time.time() - t0)
    if proc.returncode != 0:
        res.error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        return res
    records = [json.loads(line) for line in open(metrics) if line.strip()]
    train = [r for r in records if "loss" in r]
    res.val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    res.max_over_mean, res.cv, res.dead, res.slots, res.dropped = load_stats(train, window)
    if res.dropped is None and "expert-choice" not in flags:
        res.dropped = 0.0  # dropless: the trainer logs no dropped_fraction
    speeds = [r["tokens_per_sec"] for r in train]
    res.tokens_per_sec = statistics.median(speeds[1:] if len(speeds) > 1 else speeds)  # the first step warms up
    return res


def active_params(common: list[str], flags: list[str]) -> int:
    mc, _, _ = launch.parse_config(common + flags)
    return mc.active_params_per_token()


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def cpu_name() -> str:
    """The CPU model (Linux), else what platform knows: the numbers depend on the CPU family."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str:
    """The commit whose code made the runs, marked when a Python file differs from it (the numbers change with
    the code; the table and the README do not)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    try:
        head, status = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no", "--",
                                                                 "*.py")
    except OSError:  # no git on this machine
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with local changes" if status.stdout.strip() else "")


def out_check(out: str, names: tuple[str, ...], overwrite: bool) -> tuple[bool, str]:
    """(ok, error) for --out: new, or a folder of this comparison's outputs (outputs.claim), and one that
    already holds them (the committed ones in docs/) is replaced only with --overwrite. Shared with
    compare_optimizers.py."""
    kind = outputs.Kind("a folder of this comparison's outputs", True, lambda d: set(os.listdir(d)) <= set(names))
    try:
        outputs.claim(out, "--out", kind, overwrite)
    except outputs.OutputError as e:
        return False, str(e)
    taken = [name for name in names if os.path.exists(os.path.join(out, name))]
    return (overwrite or not taken, f"--out {out} already holds {', '.join(taken)}; pass --overwrite to replace "
                                    f"{'them' if len(taken) > 1 else 'it'}, or give another folder")


def write_markdown(path: str, results: list[Result], seeds: list[Result], common: list[str], setup: dict,
                   total: float, jobs: int) -> None:
    steps, window, log_interval = setup["steps"], setup["window"], setup["log_interval"]
    mc, tc, _ = launch.parse_config(common)
    noise = ""
    if seeds and all(r.rc == 0 for r in seeds) and results[0].rc == 0:
        vals = [results[0].val_loss] + [r.val_loss for r in seeds]
        noise = ("Seed-to-seed noise: the baseline reaches val loss "
                 + ", ".join(f"{v:.4f} (--seed {r.flags[-1]})" for v, r in zip(vals[1:], seeds))
                 + f" against {vals[0]:.4f} with the table's seed {tc.seed}, a range of {max(vals) - min(vals):.4f} "
                   f"(the seed also picks the initial weights, the training and the validation batches). "
                   f"Differences in val loss smaller than that range are not significant.")
    tokens = steps * tc.micro_batch_size * tc.num_microbatches * mc.seq_length
    lines = [
        "# Routing methods compared",
        "",
        f"Same model, seed, batches and steps for every method: D {mc.hidden_size}, {mc.num_layers} layers "
        f"(all MoE), {setup['experts']} experts of width F {mc.moe_ffn_hidden_size}, top-{setup['top_k']}, "
        f"T {mc.seq_length}, {tc.num_microbatches} micro-batches x {tc.micro_batch_size} sequences, "
        f"{steps} steps ({tokens:,} tokens) of the built-in corpus (byte-level), "
        f"{active_params(common, []):,} active parameters per token in every run. "
        f"Val loss: nats per byte on {tc.eval_iters} fixed validation batches after the last step.",
        "",
        f"Common flags: `{' '.join(common)}`",
        "",
        "| method | flags | final val loss | max/mean load | load CV | dead experts | dropped | tokens/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        flags = f"`{' '.join(r.flags)}`" if r.flags else "(defaults)"
        if r.rc != 0:
            lines.append(f"| {r.name} | {flags} | failed (exit {r.rc}): {r.error} | | | | | | {r.wall:.0f} |")
            continue
        lines.append(f"| {r.name} | {flags} | {r.val_loss:.4f} | {r.max_over_mean:.2f} | {r.cv:.2f} | "
                     f"{r.dead} / {r.slots} | {fmt(r.dropped, '.1%')} | {r.tokens_per_sec:,.0f} | {r.wall:.0f} |")
    lines += [
        "",
        f"Definitions. Load of an expert: its share of the layer's computed (token, expert) rows, as the "
        f"trainer logs it every {log_interval} steps (`expert_load`). **max/mean load** and **load CV** "
        f"(population std / mean of the E loads) are computed per MoE layer and logged step, then averaged "
        f"over the layers and the last {window} logged steps (steps {steps - (window - 1) * log_interval}-{steps}); "
        f"1.00 and 0.00 are perfect balance. **Dead experts**: (layer, expert) pairs whose load averaged over "
        f"those steps is below {DEAD_LOAD:.0%} of the mean load (that is, under {DEAD_LOAD:.0%} x 1/E of the "
        f"layer's rows), out of layers x E. **Dropped**: the share of top-k assignments over capacity "
        f"(`dropped_fraction`), averaged the same way; 0% for dropless methods; – for expert choice, where "
        f"a token that no expert picks skips the layer and the trainer does not count it. **tokens/s**: "
        f"median over the logged steps after the first (one step's training tokens over its time). "
        f"**wall s**: the whole run, start-up and evaluation included.",
        "",
    ]
    lines += [noise, ""] if noise else []
    lines += [
        "Notes. Expert choice routes each token by comparing it with every token of the batch, later ones "
        "included: it is not causal, so its val loss is not comparable with the others and it cannot "
        "generate as is. Round-robin ignores the router (forced balance, a speed reference). "
        "Global-batch balancing runs an extra forward pass per step to count f_i first. "
        f"The shared-expert run has one more expert in total ({setup['experts']} routed + 1 shared) but the "
        f"same active width.",
        "",
        f"Machine: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()} kernels), {os.cpu_count()} CPU "
        f"cores, torch {torch.__version__}, Python {platform.python_version()}, code at commit {code_version()}; "
        f"{jobs} run(s) at a time, one thread each. The whole comparison took {total / 60:.1f} minutes. Other "
        f"heavy jobs may have shared these cores, so tokens/s and wall times are noisy.",
        "",
        f"Reproduce: `python scripts/compare_routing.py {' '.join(sys.argv[1:])}`. Every run trains on one "
        f"thread whatever --jobs (the thread count changes how torch splits float sums), so with this code, "
        f"torch and CPU type the val losses, loads, dead experts and drops come out the same to the last digit. "
        f"Another CPU family (other vector kernels) or torch version rounds differently and may give other "
        f"numbers, of the size of the seed-to-seed noise; a change to the trainer may too.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_png(path: str, results: list[Result], seeds: list[Result]) -> bool:
    """Two horizontal bar charts (the baseline's seed-to-seed range shaded); False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    ok = [r for r in results if r.rc == 0]
    names = [r.name for r in ok][::-1]  # baseline on top
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.28 * len(ok) + 1.2), dpi=80, sharey=True)
    val = [r.val_loss for r in ok][::-1]
    spread = [r.val_loss for r in [results[0]] + seeds if r.rc == 0]
    ax1.barh(names, val, color="tab:blue")
    lo, hi = min(val + spread), max(val + spread)
    ax1.set_xlim(lo - 0.1 * (hi - lo + 1e-3) - 0.01, hi + 0.05 * (hi - lo + 1e-3) + 0.01)
    ax1.axvline(ok[0].val_loss, color="k", linewidth=0.8, linestyle="--")
    if len(spread) > 1:
        ax1.axvspan(min(spread), max(spread), color="gray", alpha=0.3)  # the baseline's seed-to-seed range
    ax1.set(title="final val loss (nats/byte; lower is better)"
            + (f"\ngray: baseline over {len(spread)} seeds" if len(spread) > 1 else ""))
    ax2.barh(names, [r.max_over_mean for r in ok][::-1], color="tab:orange")
    ax2.axvline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax2.set(title="max / mean expert load (1 = balanced)")
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=8)
        ax.title.set_fontsize(9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/routing", help="folder for routing_comparison.md and .png")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per method; 0: 300 (6 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (seconds; for tests)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="methods trained at the same time, one thread each (changes only the wall time)")
    p.add_argument("--noise-seeds", type=int, default=-1,
                   help="extra seeds of the baseline, to measure seed-to-seed noise; -1: 2 (0 with --quick)")
    p.add_argument("--keep-metrics", action="store_true", help="keep each run's metrics file in OUT/runs/")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the table, PNG and runs/ that OUT already holds (docs/ holds the committed ones)")
    args = p.parse_args()
    checks = [(args.steps >= 0, f"--steps must be >= 0 (0: the default), got {args.steps}"),
              (args.jobs >= 1, f"--jobs must be >= 1, got {args.jobs}"),
              (args.noise_seeds >= -1, f"--noise-seeds must be >= 0 (-1: the default), got {args.noise_seeds}"),
              (not os.path.exists(args.out) or os.path.isdir(args.out), f"--out {args.out} is a file; give a folder")]
    checks.append(out_check(args.out, OUTPUTS, args.overwrite))
    for ok, message in checks:
        if not ok:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    setup = dict(QUICK if args.quick else FULL)
    setup["steps"] = args.steps or setup["steps"]
    steps = setup["steps"]
    setup["log_interval"] = min(setup["log_interval"], steps)
    setup["window"] = max(1, min(setup["window"], steps // setup["log_interval"]))
    common = setup["flags"] + ["--max-steps", str(steps), "--warmup-steps", str(max(1, steps // 10)),
                               "--log-interval", str(setup["log_interval"]), "--eval-interval", str(steps),
                               "--no-progress"]
    todo = methods(setup["top_k"])
    n_methods = len(todo)
    base_seed = launch.parse_config(common)[1].seed
    n_seeds = args.noise_seeds if args.noise_seeds >= 0 else (0 if args.quick else 2)
    todo += [(f"baseline, --seed {base_seed + s}", ["--seed", str(base_seed + s)]) for s in range(1, n_seeds + 1)]
    actives = {name: active_params(common, flags) for name, flags in todo}
    if len(set(actives.values())) != 1:
        print(f"error: methods differ in active parameters per token: {actives}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        def one(i: int) -> Result:
            name, flags = todo[i]
            res = run_method(name, flags, common, os.path.join(tmp, f"{i:02d}.jsonl"), setup["window"])
            status = f"val loss {res.val_loss:.4f}" if res.rc == 0 else f"FAILED: {res.error}"
            print(f"[{i + 1}/{len(todo)}] {name}: {status} ({res.wall:.0f} s)", flush=True)
            return res
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(one, range(len(todo))))
        if args.keep_metrics:
            runs = os.path.join(args.out, "runs")
            os.makedirs(runs, exist_ok=True)
            for i in range(len(todo)):
                if os.path.exists(os.path.join(tmp, f"{i:02d}.jsonl")):
                    shutil.copy(os.path.join(tmp, f"{i:02d}.jsonl"), runs)
    total = time.time() - start
    md = os.path.join(args.out, "routing_comparison.md")
    results, seeds = results[:n_methods], results[n_methods:]
    write_markdown(md, results, seeds, common, setup, total, args.jobs)
    print(f"wrote {md} ({total / 60:.1f} min)")
    png = os.path.join(args.out, "routing_comparison.png")
    if write_png(png, results, seeds):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: no routing_comparison.png (pip install -r requirements-extras.txt)")
    if any(r.rc != 0 for r in results + seeds):
        sys.exit(1)


if __name__ == "__main__":
    main()
