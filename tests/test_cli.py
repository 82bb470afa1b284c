"""The trainer's command line: tiny runs end to end, --help, and the refusals of bad flags and bad
layouts (exit 2, one `error:` line, before any collective)."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time

import numpy as np
import pytest
import torch

import launch
import metrics
import minimal_pretrain as mp
from moe_layers import ModelConfig, MoETransformer
from helpers import assert_clean_refusal, read_metrics, refusal_in_process, run_cli, smoke, TINY_FLAGS


@smoke
def test_cli_tiny_run_writes_valid_metrics(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--num-microbatches", "2", "--eval-interval", "2",
                              "--eval-iters", "2", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert "Step 4 | Loss: " in r.stdout and "| Aux Loss: " in r.stdout and "samples/s" in r.stdout
    records = read_metrics(metrics)
    train = [x for x in records if "loss" in x]
    evals = [x for x in records if "val_loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and [x["step"] for x in evals] == [2, 4]
    keys = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec", "expert_load"}
    for x in train:
        assert keys <= set(x)
        assert math.isclose(x["loss"], x["lm_loss"] + 0.1 * x["aux_loss"] + 0.01 * x["z_loss"], rel_tol=1e-9)
        assert set(x["expert_load"]) == {"0", "1"}
        for load in x["expert_load"].values():
            assert len(load) == 4 and math.isclose(sum(load), 1.0, rel_tol=1e-9)
    assert "final val loss" in r.stdout and "unigram entropy" in r.stdout


def test_default_run_beats_the_unigram_baseline(background):
    """`python minimal_pretrain.py` with no model flags: the README's first command (about 90 s;
    run in the background from the session's start, conftest.BACKGROUND_JOBS)."""
    r, _ = background.result("default_run")
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("final val loss")][0]
    val, unigram = float(line.split()[3]), float(line.split("unigram entropy ")[1].split()[0])
    assert val < unigram - 1.0, line


@smoke
@pytest.mark.parametrize("flags,message", [
    (["--num-experts-per-token", "5"], "--num-experts-per-token"),
    (["--num-attention-heads", "3"], "--num-attention-heads"),
    (["--num-kv-heads", "3"], "--num-kv-heads"),
    (["--data", "/no/such/file"], "/no/such/file"),
    (["--max-steps", "0"], "--max-steps"),
])
def test_invalid_flags_exit_2_with_one_error_line(flags, message, capsys, monkeypatch):
    """In-process through main() as the CLI calls it; the first case also as a real process."""
    assert message in refusal_in_process(TINY_FLAGS + ["--max-steps", "2"] + flags, capsys, monkeypatch)
    if flags == ["--num-experts-per-token", "5"]:
        r = run_cli(TINY_FLAGS + ["--max-steps", "2"] + flags, timeout=60)
        assert r.returncode == 2
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], r.stderr
        assert "Traceback" not in r.stderr


@smoke
def test_help_lists_every_contract_flag():
    r = run_cli(["--help"], timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--num-experts", "--num-experts-per-token", "--moe-layer-interval", "--router-aux-loss-coef",
                 "--router-z-loss-coef", "--tensor-parallel-size", "--expert-parallel-size",
                 "--pipeline-parallel-size", "--num-microbatches", "--max-steps", "--hidden-size", "--num-layers",
                 "--num-attention-heads", "--num-kv-heads", "--ffn-hidden-size", "--moe-ffn-hidden-size",
                 "--seq-length", "--micro-batch-size", "--lr", "--min-lr", "--warmup-steps", "--weight-decay",
                 "--grad-clip", "--seed", "--data", "--eval-interval", "--eval-iters", "--log-interval",
                 "--metrics-file", "--save", "--save-interval", "--load", "--device", "--dtype"):
        assert flag + " " in r.stdout, flag


def test_eval_only_reports_the_checkpoints_val_loss_and_summary_names_experts(tmp_path):
    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--eval-interval", "4", "--eval-iters", "3", "--save", str(save),
                              "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert "run summary" in r.stdout and "layer 1: most loaded expert" in r.stdout
    assert f"checkpoints: {save} (latest: step_00000004)" in r.stdout
    val = [x for x in read_metrics(metrics) if "val_loss" in x][-1]["val_loss"]
    r = run_cli(["--load", str(save), "--eval-only", "--eval-iters", "3", "--no-progress"])
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("eval-only:")][0]
    loss = float(line.split("val loss ")[1].split()[0])
    assert math.isclose(loss, val, abs_tol=1e-4)
    assert f"perplexity {math.exp(val):.3f}" in line and f"{val / math.log(2):.4f} bits per byte" in line


@smoke
def test_too_short_data_exits_2(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(short)], timeout=60)
    assert r.returncode == 2 and "data too short" in r.stderr


@smoke
def test_text_folder_and_token_files_train(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(12):
        (folder / f"f{i:02d}.txt").write_text(("hello moe world %d " % i) * 50)
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(folder)])
    assert r.returncode == 0, r.stderr
    assert "12 text files (10.0% of the bytes held out)" in r.stdout
    bins = tmp_path / "bins"
    bins.mkdir()
    np.arange(5000, dtype=np.uint16).__mod__(100).astype(np.uint16).tofile(bins / "train.bin")
    np.arange(500, dtype=np.uint16).astype(np.uint16).__mod__(100).astype(np.uint16).tofile(bins / "val.bin")
    (bins / "meta.json").write_text(json.dumps({"vocab_size": 100}))
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(bins), "--num-experts", "0"])
    assert r.returncode == 0, r.stderr
    assert "--vocab-size 100 " in r.stdout  # the resolved config takes meta.json's vocabulary


# name: (world size, flags, words the error line must hold)
BAD_LAYOUTS = {
    "world_vs_sizes": (3, ["--tensor-parallel-size", "2"], "world size 3"),
    "heads_vs_tp": (4, ["--tensor-parallel-size", "4", "--num-kv-heads", "2"], "--num-kv-heads"),
    "experts_vs_ep": (2, ["--expert-parallel-size", "2", "--num-experts", "3", "--num-experts-per-token", "1"],
                      "--num-experts"),
    "ep_vs_stage_ranks": (2, ["--expert-parallel-size", "4"], "ranks of a pipeline stage"),
    "layers_vs_pp": (4, ["--pipeline-parallel-size", "4", "--num-layers", "2"], "--num-layers"),
    "microbatches_vs_pp": (2, ["--pipeline-parallel-size", "2", "--num-microbatches", "1"], "--num-microbatches"),
    "vocab_vs_tp": (2, ["--tensor-parallel-size", "2", "--vocab-size", "255", "--data", "BINS"], "vocabulary"),
    "shared_width_vs_tp": (2, ["--tensor-parallel-size", "2", "--num-shared-experts", "1",
                               "--shared-expert-ffn-hidden-size", "7"], "shared experts"),
}


@pytest.fixture(scope="module")
def odd_vocab_bins(tmp_path_factory):
    """train.bin / val.bin with a 255-token vocabulary (odd, so TP2 cannot split it)."""
    d = tmp_path_factory.mktemp("bins255")
    (np.arange(4000) % 255).astype(np.uint16).tofile(d / "train.bin")
    (np.arange(400) % 255).astype(np.uint16).tofile(d / "val.bin")
    return str(d)


@smoke
@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_invalid_layout_exits_2_before_any_collective(name, odd_vocab_bins, capsys, monkeypatch):
    """Every rank validates alone, so rank 0 of a would-be world fails at once (no peer needed).
    In-process (no process group can start: see refusal_in_process); the next test, under torchrun."""
    world, flags, words = BAD_LAYOUTS[name]
    flags = [odd_vocab_bins if f == "BINS" else f for f in flags]
    start = time.time()
    assert words in refusal_in_process(TINY_FLAGS + ["--max-steps", "2"] + flags, capsys, monkeypatch, world)
    assert time.time() - start < 30


def test_invalid_layout_under_torchrun_ends_every_rank_fast():
    start = time.time()
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--tensor-parallel-size", "2", "--num-kv-heads", "1",
                              "--num-attention-heads", "2"], nproc=2, timeout=120, torchrun=True)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--num-kv-heads" in errors[0]  # rank 0 alone speaks
    assert 'minimal_pretrain.py", line' not in r.stderr  # no worker traceback (torchrun prints its own)
    assert "exitcode  : 2" in r.stderr
    assert time.time() - start < 60


def test_help_lists_every_flag_once_under_its_group():
    groups = [title for title, _ in launch.FLAG_GROUPS]
    grouped = [name for _, names in launch.FLAG_GROUPS for name in names]
    fields = [f.name for cls in (ModelConfig, launch.TrainConfig) for f in dataclasses.fields(cls)]
    assert sorted(grouped) == sorted(fields) and len(set(grouped)) == len(grouped)
    text = launch.build_arg_parser().format_help()
    starts = [text.index(f"\n{title}:\n") for title in groups]
    assert starts == sorted(starts)  # in the guide's order
    for (title, names), start, end in zip(launch.FLAG_GROUPS, starts, starts[1:] + [len(text)]):
        section = text[start:end]
        for name in names:
            assert f"--{name.replace('_', '-')}" in section, (title, name)
    assert "default: -1" in text and "a tenth of the decay steps" in text  # the warm-up default says what it does


def test_banner_says_device_dtype_sizes_and_memory(capsys):
    mp.main(TINY_FLAGS + ["--max-steps", "1"])
    out = capsys.readouterr().out
    mc = launch.parse_config(TINY_FLAGS)[0]
    params = dict(MoETransformer(mc, seed=0).named_parameters())
    total = sum(p.numel() for p in params.values())
    # A token multiplies by every weight but the embedding (a lookup) and by K of the E experts.
    active = sum(p.numel() for name, p in params.items() if ".experts." not in name and "embed_tokens" not in name)
    active += sum(p.numel() for name, p in params.items() if ".experts." in name) * 2 // 4
    banner = out[:out.index("\nconfig: ")]
    assert "device: cpu (no CUDA device visible) x 1 rank | weights fp32" in banner or torch.cuda.is_available()
    assert f"model: {total:,} parameters, {active:,} active per token" in banner
    assert "memory per rank (estimate):" in banner and "warm-up 1 steps to 1.00e-02" in banner


def console_lines(out: str) -> list[str]:
    """A run's stdout without its log lines (`Step N | ...`: the documented record, one line per interval)."""
    return [line for line in out.splitlines() if not line.startswith("Step ")]


def test_banner_lines_fit_the_width_and_its_config_is_the_whole_resolved_config(tmp_path, capsys):
    save = tmp_path / "ck"
    recipe = ["--num-shared-experts", "1", "--router-score-function", "sigmoid", "--router-num-groups", "2",
              "--router-group-topk", "1", "--router-bias-update-rate", "1e-3", "--first-k-dense-layers", "1",
              "--num-layers", "3", "--mtp-num-layers", "1", "--lr-schedule", "wsd", "--no-norm-topk-prob"]
    mp.main(TINY_FLAGS + recipe + ["--max-steps", "2", "--save", str(save), "--metrics-file",
                                   str(tmp_path / "m.jsonl"), "--eval-interval", "2", "--eval-iters", "1"])
    out = capsys.readouterr().out
    assert all(len(line) <= metrics.LINE_WIDTH for line in console_lines(out)), \
        [line for line in console_lines(out) if len(line) > metrics.LINE_WIDTH]
    banner = out[out.index("\nconfig: "):out.index("Step 1 |")].splitlines()[2:]
    assert len(banner) >= 2  # wrapped: more flags than one line holds
    mc, tc, _ = launch.parse_config(shlex.split(" ".join(banner)))  # the flags, pasted back
    meta = json.loads((save / "step_00000002" / "meta.json").read_text())
    assert dataclasses.asdict(mc) == meta["model"] and dataclasses.asdict(tc) == meta["train"]


def test_eval_only_prints_what_evaluation_depends_on_and_no_training_banner(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths as short as a user's (out/run), not pytest's
    save = "ck"
    mp.main(TINY_FLAGS + ["--max-steps", "2", "--save", save])
    capsys.readouterr()
    mp.main(["--load", save, "--eval-only", "--eval-iters", "2", "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    training = ("layout:", "  rank ", "batch:", "optimizer:", "memory per rank", "optimizer state", "config:",
                "note:", "resumed from", "Step ", "=" * 20 + " run summary")
    assert not [line for line in lines if line.startswith(training)], lines
    assert lines[0].strip("= ") == "eval" and any(line.startswith("model: ") for line in lines)
    assert "eval: 2 batches of 2 sequences x 16 tokens of the val split (seed 1234)" in lines
    assert lines[-1].startswith("eval-only: step 2 | val loss ") and lines[-2].startswith("evaluating ck/step_00000002")
    assert all(len(line) <= metrics.LINE_WIDTH for line in lines)


# flags -> words the error line must hold (each refused before any collective)
BAD_RECIPE_FLAGS = {
    "groups_vs_experts": (["--router-num-groups", "3"], "--router-num-groups (3) must divide --num-experts"),
    "group_topk_vs_groups": (["--router-num-groups", "2", "--router-group-topk", "3"], "--router-group-topk (3)"),
    "one_expert_per_group": (["--router-num-groups", "4", "--router-group-topk", "2"], "two best experts"),
    "topk_vs_kept_experts": (["--router-num-groups", "2", "--router-group-topk", "1", "--num-experts-per-token", "3"],
                             "--num-experts-per-token (3) must not exceed"),
    "scale_zero": (["--router-topk-scaling-factor", "0"], "--router-topk-scaling-factor must be finite and > 0"),
    "scale_nan": (["--router-topk-scaling-factor", "nan"], "--router-topk-scaling-factor"),
    "groups_with_expert_choice": (["--router-num-groups", "2", "--router-type", "expert-choice"],
                                  "--router-type expert-choice takes neither"),
    "first_k_all_layers": (["--first-k-dense-layers", "2"], "--first-k-dense-layers 2 leaves no MoE layer"),
    "first_k_negative": (["--first-k-dense-layers", "-1"], "--first-k-dense-layers must be >= 0"),
    "list_out_of_range": (["--moe-layer-list", "1,2"], "--moe-layer-list 1,2 must name distinct layers"),
    "list_repeated": (["--moe-layer-list", "1,1"], "must name distinct layers"),
    "list_not_numbers": (["--moe-layer-list", "1;2"], "--moe-layer-list must be comma-separated"),
    "list_with_interval": (["--moe-layer-list", "1", "--moe-layer-interval", "2"], "drop --first-k-dense-layers"),
    "list_when_dense": (["--moe-layer-list", "1", "--num-experts", "0"], "--moe-layer-list names MoE layers"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPE_FLAGS))
def test_recipe_flags_refuse_bad_values_naming_the_flag(case):
    flags, words = BAD_RECIPE_FLAGS[case]
    mc, tc, _ = launch.parse_config(TINY_FLAGS + flags)
    with pytest.raises(launch.ConfigError) as e:
        launch.resolve_layout(mc, tc, 1)
    assert words in str(e.value)


def test_recipe_flag_refusal_exits_2_with_one_error_line():
    assert_clean_refusal(run_cli(TINY_FLAGS + ["--router-num-groups", "3"]), "--router-num-groups")
