"""Training data: the built-in corpus, text files and folders, train.bin / val.bin token files, batches.

Kept beside minimal_pretrain.py (not in it) because the data rules are a concern of their own,
shared with the scripts that write (prepare_data.py) and read (generate.py) the same files.

    --data omitted       the Python standard library sources of this interpreter, bytes (vocab 256)
    --data FILE          one text file, bytes; the last 10% is the validation split
    --data FOLDER        every regular text file below it once (links followed, each real file
                         once), bytes; every 10th file (sorted) is held out
    --data FOLDER        with train.bin / val.bin: token ids, uint16 or uint32 as meta.json's
                         "dtype" says (uint16 without meta.json, nanoGPT's convention)

Every split is checked when it is opened (size, dtype, count and largest id against
meta.json; small files are scanned), and every batch checks the ids it reads, so a file
that disagrees with its meta.json fails with a clear error instead of training on garbage.
"""

from __future__ import annotations

import glob
import json
import os
import stat
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """Data that cannot be used as it is; the message names the file and the fix."""


@dataclass
class Corpus:
    train: np.ndarray  # token ids of the training split
    val: np.ndarray  # token ids of the validation split
    vocab_size: int
    description: str


def builtin_corpus_files() -> list[str]:
    """The top-level .py files of this interpreter's standard library, sorted."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    """Every 10th file (in sorted order) is held out for validation."""
    return [f for i, f in enumerate(files) if i % 10 != 9], [f for i, f in enumerate(files) if i % 10 == 9]


def read_bytes(files: list[str]) -> np.ndarray:
    chunks = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                chunks.append(fh.read())
        except OSError as e:
            raise DataError(f"--data: cannot read {f} ({e.strerror or e}); fix its permissions or remove it") from None
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def text_files_under(root: str) -> tuple[list[str], int]:
    """Every regular file below `root` once, sorted; and how many non-regular entries were skipped.

    Symlinks are followed, but each real file (and folder) counts once, so a link to a parent
    folder neither loops nor puts copies of training files into the validation split. FIFOs,
    sockets and devices are skipped: reading them would block or never end."""
    files: dict[str, str] = {}  # real path -> path as found
    seen_dirs: set[str] = set()
    skipped = 0
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirs[:] = []  # a folder reached twice (a link loop or a second link): walk it once
            continue
        seen_dirs.add(real)
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.endswith((".bin", ".json")):
                continue
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:  # a dangling link
                regular = False
            if not regular:
                skipped += 1
                continue
            files.setdefault(os.path.realpath(path), path)
    return sorted(files.values()), skipped


def regular_file_or_error(path: str, what: str) -> None:
    """Refuse FIFOs, devices and folders where a data file is expected (they block or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{what} {path}: not a regular file; give a text file, a folder of them, "
                        f"or a folder with train.bin / val.bin")


def load_corpus(path: str, vocab_size_flag: int | None) -> Corpus:
    """--data rules of DESIGN.md: built-in corpus, text file / folder, or train.bin + val.bin."""
    if not path:
        train, val = split_files(builtin_corpus_files())
        return Corpus(read_bytes(train), read_bytes(val), 256,
                      f"built-in: {len(train) + len(val)} Python stdlib files ({len(val)} held out), bytes")
    if not os.path.exists(path):
        raise DataError(f"--data {path}: no such file or folder")
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, "train.bin")):
        return load_token_files(path, vocab_size_flag)
    if os.path.isdir(path):
        files, skipped = text_files_under(path)
        note = f", {skipped} non-regular entries skipped" if skipped else ""
        if not files:
            raise DataError(f"--data {path}: folder holds no regular text files (nor train.bin){note}")
        if len(files) < 2:
            data = read_bytes(files)
            cut = int(len(data) * 0.9)
            return Corpus(data[:cut], data[cut:], 256, f"{files[0]}: last 10% held out, bytes{note}")
        train, val = split_files(files)
        if not val:
            train, val = files[:-1], files[-1:]
        return Corpus(read_bytes(train), read_bytes(val), 256,
                      f"{path}: {len(files)} text files ({len(val)} held out), bytes{note}")
    regular_file_or_error(path, "--data")
    data = read_bytes([path])
    cut = int(len(data) * 0.9)
    return Corpus(data[:cut], data[cut:], 256, f"{path}: last 10% held out, bytes")


TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SCAN_LIMIT_TOKENS = 1 << 28  # scan a split for its largest id at start only up to this size (0.5-1 GB)


def read_token_meta(path: str, vocab_size_flag: int | None) -> tuple[int, str, dict]:
    """(vocab size, dtype name, the whole meta.json or {}) of a token-file folder."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.lexists(meta_path):
        if vocab_size_flag is None:
            raise DataError(f"--data {path}: no meta.json; give --vocab-size")
        return vocab_size_flag, "uint16", {}  # nanoGPT's convention
    regular_file_or_error(meta_path, "--data")  # a FIFO would block the read forever
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: unreadable ({e}); it must hold {{\"vocab_size\": N, \"dtype\": ...}}") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise DataError(f"{meta_path}: \"vocab_size\" must be a positive integer, got {vocab!r}")
    dtype = meta.get("dtype", "uint16")
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{meta_path}: \"dtype\" must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    if vocab > np.iinfo(TOKEN_DTYPES[dtype]).max + 1:
        raise DataError(f"{meta_path}: vocab {vocab} does not fit {dtype}; write the files as uint32")
    return vocab, dtype, meta


def open_token_split(path: str, split: str, dtype: str, vocab: int, meta: dict) -> np.ndarray:
    """Memory-map one split and check it against meta.json: size, dtype, count and largest id."""
    f = os.path.join(path, f"{split}.bin")
    if not os.path.lexists(f):
        raise DataError(f"--data {path}: {split}.bin missing; run scripts/prepare_data.py")
    regular_file_or_error(f, "--data")
    size, item = os.path.getsize(f), np.dtype(TOKEN_DTYPES[dtype]).itemsize
    if size == 0:
        raise DataError(f"{f}: empty; prepare the data again")
    if size % item:
        raise DataError(f"{f}: odd size, not a {dtype} token file ({size} bytes is not a multiple of {item})")
    counted, stated = (meta.get(key).get(split) if isinstance(meta.get(key), dict) else None
                       for key in ("tokens", "max_id"))
    for key, value in (("tokens", counted), ("max_id", stated)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise DataError(f"{path}/meta.json: \"{key}\" of {split} must be a non-negative integer, got {value!r}")
    if counted is not None and counted != size // item:
        raise DataError(f"{f}: {size // item} {dtype} tokens, meta.json says {counted}; "
                        f"was it written with another dtype?")
    tokens = np.memmap(f, dtype=TOKEN_DTYPES[dtype], mode="r")
    if stated is None and len(tokens) <= SCAN_LIMIT_TOKENS:
        stated = int(tokens.max())  # small enough to check every id now; bigger splits are checked per batch
    if stated is not None and stated >= vocab:
        raise DataError(f"{f} holds token {stated} >= vocab size {vocab}")
    return tokens


def load_token_files(path: str, vocab_size_flag: int | None) -> Corpus:
    """train.bin / val.bin token files (uint16 or uint32, from meta.json), vocab from meta.json or the flag.

    Both splits are checked at start against meta.json; get_batch checks the ids it reads too,
    so a large split that meta.json misdescribes still fails with a clear error, not garbage."""
    vocab, dtype, meta = read_token_meta(path, vocab_size_flag)
    train = open_token_split(path, "train", dtype, vocab, meta)
    val = open_token_split(path, "val", dtype, vocab, meta)
    return Corpus(train, val, vocab, f"{path}: train.bin / val.bin ({dtype}), vocab {vocab}")


def get_batch(tokens: np.ndarray, seed: int, split: int, index: int, batch: int,
              seq_len: int, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `index`-th global batch of a split: a function of (seed, split, index) only.

    Returns inputs and next-token targets, both (batch, seq_len) int64."""
    rng = np.random.default_rng([seed, split, index])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    if vocab_size is not None and rows.max() >= vocab_size:  # a token file larger than the start-up scan
        raise DataError(f"{getattr(tokens, 'filename', 'data')} holds token {int(rows.max())} >= vocab size "
                        f"{vocab_size} (batch {index} of split {split})")
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats per token) of the token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
