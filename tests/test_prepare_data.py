"""scripts/prepare_data.py (issues 25, 27): linear BPE on long lines, bad input, --out ownership,
compressed and parquet corpora, the validation split shared with `--data FOLDER`; generate.py's
sampling at extreme temperature and top-p.

prepare_data.main() runs in-process (sys.argv patched): an error is SystemExit(2), and anything
else it raises fails the test, as a traceback would."""

from __future__ import annotations

import gzip
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import generate
import prepare_data
import sampling
from moe_layers import ModelConfig, MoETransformer

WORDS = ["héllo", "wörld", "☃", "日本語", "def", "return", "the", "moe", "expert", "\n", "  "]


def document_text(seed: int, words: int) -> str:
    """Deterministic text with 1-, 2- and 3-byte UTF-8 characters."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=words))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def run(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of prepare_data.py with these arguments, in this process."""
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", *map(str, args)])
    try:
        prepare_data.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def prepared(monkeypatch, capsys, *args: object) -> dict:
    """meta.json of a run that must succeed; --out is the argument after "--out"."""
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 0, err[-2000:]
    out = Path(str(args[list(args).index("--out") + 1]))
    return json.loads((out / "meta.json").read_text())


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` -> its bytes (files) or its kind, links not followed."""
    state: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            state[os.path.relpath(path, root)] = (Path(path).read_bytes() if stat.S_ISREG(mode)
                                                  else os.readlink(path) if stat.S_ISLNK(mode) else "folder")
    return state


def token_files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}


# ------------------------------------------------------------------ BPE on long lines
def pre_tokenized(out: Path, text: str) -> list[str]:
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_bpe_cuts_a_long_line_without_spaces_into_bounded_pieces_and_round_trips(monkeypatch, capsys, tmp_path):
    """Work per pre-token is bounded, so the pieces of a line grow linearly with it (1x vs 4x);
    the prepared ids and the tokenizer give the line back exactly. (Before: one pre-token of the
    whole line, whose training cost grows with its square: 50 MB ran past 300 s.)"""
    pytest.importorskip("tokenizers")
    letters = np.random.default_rng(0).integers(0, 26, size=300_000) + ord("a")
    line = letters.astype(np.uint8).tobytes().decode()  # 0.3 MB of letters: one word for GPT-2's pre-tokenizer
    write(tmp_path / "t" / "a.txt", line)
    write(tmp_path / "t" / "b.txt", document_text(1, 4000))
    meta = prepared(monkeypatch, capsys, tmp_path / "t", "--out", tmp_path / "d", "--tokenizer", "bpe",
                    "--vocab-size", 600, "--val-fraction", 0.5)
    pieces, pieces_4x = pre_tokenized(tmp_path / "d", line), pre_tokenized(tmp_path / "d", line * 4)
    assert max(len(p) for p in pieces_4x) == prepare_data.MAX_PIECE_BYTES
    assert len(pieces) == -(-len(line) // prepare_data.MAX_PIECE_BYTES) and len(pieces_4x) == 4 * len(pieces)
    tokenizer = data.load_tokenizer(str(tmp_path / "d"))
    assert tokenizer.decode(tokenizer.encode(line)) == line
    head, tail = (tokenizer.decode(np.fromfile(tmp_path / "d" / f"{s}.bin", dtype=meta["dtype"]).tolist())
                  for s in ("train", "val"))
    assert head.split(prepare_data.EOS_TOKEN)[0] + tail == line + prepare_data.EOS_TOKEN  # a.txt, its tail held out


def reference_bpe(texts: list[str], vocab_size: int):
    """The BPE prepare_data.py trained before issue 25: ByteLevel pre-tokens, uncut."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[prepare_data.EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def test_bpe_of_normal_text_is_the_same_as_before_the_cut(monkeypatch, capsys, tmp_path):
    """Text whose words are shorter than MAX_PIECE_BYTES: the same merges and the same ids as the uncut BPE."""
    pytest.importorskip("tokenizers")
    source = Path(prepare_data.__file__).read_text()  # code: indentation runs, punctuation, long names
    write(tmp_path / "t" / "a.py", source)
    meta = prepared(monkeypatch, capsys, tmp_path / "t" / "a.py", "--out", tmp_path / "d", "--tokenizer", "bpe",
                    "--vocab-size", 800, "--val-fraction", 0.05)
    cut = meta["bytes"]["train"]
    head, tail = source.encode()[:cut].decode(), source.encode()[cut:].decode()
    reference = reference_bpe([head], 800)
    ours = json.loads((tmp_path / "d" / "tokenizer.json").read_text())
    assert ours["model"] == json.loads(reference.to_str())["model"]  # vocabulary and merges
    eos = reference.token_to_id(prepare_data.EOS_TOKEN)
    for split, text in (("train", head), ("val", tail)):
        want = reference.encode(text, add_special_tokens=False).ids + [eos]
        assert np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=np.uint16).tolist() == want


def test_a_bpe_vocabulary_smaller_than_asked_is_said_in_one_line(monkeypatch, capsys, tmp_path):
    pytest.importorskip("tokenizers")
    write(tmp_path / "t" / "a.txt", "the moe expert router " * 200)
    code, _, err = run(monkeypatch, capsys, tmp_path / "t", "--out", tmp_path / "d", "--tokenizer", "bpe",
                       "--vocab-size", 5000)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert code == 0 and meta["vocab_size"] < 300
    assert len(notes) == 1 and f"{meta['vocab_size']:,} tokens" in notes[0] and "--vocab-size 5,000" in notes[0]


# ------------------------------------------------------------------------ bad input
def checkpoint_folder(tmp: Path) -> Path:
    write(tmp / "ck" / "step_00000002" / "meta.json", '{"format": "moe-checkpoint"}')
    os.symlink("step_00000002", tmp / "ck" / "latest")
    return tmp / "ck"


def truncated_gz(tmp: Path) -> Path:
    blob = gzip.compress(document_text(2, 3000).encode())
    return write(tmp / "t" / "a.txt.gz", blob[:len(blob) // 2])


def truncated_zst(tmp: Path) -> Path:
    zstandard = pytest.importorskip("zstandard")
    blob = zstandard.ZstdCompressor().compress(document_text(2, 30000).encode())
    return write(tmp / "t" / "a.jsonl.zst", blob[:len(blob) // 2])  # zstandard's reader says nothing


def parquet_file(path: Path, column: str, texts: list) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts}), str(path), row_group_size=3)
    return path


def corpus(tmp: Path) -> Path:
    return write(tmp / "t" / "a.txt", document_text(0, 400)).parent


def earlier_output(tmp: Path) -> Path:
    write(tmp / "d" / "train.bin", b"\1\0")
    write(tmp / "d" / "val.bin", b"\1\0")
    write(tmp / "d" / "meta.json", json.dumps({"vocab_size": 256, "dtype": "uint16", "tokenizer": "bytes",
                                               "tokens": {"train": 1, "val": 1}}))
    return tmp / "d"


# (id, setup(tmp) -> arguments, words of the error line); before this change, see each comment
REFUSALS = [
    ("tokenizer_not_json", lambda tmp: [corpus(tmp), "--tokenizer", write(tmp / "tok.json", "not json{")],
     "not a tokenizer.json"),  # traceback (a bare Exception from the Rust side), exit 1
    ("tokenizer_json_list", lambda tmp: [corpus(tmp), "--tokenizer", write(tmp / "tok.json", "[1, 2]")],
     "not a tokenizer.json"),  # traceback
    ("tokenizer_json_wrong_shape", lambda tmp: [corpus(tmp), "--tokenizer", write(tmp / "tok.json", '{"model": 3}')],
     "not a tokenizer.json"),  # traceback
    ("jsonl_nested_deeply", lambda tmp: [write(tmp / "a.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")],
     "a.jsonl:1: a JSON record nested too deeply"),  # RecursionError traceback
    ("vocab_2_pow_32", lambda tmp: [corpus(tmp), "--tokenizer", "bpe", "--vocab-size", 2**32],
     "--vocab-size between 257"),  # a 283 GB allocation, abort (exit 134)
    ("vocab_2_pow_64", lambda tmp: [corpus(tmp), "--tokenizer", "bpe", "--vocab-size", 2**64],
     "--vocab-size between 257"),  # OverflowError traceback
    ("vocab_one_over_the_bound", lambda tmp: [corpus(tmp), "--tokenizer", "bpe", "--vocab-size",
                                              prepare_data.MAX_BPE_VOCAB + 1], "--vocab-size between 257"),
    ("vocab_negative", lambda tmp: [corpus(tmp), "--tokenizer", "bpe", "--vocab-size", -300],
     "--vocab-size between 257"),
    ("text_field_missing_in_jsonl_gz", lambda tmp: [write(tmp / "a.jsonl.gz", gzip.compress(b'{"body": "x"}\n'))],
     "a.jsonl.gz:1: no string field 'text'"),  # before: .gz read as a binary file, "no text files"
    ("text_field_missing_in_parquet", lambda tmp: [parquet_file(tmp / "a.parquet", "body", ["x"])],
     "no column 'text' (--text-field); it has body"),
    ("parquet_null_row", lambda tmp: [parquet_file(tmp / "a.parquet", "text", ["x", "y", "z", None])],
     "a.parquet:row 4: no string field"),
    ("parquet_not_parquet", lambda tmp: [write(tmp / "a.parquet", "text, not parquet" * 9)],
     "not a parquet file"),
    ("gz_truncated", lambda tmp: [truncated_gz(tmp)], "a.txt.gz: cannot read it"),
    ("gz_not_gzip", lambda tmp: [write(tmp / "a.txt.gz", "plain text" * 9)], "a.txt.gz: cannot read it"),
    ("zst_truncated", lambda tmp: [truncated_zst(tmp)], "a.jsonl.zst: truncated"),
    ("out_is_a_checkpoint", lambda tmp: [corpus(tmp), "--out", checkpoint_folder(tmp)],
     "not an output of prepare_data.py (latest, step_00000002)"),  # before: train.bin etc. written into it
    ("out_is_a_text_folder", lambda tmp: [corpus(tmp), "--out", write(tmp / "mine" / "notes.txt", "mine").parent],
     "not an output of prepare_data.py (notes.txt)"),  # before: written into it
    ("out_overwrite_is_no_licence_for_a_text_folder",
     lambda tmp: [corpus(tmp), "--overwrite", "--out", write(tmp / "mine" / "notes.txt", "mine").parent],
     "not an output of prepare_data.py"),
    ("out_under_a_file", lambda tmp: [corpus(tmp), "--out", write(tmp / "f", "x") / "sub"], "is a file, not a folder"),
    ("out_is_an_earlier_output", lambda tmp: [corpus(tmp), "--out", earlier_output(tmp)], "give --overwrite"),
    ("abbreviated_flag", lambda tmp: [corpus(tmp), "--tok", "bytes"], "unrecognized arguments: --tok"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_bad_input_is_one_error_line_exit_2_and_leaves_nothing(case, monkeypatch, capsys, tmp_path):
    _, setup, words = case
    args = [str(a) for a in setup(tmp_path)]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    code, _, err = run(monkeypatch, capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and words in errors[0], err[-2000:]
    assert snapshot(tmp_path) == before  # no --out, no temporary folder, the folder handed over untouched


def test_a_late_failure_leaves_no_out_nor_the_parent_folders_made_for_it(monkeypatch, capsys, tmp_path):
    """A NUL byte past git's binary check stops the run while tokenizing, after the work folder is made.
    (Before: the parent folders of --out stayed behind.)"""
    write(tmp_path / "t" / "a.txt", b"x" * 9000 + b"\0tail")
    code, _, err = run(monkeypatch, capsys, tmp_path / "t", "--out", tmp_path / "new" / "deeper" / "d")
    assert code == 2 and "holds a NUL" in err
    assert sorted(os.listdir(tmp_path)) == ["t"]


def test_missing_pyarrow_is_one_error_line(monkeypatch, capsys, tmp_path):
    parquet_file(tmp_path / "a.parquet", "text", ["x"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    code, _, err = run(monkeypatch, capsys, tmp_path / "a.parquet", "--out", tmp_path / "d")
    assert code == 2 and "needs the pyarrow package" in err and not (tmp_path / "d").exists()


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="the standard library reads zstd")
def test_missing_zstandard_is_one_error_line(monkeypatch, capsys, tmp_path):
    write(tmp_path / "a.txt.zst", b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    code, _, err = run(monkeypatch, capsys, tmp_path / "a.txt.zst", "--out", tmp_path / "d")
    assert code == 2 and "needs the zstandard package" in err and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- --out
def test_new_out_is_a_plain_folder_of_the_outputs_only(monkeypatch, capsys, tmp_path):
    prepared(monkeypatch, capsys, corpus(tmp_path), "--out", tmp_path / "a" / "d")
    assert sorted(os.listdir(tmp_path / "a" / "d")) == ["meta.json", "train.bin", "val.bin"]
    assert sorted(os.listdir(tmp_path / "a")) == ["d"]  # no temporary folder left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "d").st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_overwrite_replaces_an_earlier_output_whole(monkeypatch, capsys, tmp_path):
    pytest.importorskip("tokenizers")
    text = corpus(tmp_path)
    prepared(monkeypatch, capsys, text, "--out", tmp_path / "d", "--tokenizer", "bpe", "--vocab-size", 300)
    code, _, err = run(monkeypatch, capsys, text, "--out", tmp_path / "d")
    assert code == 2 and "already holds prepared data" in err
    meta = prepared(monkeypatch, capsys, text, "--out", tmp_path / "d", "--overwrite")
    assert meta["tokenizer"] == "bytes" and sorted(os.listdir(tmp_path / "d")) == ["meta.json", "train.bin",
                                                                                   "val.bin"]
    prepared(monkeypatch, capsys, text, "--out", tmp_path / "fresh")
    assert token_files(tmp_path / "d") == token_files(tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["d", "fresh", "t"]


# ------------------------------------------------------------- compressed and parquet
def records(seed: int, n: int) -> list[str]:
    return [document_text(seed + i, 20 + 7 * i) for i in range(n)]


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def zst(blob: bytes) -> bytes:
    """zstd in two frames (as pzstd writes), so the reader must go on past the first."""
    zstandard = pytest.importorskip("zstandard")
    half = len(blob) // 2
    return zstandard.ZstdCompressor().compress(blob[:half]) + zstandard.ZstdCompressor().compress(blob[half:])


@pytest.mark.parametrize("tokenizer", [["--tokenizer", "bytes"], ["--tokenizer", "bpe", "--vocab-size", 400]],
                         ids=["bytes", "bpe"])
def test_gz_zst_and_parquet_give_the_token_files_of_the_same_text_given_plainly(tokenizer, monkeypatch, capsys,
                                                                                tmp_path):
    if "bpe" in tokenizer:
        pytest.importorskip("tokenizers")
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    a, b, c, d = document_text(5, 900), records(10, 12), records(30, 9), document_text(6, 500)
    write(plain / "a.txt", a), write(plain / "b.jsonl", jsonl(b)), write(plain / "c.jsonl", jsonl(c))
    write(plain / "d.txt", d)
    write(packed / "a.txt.gz", gzip.compress(a.encode())), write(packed / "b.jsonl.zst", zst(jsonl(b)))
    parquet_file(packed / "c.parquet", "text", c), write(packed / "d.txt.zst", zst(d.encode()))
    monkeypatch.setattr(prepare_data, "ROW_BATCH", 4)  # several row batches per file
    monkeypatch.setattr(prepare_data, "PIECE_BYTES", 1000)  # several pieces per text file, cut after newlines

    def whole_file_read(*args, **kwargs):
        raise AssertionError("read the whole parquet file")

    import pyarrow.parquet as pq
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file_read)
    monkeypatch.setattr(pq, "read_table", whole_file_read)
    prepared(monkeypatch, capsys, plain, "--out", tmp_path / "p", *tokenizer)
    prepared(monkeypatch, capsys, packed, "--out", tmp_path / "q", *tokenizer)
    assert token_files(tmp_path / "p") == token_files(tmp_path / "q")


def test_compressed_files_are_read_in_bounded_blocks(tmp_path):
    text = document_text(7, 20000).encode()
    for path in (write(tmp_path / "a.txt.gz", gzip.compress(text)), write(tmp_path / "a.txt.zst", zst(text))):
        blocks = list(prepare_data.read_blocks(str(path), 4096))
        assert b"".join(blocks) == text and max(len(b) for b in blocks) == 4096


# --------------------------------------------------- the split shared with --data FOLDER
def test_data_folder_and_prepare_data_hold_out_the_same_text(monkeypatch, capsys, tmp_path):
    """Uneven files (one a third of the corpus, so it is cut) with multi-byte characters: the trainer's
    `--data FOLDER` bytes equal prepare_data's byte tokens with the eos ids taken out, in both splits.
    (Before: the trainer held out every 10th file, prepare_data a share of the bytes.)"""
    for i, words in enumerate([400, 3, 3000, 60, 900, 7, 1500, 250, 2500, 40, 700]):
        write(tmp_path / "t" / f"doc{i:02d}.txt", document_text(i, words))
    meta = prepared(monkeypatch, capsys, tmp_path / "t", "--out", tmp_path / "d")
    corpus = data.load_corpus(str(tmp_path / "t"), None)
    for split, tokens in (("train", corpus.train), ("val", corpus.val)):
        ids = np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=np.uint16)
        assert np.array_equal(ids[ids != meta["eos_id"]], tokens)
    assert corpus.val_bytes == meta["bytes"]["val"]
    assert abs(len(corpus.val) / (len(corpus.train) + len(corpus.val)) - data.VAL_FRACTION) <= 0.01


# ------------------------------------------------------------------------ generate.py
def test_sampling_at_a_tiny_temperature_and_top_p_by_hand():
    """(Before: logits / 1e-40 overflow to inf and softmax gives nan; top-p 1e-300 rounds to 0 in
    float32, so every token was dropped and 0 / 0 sampled nan.)"""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    one_hot = torch.tensor([1.0, 0, 0, 0])
    assert torch.equal(sampling.sampling_probs(logits, 1e-40), one_hot)
    assert torch.equal(sampling.sampling_probs(torch.tensor([3.0, 3.0, 0.0]), 1e-40), torch.tensor([0.5, 0.5, 0]))
    assert torch.equal(sampling.sampling_probs(logits, 1.0, top_p=1e-300), one_hot)
    assert torch.equal(sampling.sampling_probs(logits, 1e-40, top_p=1e-300), one_hot)
    # temperature 0.5: p^2 / sum = [.25, .09, .0225, .0025] / .365; top-p 0.8 keeps the first two
    # (the mass before the third is .34 / .365 = 0.93 >= 0.8): [.25, .09] / .34
    want = torch.tensor([0.25, 0.09, 0, 0]) / 0.34
    assert torch.allclose(sampling.sampling_probs(logits, 0.5, top_p=0.8), want)


def test_generate_at_a_tiny_temperature_is_greedy():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=4, num_experts_per_token=2,
                      seq_length=16)
    model = MoETransformer(cfg, seed=3).eval()
    greedy, _ = generate.generate(model, [1, 2, 3], 8, temperature=0)
    assert generate.generate(model, [1, 2, 3], 8, temperature=1e-40, seed=5)[0] == greedy
    assert generate.generate(model, [1, 2, 3], 8, temperature=1.0, top_p=1e-300, seed=5)[0] == greedy


def test_generate_refuses_abbreviated_flags(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["generate.py", "--checkpoint", str(tmp_path), "--prompt", "a", "--temp", "0"])
    with pytest.raises(SystemExit) as stop:
        generate.main()
    assert stop.value.code == 2 and "unrecognized arguments: --temp" in capsys.readouterr().err
