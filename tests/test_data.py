"""Data: batches by seed and step, the built-in corpus, text folders and token files, prepare_data.py
(bytes, jsonl, BPE, tokenizer.json), meta.json checks, and generation and eval with a run's tokenizer."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import memory
from moe_layers import MoETransformer
from parallel_layers import ModelParallel, stage_layers
from helpers import (_token_folder, run_cli, run_script, save_in_process, smoke, snapshot, text_folder, tiny_config,
                     TINY_FLAGS, write)


# ------------------------------------------------------------ data and schedule
@smoke
def test_batches_depend_on_seed_and_step_only():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = data.get_batch(tokens, 1, 0, 5, 4, 8)
    x2, _ = data.get_batch(tokens, 1, 0, 5, 4, 8)
    x3, _ = data.get_batch(tokens, 1, 0, 6, 4, 8)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the next tokens
    assert (x1[:, 1:] - x1[:, :-1] == 1).all()  # contiguous windows of the corpus


@smoke
def test_unigram_entropy_by_hand():
    tokens = np.array([0, 0, 1, 2], dtype=np.uint8)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert math.isclose(data.unigram_entropy(tokens, 256), expected)


@smoke
def test_builtin_corpus_holds_out_a_fixed_tenth_of_files():
    train, val = data.split_files(data.builtin_corpus_files())
    assert len(train) > 100 and len(val) >= len(train) // 10 and not set(train) & set(val)


def test_text_folder_counts_each_real_file_once_and_skips_special_files(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    made = []
    for i in range(3):
        (root / f"a{i}.txt").write_text(f"text {i}")
        made.append(str(root / f"a{i}.txt"))
    (root / "sub" / "b.txt").write_text("more")
    made.append(str(root / "sub" / "b.txt"))
    os.symlink(root, root / "sub" / "loop")  # a link to an ancestor: walking it would never end
    os.symlink(root / "a0.txt", root / "sub" / "copy_of_a0.txt")  # the same real file twice
    os.mkfifo(root / "pipe")  # reading it would block forever
    os.symlink(root / "missing", root / "dangling")
    files, skipped = data.text_files_under(str(root))
    assert sorted(os.path.realpath(f) for f in files) == sorted(os.path.realpath(f) for f in made)
    assert skipped == 2  # the FIFO and the dangling link


def test_uint32_token_files_are_read_exactly(tmp_path):
    vocab = 70_000  # over 65,536: needs uint32
    train = (np.arange(4000, dtype=np.int64) * 7919) % vocab
    val = (np.arange(400, dtype=np.int64) * 104729) % vocab
    d = _token_folder(tmp_path / "tok", train, val, {"vocab_size": vocab, "dtype": "uint32",
                                                     "tokens": {"train": 4000, "val": 400}}, np.uint32)
    corpus = data.load_corpus(d, None)
    assert corpus.vocab_size == vocab and corpus.train.dtype == np.uint32
    assert np.array_equal(np.asarray(corpus.train), train) and np.array_equal(np.asarray(corpus.val), val)
    x, y = data.get_batch(corpus.train, 3, 0, 0, 4, 16, vocab)
    starts = np.random.default_rng([3, 0, 0]).integers(0, len(train) - 17, size=4)  # get_batch's own draw
    assert torch.equal(x, torch.from_numpy(np.stack([train[s:s + 16] for s in starts])))
    assert x.max() > 65_535 or y.max() > 65_535


def test_ids_over_the_vocabulary_in_a_large_split_fail_at_the_batch_that_reads_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SCAN_LIMIT_TOKENS", 10)  # as if the split were too large to scan at start
    d = _token_folder(tmp_path / "tok", np.full(3000, 99), np.arange(300) % 50, {"vocab_size": 50})
    corpus = data.load_corpus(d, None)  # not scanned: opens fine
    with pytest.raises(data.DataError, match="holds token 99 >= vocab size 50"):
        data.get_batch(corpus.train, 0, 0, 0, 2, 16, corpus.vocab_size)


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 4), (1, 3, 1)])
def test_memory_planner_counts_the_parameters_each_stage_builds(layout):
    tp, pp, ep = layout
    mc = tiny_config(num_layers=3, vocab_size=64, num_experts=4, moe_layer_interval=2, num_shared_experts=1)
    counted = memory.params_per_stage(mc, tp, pp, ep)
    for stage in range(pp):
        start, end = stage_layers(mc.num_layers, pp, stage)
        par = ModelParallel(tp_size=tp, ep_size=ep, layer_start=start, layer_end=end,
                            first_stage=stage == 0, last_stage=stage == pp - 1)
        model = MoETransformer(mc, par)
        assert counted[stage] == sum(p.numel() for p in model.parameters()), (layout, stage)


# ---- tokenizers and prepared data (issue 12) ----

WORDS = ["héllo", "wörld", "☃", "日本語", "𝄞", "def", "return", "the", "moe", "expert", "router", "\n", "  "]


def document_text(seed: int, words: int) -> str:
    """Deterministic text with 1-, 2-, 3- and 4-byte UTF-8 characters."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=words))


def text_corpus(root: Path, word_counts: list[int]) -> dict[str, str]:
    """One file per entry of `word_counts`; returns file name -> text."""
    root.mkdir(parents=True)
    texts = {f"doc{i:02d}.txt": document_text(i, n) for i, n in enumerate(word_counts)}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    return texts


def prepare(inputs: list, out: Path, *flags: object) -> dict:
    r = run_script("prepare_data.py", [*inputs, "--out", out, *flags], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "meta.json").read_text())


def split_ids(out: Path, meta: dict) -> dict[str, np.ndarray]:
    return {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}


def parts(ids: np.ndarray, eos: int) -> list[list[int]]:
    """The documents of a split: its ids cut after every eos (each split ends with one)."""
    assert len(ids) and ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    return [ids[a + 1:b].tolist() for a, b in zip(np.concatenate([[-1], cuts[:-1]]), cuts)]


def test_prepare_bytes_puts_each_document_whole_in_one_split_followed_by_eos(tmp_path):
    texts = text_corpus(tmp_path / "t", [10] * 60)  # each document within twice the tolerance: none is cut
    meta = prepare([tmp_path / "t"], tmp_path / "d")
    assert {k: meta[k] for k in ("vocab_size", "dtype", "tokenizer", "eos_id", "bos_id")} == \
        {"vocab_size": 256, "dtype": "uint16", "tokenizer": "bytes", "eos_id": 0, "bos_id": None}
    ids = split_ids(tmp_path / "d", meta)
    docs = {s: [bytes(p).decode("utf-8") for p in parts(ids[s], 0)] for s in ids}
    assert sorted(docs["train"] + docs["val"]) == sorted(texts.values())  # every document once, whole
    val_share = sum(len(d.encode()) for d in docs["val"]) / sum(len(t.encode()) for t in texts.values())
    assert abs(val_share - 0.1) <= 0.01 and len(docs["val"]) in (5, 6, 7)
    for s in ids:
        assert meta["tokens"][s] == len(ids[s]) and meta["max_id"][s] == int(ids[s].max())
        assert meta["bytes"][s] == sum(len(d.encode()) for d in docs[s])


def test_prepare_jsonl_takes_the_text_field_one_document_per_record(tmp_path):
    records = [{"body": document_text(i, 8), "id": i} for i in range(100)]  # small: none is cut
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:50]) + "\n\n")  # a blank line
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[50:]))
    meta = prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "d", "--text-field", "body",
                   "--val-fraction", "0.25")
    ids = split_ids(tmp_path / "d", meta)
    docs = [bytes(p).decode("utf-8") for s in ids for p in parts(ids[s], 0)]
    assert sorted(docs) == sorted(r["body"] for r in records)


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_prepare_holds_out_the_fraction_of_bytes_whatever_the_file_sizes(tmp_path, fraction):
    """Nine files from 7 to 3000 words (one is a third of the corpus): the held-out share of the text's
    bytes is within the stated 10% of the fraction (0.1 -> [0.09, 0.11])."""
    texts = text_corpus(tmp_path / "t", [400, 3, 3000, 60, 900, 7, 1500, 250, 2500])
    meta = prepare([tmp_path / "t"], tmp_path / "d", "--val-fraction", fraction)
    ids = split_ids(tmp_path / "d", meta)
    held = int((ids["val"] != 0).sum())  # text bytes in val, counted from the file
    total = sum(len(t.encode()) for t in texts.values())
    assert int((ids["train"] != 0).sum()) + held == total and meta["bytes"]["val"] == held
    assert abs(held / total - fraction) <= 0.1 * fraction


def test_prepare_bpe_round_trips_every_document_and_unseen_bytes_and_is_deterministic(tmp_path):
    texts = text_corpus(tmp_path / "t", [30] * 60)  # none is cut
    metas = [prepare([tmp_path / "t"], tmp_path / d, "--tokenizer", "bpe", "--vocab-size", 300) for d in "ab"]
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):  # two runs, byte-identical
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    meta = metas[0]
    assert (meta["vocab_size"], meta["tokenizer"], meta["eos_id"], meta["dtype"]) == (300, "tokenizer.json", 0, "uint16")
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))  # the library, not our wrapper
    assert reference.id_to_token(0) == "<|endoftext|>"
    ids = split_ids(tmp_path / "a", meta)
    docs = [reference.decode(p) for s in ids for p in parts(ids[s], 0)]
    assert sorted(docs) == sorted(texts.values())
    for p in parts(ids["train"], 0):
        assert p == reference.encode(reference.decode(p), add_special_tokens=False).ids
    tokenizer = data.load_tokenizer(str(tmp_path / "a"))
    unseen = "Ωμέγα ∮ 🚀 \x01\x7f\u0300 ÿ"  # characters and bytes the training text never held
    encoded = tokenizer.encode(unseen)
    assert tokenizer.decode(encoded) == unseen and max(encoded) < 300 and tokenizer.eos_id == 0


def big_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json of 70,260 tokens (over uint16): 70,000 added words w0x ... w69999x."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=260, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([f"w{i}x" for i in range(70_000)])
    tok.save(str(path))
    return path


def test_prepare_with_a_tokenizer_json_over_65536_writes_uint32_read_back_exactly(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer
    path = big_tokenizer(tmp_path / "big.json")
    (tmp_path / "t").mkdir()
    texts = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}x hello" for j in range(8)) for i in range(60)]  # no cut
    for i, text in enumerate(texts):
        (tmp_path / "t" / f"{i}.txt").write_text(text)
    meta = prepare([tmp_path / "t"], tmp_path / "d", "--tokenizer", path)
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"]) == ("uint32", 70_260, 0)  # </s> found as eos
    reference = Tokenizer.from_file(str(path))
    ids = split_ids(tmp_path / "d", meta)
    want = sorted(reference.encode(t, add_special_tokens=False).ids for t in texts)
    assert sorted(p for s in ids for p in parts(ids[s], 0)) == want
    assert max(meta["max_id"].values()) > 65_535
    corpus = data.load_corpus(str(tmp_path / "d"), None)
    assert corpus.train.dtype == np.uint32 and np.array_equal(np.asarray(corpus.train), ids["train"])
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == path.read_bytes()


def nul_late(tmp: Path) -> Path:
    return write(tmp / "t" / "a.txt", b"x" * 9000 + b"\0tail")  # past git's 8000-byte binary check


def no_eos_tokenizer(tmp: Path) -> Path:
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    tok.save(str(tmp / "tok.json"))
    return tmp / "tok.json"


PREP_REFUSALS = [
    ("bpe_without_vocab", lambda tmp: [text_folder(tmp), "--tokenizer", "bpe"], "--vocab-size"),
    ("bpe_vocab_below_bytes", lambda tmp: [text_folder(tmp), "--tokenizer", "bpe", "--vocab-size", 200], "257"),
    ("vocab_for_bytes", lambda tmp: [text_folder(tmp), "--vocab-size", 300], "--vocab-size"),
    ("tokenizer_missing", lambda tmp: [text_folder(tmp), "--tokenizer", tmp / "nope.json"], "--tokenizer"),
    ("tokenizer_without_eos", lambda tmp: [text_folder(tmp), "--tokenizer", no_eos_tokenizer(tmp)], "</s>"),
    ("nul_in_bytes_document", lambda tmp: [nul_late(tmp)], "a.txt: holds a NUL"),
    ("latin1_for_bpe", lambda tmp: [write(tmp / "t" / "a.txt", "café ".encode("latin-1") * 99),
                                    "--tokenizer", "bpe", "--vocab-size", 300], "not UTF-8"),
    ("jsonl_bad_json", lambda tmp: [write(tmp / "a.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n')],
     "a.jsonl:3: not a JSON record"),
    ("jsonl_missing_field", lambda tmp: [write(tmp / "a.jsonl", '{"text": "a"}\n{"body": "b"}\n')],
     "a.jsonl:2: no string field 'text'"),
    ("jsonl_not_an_object", lambda tmp: [write(tmp / "a.jsonl", '["text"]\n')], "a.jsonl:1"),
    ("jsonl_field_not_text", lambda tmp: [write(tmp / "a.jsonl", '{"text": 3}\n'), "--text-field", "text"],
     "a.jsonl:1"),
]


@pytest.mark.parametrize("case", PREP_REFUSALS, ids=[c[0] for c in PREP_REFUSALS])
def test_prepare_refuses_bad_input_with_one_error_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    """In-process through prepare_data.main() as the script calls it (any exception but SystemExit
    fails the test, as a traceback would); the first case also as a real process."""
    pytest.importorskip("tokenizers")
    name, setup, words = case
    args = [str(a) for a in setup(tmp_path)] + ["--out", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prepare_data.py"] + args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        importlib.import_module("prepare_data").main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1 and words in errors[0], err[-2000:]
    assert snapshot(tmp_path) == before  # not even the --out folder
    if name == PREP_REFUSALS[0][0]:
        r = run_script("prepare_data.py", args, timeout=60)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and words in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr and snapshot(tmp_path) == before


def token_folder(root: Path, meta: dict) -> Path:
    return Path(_token_folder(root, np.arange(3000) % 50, np.arange(300) % 50, meta))


@pytest.mark.parametrize("change,words", [
    ({"eos_id": 50}, '"eos_id" must be null or an id in [0, 50)'),
    ({"bos_id": -1}, '"bos_id"'),
    ({"eos_id": True}, '"eos_id"'),
    ({"tokenizer": "bytes"}, "not 256"),
    ({"tokenizer": "../tok.json"}, "file name in the same folder"),
    ({"bytes": {"train": 10, "val": -1}}, '"bytes"'),
])
def test_meta_json_tokenizer_fields_are_checked(change, words, tmp_path):
    d = token_folder(tmp_path / "tok", {"vocab_size": 50, **change})
    with pytest.raises(data.DataError) as refused:
        data.load_corpus(str(d), None)
    assert words in str(refused.value)


def test_trainer_refuses_an_eos_id_over_the_vocabulary_with_one_error_line(tmp_path):
    d = token_folder(tmp_path / "tok", {"vocab_size": 50, "eos_id": 77})
    r = run_cli(TINY_FLAGS + ["--max-steps", "1", "--data", str(d)], timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and '"eos_id"' in errors[0] and "Traceback" not in r.stderr


def model_on(folder: Path, seed: int = 4) -> MoETransformer:
    """A random tiny model of a prepared folder's vocabulary."""
    vocab = json.loads((folder / "meta.json").read_text())["vocab_size"]
    return MoETransformer(tiny_config(vocab_size=vocab), seed=seed).eval()


def save_trained_on(model: MoETransformer, folder: Path, root: Path) -> str:
    """A checkpoint of `model` that says it was trained with --data folder (as the trainer writes it)."""
    ck = save_in_process(model, root)
    meta_path = Path(ck) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["train"]["data"] = str(folder)
    meta_path.write_text(json.dumps(meta))
    return ck


def greedy_by_hand(model: MoETransformer, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).output[0, -1].argmax()))
    return ids


def make_eos_come_at_step(model: MoETransformer, prompt: list[int], eos: int, steps: int = 12) -> int:
    """Swap the LM-head rows of eos and of a token the greedy continuation draws later, so that eos comes
    at that step instead (the steps before keep their argmax); return that step (1-based)."""
    new = greedy_by_hand(model, prompt, steps)[len(prompt):]
    k = next(i for i in range(2, steps) if new[i] != eos and new[i] not in new[:i])
    with torch.no_grad():
        w = model.lm_head.weight
        w[[eos, new[k]]] = w[[new[k], eos]]
    return k + 1


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """The same small corpus prepared as bytes and as a 300-token BPE."""
    root = tmp_path_factory.mktemp("prepared")
    text_corpus(root / "t", [200] * 10)
    prepare([root / "t"], root / "bytes")
    prepare([root / "t"], root / "bpe", "--tokenizer", "bpe", "--vocab-size", 300)
    return {"bytes": root / "bytes", "bpe": root / "bpe"}


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_generate_decodes_with_the_runs_tokenizer_and_stops_at_eos(kind, prepared, tmp_path):
    tokenizer = data.load_tokenizer(str(prepared[kind]))
    prompt_text = "héllo ☃"
    prompt = tokenizer.encode(prompt_text)
    model = model_on(prepared[kind])
    stop = make_eos_come_at_step(model, prompt, tokenizer.eos_id, 16 - len(prompt))
    ck = save_trained_on(model, prepared[kind], tmp_path / "ck")
    want = greedy_by_hand(model, prompt, stop)
    assert want[-1] == tokenizer.eos_id and tokenizer.eos_id not in want[len(prompt):-1]
    r = run_script("generate.py", ["--checkpoint", ck, "--prompt", prompt_text, "--temperature", 0,
                                   "--max-new-tokens", 16 - len(prompt)])
    assert r.returncode == 0, r.stderr
    assert r.stdout == tokenizer.decode(want[:-1]) + "\n"  # the eos ends it and is not printed
    assert f"{stop} tokens in" in r.stderr
    r = run_script("generate.py", ["--checkpoint", ck, "--prompt-ids", ",".join(map(str, prompt)),
                                   "--temperature", 0, "--max-new-tokens", 16 - len(prompt)])
    assert r.returncode == 0 and r.stdout.strip() == ",".join(map(str, want)), r.stderr


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_transformers_pipeline_on_the_export_continues_as_generate_does(kind, prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    tokenizer = data.load_tokenizer(str(prepared[kind]))
    prompt_text = "def héllo"
    prompt = tokenizer.encode(prompt_text)
    model = model_on(prepared[kind])
    make_eos_come_at_step(model, prompt, tokenizer.eos_id, 16 - len(prompt))
    ck = save_trained_on(model, prepared[kind], tmp_path / "ck")
    r = run_script("export_hf.py", ["--checkpoint", ck, "--out", tmp_path / "hf"])
    assert r.returncode == 0, r.stderr
    ours = run_script("generate.py", ["--checkpoint", ck, "--prompt", prompt_text, "--temperature", 0,
                                      "--max-new-tokens", 16 - len(prompt)])
    assert ours.returncode == 0, ours.stderr
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sample = "Ωμέγα 🚀 def héllo\n"
    assert hf_tokenizer(sample)["input_ids"] == tokenizer.encode(sample)
    assert list(hf_tokenizer(sample)) == ["input_ids", "attention_mask"]  # no token_type_ids, on 4.x too
    if kind == "bytes":
        assert hf_tokenizer(sample)["input_ids"] == list(sample.encode())  # id i is byte i
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.model_max_length) == (tokenizer.eos_id, 16)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    theirs = pipe(prompt_text, max_new_tokens=16 - len(prompt), do_sample=False)[0]["generated_text"]
    universal = (theirs + "\n").replace("\r\n", "\n").replace("\r", "\n")  # as run_script's text mode reads ours
    assert universal == ours.stdout


def test_eval_only_prints_bits_per_byte_of_bpe_data(prepared, tmp_path):
    save = tmp_path / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(prepared["bpe"]), "--save", str(save)])
    assert r.returncode == 0, r.stderr
    r = run_cli(["--load", str(save), "--eval-only", "--eval-iters", "2", "--no-progress"])
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("eval-only:")][0]
    loss = float(line.split("val loss ")[1].split()[0])
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(str(prepared["bpe"] / "tokenizer.json"))
    val = np.fromfile(prepared["bpe"] / "val.bin", dtype=np.uint16)
    text_bytes = sum(len(reference.decode(p).encode()) for p in parts(val, 0))  # from the ids, not meta.json
    assert f"{loss / math.log(2) * len(val) / text_bytes:.4f} bits per byte" in line
    assert text_bytes < len(val) * 3  # several bytes per token: bits per byte is not bits per token
