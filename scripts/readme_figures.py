"""Rerun every command whose output README.md and README_MOE.md quote, and print the figures.

    python scripts/readme_figures.py                      # all sections: 5 minutes on 2 idle cores, 25 busy
    python scripts/readme_figures.py --only default resume   # some of them

Each section runs its commands exactly as the guide writes them (COMMANDS; a test checks that the
guide still holds each one), in a temporary folder, and prints what the guide quotes from them:
the banner, losses and time of the default run, its --eval-only line, the LR a resume jumps to,
the EP2 run's time and load summary, the activation-memory table, the Mixtral ratio, the time of
one run of each comparison table (the tables themselves take 15-20 minutes, so their time is
estimated from one run of each kind). It starts with the machine (CPU model, cores, torch, its
threads and kernels), the commit and the load average, and prints the load again at the end:
times and throughput depend on all of these; losses on the CPU type, torch and the thread count
(section `threads` runs the default model twice on one thread and compares every record bit for
bit). Paste the figures into the guides with the machine line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from compare_routing import code_version, cpu_name  # noqa: E402

# Every command whose output the guides quote, as they write it (each string is in README.md or
# README_MOE.md: tests/test_scripts.py checks). `out/` paths land in a temporary folder.
COMMANDS = {
    "default": "python minimal_pretrain.py --save out/run --metrics-file out/run/metrics.jsonl",
    "eval": "python minimal_pretrain.py --load out/run --eval-only",
    "one_thread": "OMP_NUM_THREADS=1 python minimal_pretrain.py --metrics-file out/one_thread.jsonl",
    "ckpt": "python minimal_pretrain.py --max-steps 200 --save out/ckpt --save-interval 50 --keep-last 2",
    "resume": "python minimal_pretrain.py --max-steps 400 --lr-decay-steps 400 --load out/ckpt --save out/ckpt400",
    "ep2": "torchrun --nproc_per_node=2 minimal_pretrain.py --expert-parallel-size 2 --max-steps 20 "
           "--metrics-file out/ep2.jsonl",
    "plot": "python scripts/plot_metrics.py out/ep2.jsonl --out out/ep2_plots",
    "activation": "OMP_NUM_THREADS=1 python scripts/bench_activation_memory.py",
    "mixtral": "python scripts/bench_vs_mixtral.py",
}
SECTIONS = ("default", "threads", "resume", "ep2", "activation", "mixtral", "routing", "optimizers")


def argv_of(command: str, cwd: str) -> tuple[list[str], dict]:
    """A guide's command line -> (argv, environment): `VAR=value` prefixes go into the environment,
    `python` is this interpreter, the project's files are found from any folder, and torchrun gets a
    free port (other jobs on the machine may hold torchrun's default one)."""
    env, words = dict(os.environ, PYTHONUNBUFFERED="1"), shlex.split(command)
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    argv = []
    for word in words:
        if word == "python":
            argv.append(sys.executable)
        elif word == "torchrun":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            argv += [sys.executable, "-m", "torch.distributed.run", "--master-port", str(port)]
        elif word.endswith(".py") and os.path.isfile(os.path.join(ROOT, word)):
            argv.append(os.path.join(ROOT, word))
        else:
            argv.append(word)
    os.makedirs(os.path.join(cwd, "out"), exist_ok=True)
    return argv, env


def run(name: str, cwd: str) -> tuple[str, float]:
    """Run COMMANDS[name] in `cwd`; (stdout, wall seconds). A failed command ends the script."""
    argv, env = argv_of(COMMANDS[name], cwd)
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        sys.exit(f"error: `{COMMANDS[name]}` exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return proc.stdout, time.time() - t0


def lines_of(out: str, *starts: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(starts)]


def say(title: str, command: str = "") -> None:
    """A section's title, with the load average as it starts (times depend on it), and its command."""
    print(f"\n## {title} (load average {os.getloadavg()[0]:.2f})" + (f"\n$ {command}" if command else ""),
          flush=True)


def records(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def machine() -> None:
    """What every figure below depends on."""
    say("machine")
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores | torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads by default ({torch.backends.cpu.get_cpu_capability()} kernels) | Python "
          f"{sys.version.split()[0]} | commit {code_version()} | load average {os.getloadavg()[0]:.2f}")


def default_run(cwd: str) -> None:
    """The quick start's run (the same 400 steps as plain `python minimal_pretrain.py`) and its --eval-only."""
    say("default run", COMMANDS["default"])
    out, wall = run("default", cwd)
    print(out[:out.index("\nStep ")])  # the banner, config lines included
    print("\n".join(lines_of(out, "Step 10 |")))
    summary = out[out.index("=" * 10 + " run summary"):]
    print("\n".join(lines_of(summary, "steps ", "final ", "peak memory")) + f"\n(command wall time {wall:.0f} s)")
    say("eval-only", COMMANDS["eval"])
    print("\n".join(lines_of(run("eval", cwd)[0], "eval-only:")))


def threads(cwd: str) -> None:
    """The default run twice on one thread at the same time: every record equal, bit for bit?"""
    say("one thread, twice at once", COMMANDS["one_thread"])
    argv, env = argv_of(COMMANDS["one_thread"], cwd)
    second = [a.replace("one_thread.jsonl", "one_thread_2.jsonl") for a in argv]
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
             for a in (argv, second)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("error: a one-thread run failed")
    a, b = (records(os.path.join(cwd, "out", f)) for f in ("one_thread.jsonl", "one_thread_2.jsonl"))
    same = [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in a] == \
           [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in b]
    print("\n".join(lines_of(outs[0], "software:", "final val loss", "steps ")))
    print(f"two runs, every metrics record except tokens/s equal bit for bit: {same} ({len(a)} records)")


def resume(cwd: str) -> None:
    """The checkpoint section's resume with a stretched cosine: the LR jump its banner states. The
    resumed run is stopped by SIGTERM once the banner is out (the jump is all the guide quotes)."""
    say("resume", COMMANDS["ckpt"] + "\n$ " + COMMANDS["resume"])
    run("ckpt", cwd)
    argv, env = argv_of(COMMANDS["resume"], cwd)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd)
    in_note = False
    for line in proc.stdout:
        in_note = line.startswith("note:") or (in_note and line.startswith("    "))  # a note and its wrapped rest
        if in_note or line.startswith("resumed from"):
            print(line.rstrip())
        if line.startswith("resumed from"):
            proc.send_signal(signal.SIGTERM)  # the banner is out: end it (out/ is thrown away)
            break
    proc.communicate()


def ep2(cwd: str) -> None:
    """The load-health example: two ranks of EP2 x DP2, its summary's layer lines; then its plots."""
    say("EP2 on two ranks", COMMANDS["ep2"])
    out, wall = run("ep2", cwd)
    print("\n".join(lines_of(out, "steps ", "layer ")) + f"\n(command wall time {wall:.0f} s)")
    say("plots", COMMANDS["plot"])
    out, _ = run("plot", cwd)
    print(f"{len(os.listdir(os.path.join(cwd, 'out', 'ep2_plots')))} PNGs: {out.strip().splitlines()[-1][:100]}")


def table(name: str, cwd: str) -> None:
    """A script whose whole output is the figure (activation-memory table, Mixtral ratio)."""
    say(name, COMMANDS[name])
    out, wall = run(name, cwd)
    print(out.rstrip() + f"\n(command wall time {wall:.0f} s)")


def comparison_runs(cwd: str, title: str, steps: int, runs: list[list[str]]) -> list[float]:
    """Runs of a comparison table's setup, at the same time, one thread each (as --jobs does); wall seconds."""
    say(title)
    procs = []
    for i, flags in enumerate(runs):
        argv, env = argv_of("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python minimal_pretrain.py", cwd)
        argv += ["--seq-length", "128", "--micro-batch-size", "4", "--num-microbatches", "2", "--eval-iters", "10",
                 "--max-steps", str(steps), "--eval-interval", str(steps), "--log-interval", "10", "--no-progress",
                 "--metrics-file", os.path.join(cwd, "out", f"{title[:4]}{i}.jsonl")] + flags
        print("$ " + " ".join(argv[1:]).replace(ROOT + os.sep, ""))
        procs.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd),
                      time.time()))
    walls = []
    for proc, t0 in procs:
        proc.wait()
        walls.append(time.time() - t0)
    return walls


def comparisons(cwd: str, which: str) -> None:
    """The tables take 15-20 minutes; one round of their runs here says how long they take on this machine."""
    if which == "routing":  # 13 runs (11 methods, 2 more seeds), 2 at a time; global-batch does two forwards
        walls = comparison_runs(cwd, "routing table: baseline and global-batch aux, 150 steps, together", 150,
                                [[], ["--router-aux-loss-type", "global-batch"]])
        print(f"wall: baseline {walls[0]:.0f} s, global-batch {walls[1]:.0f} s; the table's 13 runs 2 at a time: "
              f"about {13 * walls[0] / 2 / 60:.0f}-{13 * walls[1] / 2 / 60:.0f} minutes")
    else:  # 8 runs (4 combinations x 2 seeds), 2 at a time
        walls = comparison_runs(cwd, "optimizer table: adamw and muon (cosine), 100 steps, together", 100,
                                [["--optimizer", "adamw"], ["--optimizer", "muon"]])
        print(f"wall: adamw {walls[0]:.0f} s, muon {walls[1]:.0f} s; the table's 8 runs 2 at a time: about "
              f"{4 * max(walls) / 60:.0f} minutes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    args = p.parse_args()
    t0 = time.time()
    machine()
    with tempfile.TemporaryDirectory(prefix="readme_figures_") as cwd:
        for section in args.only:
            if section == "default":
                default_run(cwd)
            elif section == "threads":
                threads(cwd)
            elif section == "resume":
                resume(cwd)
            elif section == "ep2":
                ep2(cwd)
            elif section in ("activation", "mixtral"):
                table(section, cwd)
            else:
                comparisons(cwd, section)
    say("done")
    print(f"{(time.time() - t0) / 60:.1f} minutes; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
