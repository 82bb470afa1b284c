"""Turn text files or folders into train.bin / val.bin / meta.json for `minimal_pretrain.py --data`.

    python scripts/prepare_data.py my_corpus/ --out data/mine
    python scripts/prepare_data.py a.txt b.txt notes/ --out data/mix --val-fraction 0.05
    python minimal_pretrain.py --data data/mine

Tokens are bytes (vocabulary 256), written as uint16 like nanoGPT's train.bin / val.bin, with
meta.json = {"vocab_size": 256, "tokenizer": "bytes", ...}. Folders are searched recursively;
files that look binary (a NUL byte in their first 8000 bytes, git's rule) are skipped.
Validation split, deterministic:
  several files  every k-th file of the sorted list is held out, k = round(1 / --val-fraction)
                 (the last file when there are fewer than k), so no file is in both splits;
  one file       its last --val-fraction of bytes is held out.
Bad input (a missing path, nothing to read, an empty split) prints one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def find_files(paths: list[str], out: str) -> tuple[list[str], int]:
    """Text files under `paths` (not under `out`), sorted, each once; and how many binary files were skipped."""
    out = os.path.join(os.path.abspath(out), "")
    found = set()
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder")
        if os.path.isfile(path):
            found.add(os.path.abspath(path))
        for root, _, names in os.walk(path):
            found.update(os.path.abspath(os.path.join(root, n)) for n in names)
    text, skipped = [], 0
    for f in sorted(f for f in found if not f.startswith(out)):  # never read our own output back
        with open(f, "rb") as fh:
            if b"\0" in fh.read(8000):
                skipped += 1
            else:
                text.append(f)
    return text, skipped


def split(files: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Byte tokens of the train and val splits, and the files held out (none for one file)."""
    if len(files) == 1:
        data = np.fromfile(files[0], dtype=np.uint8)
        cut = len(data) - int(len(data) * val_fraction)
        return data[:cut], data[cut:], []
    k = max(1, round(1 / val_fraction))
    held = [f for i, f in enumerate(files) if i % k == k - 1] or files[-1:]
    train = [f for f in files if f not in set(held)]

    def read(fs: list[str]) -> np.ndarray:
        return np.concatenate([np.fromfile(f, dtype=np.uint8) for f in fs])

    return read(train), read(held), held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files and/or folders of text files")
    p.add_argument("--out", required=True, help="folder to write train.bin, val.bin and meta.json into")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation")
    args = p.parse_args()

    try:
        if not 0 < args.val_fraction < 1:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
        files, skipped = find_files(args.inputs, args.out)
        if not files:
            raise ValueError(f"no text files in {' '.join(args.inputs)} ({skipped} binary files skipped)")
        train, val, held = split(files, args.val_fraction)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"a split is empty ({len(train)} train / {len(val)} val bytes); "
                             f"give more text or another --val-fraction")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    os.makedirs(args.out, exist_ok=True)
    train.astype(np.uint16).tofile(os.path.join(args.out, "train.bin"))
    val.astype(np.uint16).tofile(os.path.join(args.out, "val.bin"))
    meta = {"vocab_size": 256, "tokenizer": "bytes", "dtype": "uint16",
            "train_tokens": int(len(train)), "val_tokens": int(len(val)),
            "inputs": [os.path.abspath(i) for i in args.inputs], "files": len(files),
            "binary_files_skipped": skipped, "val_files": held,
            "split": "whole files, every k-th held out" if held else "tail of the file"}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{len(files)} files ({skipped} binary skipped, {len(held)} held out): "
          f"{len(train):,} train / {len(val):,} val tokens -> {args.out}")


if __name__ == "__main__":
    main()
