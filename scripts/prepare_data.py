"""Turn text, JSON Lines and parquet files and folders into train.bin / val.bin / meta.json for `--data`.

    python scripts/prepare_data.py my_corpus/ --out data/mine                              # bytes
    python scripts/prepare_data.py my_corpus/ --out data/bpe --tokenizer bpe --vocab-size 4096
    python scripts/prepare_data.py crawl.jsonl.zst --out data/crawl --tokenizer bpe --vocab-size 32000 --text-field body
    python scripts/prepare_data.py shards/*.parquet --out data/web --tokenizer path/to/tokenizer.json
    python scripts/prepare_data.py a.txt notes/ --out data/mine --overwrite               # replace data/mine
    python minimal_pretrain.py --data data/mine

Documents: a text file is one document, a JSON Lines file (`.jsonl`) one per record (its
--text-field, a string; a record that is not an object holding one is an error naming file:line),
a parquet file (`.parquet`, read with the optional `pyarrow`) one per row (its --text-field
column, strings). `.gz` and `.zst` files are read decompressed as the file their name has without
that suffix (`a.jsonl.zst` is JSON Lines, `a.txt.gz` text); gzip is the standard library's, zstd
the standard library's `compression.zstd` on Python >= 3.14, else the optional `zstandard`.
Everything is streamed: text in pieces, parquet in row batches, so memory does not grow with the
corpus. Folders are walked as `--data FOLDER` walks them (data.text_files_under): links followed,
each real file once, regular files only (FIFOs, devices, sockets, broken links are skipped and
counted, never opened), .bin and .json files left out; text files with a NUL byte in their first
8000 bytes, after decompression (git's rule for binary) are skipped and counted. Inputs are taken
in sorted order.
Tokenizers (--tokenizer):
  bytes  (default) ids are the UTF-8 bytes, vocab 256, eos 0 (NUL): text never holds a NUL (a
         document that does is refused), and keeping vocab 256 keeps byte data, the built-in corpus
         and byte checkpoints interchangeable (a run on one can --load a run on the other);
  bpe    a byte-level BPE of up to --vocab-size tokens trained here on the training split with the
         `tokenizers` library (ByteLevel pre-tokenizer and decoder, all 256 bytes in the initial
         alphabet, so no byte is ever unknown), eos `<|endoftext|>` = id 0; written as tokenizer.json.
         Pre-tokens (words, runs of digits or punctuation) are cut into pieces of at most
         MAX_PIECE_BYTES: BPE training's cost grows with the square of a pre-token's length (a
         50 MB line without spaces, minified code or base64, ran past 300 s), and with the cut it
         grows linearly; text whose words are shorter is tokenized exactly as without the cut;
  PATH   an existing tokenizer.json, copied into --out; eos is the first of its tokens named in
         data.EOS_NAMES (<|endoftext|>, </s>, ...).
The eos id follows every document (meta.json "eos_id"); no bos is written ("bos_id": null).
Split rule (deterministic, one pass): data.HoldOut, the rule `--data FOLDER` applies to a text
folder too, so that both hold out the same text. Documents are taken in order and each goes whole
to the split that leaves the held-out bytes closer to --val-fraction x the bytes seen so far; a
document too big for that has its tail held out, cut at a UTF-8 character boundary (each part ends
with eos). The held-out share lies within data.SPLIT_TOLERANCE x --val-fraction of the fraction.
Streaming: a document is read in pieces of PIECE_BYTES cut after a newline, tokenized and appended
to the .bin files; BPE training reads the same stream.
The same inputs and flags give byte-identical outputs. Token files are uint16 when the vocabulary
fits (<= 65,536), else uint32. meta.json is DESIGN.md's: vocab_size, dtype, tokenizer, eos_id,
bos_id, tokens / max_id / bytes per split ("bytes": UTF-8 bytes of text, for bits per byte).
--out: the files are written into a temporary folder beside --out and renamed to --out at the end,
so a failed run leaves nothing. --out must be new, an empty folder, or (with --overwrite) an
earlier output of this script (a meta.json of ours and only the files it writes); anything else
(a checkpoint, a folder of texts) is refused, never written into.
Bad input (a missing or unreadable path, a damaged or truncated compressed file, nothing to read,
an empty split, a bad record, non-UTF-8 text for a text tokenizer, a tokenizer.json that is not
one, an absurd --vocab-size, an --out that is not ours) prints one `error:` line, exit 2, and
leaves no --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import zlib
from typing import BinaryIO, Callable, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import outputs  # noqa: E402
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

OUTPUTS = ("train.bin", "val.bin", "meta.json", "tokenizer.json")
EOS_TOKEN = data.EOS_NAMES[0]  # <|endoftext|>: the eos the BPE trainer adds
PIECE_BYTES = 8 << 20  # a document is read and tokenized this many bytes at a time (cut after a newline)
MAX_PIECE_BYTES = 256  # longest BPE pre-token: keeps training and encoding linear in a line's length
MAX_BPE_VOCAB = 1 << 20  # 4x the largest vocabularies in use (262,144); the trainer allocates per token
ROW_BATCH = 1024  # parquet rows read at a time
ZSTD_CHUNK = 1 << 16  # compressed bytes fed to the zstandard decompressor at a time


# --------------------------------------------------------------------------- inputs
COMPRESSED = (".gz", ".zst")


def kind_of(path: str) -> str:
    """parquet, jsonl or text, from the file name without a .gz / .zst suffix."""
    name = path
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return "parquet" if name.endswith(".parquet") else "jsonl" if name.endswith(".jsonl") else "text"


def zstandard_blocks(path: str) -> Iterator[bytes]:
    """A .zst file decompressed with the optional `zstandard`, frame after frame.

    Its stream reader returns a truncated file's bytes without complaint; a decompressobj per frame
    says whether the last frame ended, and ZSTD_CHUNK bounds the input of each call."""
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{path}: reading .zst needs the zstandard package (or Python >= 3.14); "
                         f"pip install -r requirements-extras.txt") from None
    with open(path, "rb") as f:
        frame, pending = zstandard.ZstdDecompressor().decompressobj(), False
        try:
            while chunk := f.read(ZSTD_CHUNK):
                while chunk:
                    yield frame.decompress(chunk)
                    pending, chunk = not frame.eof, frame.unused_data if frame.eof else b""
                    if frame.eof:  # the next frame, if any, starts in unused_data
                        frame = zstandard.ZstdDecompressor().decompressobj()
        except zstandard.ZstdError as e:
            raise ValueError(f"{path}: not zstd data or damaged ({e})") from None
    if pending:
        raise ValueError(f"{path}: truncated (the last zstd frame does not end)")


def open_compressed(path: str) -> BinaryIO:
    """A binary file object of a plain, .gz or (Python >= 3.14) .zst file, decompressed."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        from compression import zstd  # only called on Python >= 3.14
        return zstd.open(path, "rb")
    return open(path, "rb")


def read_blocks(path: str, size: int = PIECE_BYTES) -> Iterator[bytes]:
    """A file's bytes, decompressed (.gz, .zst), in blocks of `size` bytes (the last one shorter).

    Memory holds one block whatever the file's size. A damaged or truncated file is a ValueError
    naming it: gzip raises OSError, EOFError or zlib.error for them."""
    if path.endswith(".zst") and sys.version_info < (3, 14):
        buffer = bytearray()
        for block in zstandard_blocks(path):
            buffer += block
            while len(buffer) >= size:
                yield bytes(buffer[:size])
                del buffer[:size]
        if buffer:
            yield bytes(buffer)
        return
    try:
        with open_compressed(path) as f:
            while block := f.read(size):  # a buffered read returns `size` bytes until the end
                yield block
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None


def is_binary(path: str) -> bool:
    """Git's rule: a NUL byte in the first 8000 bytes (of the decompressed text). Parquet is not text."""
    if kind_of(path) == "parquet":
        return False
    head = next(read_blocks(path, 8000), b"")
    return b"\0" in head


def find_files(paths: list[str], out: str) -> tuple[list[str], int, int]:
    """Text, JSON Lines and parquet files under `paths` (not under `out`), sorted, each real file
    once; and how many binary files and non-regular entries (FIFOs, devices, sockets, broken links:
    never opened) were skipped. Folders are walked as `--data FOLDER` walks them (data.text_files_under)."""
    out = os.path.join(os.path.realpath(out), "")
    found, special = set(), 0
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder")
        if os.path.isdir(path):
            files, skipped = data.text_files_under(path)
            found.update(os.path.realpath(f) for f in files)
            special += skipped
        elif os.path.isfile(path):  # a regular file (after following links)
            found.add(os.path.realpath(path))
        else:
            raise ValueError(f"{path}: not a regular file nor a folder; give text files or folders")
    text, binary = [], 0
    for f in sorted(f for f in found if not f.startswith(out)):  # never read our own output back
        if is_binary(f):
            binary += 1
        else:
            text.append(f)
    return text, binary, special


def file_pieces(path: str) -> Iterator[bytes]:
    """A file's bytes in pieces of about PIECE_BYTES, each cut after a newline (or, in a line longer
    than that, before a UTF-8 lead byte), so every piece decodes on its own; a file that fits in one
    piece is one piece, tokenized exactly as the whole text."""
    blocks = read_blocks(path, PIECE_BYTES)
    block = next(blocks, b"")
    while block:
        following = next(blocks, b"")
        if not following:
            yield block
            return
        cut = block.rfind(b"\n") + 1 or data.char_boundary(block, len(block) - 4)
        yield block[:cut]
        block = block[cut:] + following


def lines(path: str) -> Iterator[bytes]:
    """A file's lines (decompressed), each with its newline but the last; one line in memory at a time."""
    pending: list[bytes] = []  # the blocks of a line longer than a block, joined once it ends
    for block in read_blocks(path):
        end = block.rfind(b"\n") + 1
        if not end:
            pending.append(block)
            continue
        yield from (b"".join(pending) + block[:end]).splitlines(keepends=True)
        pending = [block[end:]]
    if any(pending):
        yield b"".join(pending)


def record_text(record: object, field: str, where: str) -> bytes:
    """The UTF-8 bytes of a record's --text-field string."""
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{where}: no string field {field!r} (--text-field) in this record")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: field {field!r} holds a lone surrogate, not text") from None


def jsonl_records(path: str, field: str) -> Iterator[tuple[str, bytes]]:
    """(file:line, UTF-8 text) of every record of a JSON Lines file; blank lines are skipped."""
    for number, line in enumerate(lines(path), 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not a JSON record ({e})") from None
        except RecursionError:  # json recurses once per level of nesting
            raise ValueError(f"{where}: a JSON record nested too deeply to read") from None
        yield where, record_text(record, field, where)


def parquet_records(path: str, field: str) -> Iterator[tuple[str, bytes]]:
    """(file:row, UTF-8 text) of every row of a parquet file's --text-field column, ROW_BATCH rows
    at a time (never the whole file), with the optional pyarrow."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs the pyarrow package; "
                         f"pip install -r requirements-extras.txt") from None
    try:
        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise ValueError(f"{path}: no column {field!r} (--text-field); it has "
                             f"{', '.join(table.schema_arrow.names)}")
        row = 0
        for batch in table.iter_batches(batch_size=ROW_BATCH, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield f"{path}:row {row}", record_text({field: text}, field, f"{path}:row {row}")
    except pyarrow.ArrowException as e:  # pyarrow's own errors; ours (plain ValueError) pass as they are
        raise ValueError(f"{path}: not a parquet file or damaged ({e})") from None


def text_size(path: str) -> int:
    """Bytes of a text file's text: its size, or for a compressed file the count of a pass over it."""
    if path.endswith(COMPRESSED):
        return sum(len(block) for block in read_blocks(path))
    return os.path.getsize(path)


def documents(files: list[str], field: str, sizes: dict[str, int]) -> Iterator[tuple[str, int, Iterator[bytes]]]:
    """(where, UTF-8 bytes, pieces) of every document, in order: a text file is one, a JSON Lines
    record or parquet row is one. `sizes` holds each text file's size (text_size)."""
    for path in files:
        kind = kind_of(path)
        if kind == "text":
            yield path, sizes[path], file_pieces(path)
            continue
        records = parquet_records(path, field) if kind == "parquet" else jsonl_records(path, field)
        for where, text in records:
            yield where, len(text), iter([text])


# ------------------------------------------------------------------------ the split
def route(pieces: Iterator[bytes], keep: int) -> Iterator[tuple[int, bytes]]:
    """(split, piece) for a document's pieces: its first `keep` bytes (moved to a character boundary)
    are split 0 (train), the rest split 1 (val)."""
    offset = 0
    for piece in pieces:
        if offset < keep < offset + len(piece):
            cut = data.char_boundary(piece, keep - offset)
            yield 0, piece[:cut]
            yield 1, piece[cut:]
        else:
            yield (0 if offset < keep else 1), piece
        offset += len(piece)


def split_documents(files: list[str], field: str, sizes: dict[str, int], total: int, fraction: float
                    ) -> Iterator[tuple[str, int, bytes | None]]:
    """(where, split, piece) over the corpus; piece None marks the end of a document's part in a split."""
    holdout = data.HoldOut(total, fraction)
    for where, size, pieces in documents(files, field, sizes):
        if size == 0:
            continue
        keep = holdout.train_bytes(size)
        last, held = None, 0
        for split, piece in route(pieces, keep):
            if last is not None and split != last:
                yield where, last, None  # the train head of a cut document ends here
            if piece:
                yield where, split, piece
            held += len(piece) if split else 0
            last = split
        holdout.count(held)
        if last is not None:
            yield where, last, None


# ----------------------------------------------------------------------- tokenizers
def train_bpe(stream: Iterator[tuple[str, int, bytes | None]], vocab_size: int, total: int):
    """A byte-level BPE (tokenizers) trained on the train pieces of `stream`; eos <|endoftext|> is id 0."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tqdm import tqdm
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's byte-level split into words, then each word cut into pieces of at most MAX_PIECE_BYTES
    # characters (one character per byte after ByteLevel): a shorter word is one piece, as before.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        pre_tokenizers.Split(Regex(f"[\\s\\S]{{1,{MAX_PIECE_BYTES}}}"), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes
    with tqdm(total=total, desc="train bpe", unit="B", unit_scale=True, file=sys.stderr, mininterval=1) as bar:

        def train_texts() -> Iterator[str]:
            for where, split, piece in stream:
                if piece is not None:
                    bar.update(len(piece))
                    if split == 0:
                        yield utf8(piece, where)

        tokenizer.train_from_iterator(train_texts(), trainer)
    return tokenizer


def utf8(piece: bytes, where: str) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason}); convert it "
                         f"or use --tokenizer bytes") from None


def eos_of(tokenizer, path: str) -> int:
    """The end-of-document id of a given tokenizer.json: the first of data.EOS_NAMES it holds."""
    eos_id = data.find_eos_id(tokenizer)
    if eos_id is None:
        raise ValueError(f"--tokenizer {path}: it holds none of the end-of-document tokens "
                         f"{', '.join(data.EOS_NAMES)}; add one")
    return eos_id


def byte_ids(piece: bytes, where: str) -> np.ndarray:
    if data.BYTE_EOS_ID in piece:
        raise ValueError(f"{where}: holds a NUL byte, the end-of-document token of --tokenizer bytes; remove it "
                         f"or use --tokenizer bpe")
    return np.frombuffer(piece, dtype=np.uint8)


# -------------------------------------------------------------------------- outputs
class SplitFile:
    """One split's token file, appended to as documents stream in, with the counts meta.json states."""

    def __init__(self, path: str, dtype: str):
        self.file = open(path, "wb")
        self.dtype = dtype
        self.tokens = self.max_id = self.bytes = 0

    def append(self, ids: np.ndarray, text_bytes: int) -> None:
        if len(ids):
            self.file.write(ids.astype(self.dtype).tobytes())
            self.tokens += len(ids)
            self.max_id = max(self.max_id, int(ids.max()))
        self.bytes += text_bytes


def tokenize(stream: Iterator[tuple[str, int, bytes | None]], encode: Callable[[bytes, str], np.ndarray],
             eos_id: int, splits: tuple[SplitFile, SplitFile], total: int) -> None:
    """Append every piece's ids to its split, and eos after every document part."""
    from tqdm import tqdm
    eos = np.array([eos_id])
    with tqdm(total=total, desc="tokenize", unit="B", unit_scale=True, file=sys.stderr, mininterval=1) as bar:
        for where, split, piece in stream:
            if piece is None:
                splits[split].append(eos, 0)
            else:
                splits[split].append(encode(piece, where), len(piece))
                bar.update(len(piece))


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.val_fraction < 1:  # also refuses nan
        raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.tokenizer == "bpe" and (args.vocab_size is None or not 257 <= args.vocab_size <= MAX_BPE_VOCAB):
        raise ValueError(f"--tokenizer bpe needs --vocab-size between 257 (256 bytes and eos) and "
                         f"{MAX_BPE_VOCAB:,}, got {args.vocab_size}")
    if args.tokenizer != "bpe" and args.vocab_size is not None:
        raise ValueError("--vocab-size is for --tokenizer bpe; bytes have 256, a tokenizer.json its own")
    if args.tokenizer not in ("bytes", "bpe") and not os.path.isfile(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer}: give bytes, bpe or the path of a tokenizer.json")


def given_tokenizer(path: str):
    """The tokenizers.Tokenizer of a --tokenizer PATH, checked before any work (the Rust side raises
    a bare Exception for a file that is not JSON or not a tokenizer)."""
    Tokenizer = data.import_tokenizers().Tokenizer
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"--tokenizer {path}: not a tokenizer.json ({e})") from None
    eos_of(tokenizer, path)
    return tokenizer


def prepare(args: argparse.Namespace, files: list[str], folder: str, given) -> dict:
    """Write train.bin, val.bin (and tokenizer.json) of `files` into `folder`; return meta.json."""
    sizes = {f: text_size(f) for f in files if kind_of(f) == "text"}  # one pass over compressed text
    total = sum(size for _, size, _ in documents(files, args.text_field, sizes))  # also checks every record
    if total == 0:
        raise ValueError("a split is empty (the documents hold no text); give more text")

    def stream() -> Iterator[tuple[str, int, bytes | None]]:  # each pass replays the same split
        return split_documents(files, args.text_field, sizes, total, args.val_fraction)

    tokenizer, tokenizer_name = given, "bytes"
    if args.tokenizer == "bpe":
        tokenizer = train_bpe(stream(), args.vocab_size, total)
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
    elif tokenizer is not None:
        shutil.copyfile(args.tokenizer, os.path.join(folder, "tokenizer.json"))
    if tokenizer is None:
        vocab, eos_id, encode = 256, data.BYTE_EOS_ID, byte_ids
    else:
        tokenizer_name = "tokenizer.json"
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        eos_id = tokenizer.token_to_id(EOS_TOKEN) if args.tokenizer == "bpe" else eos_of(tokenizer, args.tokenizer)
        if args.tokenizer == "bpe" and vocab < args.vocab_size:
            print(f"note: the BPE vocabulary has {vocab:,} tokens, fewer than --vocab-size {args.vocab_size:,}: "
                  f"every word of the training text is already one token; meta.json says {vocab:,}",
                  file=sys.stderr)

        def encode(piece: bytes, where: str) -> np.ndarray:
            return np.array(tokenizer.encode(utf8(piece, where), add_special_tokens=False).ids, dtype=np.int64)

    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    splits = SplitFile(os.path.join(folder, "train.bin"), dtype), SplitFile(os.path.join(folder, "val.bin"), dtype)
    try:
        tokenize(stream(), encode, eos_id, splits, total)
    finally:
        for s in splits:
            s.file.close()
    train, val = splits
    if train.bytes == 0 or val.bytes == 0:
        raise ValueError(f"a split is empty ({train.bytes} train / {val.bytes} val bytes); "
                         f"give more text or another --val-fraction")
    return {"vocab_size": vocab, "dtype": dtype, "tokenizer": tokenizer_name, "eos_id": eos_id, "bos_id": None,
            "tokens": {"train": train.tokens, "val": val.tokens}, "max_id": {"train": train.max_id, "val": val.max_id},
            "bytes": {"train": train.bytes, "val": val.bytes}}


# ------------------------------------------------------------------------ --out
def is_our_output(folder: str, names: list[str]) -> bool:
    """Whether a folder is an earlier output of this script: only OUTPUTS, with a meta.json of ours."""
    if "meta.json" not in names or not set(names) <= set(OUTPUTS):
        return False
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and {"vocab_size", "dtype", "tokenizer", "tokens"} <= set(meta)


def check_out(out: str, overwrite: bool) -> None:
    """--out is new, an empty folder, or (with --overwrite) an earlier output of this script."""
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"--out {out}: {ancestor} is a file, not a folder")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a folder")
    names = sorted(os.listdir(out))
    if not names:
        return
    if not is_our_output(out, names):
        raise ValueError(f"--out {out} already holds files that are not an output of prepare_data.py "
                         f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); give a new or empty folder")
    if not overwrite:
        raise ValueError(f"--out {out} already holds prepared data ({', '.join(names)}); give --overwrite to "
                         f"replace it, or another folder")


def make_work_folder(out: str) -> tuple[str, str | None]:
    """A temporary folder beside --out to write into, and the topmost parent folder made for it (or None)."""
    parent = os.path.dirname(os.path.abspath(out))
    made = None
    if not os.path.exists(parent):
        made = parent
        while not os.path.exists(os.path.dirname(made)):
            made = os.path.dirname(made)
        os.makedirs(parent)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".part", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; --out gets a plain folder's mode
    return work, made


def remove_work(work: str | None, made: str | None, out: str) -> None:
    """Undo make_work_folder: the work folder, and the parent folders it made while still empty."""
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    folder = os.path.dirname(os.path.abspath(out))
    while made is not None and len(folder) >= len(made):  # innermost first, up to the topmost made
        try:
            os.rmdir(folder)
        except OSError:
            return  # not empty, or gone already
        folder = os.path.dirname(folder)


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text, JSON Lines (.jsonl) and parquet files (.gz, .zst too) "
                                             "and/or folders of them")
    p.add_argument("--out", required=True, help="folder to write train.bin, val.bin, meta.json (and tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of this script in --out")
    p.add_argument("--val-fraction", type=float, default=data.VAL_FRACTION, help="share of the text's bytes held out")
    p.add_argument("--tokenizer", default="bytes", help="bytes, bpe (trained here) or the path of a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=None, help="tokens of the BPE vocabulary (--tokenizer bpe)")
    p.add_argument("--text-field", default="text", help="the field of a JSON Lines record, or the parquet column, "
                                                       "that holds its text")
    args = p.parse_args()

    work = made = None
    try:
        check_args(args)
        check_out(args.out, args.overwrite)
        given = None
        if args.tokenizer == "bpe":
            data.import_tokenizers()  # the missing extra is an error before any work
        elif args.tokenizer != "bytes":
            given = given_tokenizer(args.tokenizer)
        files, skipped, special = find_files(args.inputs, args.out)
        if not files:
            raise ValueError(f"no text files in {' '.join(args.inputs)} ({skipped} binary files and "
                             f"{special} special files skipped)")
        work, made = make_work_folder(args.out)
        meta = prepare(args, files, work, given)
        with open(os.path.join(work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        outputs.swap_in(work, args.out)  # an earlier output (--overwrite) goes only once the new one is in place
    except (ValueError, OSError) as e:  # DataError is a ValueError
        remove_work(work, made, args.out)  # a failed run leaves no trace
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(files)} files ({skipped} binary and {special} special files skipped), {args.tokenizer} "
          f"tokenizer, vocab {meta['vocab_size']}: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} "
          f"val tokens, {meta['bytes']['val'] / (meta['bytes']['train'] + meta['bytes']['val']):.2%} of the bytes "
          f"held out -> {args.out}")


if __name__ == "__main__":
    main()
