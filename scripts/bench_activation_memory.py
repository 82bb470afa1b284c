"""Activation memory per rank with and without sequence parallelism, measured on CPU ranks.

    python scripts/bench_activation_memory.py                   # TP 1, 2 and 4, SP off and on
    python scripts/bench_activation_memory.py --tp 2 --seq-length 128

For each layout it spawns TP ranks (gloo, one process each), builds each rank's slice of the same
model (EP = TP, as the trainer's default) and runs one micro-batch's forward and loss. A
saved-tensor hook records every tensor autograd keeps for backward; the bytes of the distinct
storages among them, weights and buffers left out, are what that rank holds until its backward.
The table gives the largest rank's bytes beside memory.py's estimate (what --dry-run prints).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as torch_mp  # noqa: E402

import memory  # noqa: E402
from launch import TrainConfig, resolve_layout  # noqa: E402
from moe_layers import ModelConfig, MoETransformer  # noqa: E402
from parallel_layers import lm_head_cross_entropy, ModelParallel  # noqa: E402


def saved_bytes(model: MoETransformer, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward and loss, weights and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, head=False)  # as the trainer runs it: the loss applies the LM head
        loss = lm_head_cross_entropy(out.output, model.lm_head, ids, model.par)
        loss = loss + out.aux_loss + out.z_loss
    del loss, out
    return sum(kept.values())


def rank_worker(rank: int, tp: int, sp: bool, port: int, model_kw: dict, batch: int, out_dir: str) -> None:
    """One TP rank: its slice of the model, one micro-batch, the bytes it keeps, written as JSON."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    group = dist.new_group(list(range(tp)))  # the TP group (and the EP group: EP = TP)
    par = ModelParallel(tp_group=group, tp_rank=rank, tp_size=tp, ep_group=group, ep_rank=rank, ep_size=tp,
                        sequence_parallel=sp)
    mc = ModelConfig(**model_kw)
    model = MoETransformer(mc, par, seed=0)
    ids = torch.randint(0, mc.vocab_size, (batch, mc.seq_length), generator=torch.Generator().manual_seed(0))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(saved_bytes(model, ids), f)
    dist.destroy_process_group()


def measure(tp: int, sp: bool, model_kw: dict, batch: int) -> list[int]:
    """Bytes kept by each rank of a TP group of `tp` ranks, with or without sequence parallelism."""
    with tempfile.TemporaryDirectory() as out_dir, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        torch_mp.spawn(rank_worker, args=(tp, sp, port, model_kw, batch, out_dir), nprocs=tp)
        return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(tp)]


def estimate(mc: ModelConfig, tp: int, sp: bool, batch: int) -> int:
    """memory.py's activations of one micro-batch on a rank (fp32, expert loop): --dry-run's figure."""
    tc = TrainConfig(tensor_parallel_size=tp, sequence_parallel=sp, micro_batch_size=batch)
    return memory.activation_bytes(mc, resolve_layout(mc, tc, tp), stage=0, el=4, grouped=False).per_microbatch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP sizes to measure")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    args = p.parse_args()
    model_kw = dict(vocab_size=256, hidden_size=args.hidden_size, num_layers=args.num_layers,
                    num_attention_heads=8, num_kv_heads=4, ffn_hidden_size=4 * args.hidden_size,
                    moe_ffn_hidden_size=2 * args.hidden_size, num_experts=args.num_experts, num_experts_per_token=2,
                    moe_layer_interval=2, seq_length=args.seq_length)
    mc = ModelConfig(**model_kw)
    print(f"model: {json.dumps(model_kw)}; micro-batch {args.micro_batch_size} x {args.seq_length} tokens; fp32 "
          f"on the CPU (expert loop), EP = TP; torch {torch.__version__}")
    print("| layout | measured, largest rank | memory.py estimate | vs. the same TP without SP |")
    print("| --- | --- | --- | --- |")
    for tp in args.tp:
        without = None
        for sp in ([False, True] if tp > 1 else [False]):
            kept = max(measure(tp, sp, model_kw, args.micro_batch_size))
            est = estimate(mc, tp, sp, args.micro_batch_size)
            name = f"TP{tp}" + (" + SP" if sp else "")
            ratio = f"{kept / without:.2f}x" if sp else "-"
            print(f"| {name} | {kept / 2**20:.2f} MiB | {est / 2**20:.2f} MiB ({(est - kept) / kept:+.1%}) | {ratio} |",
                  flush=True)
            without = kept


if __name__ == "__main__":
    main()
