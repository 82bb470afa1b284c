"""Peak resident memory of loading a checkpoint: an 8-rank checkpoint read on 8 ranks and on 1.

    torchrun --nproc_per_node=8 scripts/bench_load.py --write out/bench_load    # TP2 x PP4, EP2
    python scripts/bench_load.py out/bench_load                                # prints the table

--write saves one step of a model whose weights dominate memory (random AdamW moments, so the
files are full size) through checkpoint.save_checkpoint, as the trainer's ranks do. Reading starts
a fresh process per reading rank (one at a time, so they do not compete for the CPU) that builds
its slice of the model, opens the checkpoint and loads it, and reports its peak resident memory
(VmHWM) before and after loading: on 8 ranks (TP2 x PP4, each holds an eighth), on 1 rank (the
whole model), and as the previous loader did, each file read whole (torch.load without mmap).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint as ckpt_io  # noqa: E402
from moe_layers import ModelConfig, MoETransformer  # noqa: E402
from parallel_layers import Layout, ModelParallel, stage_layers  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=512, num_layers=8, num_attention_heads=8, num_kv_heads=4,
             ffn_hidden_size=2048, moe_ffn_hidden_size=1024, num_experts=8, num_experts_per_token=2, seq_length=256)
TP, PP, EP = 2, 4, 2


def vm_hwm() -> int:
    """Peak resident set of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def rank_parallel(mc: ModelConfig, rank: int, tp: int, pp: int, ep: int, world: int) -> tuple[ModelParallel, int, int]:
    """(ModelParallel, dp rank, rank within the stage) of `rank`, numbered as the trainer numbers ranks."""
    stage, in_stage = divmod(rank, world // pp)
    start, end = stage_layers(mc.num_layers, pp, stage)
    return (ModelParallel(tp_rank=in_stage % tp, tp_size=tp, ep_rank=in_stage % ep, ep_size=ep, layer_start=start,
                          layer_end=end, first_stage=stage == 0, last_stage=stage == pp - 1), in_stage // tp, in_stage)


def write(root: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == TP * PP, f"launch {TP * PP} ranks"
    mc = ModelConfig(**MODEL)
    par, dp_rank, in_stage = rank_parallel(mc, rank, TP, PP, EP, world)
    model = MoETransformer(mc, par, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # moments of the saved size, as after a step
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 1, "model": MODEL, "train": {},
            "layout": {"world_size": world, "tp": TP, "pp": PP, "dp": 1, "ep": EP}}
    ckpt_io.save_checkpoint(root, 1, ckpt_io.rank_payload(model, opt, Layout(world_size=world, tp=TP, pp=PP, ep=EP, rank=rank)), meta,
                            rank, world)
    dist.destroy_process_group()


def read_as(root: str, rank: int, world: int, whole: bool) -> None:
    """One reading rank: build its slice and optimizer, then load; print JSON figures."""
    mc = ModelConfig(**MODEL)
    tp, pp, ep = (TP, PP, EP) if world > 1 else (1, 1, 1)
    par, _, _ = rank_parallel(mc, rank, tp, pp, ep, world)
    model = MoETransformer(mc, par, seed=1)
    opt = torch.optim.AdamW(model.parameters())
    before = vm_hwm()
    ckpt = ckpt_io.read_checkpoint(root)
    # the previous loader held every file whole in memory while it loaded
    held = [torch.load(os.path.join(ckpt.path, f), map_location="cpu", weights_only=True)
            for f in ckpt.meta["files"]] if whole else []
    ckpt_io.load_into(ckpt, model, opt)
    after = vm_hwm()
    own = sum(p.numel() * p.element_size() * 3 for p in model.parameters())  # weights + two moments
    print(json.dumps({"rank": rank, "before": before, "after": after, "own": own, "files_held": len(held)}))


def read(root: str) -> None:
    step_dir = ckpt_io.resolve(root)
    files = sum(os.path.getsize(os.path.join(step_dir, f)) for f in os.listdir(step_dir) if f.endswith(".pt"))
    mib = 2**20
    print(f"checkpoint {step_dir}: {files / mib:.0f} MiB in {TP * PP} rank files (TP{TP} x PP{PP}, EP{EP}); "
          f"model {MODEL}")
    print("peak resident memory (VmHWM) per process: after building its model slice and optimizer, and after loading")
    print(f"{'readers':>34} {'rank':>4} {'before MiB':>10} {'after MiB':>10} {'load adds MiB':>13} {'slice+moments MiB':>17}")
    for label, world, whole in (("8 ranks (TP2 x PP4), mmap", 8, False), ("1 rank, mmap", 1, False),
                                ("8 ranks, each file read whole", 8, True)):
        for rank in range(world):
            out = subprocess.run([sys.executable, __file__, "--read-as", str(rank), "--world", str(world), root]
                                 + (["--whole"] if whole else []), capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{label:>34} {rank:>4} {r['before'] / mib:>10.0f} {r['after'] / mib:>10.0f} "
                  f"{(r['after'] - r['before']) / mib:>13.0f} {r['own'] / mib:>17.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("root", help="the checkpoint folder to write, or to read: loading measured on 8 ranks, on 1, "
                                "and with every file read whole")
    p.add_argument("--write", action="store_true", help="write the checkpoint (under torchrun, 8 ranks)")
    p.add_argument("--read-as", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write:
        write(args.root)
    elif args.read_as >= 0:
        read_as(args.root, args.read_as, args.world, args.whole)
    else:
        read(args.root)


if __name__ == "__main__":
    main()
