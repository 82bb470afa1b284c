"""Training data: the built-in corpus, text files and folders, train.bin / val.bin token files, batches.

Kept beside minimal_pretrain.py (not in it) because the data rules are a concern of their own,
shared with the scripts that write (prepare_data.py) and read (generate.py) the same files.

    --data omitted       the Python standard library sources of this interpreter, bytes (vocab 256)
    --data FILE          one text file, bytes; its last 10% is the validation split
    --data FOLDER        every regular text file below it once (links followed, each real file
                         once), bytes; 10% of the bytes held out by split_text, the rule
                         scripts/prepare_data.py applies, so both hold out the same text
    --data FOLDER        with train.bin / val.bin: token ids, uint16 or uint32 as meta.json's
                         "dtype" says (uint16 without meta.json, nanoGPT's convention)

meta.json (written by scripts/prepare_data.py, DESIGN.md's contract): "vocab_size", "dtype",
"tokenizer" ("bytes" or the name of a tokenizer.json in the same folder), "eos_id", "bos_id"
(or null), "tokens" / "max_id" / "bytes" per split ({"train": n, "val": n}; "bytes" counts the
UTF-8 bytes of text behind a split, for bits per byte). load_tokenizer(folder) gives the
tokenizer of any --data value: bytes (ids 0-255 are the bytes; prepared byte data ends every
document with byte 0, NUL, which text never holds) or a `tokenizers` tokenizer.json.

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
    val_bytes: int | None  # UTF-8 bytes of text behind the val split (bits per byte); None: unknown


def builtin_corpus_files() -> list[str]:
    """The top-level .py files of this interpreter's standard library, sorted."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    """The built-in corpus's split: every 10th file (in sorted order) is held out for validation."""
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


def byte_corpus(train: np.ndarray, val: np.ndarray, description: str) -> Corpus:
    """Text read as bytes: vocab 256, and one token is one byte of text."""
    return Corpus(train, val, 256, description, val_bytes=len(val))


# ------------------------------------------------------------------- the validation split of text
VAL_FRACTION = 0.1  # share of a text corpus's bytes held out (prepare_data.py's --val-fraction default)
SPLIT_TOLERANCE = 0.1  # the held-out share lies within +-10% of the fraction


def char_boundary(text: bytes, at: int) -> int:
    """The first index >= `at` (clamped to the text) that starts a UTF-8 character."""
    at = max(0, min(at, len(text)))
    while at < len(text) and 0x80 <= text[at] < 0xC0:  # continuation bytes never start a character
        at += 1
    return at


class HoldOut:
    """Which tail of each document is held out for validation, documents taken in order.

    Each document goes whole to the split that leaves the held-out bytes closer to fraction x the
    bytes seen so far (error diffusion, as in Floyd-Steinberg dithering), so the val share follows
    the fraction whatever the sizes and val documents are spread over the whole corpus. When
    neither whole choice keeps the held-out bytes within SPLIT_TOLERANCE of the target (a few huge
    documents, or one), the document's tail is held out instead, so the held-out bytes hit the
    target. The trainer's text corpus (split_text) and scripts/prepare_data.py both use this."""

    def __init__(self, total_bytes: int, fraction: float):
        self.fraction = fraction
        self.tolerance = SPLIT_TOLERANCE * fraction * total_bytes  # bytes the held-out count may be off by
        self.seen = self.held = 0

    def train_bytes(self, size: int) -> int:
        """How many leading bytes of the next document (of `size` bytes) go to train; the rest go to val."""
        self.seen += size
        target = self.fraction * self.seen
        to_train, to_val = self.held - target, self.held + size - target  # the error of each whole choice
        if min(abs(to_train), abs(to_val)) <= self.tolerance:
            return size if abs(to_train) <= abs(to_val) else 0
        return size - min(size, max(0, round(target - self.held)))  # cut: hold out what hits the target

    def count(self, held: int) -> None:
        self.held += held  # what was held out, after the cut moved to a character boundary


def split_text(documents: list[bytes], fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) bytes of documents in order, split by HoldOut; a cut falls on a character boundary.

    prepare_data.py --tokenizer bytes on the same documents writes these bytes, each part followed
    by its eos."""
    holdout = HoldOut(sum(len(d) for d in documents), fraction)
    train, val = [], []
    for doc in documents:
        if not doc:
            continue  # an empty document has no bytes to place (prepare_data.py skips it too)
        cut = char_boundary(doc, holdout.train_bytes(len(doc)))
        holdout.count(len(doc) - cut)
        train.append(doc[:cut])
        val.append(doc[cut:])
    return np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8)


def text_corpus(files: list[str], description: str) -> Corpus:
    """Text files read as bytes, one document each, split by split_text."""
    train, val = split_text([read_bytes([f]).tobytes() for f in files])
    share = len(val) / max(1, len(train) + len(val))
    return byte_corpus(train, val, f"{description} ({share:.1%} of the bytes held out), bytes")


def load_corpus(path: str, vocab_size_flag: int | None) -> Corpus:
    """--data rules of DESIGN.md: built-in corpus, text file / folder, or train.bin + val.bin."""
    if not path:
        train, val = split_files(builtin_corpus_files())
        return byte_corpus(read_bytes(train), read_bytes(val),
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
        return text_corpus(files, f"{path}: {len(files)} text files{note}")
    regular_file_or_error(path, "--data")
    return text_corpus([path], path)


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
    check_tokenizer_fields(meta_path, meta, vocab)
    return vocab, dtype, meta


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_tokenizer_fields(meta_path: str, meta: dict, vocab: int) -> None:
    """The fields prepare_data.py adds: special ids inside the vocabulary, a tokenizer name, byte counts.

    All optional (meta.json files written by hand or before them stay valid); the file named by
    "tokenizer" is opened only by load_tokenizer, which the trainer never calls."""
    for key in ("eos_id", "bos_id"):
        value = meta.get(key)
        if value is not None and not (is_count(value) and value < vocab):
            raise DataError(f"{meta_path}: \"{key}\" must be null or an id in [0, {vocab}), got {value!r}")
    name = meta.get("tokenizer")
    if name is not None and (not isinstance(name, str) or not name or os.path.basename(name) != name):
        raise DataError(f"{meta_path}: \"tokenizer\" must be \"bytes\" or a file name in the same folder, "
                        f"got {name!r}")
    if name == "bytes" and vocab != 256:
        raise DataError(f"{meta_path}: \"tokenizer\" is bytes but \"vocab_size\" is {vocab}, not 256")
    counted = meta.get("bytes", {})
    if not isinstance(counted, dict) or not all(is_count(counted.get(k, 0)) for k in ("train", "val")):
        raise DataError(f"{meta_path}: \"bytes\" must be {{\"train\": n, \"val\": n}} with n >= 0, got {counted!r}")


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
    val_bytes = meta.get("bytes", {}).get("val")
    return Corpus(train, val, vocab, f"{path}: train.bin / val.bin ({dtype}), vocab {vocab}", val_bytes)


# ------------------------------------------------------------------------------------- tokenizers
BYTE_EOS_ID = 0  # prepared byte data ends each document with NUL: text never holds one, and vocab stays 256


@dataclass
class ByteTokenizer:
    """UTF-8 bytes are the ids (vocab 256); eos_id None for raw text, BYTE_EOS_ID for prepared data."""
    eos_id: int | None = None
    bos_id: int | None = None
    vocab_size: int = 256
    name: str = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogateescape"))  # the bytes given, even if not UTF-8

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class TextTokenizer:
    """A `tokenizers` tokenizer.json (BPE or any other), with the special ids of its meta.json."""

    def __init__(self, path: str, eos_id: int | None, bos_id: int | None):
        Tokenizer = import_tokenizers().Tokenizer
        regular_file_or_error(path, "tokenizer")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises its own Exception type for a bad file
            raise DataError(f"{path}: not a tokenizer.json ({e})") from None
        self.eos_id, self.bos_id, self.name = eos_id, bos_id, path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")  # end-of-document names, in order


def find_eos_id(tokenizer) -> int | None:
    """The id of the first of EOS_NAMES a tokenizers.Tokenizer holds (a tokenizer.json given by the user)."""
    for name in EOS_NAMES:
        if tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name)
    return None


def import_tokenizers():
    """The optional `tokenizers` package, or a DataError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise DataError("the tokenizers package is not installed; pip install -r requirements-extras.txt") from None
    return tokenizers


def load_tokenizer(path: str) -> ByteTokenizer | TextTokenizer:
    """The tokenizer of a --data value: bytes for the built-in corpus, text files and folders; for a
    token folder the one its meta.json names (a tokenizer.json beside it, or bytes)."""
    if not path or not os.path.isdir(path) or not os.path.lexists(os.path.join(path, "train.bin")):
        return ByteTokenizer()
    vocab, _, meta = read_token_meta(path, 0)  # 0: without meta.json there is no tokenizer either
    name = meta.get("tokenizer")
    if name is None:
        raise DataError(f"--data {path}: its meta.json names no tokenizer (\"tokenizer\"); give ids, not text")
    if name == "bytes":
        return ByteTokenizer(meta.get("eos_id"), meta.get("bos_id"))
    tokenizer = TextTokenizer(os.path.join(path, name), meta.get("eos_id"), meta.get("bos_id"))
    if tokenizer.vocab_size > vocab:
        raise DataError(f"{path}/{name}: {tokenizer.vocab_size} tokens, more than meta.json's vocab_size {vocab}")
    return tokenizer


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
