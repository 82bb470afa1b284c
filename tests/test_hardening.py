"""Hardening of start-up and outputs (issue 25): who owns an output path, checkpoint folders owned
by run id, saves on a full disk, parsing without abbreviations, launch variables, ranks that agree,
timeouts that hold, absurd sizes. Refusals run in-process as tables; a few processes prove the exit
status, the one `error:` line and that nothing hangs."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint as ckpt_io
import export_hf
import launch
import minimal_pretrain as mp
import outputs
from metrics import RunLog

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-kv-heads", "2",
        "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--num-experts", "4", "--num-experts-per-token",
        "2", "--seq-length", "16", "--micro-batch-size", "2", "--log-interval", "1", "--eval-interval", "0",
        "--no-progress"]


def train(argv: list[str], capsys) -> tuple[int, str]:
    """minimal_pretrain.main in this process: (exit status, stderr)."""
    try:
        mp.main(TINY + argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(root: str, run_id: str | None = "run-a", step: int = 0) -> str:
    """A one-rank checkpoint of a 1-tensor model at `step`, of run `run_id` (None: from before run ids)."""
    payload = {"params": {"w": {"tensor": torch.zeros(2), "dim": None, "rank": 0, "size": 1}}, "optim": {},
               "rng": {"torch": torch.get_rng_state()}}
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": step, "model": {}, "train": {},
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    if run_id is not None:
        meta["run_id"] = run_id
    return ckpt_io.save_checkpoint(root, step, payload, meta, 0, 1)


# ------------------------------------------------------------------ who owns an output path
def _output_case(case: str, tmp) -> tuple[str, outputs.Kind, dict, str | None]:
    """(path, kind, inputs, words of the refusal or None when accepted) of one case."""
    data = tmp / "data"
    data.mkdir()
    (data / "a.txt").write_text("training text")
    ck = tmp / "ck"
    tiny_checkpoint(str(ck))
    ours = tmp / "metrics.jsonl"
    ours.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    (tmp / "file").write_text("x")
    os.mkfifo(tmp / "fifo")
    (tmp / "tb").mkdir()
    (tmp / "tb" / "events.out.tfevents.1.host").write_bytes(b"")
    (tmp / "plots").mkdir()
    (tmp / "plots" / "notes.txt").write_text("mine")
    long_name = "n" * 256
    deep = tmp / "/".join(["d" * 200] * 21)  # over PATH_MAX with what a save adds under it
    return {
        "metrics_is_a_checkpoints_meta": (ck / "step_00000000" / "meta.json", outputs.METRICS_FILE, {}, "not a metrics"),
        "metrics_is_latest": (ck / "latest", outputs.METRICS_FILE, {}, "not a metrics"),
        "metrics_is_a_data_text_file": (data / "a.txt", outputs.METRICS_FILE, {"--data": str(data)}, "inside --data"),
        "metrics_is_our_metrics_file": (ours, outputs.METRICS_FILE, {}, None),
        "metrics_is_new": (tmp / "new" / "m.jsonl", outputs.METRICS_FILE, {}, None),
        "metrics_under_a_regular_file": (tmp / "file" / "m.jsonl", outputs.METRICS_FILE, {}, "is a file, not a folder"),
        "metrics_is_a_fifo": (tmp / "fifo", outputs.METRICS_FILE, {}, "not a regular file"),
        "metrics_is_a_folder": (tmp / "tb", outputs.METRICS_FILE, {}, "is a folder"),
        "tensorboard_of_events": (tmp / "tb", outputs.TENSORBOARD_DIR, {}, None),
        "tensorboard_is_the_data_folder": (data, outputs.TENSORBOARD_DIR, {"--data": str(data)}, "lies inside --data"),
        "tensorboard_holds_other_files": (tmp / "plots", outputs.TENSORBOARD_DIR, {}, "--overwrite"),
        "plots_into_a_folder_of_notes": (tmp / "plots", outputs.PLOT_DIR, {}, "not a folder of plots"),
        "save_inside_the_data_folder": (data / "ck", ckpt_io.CHECKPOINT_ROOT, {"--data": str(data)}, "inside --data"),
        "save_containing_the_data_folder": (tmp, ckpt_io.CHECKPOINT_ROOT, {"--data": str(data)}, "contains --data"),
        "save_name_over_255_bytes": (tmp / long_name, ckpt_io.CHECKPOINT_ROOT, {}, "longer than"),
        "save_path_near_4096_bytes": (deep, ckpt_io.CHECKPOINT_ROOT, {}, "limit of"),
        "save_into_a_folder_of_other_files": (tmp / "plots", ckpt_io.CHECKPOINT_ROOT, {}, "not a checkpoint folder"),
        "export_into_a_run": (ck, export_hf.HF_EXPORT, {}, "already holds a checkpoint"),
    }[case]


OUTPUT_CASES = ["metrics_is_a_checkpoints_meta", "metrics_is_latest", "metrics_is_a_data_text_file",
                "metrics_is_our_metrics_file", "metrics_is_new", "metrics_under_a_regular_file", "metrics_is_a_fifo",
                "metrics_is_a_folder", "tensorboard_of_events", "tensorboard_is_the_data_folder",
                "tensorboard_holds_other_files", "plots_into_a_folder_of_notes", "save_inside_the_data_folder",
                "save_containing_the_data_folder", "save_name_over_255_bytes", "save_path_near_4096_bytes",
                "save_into_a_folder_of_other_files", "export_into_a_run"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_an_output_is_new_empty_or_ours_and_never_inside_an_input(case, tmp_path):
    path, kind, inputs, words = _output_case(case, tmp_path)
    if words is None:
        outputs.claim(str(path), "--out", kind, inputs=inputs)
        return
    with pytest.raises(outputs.OutputError, match=words):
        outputs.claim(str(path), "--out", kind, inputs=inputs)


@pytest.mark.parametrize("case", ["metrics_is_latest", "tensorboard_holds_other_files", "plots_into_a_folder_of_notes"])
def test_overwrite_hands_over_what_is_not_ours(case, tmp_path):
    path, kind, inputs, _ = _output_case(case, tmp_path)
    outputs.claim(str(path), "--out", kind, overwrite=True, inputs=inputs)


def test_trainer_refuses_a_metrics_file_that_is_a_checkpoints_latest_and_leaves_it_whole(tmp_path, capsys):
    tiny_checkpoint(str(tmp_path / "ck"))
    code, err = train(["--max-steps", "1", "--metrics-file", str(tmp_path / "ck" / "latest")], capsys)
    assert code == 2 and "not a metrics file" in one_error_line(err)
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000000"


def test_trainer_refuses_save_inside_the_data_text_folder(tmp_path, capsys):
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text("hello world, " * 400)
    code, err = train(["--max-steps", "1", "--data", str(data), "--save", str(data / "ck")], capsys)
    assert code == 2 and "outputs are never read as inputs" in one_error_line(err)
    assert sorted(os.listdir(data)) == ["a.txt"]


# ------------------------------------------------------------ checkpoint folders by run id
def test_save_folder_of_another_run_is_refused_unless_resumed_or_handed_over(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny_checkpoint(a, "run-a", 3)
    tiny_checkpoint(b, "run-b", 1)
    resumed = ckpt_io.read_checkpoint(a)
    with pytest.raises(outputs.OutputError, match="another run"):
        ckpt_io.claim_save_folder(b, "run-a", resumed, False, {})
    assert ckpt_io.claim_save_folder(b, "run-a", resumed, True, {}) == {"run-a"}  # --overwrite: prunes only its own
    assert ckpt_io.claim_save_folder(a, "run-a", resumed, False, {}) == {"run-a"}  # its own folder
    assert ckpt_io.claim_save_folder(str(tmp_path / "new"), "run-c", None, False, {}) == {"run-c"}


def test_checkpoint_from_before_run_ids_resumes_into_its_own_folder_and_prunes_it(tmp_path):
    old = str(tmp_path / "old")
    tiny_checkpoint(old, None, 1)
    resumed = ckpt_io.read_checkpoint(old)
    owned = ckpt_io.claim_save_folder(old, "run-new", resumed, False, {})
    assert owned == {"run-new", None}
    with pytest.raises(outputs.OutputError, match="another run"):  # but not into another run's folder
        ckpt_io.claim_save_folder(old, "run-x", ckpt_io.read_checkpoint(tiny_checkpoint(str(tmp_path / "x"), "run-x")),
                                  False, {})


def test_keep_last_prunes_only_this_runs_checkpoints(tmp_path):
    root = str(tmp_path / "b")
    tiny_checkpoint(root, "run-b", 1)  # another run's, in a folder handed over with --overwrite
    payload = {"params": {}, "optim": {}, "rng": {"torch": torch.get_rng_state()}}
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "model": {}, "train": {},
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}, "run_id": "run-a"}
    for step in (2, 3, 4):
        ckpt_io.save_checkpoint(root, step, payload, dict(meta, step=step), 0, 1, keep_last=1,
                                owned=frozenset({"run-a"}))
    assert ckpt_io.list_checkpoints(root) == ["step_00000001", "step_00000004"]


def test_load_a_save_b_of_another_run_is_refused_end_to_end(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train(["--max-steps", "1", "--save", a], capsys)[0] == 0
    assert train(["--max-steps", "1", "--save", b, "--seed", "7"], capsys)[0] == 0
    before = (tmp_path / "b" / "step_00000001" / "meta.json").read_text()
    code, err = train(["--max-steps", "3", "--load", a, "--save", b, "--keep-last", "1"], capsys)
    assert code == 2 and "another run" in one_error_line(err)
    assert (tmp_path / "b" / "step_00000001" / "meta.json").read_text() == before
    code, err = train(["--max-steps", "3", "--load", a, "--save", b, "--keep-last", "1", "--overwrite"], capsys)
    assert code == 0, err
    assert ckpt_io.list_checkpoints(b) == ["step_00000001", "step_00000003"]  # the other run's step 1 is kept
    run_a = json.loads((tmp_path / "a" / "step_00000001" / "meta.json").read_text())["run_id"]
    assert json.loads((tmp_path / "b" / "step_00000003" / "meta.json").read_text())["run_id"] == run_a


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_that_is_not_a_regular_file_is_refused_at_start(kind, tmp_path):
    lock = tmp_path / ".lock"
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("opening the lock blocked"))
    signal.alarm(10)
    try:
        with pytest.raises(ckpt_io.CheckpointError, match=".lock"):
            ckpt_io.acquire_save_lock(str(tmp_path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------ a full disk
def _disk_full_on(name: str, monkeypatch) -> None:
    real = ckpt_io._fsync_write

    def write(path: str, fn) -> None:
        if os.path.basename(path).startswith(name):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, fn)
    monkeypatch.setattr(ckpt_io, "_fsync_write", write)


@pytest.mark.parametrize("fails", ["rank_", "meta.json", "latest"])
def test_a_save_on_a_full_disk_removes_its_files_and_keeps_latest(fails, tmp_path, monkeypatch):
    root = str(tmp_path / "ck")
    tiny_checkpoint(root, "run-a", 1)
    _disk_full_on(fails, monkeypatch)
    payload = {"params": {}, "optim": {}, "rng": {"torch": torch.get_rng_state()}}
    meta = dict(ckpt_io.read_checkpoint(root).meta, step=2)
    with pytest.raises(ckpt_io.SaveFailed, match="No space left"):
        ckpt_io.save_checkpoint(root, 2, payload, meta, 0, 1)
    assert not [e for e in os.listdir(root) if e.startswith(".tmp") or e.endswith(".part")]
    assert ckpt_io.read_latest(root) == "step_00000001"
    assert ckpt_io.read_checkpoint(root).meta["step"] == 1


def test_trainer_save_on_a_full_disk_is_one_error_line_and_the_earlier_checkpoint_loads(tmp_path, capsys, monkeypatch):
    real, calls = ckpt_io._fsync_write, []

    def write(path: str, fn) -> None:
        if os.path.basename(path).startswith("rank_"):
            calls.append(path)
            if len(calls) == 2:  # the second save's rank file
                raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, fn)
    monkeypatch.setattr(ckpt_io, "_fsync_write", write)
    code, err = train(["--max-steps", "2", "--save", str(tmp_path / "ck"), "--save-interval", "1"], capsys)
    assert code == 2 and "No space left" in one_error_line(err)
    assert ckpt_io.read_checkpoint(str(tmp_path / "ck")).meta["step"] == 1
    assert sorted(os.listdir(tmp_path / "ck")) == [".lock", "latest", "step_00000001"]


def test_metrics_on_a_full_disk_warn_once_and_the_run_goes_on(tmp_path):
    said = []
    log = RunLog(str(tmp_path / "m.jsonl"), "", 0, said.append, lambda t: None)

    class Full:
        name = str(tmp_path / "m.jsonl")

        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")
    log.file.close()
    log.file = Full()
    log.eval(1, 2.0, None)
    log.eval(2, 2.0, None)
    assert len([s for s in said if "warning" in s]) == 1 and log.file is None


# --------------------------------------------------------------- the tokenizer travels
def test_export_of_a_bpe_run_whose_data_moved_uses_the_tokenizer_the_checkpoint_carries(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    import export_hf
    text = "the quick brown fox jumps over the lazy dog. " * 200
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = tmp_path / "data"
    data.mkdir()
    tok.save(str(data / "tokenizer.json"))
    ids = np.array(tok.encode(text).ids * 20, dtype=np.uint16)
    ids.tofile(data / "train.bin")
    ids[:2000].tofile(data / "val.bin")
    vocab = tok.get_vocab_size()
    (data / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint16", "tokenizer": "tokenizer.json",
                                                "eos_id": None, "bos_id": None}))
    code, err = train(["--max-steps", "1", "--data", str(data), "--save", str(tmp_path / "ck")], capsys)
    assert code == 0, err
    os.rename(data, tmp_path / "moved")
    export_hf.export(str(tmp_path / "ck"), str(tmp_path / "hf"))
    written = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert written.get_vocab_size() == vocab  # not the 256-byte tokenizer
    step = tmp_path / "ck" / "step_00000001"
    meta = json.loads((step / "meta.json").read_text())
    (step / "tokenizer.json").write_text("{}")  # replaced: its hash no longer matches
    with pytest.raises(ckpt_io.CheckpointError, match="sha256"):
        export_hf.export(str(tmp_path / "ck"), str(tmp_path / "hf2"))
    meta.pop("tokenizer")  # a checkpoint from before the copy, whose data folder is gone
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt_io.CheckpointError, match="is gone"):
        export_hf.export(str(tmp_path / "ck"), str(tmp_path / "hf3"))


# ------------------------------------------------------------- flags read by the parser
@pytest.mark.parametrize("flags", [["--hidden", "32"], ["--micro-batch", "4"], ["--lr-sched", "wsd"], ["--min", "0.1"],
                                   ["--warm", "3"], ["--hidden=32"]])
def test_abbreviated_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as e:
        launch.parse_config(flags + ["--load", "x"])
    assert e.value.code == 2 and "unrecognized arguments" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, given", [
    (["--hidden-size=32"], {"hidden_size"}), (["--hidden-size", "32", "--load", "x"], {"hidden_size", "load"}),
    (["--no-progress"], {"progress"}), (["--lr-schedule=wsd", "--data=--x=1"], {"lr_schedule", "data"}),
    ([], set())])
def test_given_flags_come_from_the_parser(flags, given):
    assert launch.parse_config(flags)[2] == given  # `--no-progress` gives progress; `--data=--x=1` is one flag


# ------------------------------------------------------------------ launch variables
@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "abc"}, "whole numbers"), ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK must be"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_PORT"),
    ({"RANK": "-1"}, "whole numbers")])
def test_launch_variables_are_checked(env, words, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(launch.ConfigError, match=words):
        if launch.launch_ranks()[1] > 1:
            launch.check_master_env(2)


def run_process(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(k, None)
    full.update(env)
    return subprocess.run([sys.executable] + args, env=full, capture_output=True, text=True, timeout=timeout)


def test_world_size_without_master_addr_is_one_error_line_exit_2():
    r = run_process([os.path.join(HERE, "minimal_pretrain.py"), "--max-steps", "1"], {"WORLD_SIZE": "2", "RANK": "0"})
    assert r.returncode == 2 and "MASTER_ADDR" in one_error_line(r.stderr)


# ------------------------------------------------------------------------ absurd sizes
def test_absurd_sizes_are_refused_by_validation():
    mc, tc, _ = launch.parse_config(["--hidden-size", str(10**12), "--num-layers", str(10**9)])
    with pytest.raises(launch.ConfigError, match="beyond any model"):
        launch.resolve_layout(mc, tc, 1)


def test_dry_run_of_absurd_sizes_is_one_error_line_exit_2():
    r = run_process([os.path.join(HERE, "minimal_pretrain.py"), "--dry-run", "--hidden-size", str(10**12),
                     "--num-layers", str(10**9)], {}, timeout=90)
    assert r.returncode == 2 and "beyond any model" in one_error_line(r.stderr)


# ------------------------------------------------------------ ranks that agree, timeouts
STUCK = """import os, sys, time
sys.path.insert(0, {here!r})
import minimal_pretrain as mp
if os.environ["RANK"] == "1" and os.environ["STUCK"] == "step":
    mp.train_step = lambda *a, **k: time.sleep(600)  # this rank never reaches the gradient all-reduce
mp.main()
"""


def two_ranks(tmp_path, flags: list[list[str]], stuck: str = "", timeout: float = 150) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of a 2-rank launch by hand, rank r with TINY + flags[r]; rank 1 left out if
    stuck == "missing", rank 1 stuck in its first step if stuck == "step"."""
    script = tmp_path / "rank.py"
    script.write_text(STUCK.format(here=HERE))
    port, procs = str(free_port()), []
    for rank in (0, 1):
        if stuck == "missing" and rank == 1:
            continue
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, STUCK=stuck)
        procs.append(subprocess.Popen([sys.executable, str(script)] + TINY + flags[rank], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the rank hung")
    return proc.returncode, err


def test_ranks_with_different_configs_refuse_together(tmp_path):
    procs = two_ranks(tmp_path, [["--max-steps", "1"], ["--max-steps", "1", "--lr", "1e-3"]])
    results = [finish(p, 150) for p in procs]
    assert [code for code, _ in results] == [2, 2]
    assert "ranks disagree" in one_error_line(results[0][1]) and "error:" not in results[1][1]


def test_a_stuck_rank_ends_the_run_within_the_timeout_with_an_error(tmp_path):
    procs = two_ranks(tmp_path, [["--max-steps", "2", "--dist-timeout", "3"]] * 2, stuck="step")
    start = time.time()
    code, err = finish(procs[0], 150)
    procs[1].kill()
    procs[1].communicate()
    assert code == 2 and "--dist-timeout 3" in one_error_line(err), err[-2000:]
    assert time.time() - start < 120


def test_a_rank_missing_at_the_rendezvous_is_an_error_line(tmp_path):
    procs = two_ranks(tmp_path, [["--max-steps", "1", "--dist-timeout", "3"]], stuck="missing")
    code, err = finish(procs[0], 120)
    assert code == 2 and "rendezvous" in one_error_line(err)
