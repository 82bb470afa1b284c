"""scripts/: bench_train, plot_metrics, the routing and optimizer comparisons, readme_figures, the test
selection of gpu_check.sh."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compare_optimizers
import compare_routing
import readme_figures
from helpers import HERE, read_metrics, run_cli, run_script, snapshot, write


def test_bench_train_times_the_trainers_own_step(monkeypatch, capsys):
    """scripts/bench_train.py has no step of its own: every step it times is minimal_pretrain.train_step."""
    import bench_train
    steps = []
    real = bench_train.train_step

    def counted(*args, **kw):
        steps.append(args[-1])
        return real(*args, **kw)

    monkeypatch.setattr(bench_train, "train_step", counted)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--num-layers", "1", "--hidden-size", "32",
                                      "--num-attention-heads", "2", "--num-kv-heads", "1", "--ffn-hidden-size", "32",
                                      "--moe-ffn-hidden-size", "16", "--seq-length", "16", "--micro-batch-size", "2",
                                      "--steps", "2", "--warmup", "1", "--json"])
    bench_train.main()
    assert steps == [0, 1, 2]
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(record["loss"]) and record["step_ms"] > 0 and record["total_params"] > 0


# --------------------------------------- use the model: export, import, generate, plot
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- plots
def test_plot_metrics_writes_every_figure_as_small_pngs(trained, tmp_path):
    pytest.importorskip("matplotlib")
    records = [json.loads(line) for line in open(trained / "m.jsonl")]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    r = run_script("plot_metrics.py", [str(trained / "m.jsonl"), "--out", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    expected = {"loss.png", "router_losses.png", "lr.png", "grad_norm.png", "throughput.png", "load_balance.png",
                "load_cv.png", "dead_experts.png", "expert_load_layer0.png", "expert_load_layer1.png"}
    # byte-level data: the evaluations report bits per byte, which get their own chart
    assert set(os.listdir(tmp_path / "plots")) == expected | {"overview.png", "val_bpb.png"}
    for name in expected:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 1000 < len(data) < 60_000, (name, len(data))
    assert 1000 < (tmp_path / "plots" / "overview.png").stat().st_size < 200_000


# ------------------------------------------------------------ routing comparison
@pytest.fixture(scope="module")
def quick_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing")
    r = run_script("compare_routing.py", ["--quick", "--jobs", "2", "--noise-seeds", 1, "--keep-metrics",
                                          "--out", out], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, r.stdout


def table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]  # without the header


def test_quick_comparison_has_one_finite_row_per_method(quick_comparison):
    out, _ = quick_comparison
    rows = table_rows((out / "routing_comparison.md").read_text())
    assert [r[0] for r in rows] == [name for name, _ in compare_routing.methods(2)]
    for r in rows:
        val, ratio, cv = float(r[2]), float(r[3]), float(r[4])
        assert math.isfinite(val) and 0 < val < math.log(256) + 1
        assert ratio >= 1.0 and cv >= 0.0 and math.isfinite(float(r[7].replace(",", ""))) and float(r[8]) > 0
    by_name = {r[0]: r for r in rows}
    for forced in ("expert choice", "round-robin (forced balance)"):  # balanced by construction
        assert (by_name[forced][3], by_name[forced][4]) == ("1.00", "0.00")
    assert float(by_name["capacity factor 1.0 (drops)"][6].rstrip("%")) > 0
    assert by_name["top-k softmax + aux (baseline)"][6] == "0.0%" and by_name["expert choice"][6] == "–"


def test_quick_comparison_numbers_match_the_runs_metrics(quick_comparison):
    out, _ = quick_comparison
    rows = table_rows((out / "routing_comparison.md").read_text())
    for i in (0, 6):  # baseline, capacity factor 1.0
        records = read_metrics(out / "runs" / f"{i:02d}.jsonl")
        val = [x["val_loss"] for x in records if "val_loss" in x][-1]
        last = [x for x in records if "loss" in x][-3:]  # --quick: the last 3 logged steps
        loads = [load for x in last for load in x["expert_load"].values()]
        ratio = sum(max(load) * len(load) for load in loads) / len(loads)
        assert rows[i][2] == f"{val:.4f}" and rows[i][3] == f"{ratio:.2f}"
    last = [x for x in read_metrics(out / "runs" / "06.jsonl") if "loss" in x][-3:]
    drops = [d for x in last for d in x["dropped_fraction"].values()]
    assert rows[6][6] == f"{sum(drops) / len(drops):.1%}"
    other_seed = [x["val_loss"] for x in read_metrics(out / "runs" / "11.jsonl") if "val_loss" in x][-1]
    md = (out / "routing_comparison.md").read_text()
    assert f"val loss {other_seed:.4f} (--seed 1235) against {rows[0][2]}" in md


def test_quick_comparison_writes_the_png(quick_comparison):
    pytest.importorskip("matplotlib")
    out, stdout = quick_comparison
    png = out / "routing_comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000
    assert f"wrote {png}" in stdout


# ---- plots and routing comparison (issue 17) ----
def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk that every PNG starts with, read here, not by the code under test."""
    data = path.read_bytes()[:24]
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def capacity_run_metrics(path: Path) -> Path:
    """Ten train records of a 2-layer run with a capacity factor (dropped_fraction) and two evaluations
    that report bits per byte, as the trainer writes them."""
    lines = []
    for step in range(1, 11):
        load = [0.4 - 0.02 * step, 0.3, 0.2, 0.1 + 0.02 * step]
        lines.append({"step": step, "loss": 4 - 0.1 * step, "lm_loss": 3.9 - 0.1 * step, "aux_loss": 1.1,
                      "z_loss": 0.2, "lr": 1e-3, "grad_norm": 2.0 / step, "tokens_per_sec": 900.0 + step,
                      "expert_load": {"0": load, "1": [0.25] * 4},
                      "dropped_fraction": {"0": 0.2 - 0.01 * step, "1": 0.05}})
        if step % 5 == 0:
            lines.append({"step": step, "val_loss": 3.5 - 0.1 * step, "val_bpb": (3.5 - 0.1 * step) / math.log(2)})
    return write(path, "".join(json.dumps(r) + "\n" for r in lines))


def test_plot_metrics_writes_an_overview_and_laptop_sized_figures(tmp_path):
    pytest.importorskip("matplotlib")
    r = run_script("plot_metrics.py", [capacity_run_metrics(tmp_path / "m.jsonl"), "--out", tmp_path / "p"])
    assert r.returncode == 0 and not r.stderr, r.stderr
    names = set(os.listdir(tmp_path / "p"))
    assert names == {"overview.png", "loss.png", "router_losses.png", "lr.png", "grad_norm.png", "throughput.png",
                     "val_bpb.png", "load_balance.png", "dropped_fraction.png", "expert_load_layer0.png",
                     "expert_load_layer1.png"}
    width, height = png_size(tmp_path / "p" / "overview.png")
    assert width >= 1920 and height >= 1200 and (tmp_path / "p" / "overview.png").stat().st_size < 200_000
    for name in names - {"overview.png"}:
        width, height = png_size(tmp_path / "p" / name)
        assert width >= 1200 and height >= 750 and (tmp_path / "p" / name).stat().st_size < 60_000, name


def test_plot_metrics_skips_the_optional_figures_silently_when_the_fields_are_absent(tmp_path):
    pytest.importorskip("matplotlib")
    plain = [json.loads(line) for line in capacity_run_metrics(tmp_path / "m.jsonl").read_text().splitlines()]
    for r in plain:
        r.pop("dropped_fraction", None)
        r.pop("val_bpb", None)
    r = run_script("plot_metrics.py", [write(tmp_path / "plain.jsonl", "".join(json.dumps(x) + "\n" for x in plain)),
                                       "--out", tmp_path / "p"])
    assert r.returncode == 0 and not r.stderr, r.stderr
    names = set(os.listdir(tmp_path / "p"))
    assert "overview.png" in names and not names & {"dropped_fraction.png", "val_bpb.png"}


def test_compare_routing_refuses_an_out_that_holds_a_table_without_overwrite(tmp_path, capsys, monkeypatch):
    out = write(tmp_path / "docs" / "routing_comparison.md", "the committed table").parent
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compare_routing.py", "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        compare_routing.main()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1
    assert "already holds routing_comparison.md" in errors[0] and "--overwrite" in errors[0]
    assert snapshot(tmp_path) == before


def without_timings(path: Path) -> list[dict]:
    """A kept metrics file without tokens_per_sec, the one field that depends on the machine's load."""
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in read_metrics(path)]


def test_quick_comparison_gives_the_same_numbers_whatever_jobs_and_threads(quick_comparison, tmp_path):
    # The fixture ran --jobs 2 under OMP_NUM_THREADS=1; here --jobs 3 under OMP_NUM_THREADS=2, which
    # (were it passed on) changes the trainer's grad norm from step 1 at this size. Into a folder that
    # holds a table: --overwrite replaces it.
    first, _ = quick_comparison
    out = write(tmp_path / "again" / "routing_comparison.md", "an older table").parent
    r = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "compare_routing.py"), "--quick", "--jobs", "3",
                        "--noise-seeds", "1", "--keep-metrics", "--overwrite", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = sorted(os.listdir(first / "runs"))
    assert runs == sorted(os.listdir(out / "runs")) and len(runs) == 12
    for name in runs:  # every loss, load, norm and drop of every logged step, bit for bit
        assert without_timings(first / "runs" / name) == without_timings(out / "runs" / name), name
    tables = [table_rows((d / "routing_comparison.md").read_text()) for d in (first, out)]
    assert [row[:7] for row in tables[0]] == [row[:7] for row in tables[1]]  # all but tokens/s and wall s


def test_quick_optimizer_comparison_equals_a_direct_run_and_keeps_its_table(tmp_path):
    """Each row's val loss is what the trainer gives for those flags (run here directly, one thread), and a
    second run into the same folder is refused without --overwrite."""
    out = tmp_path / "co"
    r = run_script("compare_optimizers.py", ["--quick", "--seeds", 1, "--jobs", 2, "--out", out], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {(row[0], row[1]): float(row[2]) for row in table_rows((out / "optimizer_comparison.md").read_text())}
    assert set(rows) == set(compare_optimizers.COMBINATIONS)
    metrics = tmp_path / "direct.jsonl"
    common = compare_optimizers.QUICK["flags"] + ["--max-steps", "6", "--log-interval", "1", "--eval-interval", "6",
                                                  "--no-progress"]
    direct = run_cli(common + ["--optimizer", "muon", "--lr-schedule", "wsd", "--metrics-file", str(metrics)])
    assert direct.returncode == 0, direct.stderr[-2000:]
    val = [x["val_loss"] for x in read_metrics(str(metrics)) if "val_loss" in x][-1]
    assert rows[("muon", "wsd")] == float(f"{val:.4f}")
    before = (out / "optimizer_comparison.md").read_bytes()
    again = run_script("compare_optimizers.py", ["--quick", "--seeds", 1, "--out", out], timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (out / "optimizer_comparison.md").read_bytes() == before


def test_readme_figures_runs_the_commands_the_guides_quote(tmp_path):
    """The figures the guides quote come from their own commands: each command the script runs is
    written, as it runs it, in README.md or README_MOE.md, and resolves to the project's files."""
    guides = "".join(Path(HERE, name).read_text() for name in ("README.md", "README_MOE.md"))
    for name, command in readme_figures.COMMANDS.items():
        assert command in guides, name
        argv, env = readme_figures.argv_of(command, str(tmp_path))
        assert all(os.path.isfile(a) for a in argv if a.endswith(".py")), argv
    argv, env = readme_figures.argv_of(readme_figures.COMMANDS["activation"], str(tmp_path))
    assert env["OMP_NUM_THREADS"] == "1" and argv[0] == sys.executable


def test_gpu_checks_pytest_step_selects_the_cuda_tests():
    """scripts/gpu_check.sh's pytest step, as written there, collects the CUDA tests (on the CPU they
    are collected and skipped): pointed at a file without them, the GPU run would test nothing."""
    line = next(ln for ln in Path(HERE, "scripts", "gpu_check.sh").read_text().splitlines()
                if ln.strip().startswith("step pytest"))
    args = [a for a in line.split("#")[0].split("-m pytest", 1)[1].split() if a not in ("-q", "-x")]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"] + args, capture_output=True,
                       text=True, cwd=HERE, timeout=120)
    collected = [ln.split("::")[1].split("[")[0] for ln in r.stdout.splitlines() if "::" in ln]
    assert {"test_cuda_training_run_bf16", "test_cuda_moe_layer_matches_per_token_reference_fp32_and_grouped_bf16",
            "test_cuda_step_keeps_activations_bf16_and_the_router_fp32"} <= set(collected), r.stdout[-2000:]
