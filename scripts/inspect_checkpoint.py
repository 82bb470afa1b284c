"""Print what a checkpoint holds: step, layout, configs and every tensor's full shape.

    python scripts/inspect_checkpoint.py out/ckpt            # follows `latest`
    python scripts/inspect_checkpoint.py out/ckpt/step_00000200

A folder that is not a whole, readable checkpoint is one `error:` line, exit 2, and nothing else.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ckpt_io  # noqa: E402
from launch import ArgumentParser  # noqa: E402  (one `error:` line, exit 2)


def describe(path: str) -> list[str]:
    """The lines to print; raises on a checkpoint that cannot be read whole, before anything is printed."""
    ckpt = ckpt_io.read_checkpoint(path)
    meta = ckpt.meta
    layout = meta["layout"]
    lines = [f"checkpoint: {ckpt.path}",
             f"step: {meta['step']} (skipped non-finite steps: {meta.get('skipped_steps', 0)})",
             f"layout: world {layout['world_size']} = PP {layout['pp']} x DP {layout['dp']} x TP {layout['tp']}, "
             f"EP {layout['ep']} ({len(meta['files'])} files)",
             f"model: {json.dumps(meta['model'])}",
             f"train: {json.dumps(meta['train'])}",
             "tensors (full shape, slices written, optimizer state):"]
    total = 0
    for name in sorted(ckpt.params, key=lambda n: (n.split(".")[0] != "embed_tokens", n)):
        full = ckpt_io.assemble(ckpt.params[name])
        total += full.numel()
        slices = len(ckpt.params[name])
        state = ckpt.optim.get(name, [{}])[0]
        optim = "muon" if "momentum_buffer" in state else "adamw" if "exp_avg" in state else "none"
        lines.append(f"  {name:55s} {str(tuple(full.shape)):18s} {slices} slice(s)  {optim}")
    return lines + [f"parameters: {total:,}"]


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a --save folder or one of its step folders")
    args = parser.parse_args()
    try:
        if not os.path.isdir(args.path):
            raise ckpt_io.CheckpointError(f"{args.path}: no such folder; give a --save folder or a step folder")
        lines = describe(args.path)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, TypeError) as e:  # a meta.json missing an entry or holding one of another type
        print(f"error: {args.path}: not a checkpoint of this trainer ({type(e).__name__}: {e})", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
