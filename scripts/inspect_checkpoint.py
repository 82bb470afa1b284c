"""Print what a checkpoint holds: step, layout, configs and every tensor's full shape.

    python scripts/inspect_checkpoint.py out/ckpt            # follows `latest`
    python scripts/inspect_checkpoint.py out/ckpt/step_00000200
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a --save folder or one of its step folders")
    args = parser.parse_args()
    try:
        ckpt = ckpt_io.read_checkpoint(args.path)
    except ckpt_io.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    meta = ckpt.meta
    print(f"checkpoint: {ckpt.path}")
    print(f"step: {meta['step']} (skipped non-finite steps: {meta.get('skipped_steps', 0)})")
    layout = meta["layout"]
    print(f"layout: world {layout['world_size']} = PP {layout['pp']} x DP {layout['dp']} x TP {layout['tp']}, "
          f"EP {layout['ep']} ({len(meta['files'])} files)")
    print(f"model: {json.dumps(meta['model'])}")
    print(f"train: {json.dumps(meta['train'])}")
    total = 0
    print("tensors (full shape, slices written, AdamW state):")
    for name in sorted(ckpt.params, key=lambda n: (n.split(".")[0] != "embed_tokens", n)):
        full = ckpt_io.assemble(ckpt.params[name])
        total += full.numel()
        slices = len(ckpt.params[name])
        optim = "yes" if name in ckpt.optim else "no"
        print(f"  {name:55s} {str(tuple(full.shape)):18s} {slices} slice(s)  adam {optim}")
    print(f"parameters: {total:,}")


if __name__ == "__main__":
    main()
