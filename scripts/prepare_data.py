"""Turn text files or folders into train.bin / val.bin / meta.json for `minimal_pretrain.py --data`.

    python scripts/prepare_data.py my_corpus/ --out data/mine
    python scripts/prepare_data.py a.txt b.txt notes/ --out data/mix --val-fraction 0.05
    python minimal_pretrain.py --data data/mine

Tokens are bytes (vocabulary 256), written as uint16 like nanoGPT's train.bin / val.bin, with
meta.json = {"vocab_size": 256, "tokenizer": "bytes", ...}. Folders are walked as `--data FOLDER`
walks them (data.text_files_under): links followed, each real file once (a link to a file already
found, or a folder linked into itself, adds nothing), regular files only (FIFOs, devices, sockets,
broken links are skipped and counted, never opened), .bin and .json files left out. Files that
look binary (a NUL byte in their first 8000 bytes, git's rule) are skipped and counted.
Validation split, deterministic:
  several files  every k-th file of the sorted list is held out, k = round(1 / --val-fraction)
                 (the last file when there are fewer than k), so no file is in both splits;
  one file       its last --val-fraction of bytes is held out.
Bad input (a missing path, nothing to read, an empty split, an --out that already holds one of
the three files) prints one `error:` line, exit 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from minimal_pretrain import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)

OUTPUTS = ("train.bin", "val.bin", "meta.json")


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


def split(files: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Byte tokens of the train and val splits, and the files held out (none for one file)."""
    if len(files) == 1:
        data = np.fromfile(files[0], dtype=np.uint8)
        cut = len(data) - int(len(data) * val_fraction)
        return data[:cut], data[cut:], []
    k = round(1 / max(val_fraction, 1 / len(files)))  # k > the number of files holds out the last file
    held = [f for i, f in enumerate(files) if i % k == k - 1] or files[-1:]
    train = [f for f in files if f not in set(held)]

    def read(fs: list[str]) -> np.ndarray:
        return np.concatenate([np.fromfile(f, dtype=np.uint8) for f in fs])

    return read(train), read(held), held


def write(out: str, files: dict[str, bytes | np.ndarray]) -> None:
    """Write every file as NAME.part, then rename them all: a failure leaves no half-written split."""
    os.makedirs(out, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(out, name + ".part"), "wb") as f:
            f.write(content)
    for name in files:
        os.replace(os.path.join(out, name + ".part"), os.path.join(out, name))


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files and/or folders of text files")
    p.add_argument("--out", required=True, help="folder to write train.bin, val.bin and meta.json into")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation")
    args = p.parse_args()

    try:
        if not 0 < args.val_fraction < 1:  # also refuses nan
            raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a file; give a folder")
        taken = [n for n in OUTPUTS if os.path.lexists(os.path.join(args.out, n))]
        if taken:
            raise ValueError(f"--out {args.out} already holds {', '.join(taken)}; choose another folder "
                             f"(nothing is overwritten)")
        files, skipped, special = find_files(args.inputs, args.out)
        if not files:
            raise ValueError(f"no text files in {' '.join(args.inputs)} ({skipped} binary files and "
                             f"{special} special files skipped)")
        train, val, held = split(files, args.val_fraction)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"a split is empty ({len(train)} train / {len(val)} val bytes); "
                             f"give more text or another --val-fraction")
        meta = {"vocab_size": 256, "tokenizer": "bytes", "dtype": "uint16",
                "train_tokens": int(len(train)), "val_tokens": int(len(val)),
                "inputs": [os.path.abspath(i) for i in args.inputs], "files": len(files),
                "binary_files_skipped": skipped, "special_files_skipped": special, "val_files": held,
                "split": "whole files, every k-th held out" if held else "tail of the file"}
        write(args.out, {"train.bin": train.astype(np.uint16), "val.bin": val.astype(np.uint16),
                         "meta.json": json.dumps(meta, indent=1).encode()})
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(files)} files ({skipped} binary and {special} special files skipped, {len(held)} held out): "
          f"{len(train):,} train / {len(val):,} val tokens -> {args.out}")


if __name__ == "__main__":
    main()
