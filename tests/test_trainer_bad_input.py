"""The trainer given hostile input (bad checkpoints, data, FIFOs): exit 2, one `error:` line, fast,
and nothing on disk changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import minimal_pretrain as mp
from helpers import (_token_folder, assert_clean_refusal, free_port, HERE, refusal_in_process, run_cli, smoke,
                     TINY_FLAGS, tree_bytes)


def _bad_input(tmp_path, saved_tiny, case: str) -> tuple[list[str], str]:
    """Flags for one bad-input case and the words its error line must hold."""
    ck = tmp_path / "ck"
    shutil.copytree(saved_tiny, ck)
    step = ck / "step_00000002"
    if case == "missing_folder":
        return ["--load", str(tmp_path / "nothing")], "no such folder"
    if case == "missing_rank_file":
        (step / "rank_00000.pt").unlink()
        return ["--load", str(ck)], "rank_00000.pt: missing"
    if case == "truncated_rank_file":
        data = (step / "rank_00000.pt").read_bytes()
        (step / "rank_00000.pt").write_bytes(data[:len(data) // 2])
        return ["--load", str(ck)], "rank_00000.pt: unreadable"
    if case == "foreign_meta":
        (step / "meta.json").write_text(json.dumps({"format": "something-else"}))
        return ["--load", str(ck)], "not a checkpoint of this trainer"
    if case == "conflicting_model_flag":
        return ["--load", str(ck), "--hidden-size", "64"], "--hidden-size 64 conflicts"
    if case == "unwritable_save":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        return ["--save", str(blocker / "sub")], "not writable"
    if case == "corrupt_data_file":
        bins = tmp_path / "bins"
        bins.mkdir()
        (bins / "train.bin").write_bytes(b"\x01\x00\x02")  # odd size: not uint16
        (bins / "val.bin").write_bytes(b"\x01\x00")
        (bins / "meta.json").write_text('{"vocab_size": 256}')
        return ["--data", str(bins)], "train.bin: odd size"
    raise AssertionError(case)


@smoke
@pytest.mark.parametrize("case", ["missing_folder", "missing_rank_file", "truncated_rank_file", "foreign_meta",
                                  "conflicting_model_flag", "unwritable_save", "corrupt_data_file"])
def test_bad_checkpoint_or_data_exits_2_and_harms_nothing(case, tmp_path, saved_tiny, capsys, monkeypatch):
    """In-process through main(); test_hostile_input_as_a_process_exits_2_without_traceback runs such
    cases (a checkpoint of another model, FIFOs) as real processes."""
    flags, words = _bad_input(tmp_path, saved_tiny, case)
    before = {p: p.read_bytes() for p in (tmp_path / "ck").rglob("*") if p.is_file()}
    assert words in refusal_in_process(TINY_FLAGS + ["--max-steps", "4"] + flags, capsys, monkeypatch)
    assert before == {p: p.read_bytes() for p in (tmp_path / "ck").rglob("*") if p.is_file()}


def _bad_trainer_input(case: str, tmp_path, saved_tiny) -> tuple[list[str], str]:
    """Flags of one hostile case (files made under tmp_path) and the words its error line holds.
    Every case gets a copy of a saved run in tmp_path / "ck", which the tests check is left as it was."""
    shutil.copytree(saved_tiny, tmp_path / "ck", symlinks=True)
    flags = _bad_flags(tmp_path)
    if case in flags:
        return flags[case]
    return _bad_data(case, tmp_path) or _bad_checkpoint(case, tmp_path / "ck")


def _bad_flags(tmp_path) -> dict[str, tuple[list[str], str]]:
    return {
        "lr_nan": (["--lr", "nan"], "--lr"),
        "min_lr_over_lr": (["--min-lr", "1"], "--min-lr"),
        "rope_theta_0": (["--rope-theta", "0"], "--rope-theta"),
        "rms_eps_negative": (["--rms-norm-eps", "-1"], "--rms-norm-eps"),
        "init_std_0": (["--init-std", "0"], "--init-std"),
        "weight_decay_negative": (["--weight-decay", "-0.1"], "--weight-decay"),
        "aux_coef_negative": (["--router-aux-loss-coef", "-1"], "--router-aux-loss-coef"),
        "z_coef_inf": (["--router-z-loss-coef", "inf"], "--router-z-loss-coef"),
        "capacity_inf": (["--moe-capacity-factor", "inf"], "--moe-capacity-factor"),
        "jitter_one": (["--router-jitter-noise", "1"], "--router-jitter-noise"),
        "seed_negative": (["--seed", "-1"], "--seed"),
        "dist_timeout_0": (["--dist-timeout", "0"], "--dist-timeout"),
        "grad_clip_nan": (["--grad-clip", "nan"], "--grad-clip"),
        "keep_last_negative": (["--keep-last", "-1"], "--keep-last"),
        "experts_too_many_for_memory": (["--num-experts", "2000000"], "GiB per rank"),
        "micro_batch_too_big_for_memory": (["--micro-batch-size", "4000000000"], "GiB per rank"),
        "metrics_file_is_a_folder": (["--metrics-file", str(tmp_path)], "is a folder"),
        "flag_not_a_number": (["--lr", "fast"], "argument --lr: invalid float value"),
    }


def _bad_data(case: str, tmp_path) -> tuple[list[str], str] | None:
    ok_train, ok_val = np.arange(3000) % 50, np.arange(300) % 50
    if case == "empty_train_bin":
        d = _token_folder(tmp_path / "tok", [], ok_val, {"vocab_size": 50})
        return ["--data", d], "train.bin: empty"
    if case == "val_id_over_vocab":
        d = _token_folder(tmp_path / "tok", ok_train, np.append(ok_val, 77), {"vocab_size": 50})
        return ["--data", d], "val.bin holds token 77"
    if case == "meta_max_id_over_vocab":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val,
                          {"vocab_size": 50, "max_id": {"train": 49, "val": 60}})
        return ["--data", d], "val.bin holds token 60"
    if case == "uint32_file_read_as_uint16":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val,
                          {"vocab_size": 50, "dtype": "uint16", "tokens": {"train": 3000, "val": 300}}, np.uint32)
        return ["--data", d], "meta.json says 3000"
    if case == "unknown_dtype":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val, {"vocab_size": 50, "dtype": "int8"})
        return ["--data", d], "\"dtype\""
    if case == "vocab_too_big_for_uint16":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val, {"vocab_size": 70000, "dtype": "uint16"})
        return ["--data", d], "does not fit uint16"
    if case == "token_meta_json_is_a_fifo":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val, None)
        os.mkfifo(os.path.join(d, "meta.json"))  # reading it would block forever
        return ["--data", d], "meta.json: not a regular file"
    if case == "data_is_a_fifo":
        os.mkfifo(tmp_path / "fifo")
        return ["--data", str(tmp_path / "fifo")], "not a regular file"
    return None


def _bad_checkpoint(case: str, ck) -> tuple[list[str], str]:
    tmp_path, step = ck.parent, ck / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    if case == "meta_missing_files":
        meta.pop("files")
        (step / "meta.json").write_text(json.dumps(meta))
        return ["--load", str(ck)], "\"files\""
    if case == "meta_missing_layout":
        meta.pop("layout")
        (step / "meta.json").write_text(json.dumps(meta))
        return ["--load", str(ck)], "\"layout\""
    if case == "meta_step_not_integer":
        (step / "meta.json").write_text(json.dumps(dict(meta, step="two")))
        return ["--load", str(ck)], "\"step\""
    if case == "meta_unknown_model_field":
        (step / "meta.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], n_embd=3))))
        return ["--load", str(ck)], "unknown fields ['n_embd']"
    if case == "meta_model_field_wrong_type":
        (step / "meta.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], hidden_size="32"))))
        return ["--load", str(ck)], "hidden_size"
    if case == "latest_is_a_folder":
        (ck / "latest").unlink()
        (ck / "latest").mkdir()
        return ["--load", str(ck)], "latest: unreadable"
    if case == "latest_is_a_symlink_loop_on_auto_resume":
        (ck / "latest").unlink()
        os.symlink(ck / "latest", ck / "latest")
        return ["--save", str(ck)], "latest: unreadable"
    if case == "latest_is_a_fifo":
        (ck / "latest").unlink()
        os.mkfifo(ck / "latest")  # reading it would block forever
        return ["--save", str(ck)], "latest: unreadable (not a regular file)"
    if case == "meta_json_is_a_fifo":
        (step / "meta.json").unlink()
        os.mkfifo(step / "meta.json")
        return ["--load", str(step)], "meta.json: unreadable"
    if case == "latest_names_a_path_outside":
        (ck / "latest").write_text("../../etc")
        return ["--load", str(ck)], "not a step folder"
    if case == "save_holds_steps_but_no_latest":
        (ck / "latest").unlink()
        return ["--save", str(ck)], "no `latest`"
    if case == "foreign_torch_save_as_rank_file":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, step / "rank_00000.pt")
        return ["--load", str(ck)], "not a rank file of this trainer"
    if case == "checkpoint_of_another_model":
        # meta.json says the tiny model; its tensors are of a wider one
        other = tmp_path / "other"
        r = run_cli(TINY_FLAGS + ["--max-steps", "1", "--hidden-size", "64", "--save", str(other)])
        assert r.returncode == 0, r.stderr
        shutil.copy(other / "step_00000001" / "rank_00000.pt", step / "rank_00000.pt")
        # its size recorded too, so that the shapes (not the size check) are what refuses it
        (step / "meta.json").write_text(json.dumps(dict(meta, sizes=[(step / "rank_00000.pt").stat().st_size])))
        return ["--load", str(ck)], "the model needs"
    raise AssertionError(case)


HOSTILE_TRAINER_CASES = [
    "lr_nan", "min_lr_over_lr", "rope_theta_0", "rms_eps_negative", "init_std_0", "weight_decay_negative",
    "aux_coef_negative", "z_coef_inf", "capacity_inf", "jitter_one", "seed_negative", "dist_timeout_0",
    "grad_clip_nan", "keep_last_negative", "experts_too_many_for_memory", "micro_batch_too_big_for_memory",
    "metrics_file_is_a_folder", "empty_train_bin", "val_id_over_vocab", "meta_max_id_over_vocab",
    "uint32_file_read_as_uint16", "unknown_dtype", "vocab_too_big_for_uint16", "data_is_a_fifo",
    "token_meta_json_is_a_fifo",
    "meta_missing_files", "meta_missing_layout", "meta_step_not_integer", "meta_unknown_model_field",
    "meta_model_field_wrong_type", "latest_is_a_folder", "latest_is_a_symlink_loop_on_auto_resume",
    "latest_is_a_fifo", "meta_json_is_a_fifo", "flag_not_a_number",
    "latest_names_a_path_outside", "save_holds_steps_but_no_latest", "foreign_torch_save_as_rank_file",
    "checkpoint_of_another_model"]


# A FIFO that the code wrongly opened would block forever: those cases run as processes with a timeout.
FIFO_CASES = ["data_is_a_fifo", "token_meta_json_is_a_fifo", "latest_is_a_fifo", "meta_json_is_a_fifo"]


@pytest.mark.parametrize("case", [c for c in HOSTILE_TRAINER_CASES if c not in FIFO_CASES])
def test_hostile_input_exits_2_with_one_error_line_fast_and_touches_nothing(case, tmp_path, saved_tiny, capsys):
    """In-process (main() as the CLI calls it) so that 35 cases cost seconds, not minutes; the
    next test runs the FIFO cases and a few others as real processes."""
    flags, words = _bad_trainer_input(case, tmp_path, saved_tiny)
    before = tree_bytes(tmp_path / "ck")
    capsys.readouterr()
    start = time.time()
    with pytest.raises(SystemExit) as stop:
        mp.main(TINY_FLAGS + ["--max-steps", "4"] + flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert time.time() - start < 30
    assert tree_bytes(tmp_path / "ck") == before


@pytest.mark.parametrize("case", ["lr_nan", "flag_not_a_number", "checkpoint_of_another_model"] + FIFO_CASES)
def test_hostile_input_as_a_process_exits_2_without_traceback(case, tmp_path, saved_tiny):
    flags, words = _bad_trainer_input(case, tmp_path, saved_tiny)
    before = tree_bytes(tmp_path / "ck")
    r = run_cli(TINY_FLAGS + ["--max-steps", "4"] + flags, timeout=60)
    assert_clean_refusal(r, words)
    assert tree_bytes(tmp_path / "ck") == before


def test_bad_data_on_another_node_fails_every_rank_fast_with_its_message(tmp_path):
    """Two torchrun "nodes" on loopback; only node 1's --data is missing. With --dist-timeout 300,
    rank 0 must not wait for it: both end in seconds, rank 0 printing rank 1's message."""
    port = str(free_port())
    procs = []
    start = time.time()
    for node, path in ((0, ""), (1, str(tmp_path / "not_on_this_node"))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               os.path.join(HERE, "minimal_pretrain.py")] + TINY_FLAGS + ["--max-steps", "2", "--data", path]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outputs = [p.communicate(timeout=200) for p in procs]
    assert time.time() - start < 120
    assert all(p.returncode != 0 for p in procs)
    errors = [line for line in outputs[0][1].splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1: --data {tmp_path / 'not_on_this_node'}: no such file or folder"], outputs[0][1]
    assert not any(line.startswith("error:") for line in outputs[1][1].splitlines())  # rank 0 alone speaks
    assert "exitcode  : 2" in outputs[0][1] + outputs[1][1]
