"""Checkpoints: exact resume on one and many ranks, resharding onto other layouts, crashes while
saving, keep-last, a restarted worker, SIGTERM, resume semantics of the schedule and global batch."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint as ckpt_io
from parallel_layers import Layout
import minimal_pretrain as mp
from moe_layers import MoETransformer
from helpers import (_assert_continues_like, assert_clean_refusal, free_port, HERE, interrupted_at_3, run_cli,
                     run_for_resume, smoke, tiny_config, TINY_FLAGS, train_records, tree_bytes, unwrapped,
                     without_timing)


@pytest.fixture(scope="module")
def full_run_one(tmp_path_factory):
    """An uninterrupted 6-step run on one process, checkpoints at 3 and 6: (its folder, its records)."""
    tmp = tmp_path_factory.mktemp("full_run_one")
    return tmp / "one", run_for_resume(tmp, "one", 1, [], 4)


@pytest.fixture(scope="module")
def full_run_8(tmp_path_factory):
    """The same run on 8 ranks (TP2 x PP2 x DP2), in a fixture of its own so that the smoke set (which
    resumes the one-process run only) never starts 8 ranks."""
    tmp = tmp_path_factory.mktemp("full_run_8")
    return tmp / "tp2_pp2_dp2", run_for_resume(tmp, "tp2_pp2_dp2", 8, ["--tensor-parallel-size", "2",
                                                                       "--pipeline-parallel-size", "2"], 2)


@smoke
def test_resume_is_exact_in_one_process(full_run_one, tmp_path):
    folder, records = full_run_one
    shutil.copytree(folder, tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 1, [], 4, load=interrupted_at_3(tmp_path / "ck"))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert without_timing(resumed) == without_timing(records[3:])  # bitwise: every float of every record


def test_resume_is_exact_on_4_ranks(tmp_path):
    layout = ["--tensor-parallel-size", "2", "--expert-parallel-size", "4"]
    full = run_for_resume(tmp_path, "full", 4, layout, 2)
    resumed = run_for_resume(tmp_path, "resumed", 4, layout, 2, load=interrupted_at_3(tmp_path / "full"))
    assert without_timing(resumed) == without_timing(full[3:])


@pytest.mark.parametrize("target", ["one_process", "pp2_dp2_ep2"])
def test_checkpoint_of_8_ranks_reshards_onto_other_layouts(full_run_8, tmp_path, target):
    folder, records = full_run_8
    shutil.copytree(folder, tmp_path / "ck")
    nproc, layout, micro = {"one_process": (1, [], 4),
                            "pp2_dp2_ep2": (4, ["--pipeline-parallel-size", "2", "--expert-parallel-size", "2"], 2),
                            }[target]
    resumed = run_for_resume(tmp_path, "resumed", nproc, layout, micro, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(records, resumed)
    print(f"8 ranks -> {target}: max relative loss difference {worst:.2e}")


def test_checkpoint_of_one_process_reshards_onto_8_ranks(full_run_one, tmp_path):
    folder, records = full_run_one
    shutil.copytree(folder, tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size",
                                                      "2"], 2, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(records, resumed)
    print(f"1 rank -> 8 ranks: max relative loss difference {worst:.2e}")


def tiny_checkpoint_at_step_3(root) -> tuple[MoETransformer, torch.optim.Optimizer, dict, dict]:
    """A one-rank checkpoint of a tiny model at step 3 in `root`: (model, optimizer, meta, saved weights)."""
    model = MoETransformer(tiny_config(), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 3, "skipped_steps": 0,
            "model": {}, "train": {}, "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    ckpt_io.save_checkpoint(str(root), 3, ckpt_io.rank_payload(model, opt, Layout()), meta, 0, 1)
    return model, opt, meta, ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(root)))


@smoke
def test_save_that_crashes_between_files_leaves_latest_loadable(tmp_path, monkeypatch):
    model, opt, meta, before = tiny_checkpoint_at_step_3(tmp_path)
    real_write = ckpt_io._fsync_write

    def crash_on_meta(path, write):  # the rank file is written, then the process "dies"
        if path.endswith("meta.json"):
            raise KeyboardInterrupt("killed")
        real_write(path, write)

    monkeypatch.setattr(ckpt_io, "_fsync_write", crash_on_meta)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(str(tmp_path), 6, ckpt_io.rank_payload(model, opt, Layout()),
                                dict(meta, step=6), 0, 1)
    assert (tmp_path / "latest").read_text() == "step_00000003"
    after = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path)))
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(ckpt_io, "_fsync_write", real_write)  # the next save cleans up and succeeds
    ckpt_io.save_checkpoint(str(tmp_path), 6, ckpt_io.rank_payload(model, opt, Layout()), dict(meta, step=6), 0, 1)
    assert ckpt_io.read_checkpoint(str(tmp_path)).meta["step"] == 6
    assert not any(d.startswith(".tmp") for d in os.listdir(tmp_path))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--save", str(tmp_path / "ck"), "--save-interval", "1",
                              "--keep-last", "2"])
    assert r.returncode == 0, r.stderr
    assert ckpt_io.list_checkpoints(str(tmp_path / "ck")) == ["step_00000003", "step_00000004"]


def _worker_pids(marker: str) -> list[int]:
    """Pids of minimal_pretrain.py workers (not the torchrun agent) whose command line holds `marker`."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        args = [c.decode(errors="replace") for c in cmd]
        if marker in args and any(a.endswith("minimal_pretrain.py") for a in args) \
                and "torch.distributed.run" not in args:
            pids.append(int(pid))
    return pids


def test_killed_worker_restarts_from_latest_and_finishes_like_an_uninterrupted_run(tmp_path):
    steps = 30
    args = TINY_FLAGS + ["--max-steps", str(steps), "--num-microbatches", "2", "--dist-timeout", "30"]
    clean = run_cli(args + ["--metrics-file", str(tmp_path / "clean.jsonl")], nproc=2)
    assert clean.returncode == 0, clean.stderr[-3000:]
    save = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           os.path.join(HERE, "minimal_pretrain.py")]
    cmd += args + ["--save", str(save), "--save-interval", "2", "--metrics-file", str(tmp_path / "killed.jsonl")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (save / "step_00000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    victims = _worker_pids(str(save))
    assert victims and not (save / f"step_{steps:08d}").exists(), "the run ended before it could be killed"
    os.kill(victims[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("resumed from") == 1  # the restarted workers found `latest` by themselves
    final_clean = train_records(str(tmp_path / "clean.jsonl"))[-1]
    final_killed = train_records(str(tmp_path / "killed.jsonl"))[-1]
    assert final_killed["step"] == steps and final_killed["loss"] == final_clean["loss"]
    # The restart redid the steps after its checkpoint: each step is in the metrics file once.
    assert [r["step"] for r in train_records(str(tmp_path / "killed.jsonl"))] == list(range(1, steps + 1))


# ---------------------------------------------- resume semantics, log intervals, help (issue 17)
def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """The documented schedule, by hand (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (decay - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def test_resume_with_a_longer_max_steps_keeps_the_saved_schedule_unless_told(tmp_path, capsys):
    flags = TINY_FLAGS + ["--min-lr", "1e-3", "--save-interval", "6"]
    mp.main(flags + ["--max-steps", "6", "--save", str(tmp_path / "a"), "--metrics-file", str(tmp_path / "a.jsonl")])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    # Longer run, no schedule flag: the cosine of the 6-step run has ended, the LR stays at --min-lr.
    mp.main(flags + ["--max-steps", "9", "--save", str(tmp_path / "a"), "--metrics-file", str(tmp_path / "a.jsonl")])
    out = unwrapped(capsys.readouterr().out)
    assert "note: the checkpoint's LR schedule goes on: its decay ends at step 6" in out
    lrs = [r["lr"] for r in train_records(str(tmp_path / "a.jsonl"))]
    assert lrs[:6] == pytest.approx([cosine_lr(s, 1e-2, 1e-3, 1, 6) for s in range(6)], rel=1e-12)
    assert lrs[6:] == [1e-3] * 3
    # Asked for: the cosine is recomputed over 12 steps from step 6 on, and the start says how the LR jumps.
    mp.main(flags + ["--max-steps", "9", "--lr-decay-steps", "12", "--save", str(tmp_path / "b"),
                     "--metrics-file", str(tmp_path / "b.jsonl")])
    out = unwrapped(capsys.readouterr().out)
    jump = f"the LR goes from {cosine_lr(6, 1e-2, 1e-3, 1, 6):.2e} to {cosine_lr(6, 1e-2, 1e-3, 1, 12):.2e}"
    assert f"note: the LR schedule changes at step 6 (--lr-decay-steps 6 -> 12): {jump}" in out
    lrs = [r["lr"] for r in train_records(str(tmp_path / "b.jsonl"))]  # steps 7, 8, 9
    assert lrs == pytest.approx([cosine_lr(s, 1e-2, 1e-3, 1, 12) for s in (6, 7, 8)], rel=1e-12)


def test_a_changed_global_batch_on_resume_is_refused_or_derived(tmp_path):
    flags = TINY_FLAGS + ["--max-steps", "4", "--save-interval", "2"]
    two = run_cli(flags + ["--save", str(tmp_path / "two"), "--metrics-file", str(tmp_path / "two.jsonl")], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    for name in ("refused", "derived", "allowed"):
        shutil.copytree(tmp_path / "two", tmp_path / name)
        (tmp_path / name / "latest").write_text(ckpt_io.step_dir_name(2))
        shutil.rmtree(tmp_path / name / ckpt_io.step_dir_name(4))
    # DP 2 x 1 micro-batch of 2 = 4 sequences; one rank with --num-microbatches 1 would train on 2.
    refused = run_cli(flags + ["--num-microbatches", "1", "--save", str(tmp_path / "refused")], timeout=60)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "global batch of 4 sequences" in errors[0] and "--num-microbatches 2" in errors[0]
    # Not given: derived so that one rank sees the same 4 sequences per step, and trains on like the 2 ranks.
    derived = run_cli(flags + ["--save", str(tmp_path / "derived"), "--metrics-file", str(tmp_path / "d.jsonl")])
    assert derived.returncode == 0, derived.stderr[-2000:]
    assert "note: --num-microbatches 2 keeps the checkpoint's global batch of 4 sequences on DP 1" in unwrapped(derived.stdout)
    reference, resumed = train_records(str(tmp_path / "two.jsonl"))[2:], train_records(str(tmp_path / "d.jsonl"))
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(reference, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    allowed = run_cli(flags + ["--num-microbatches", "1", "--allow-global-batch-change", "--save",
                               str(tmp_path / "allowed")])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "note: the global batch changes from 4 to 2 sequences" in unwrapped(allowed.stdout)


def test_weights_only_checkpoint_says_the_optimizer_and_warmup_start_fresh(tmp_path, capsys):
    mp.main(TINY_FLAGS + ["--max-steps", "1", "--save", str(tmp_path / "trained")])
    trained = ckpt_io.read_checkpoint(str(tmp_path / "trained"))  # one rank: one whole slice per tensor
    ckpt_io.save_full_state(str(tmp_path / "imported"), {n: s[0]["tensor"] for n, s in trained.params.items()},
                            trained.meta["model"], {})  # as import_hf.py and upcycle.py write them
    mp.main(TINY_FLAGS + ["--warmup-steps", "4", "--max-steps", "2", "--load", str(tmp_path / "imported"),
                          "--metrics-file", str(tmp_path / "m.jsonl")])
    assert "holds weights only (imported or upcycled): the optimizer state is fresh" in unwrapped(capsys.readouterr().out)
    assert [r["lr"] for r in train_records(str(tmp_path / "m.jsonl"))] == pytest.approx([1e-2 / 4, 2e-2 / 4])


def test_inspect_checkpoint_prints_step_layout_and_shapes(saved_tiny):
    r = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "inspect_checkpoint.py"), str(saved_tiny)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "step: 2" in r.stdout and "world 1 = PP 1 x DP 1 x TP 1" in r.stdout
    assert "layers.1.mlp.experts.3.down_proj.weight" in r.stdout and "(32, 32)" in r.stdout


def test_rewind_with_keep_last_keeps_the_new_checkpoint_and_latest(tmp_path):
    save = tmp_path / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "6", "--save", str(save), "--save-interval", "2"])
    assert r.returncode == 0, r.stderr
    later = tree_bytes(save / "step_00000006")
    # Rewind to step 2 and train to 4 with --keep-last 1: the later step 6 is another timeline.
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--load", str(save / "step_00000002"), "--save", str(save),
                              "--keep-last", "1"])
    assert r.returncode == 0, r.stderr
    assert "also holds later checkpoints ['step_00000004', 'step_00000006']" in r.stdout
    assert (save / "latest").read_text() == "step_00000004"
    assert ckpt_io.read_checkpoint(str(save)).meta["step"] == 4
    assert ckpt_io.list_checkpoints(str(save)) == ["step_00000004", "step_00000006"]
    assert tree_bytes(save / "step_00000006") == later


def test_resave_of_the_latest_step_that_crashes_midway_still_loads(tmp_path, monkeypatch):
    model, opt, meta, before = tiny_checkpoint_at_step_3(tmp_path)
    real_replace = os.replace

    def die_before_the_new_folder_moves_in(src, dst):
        if os.path.basename(src).startswith(".tmp-step_"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_io.os, "replace", die_before_the_new_folder_moves_in)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(str(tmp_path), 3, ckpt_io.rank_payload(model, opt, Layout()), meta, 0, 1)
    monkeypatch.setattr(ckpt_io.os, "replace", real_replace)
    assert not (tmp_path / "step_00000003").exists()  # the crash fell between the two renames
    after = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path)))  # `latest` -> the old copy
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt_io.save_checkpoint(str(tmp_path), 3, ckpt_io.rank_payload(model, opt, Layout()), meta, 0, 1)
    resaved = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path)))
    assert all(torch.equal(before[k] + 1.0, resaved[k]) for k in before if k.endswith("weight"))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003"]


def test_second_run_on_the_same_save_folder_is_refused_while_the_first_trains(tmp_path):
    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    first = subprocess.Popen([sys.executable, os.path.join(HERE, "minimal_pretrain.py")] + TINY_FLAGS +
                             ["--max-steps", "100000", "--save", str(save), "--metrics-file", str(metrics)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not metrics.exists() or not metrics.read_text():  # training: it holds the lock, handles SIGTERM
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        assert (save / ".lock").read_text()
        second = run_cli(TINY_FLAGS + ["--max-steps", "4", "--save", str(save)], timeout=60)
        assert_clean_refusal(second, "is in use by another run")
        assert first.poll() is None  # the first run trains on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert ckpt_io.read_checkpoint(str(save)).meta["step"] >= 1  # it saved where it stopped


def test_sigterm_saves_a_checkpoint_from_which_resume_is_exact(tmp_path):
    steps = 40
    args = TINY_FLAGS + ["--max-steps", str(steps)]
    clean = run_cli(args + ["--metrics-file", str(tmp_path / "clean.jsonl")])
    assert clean.returncode == 0, clean.stderr
    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "minimal_pretrain.py")] + args +
                            ["--save", str(save), "--metrics-file", str(metrics)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM after step" in out and "Traceback" not in err
    stopped_at = ckpt_io.read_checkpoint(str(save)).meta["step"]
    assert 3 <= stopped_at < steps
    resumed = run_cli(args + ["--save", str(save), "--metrics-file", str(metrics)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {save / ckpt_io.step_dir_name(stopped_at)}" in resumed.stdout
    clean_records = {r["step"]: r["loss"] for r in train_records(str(tmp_path / "clean.jsonl"))}
    for r in train_records(str(metrics)):
        assert r["loss"] == clean_records[r["step"]], r["step"]  # bitwise: the same run
    nothing = run_cli(args + ["--save", str(save)])
    assert nothing.returncode == 0 and "nothing to do: the checkpoint is at step 40" in nothing.stdout
