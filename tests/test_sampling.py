"""Samples during training (--sample-interval): the line printed at a step is what scripts/generate.py prints
for that step's checkpoint, every layout prints the one-process text, sampling changes no loss, bad flags
are refused at start."""

from __future__ import annotations

import ast
import sys

import numpy as np
import pytest
import torch

import checkpoint as ckpt_io
import generate
import minimal_pretrain as mp
from helpers import _token_folder, read_metrics, refusal_in_process, run_cli, TINY_FLAGS, write

# 4 layers so that PP 2 can interleave two chunks per rank; 2 micro-batches for every layout (the same
# global batch as PP 2 on one DP rank). A step-1 model still continues "def " with varied bytes: a
# sample that tells weights apart (later ones settle on runs of spaces).
SAMPLE_FLAGS = TINY_FLAGS + ["--num-layers", "4", "--num-microbatches", "2", "--max-steps", "2",
                             "--sample-interval", "1", "--sample-tokens", "10"]


def samples(stdout: str) -> dict[int, str]:
    """{step: text} of the `Step N | sample: 'text'` lines (the text is a Python literal)."""
    found = {}
    for line in stdout.splitlines():
        if " | sample: " in line:
            head, text = line.split(" | sample: ", 1)
            found[int(head.removeprefix("Step "))] = ast.literal_eval(text)
    return found


def generate_py(monkeypatch, capsys, step_dir, prompt: str, tokens: int) -> str:
    """scripts/generate.py's greedy text for a checkpoint, through its main() as the command line calls it."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["generate.py", "--checkpoint", str(step_dir), "--prompt", prompt,
                                      "--temperature", "0", "--max-new-tokens", str(tokens)])
    generate.main()
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of SAMPLE_FLAGS with a checkpoint at every step: (its samples, its save folder)."""
    d = tmp_path_factory.mktemp("one")
    r = run_cli(SAMPLE_FLAGS + ["--save", str(d / "ck"), "--save-interval", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    return samples(r.stdout), d / "ck"


def test_the_sample_at_a_step_is_generate_py_on_that_steps_checkpoint(one_process, monkeypatch, capsys):
    found, ck = one_process
    assert sorted(found) == [1, 2]  # every step (interval 1), rank 0 alone
    for step, text in found.items():
        assert text == generate_py(monkeypatch, capsys, ck / ckpt_io.step_dir_name(step), "def ", 10)
    assert len(found[1]) == len("def ") + 10 and found[1].strip() != "def"  # ten bytes, not all blank


def test_a_bpe_runs_sample_is_generate_py_in_the_runs_tokenizer(tmp_path, monkeypatch, capsys):
    """Prepared BPE data: the prompt is encoded and the sample decoded with the run's tokenizer.json, as
    generate.py does with the copy the checkpoint carries."""
    import prepare_data
    words = ["alpha", "beta", "gamma", "return", "import", "value"]
    text = "\n".join(" ".join(words[(i * 7 + j * 3) % 6] for j in range(12)) for i in range(2000))
    write(tmp_path / "t.txt", text)
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", str(tmp_path / "t.txt"), "--out", str(tmp_path / "bpe"),
                                      "--tokenizer", "bpe", "--vocab-size", "300"])
    prepare_data.main()
    capsys.readouterr()
    mp.main(TINY_FLAGS + ["--data", str(tmp_path / "bpe"), "--seq-length", "32", "--max-steps", "4",
                          "--sample-interval", "4", "--sample-prompt", "alpha beta", "--sample-tokens", "6",
                          "--save", str(tmp_path / "ck")])
    found = samples(capsys.readouterr().out)
    assert list(found) == [4] and found[4].startswith("alpha beta")
    assert found[4] == generate_py(monkeypatch, capsys, tmp_path / "ck" / ckpt_io.step_dir_name(4), "alpha beta", 6)


@pytest.mark.parametrize("layout", [
    ["--tensor-parallel-size", "2", "--sequence-parallel"],  # TP, SP and EP 2: heads, vocab and experts split
    ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "1"],  # PP, two chunks per rank
    ["--micro-batch-size", "1", "--num-microbatches", "2", "--use-distributed-optimizer",
     "--expert-parallel-size", "2"],  # DP 2: weights whole only after the ZeRO-1 all-gather; EP 2 over DP
], ids=["tp2_sp_ep2", "pp2_interleaved", "dp2_zero1_ep2"])
def test_two_ranks_print_the_one_process_sample(layout, one_process, tmp_path, monkeypatch, capsys):
    """The same global batch on 2 gloo ranks: the same text as one process, and exactly generate.py's text
    for this run's own checkpoint (its gathered weights are whole, not merely close)."""
    r = run_cli(SAMPLE_FLAGS + layout + ["--save", str(tmp_path / "ck"), "--save-interval", "1",
                                         "--dist-timeout", "60"], nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    found = samples(r.stdout)
    assert r.stdout.count(" | sample: ") == 2 and found == one_process[0]
    assert found[1] == generate_py(monkeypatch, capsys, tmp_path / "ck" / ckpt_io.step_dir_name(1), "def ", 10)


def test_sampling_changes_no_loss_and_no_weight(tmp_path, capsys):
    """The same run with and without samples at every step: the same records (bit for bit, timing aside)
    and the same final weights; the global RNG state is restored around each sample."""
    runs = {}
    for name, extra in (("off", []), ("on", ["--sample-interval", "1", "--sample-tokens", "4"])):
        flags = TINY_FLAGS + ["--max-steps", "3", "--router-jitter-noise", "0.1", "--metrics-file",
                              str(tmp_path / f"{name}.jsonl"), "--save", str(tmp_path / name)]
        torch.manual_seed(0)
        mp.main(flags + extra)
        records = [{k: v for k, v in rec.items() if k != "tokens_per_sec"}
                   for rec in read_metrics(str(tmp_path / f"{name}.jsonl"))]
        weights = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / name)))
        runs[name] = (records, weights, torch.get_rng_state())
    assert capsys.readouterr().out.count(" | sample: ") == 3
    assert runs["on"][0] == runs["off"][0] and len(runs["on"][0]) == 3
    assert torch.equal(runs["on"][2], runs["off"][2])  # the global RNG stream is where training left it
    assert runs["on"][1].keys() == runs["off"][1].keys()
    assert all(torch.equal(runs["on"][1][k], runs["off"][1][k]) for k in runs["off"][1])


@pytest.mark.parametrize("flags,words", [
    (["--sample-interval", "-1"], "--sample-interval must be >= 0"),
    (["--sample-interval", "2", "--sample-tokens", "0"], "--sample-tokens must be positive"),
    (["--sample-prompt", "class "], "add --sample-interval"),
    (["--sample-interval", "2", "--sample-prompt", ""], "--sample-prompt: the prompt is empty"),
    (["--sample-interval", "2", "--sample-prompt", "x" * 17], "more than the model's seq_length 16"),
    (["--sample-interval", "two"], "--sample-interval: invalid int value"),
])
def test_bad_sample_flags_exit_2_with_one_error_line(flags, words, capsys, monkeypatch):
    assert words in refusal_in_process(TINY_FLAGS + ["--max-steps", "2"] + flags, capsys, monkeypatch)


def test_token_files_without_a_tokenizer_refuse_samples_at_start(tmp_path, capsys, monkeypatch):
    bins = _token_folder(tmp_path / "bins", np.arange(3000) % 50, np.arange(300) % 50, {"vocab_size": 64})
    line = refusal_in_process(TINY_FLAGS + ["--max-steps", "2", "--data", bins, "--sample-interval", "1"],
                              capsys, monkeypatch)
    assert "--sample-interval needs the run's tokenizer" in line and "names no tokenizer" in line
