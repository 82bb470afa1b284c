"""Turn text files, folders and JSON Lines into train.bin / val.bin / meta.json for `minimal_pretrain.py --data`.

    python scripts/prepare_data.py my_corpus/ --out data/mine                              # bytes
    python scripts/prepare_data.py my_corpus/ --out data/bpe --tokenizer bpe --vocab-size 4096
    python scripts/prepare_data.py crawl.jsonl --out data/crawl --tokenizer bpe --vocab-size 32000 --text-field body
    python scripts/prepare_data.py a.txt notes/ --out data/mix --tokenizer path/to/tokenizer.json
    python minimal_pretrain.py --data data/mine

Documents: a text file is one document, a JSON Lines file (`.jsonl`) one per record (its
--text-field, a string; a record that is not an object holding one is an error naming file:line).
Folders are walked as `--data FOLDER` walks them (data.text_files_under): links followed, each real
file once, regular files only (FIFOs, devices, sockets, broken links are skipped and counted,
never opened), .bin and .json files left out; files with a NUL byte in their first 8000 bytes
(git's rule for binary) are skipped and counted. Inputs are taken in sorted order.
Tokenizers (--tokenizer):
  bytes  (default) ids are the UTF-8 bytes, vocab 256, eos 0 (NUL): text never holds a NUL (a
         document that does is refused), and keeping vocab 256 keeps byte data, the built-in corpus
         and byte checkpoints interchangeable (a run on one can --load a run on the other);
  bpe    a byte-level BPE of --vocab-size tokens trained here on the training split with the
         `tokenizers` library (ByteLevel pre-tokenizer and decoder, all 256 bytes in the initial
         alphabet, so no byte is ever unknown), eos `<|endoftext|>` = id 0; written as tokenizer.json;
  PATH   an existing tokenizer.json, copied into --out; eos is the first of its tokens named in
         data.EOS_NAMES (<|endoftext|>, </s>, ...).
The eos id follows every document (meta.json "eos_id"); no bos is written ("bos_id": null).
Split rule (deterministic, one pass, no document in both splits unless it must be cut): documents
are taken in order and each goes whole to the split that leaves the held-out bytes closer to
--val-fraction x the bytes seen so far (error diffusion, as in Floyd-Steinberg dithering), so the
val share follows the fraction whatever the file sizes and val documents are spread over the whole
corpus, not its tail. When neither whole choice keeps the held-out bytes within SPLIT_TOLERANCE of
the target (a few huge files, or one), the document's tail is held out instead, cut at a UTF-8
character boundary, so that the held-out bytes hit the target (each part ends with eos). The
held-out share of the text's bytes thus lies within SPLIT_TOLERANCE x --val-fraction of the fraction.
Streaming: a document is read in pieces of PIECE_BYTES cut after a newline, tokenized and appended
to the .bin files, so memory does not grow with the corpus; BPE training reads the same stream.
The same inputs and flags give byte-identical outputs. Token files are uint16 when the vocabulary
fits (<= 65,536), else uint32. meta.json is DESIGN.md's: vocab_size, dtype, tokenizer, eos_id,
bos_id, tokens / max_id / bytes per split ("bytes": UTF-8 bytes of text, for bits per byte).
Bad input (a missing path, nothing to read, an empty split, a bad record, non-UTF-8 text for a
text tokenizer, an --out that already holds one of the outputs) prints one `error:` line, exit 2,
and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Callable, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

OUTPUTS = ("train.bin", "val.bin", "meta.json", "tokenizer.json")
EOS_TOKEN = data.EOS_NAMES[0]  # <|endoftext|>: the eos the BPE trainer adds
PIECE_BYTES = 8 << 20  # a document is read and tokenized this many bytes at a time (cut after a newline)
SPLIT_TOLERANCE = 0.1  # the held-out share lies within +-10% of --val-fraction


# --------------------------------------------------------------------------- inputs
def find_files(paths: list[str], out: str) -> tuple[list[str], int, int]:
    """Text files under `paths` (not under `out`), sorted, each real file once; and how many binary
    files and non-regular entries (FIFOs, devices, sockets, broken links: never opened) were skipped.
    Folders are walked as `--data FOLDER` walks them (data.text_files_under)."""
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
        with open(f, "rb") as fh:
            if b"\0" in fh.read(8000):
                binary += 1
            else:
                text.append(f)
    return text, binary, special


def file_pieces(path: str) -> Iterator[bytes]:
    """A file's bytes in pieces of about PIECE_BYTES, each cut after a newline (or, in a line longer
    than that, before a UTF-8 lead byte), so every piece decodes on its own; a file that fits in one
    piece is one piece, tokenized exactly as the whole text."""
    with open(path, "rb") as f:
        block = f.read(PIECE_BYTES)
        while block:
            following = f.read(PIECE_BYTES)
            if not following:
                yield block
                return
            cut = block.rfind(b"\n") + 1 or char_boundary(block, len(block) - 4)
            yield block[:cut]
            block = block[cut:] + following


def char_boundary(text: bytes, at: int) -> int:
    """The first index >= `at` (clamped to the text) that starts a UTF-8 character."""
    at = max(0, min(at, len(text)))
    while at < len(text) and 0x80 <= text[at] < 0xC0:  # continuation bytes never start a character
        at += 1
    return at


def jsonl_records(path: str, field: str) -> Iterator[tuple[str, bytes]]:
    """(file:line, UTF-8 text) of every record of a JSON Lines file; blank lines are skipped."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not a JSON record ({e})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{where}: no string field {field!r} (--text-field) in this record")
            try:
                yield where, text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: field {field!r} holds a lone surrogate, not text") from None


def documents(files: list[str], field: str) -> Iterator[tuple[str, int, Iterator[bytes]]]:
    """(where, UTF-8 bytes, pieces) of every document, in order: a file is one, a .jsonl record is one."""
    for path in files:
        if path.endswith(".jsonl"):
            for where, text in jsonl_records(path, field):
                yield where, len(text), iter([text])
        else:
            yield path, os.path.getsize(path), file_pieces(path)


# ------------------------------------------------------------------------ the split
class HoldOut:
    """Which tail of each document is held out for validation (the split rule of the docstring)."""

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


def route(pieces: Iterator[bytes], keep: int) -> Iterator[tuple[int, bytes]]:
    """(split, piece) for a document's pieces: its first `keep` bytes (moved to a character boundary)
    are split 0 (train), the rest split 1 (val)."""
    offset = 0
    for piece in pieces:
        if offset < keep < offset + len(piece):
            cut = char_boundary(piece, keep - offset)
            yield 0, piece[:cut]
            yield 1, piece[cut:]
        else:
            yield (0 if offset < keep else 1), piece
        offset += len(piece)


def split_documents(files: list[str], field: str, total: int, fraction: float
                    ) -> Iterator[tuple[str, int, bytes | None]]:
    """(where, split, piece) over the corpus; piece None marks the end of a document's part in a split."""
    holdout = HoldOut(total, fraction)
    for where, size, pieces in documents(files, field):
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tqdm import tqdm
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
    if args.tokenizer == "bpe" and (args.vocab_size is None or args.vocab_size < 257):
        raise ValueError(f"--tokenizer bpe needs --vocab-size of at least 257 (256 bytes and eos), "
                         f"got {args.vocab_size}")
    if args.tokenizer != "bpe" and args.vocab_size is not None:
        raise ValueError("--vocab-size is for --tokenizer bpe; bytes have 256, a tokenizer.json its own")
    if args.tokenizer not in ("bytes", "bpe") and not os.path.isfile(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer}: give bytes, bpe or the path of a tokenizer.json")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a folder")
    taken = [n for n in OUTPUTS if os.path.lexists(os.path.join(args.out, n))]
    if taken:
        raise ValueError(f"--out {args.out} already holds {', '.join(taken)}; choose another folder "
                         f"(nothing is overwritten)")


def prepare(args: argparse.Namespace, files: list[str], parts: dict[str, str]) -> dict:
    """Write the .part files of every output (names in `parts`); return meta.json."""
    total = sum(size for _, size, _ in documents(files, args.text_field))  # also checks every record first
    if total == 0:
        raise ValueError("a split is empty (the documents hold no text); give more text")

    def stream() -> Iterator[tuple[str, int, bytes | None]]:  # each pass replays the same split
        return split_documents(files, args.text_field, total, args.val_fraction)

    tokenizer_name, tokenizer = "bytes", None
    if args.tokenizer == "bpe":
        tokenizer = train_bpe(stream(), args.vocab_size, total)
    elif args.tokenizer != "bytes":
        tokenizer = data.import_tokenizers().Tokenizer.from_file(args.tokenizer)
    if tokenizer is None:
        vocab, eos_id, encode = 256, data.BYTE_EOS_ID, byte_ids
    else:
        tokenizer_name = "tokenizer.json"
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        eos_id = tokenizer.token_to_id(EOS_TOKEN) if args.tokenizer == "bpe" else eos_of(tokenizer, args.tokenizer)
        if args.tokenizer == "bpe":
            tokenizer.save(parts["tokenizer.json"])
        else:
            shutil.copyfile(args.tokenizer, parts["tokenizer.json"])

        def encode(piece: bytes, where: str) -> np.ndarray:
            return np.array(tokenizer.encode(utf8(piece, where), add_special_tokens=False).ids, dtype=np.int64)

    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    splits = SplitFile(parts["train.bin"], dtype), SplitFile(parts["val.bin"], dtype)
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


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files, JSON Lines files (.jsonl) and/or folders of them")
    p.add_argument("--out", required=True, help="folder to write train.bin, val.bin, meta.json (and tokenizer.json)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text's bytes held out")
    p.add_argument("--tokenizer", default="bytes", help="bytes, bpe (trained here) or the path of a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=None, help="tokens of the BPE vocabulary (--tokenizer bpe)")
    p.add_argument("--text-field", default="text", help="the field of a JSON Lines record that holds its text")
    args = p.parse_args()

    parts = {n: os.path.join(args.out, n + ".part") for n in OUTPUTS}
    created = not os.path.exists(args.out)
    try:
        check_args(args)
        if args.tokenizer != "bytes":
            data.import_tokenizers()  # the missing extra is an error before any work
        files, skipped, special = find_files(args.inputs, args.out)
        if not files:
            raise ValueError(f"no text files in {' '.join(args.inputs)} ({skipped} binary files and "
                             f"{special} special files skipped)")
        os.makedirs(args.out, exist_ok=True)
        meta = prepare(args, files, parts)
        with open(parts["meta.json"], "w") as f:
            json.dump(meta, f, indent=1)
        for name, part in parts.items():  # all written: now rename, meta.json last
            if name != "meta.json" and os.path.exists(part):
                os.replace(part, os.path.join(args.out, name))
        os.replace(parts["meta.json"], os.path.join(args.out, "meta.json"))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        for part in parts.values():
            if os.path.exists(part):
                os.remove(part)
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # a refusal leaves no trace
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(files)} files ({skipped} binary and {special} special files skipped), {args.tokenizer} "
          f"tokenizer, vocab {meta['vocab_size']}: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} "
          f"val tokens, {meta['bytes']['val'] / (meta['bytes']['train'] + meta['bytes']['val']):.2%} of the bytes "
          f"held out -> {args.out}")


if __name__ == "__main__":
    main()
