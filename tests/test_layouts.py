"""Parallel layouts against one process: TP, PP, EP, DP and their products, two torchrun nodes,
the dispatcher's all-to-all, gradient buckets during backward."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint as ckpt_io
import minimal_pretrain as mp
from moe_layers import MoETransformer
from parallel_layers import ModelParallel
from helpers import (assert_same_training, free_port, HERE, parity_run, PARITY_STEPS, shared_parity_run, smoke,
                     tiny_config, TINY_FLAGS, train_records)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Single-process references: global batch 8 sequences = 2 per micro-batch x 4 micro-batches."""
    tmp = tmp_path_factory.mktemp("one_process")
    return {"interval1": shared_parity_run(tmp_path_factory, 1, [], 4)[1],  # also the reference of other files
            "interval2": parity_run(tmp, "interval2", 1, [], 4, ["--moe-layer-interval", "2"]),
            "narrow": parity_run(tmp, "narrow", 1, [], 4, ["--moe-ffn-hidden-size", "16"])}


# name: (ranks, layout flags, micro-batches per DP rank, reference, extra flags)
LAYOUTS = {
    "dp2": (2, [], 2, "interval1", []),
    "tp2_ep2": (2, ["--tensor-parallel-size", "2"], 4, "interval1", []),
    "ep2_over_dp2": (2, ["--expert-parallel-size", "2"], 2, "interval1", []),
    "pp2_1f1b_4mb": (2, ["--pipeline-parallel-size", "2"], 4, "interval1", []),
    "dp2_tp2_ep4": (4, ["--tensor-parallel-size", "2", "--expert-parallel-size", "4"], 2, "interval1", []),
    "tp2_pp2_dp2_ep2": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], 2, "interval1", []),
    "pp2_moe_interval2": (2, ["--pipeline-parallel-size", "2"], 4, "interval2", ["--moe-layer-interval", "2"]),
    # experts narrower than the model (F 16 < D 32): the routing weights scale the hidden h and travel
    # to the expert's rank with their rows
    "ep2_over_dp2_narrow_experts": (2, ["--expert-parallel-size", "2"], 2, "narrow", ["--moe-ffn-hidden-size", "16"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, one_process, tmp_path_factory):
    """Each layout's run is shared (shared_parity_run) with the distributed optimizer's tests, which
    compare against the same layout without the flag."""
    nproc, layout, micro, ref, extra = LAYOUTS[name]
    worst = assert_same_training(one_process[ref], shared_parity_run(tmp_path_factory, nproc, layout, micro, extra)[1])
    print(f"{name}: max relative loss difference {worst:.2e}")


def test_two_torchrun_nodes_on_loopback_train_together(one_process, tmp_path):
    """Two launches with --nnodes 2 on 127.0.0.1 form one DP2 job equal to one process."""
    port = str(free_port())
    out = tmp_path / "two_nodes"
    args = TINY_FLAGS + ["--max-steps", str(PARITY_STEPS), "--num-microbatches", "2",
                         "--metrics-file", str(out) + ".jsonl", "--save", str(out), "--dist-timeout", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               os.path.join(HERE, "minimal_pretrain.py")] + args
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    two_nodes = (train_records(str(out) + ".jsonl"), ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(out))))
    assert_same_training(one_process["interval1"], two_nodes)


def _dispatch_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    """One rank of the dispatcher test: tokens go to their expert's rank and come back in order."""
    import torch.distributed as dist
    from moe_layers import combine_from_experts, dispatch_to_experts
    torch.set_num_threads(1)  # one thread a rank: the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    e_local, num_experts = 2, 2 * world
    # Uneven, rank-dependent counts; expert 1 never receives a token from anyone.
    counts = torch.tensor([(rank + e) % 4 if e != 1 else 0 for e in range(num_experts)])
    rows = int(counts.sum())
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts), counts)
    # Row value encodes (source rank, row index, expert) so every row can be traced.
    x = torch.stack([torch.tensor([rank, i, int(expert_of_row[i])], dtype=torch.float32) for i in range(rows)]) \
        if rows else torch.zeros(0, 3)
    par = ModelParallel(ep_group=dist.group.WORLD, ep_rank=rank, ep_size=world)
    got, local_counts, plan = dispatch_to_experts(x, counts, par)
    # Grouped by local expert, each row must belong to that expert of this rank.
    owner = torch.repeat_interleave(torch.arange(e_local), local_counts) + rank * e_local
    ok_owner = bool((got[:, 2] == owner.float()).all())
    expected_rows = sum(((r + e) % 4 if e != 1 else 0) for r in range(world) for e in range(rank * e_local,
                                                                                           (rank + 1) * e_local))
    ok_count = got.shape[0] == expected_rows
    # "Expert" = scale by (expert id + 1); the combine must return rows in the sender's order.
    back = combine_from_experts(got * (got[:, 2:3] + 1), plan, par)
    ok_back = torch.equal(back, x * (x[:, 2:3] + 1))
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump({"owner": ok_owner, "count": ok_count, "back": ok_back}, f)
    dist.destroy_process_group()


def test_dispatcher_routes_rows_to_owner_and_back_in_order(tmp_path):
    import torch.multiprocessing as tmp_mp
    world = 3
    tmp_mp.spawn(_dispatch_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for r in range(world):
        assert json.load(open(tmp_path / f"{r}.json")) == {"owner": True, "count": True, "back": True}


@smoke
def test_gradient_buckets_are_launched_during_the_last_backward():
    """The overlap: every bucket's reduction starts from hooks inside backward, before finish()."""
    model = MoETransformer(tiny_config(), seed=0)
    params = list(model.parameters())
    reducer = mp.OverlappedGradReduce(params, group=None, size=1, scale=0.5, bucket_bytes=4096)
    assert len(reducer.buckets) > 5
    x = torch.randint(0, 64, (2, 8))
    model(x).output.sum().backward()  # an earlier micro-batch: accumulates only
    assert reducer.work == {}
    first = [p.grad.clone() for p in params]
    reducer.arm()
    model(x).output.sum().backward()  # the last micro-batch
    assert sorted(reducer.work) == list(range(len(reducer.buckets)))  # all launched inside backward
    reducer.finish()
    for p, g in zip(params, first):
        assert torch.allclose(p.grad, g * 2 * 0.5)  # two equal backwards accumulated, then scaled


def test_head_dim_under_tp2_and_pp2_matches_one_process(tmp_path):
    """Attention 4 x 16 = 64 wide over hidden 32: TP2 splits the heads as before; both layouts train as one process."""
    wide = ["--head-dim", "16"]
    reference = parity_run(tmp_path, "one", 1, [], 4, wide)
    for name, layout in (("tp2", ["--tensor-parallel-size", "2"]), ("pp2", ["--pipeline-parallel-size", "2"])):
        worst = assert_same_training(reference, parity_run(tmp_path, name, 2, layout, 4, wide))
        print(f"head-dim {name}: max relative loss difference {worst:.2e}")
    assert reference[1]["layers.0.self_attn.q_proj.weight"].shape == (64, 32)
