"""The distributed optimizer (ZeRO-1): state per rank, parity with one process and with the layout
without it, exact resume and resharding of its checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from parallel_layers import placement

import launch
import minimal_pretrain as mp
import optim
from helpers import (_assert_continues_like, assert_same_training, free_port, interrupted_at_3, parity_run, run_cli,
                     run_for_resume, shared_parity_run, tiny_config, TINY_FLAGS, tokens, train_records, without_timing)


# ---- distributed optimizer (issue 11) ----
ZERO1 = ["--use-distributed-optimizer"]


def _optimizer_state_worker(rank: int, world: int, port: int, result_dir: str, dtype: str) -> None:
    """One rank of DP4 x EP2 with the distributed optimizer: one step, then count the state it holds."""
    import torch.distributed as dist
    torch.set_num_threads(1)  # one thread a rank: the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mc, tc = tiny_config(), launch.TrainConfig(dtype=dtype, expert_parallel_size=2, use_distributed_optimizer=True)
    pg = mp.build_process_groups(launch.resolve_layout(mc, tc, world, rank))
    cpu, autocast = torch.device("cpu"), torch.bfloat16 if dtype == "bfloat16" else None
    model = mp.build_model(mc, tc, pg, cpu, autocast)
    reducers = mp.build_grad_reducers(model, pg, distributed_optimizer=True)
    opt = optim.build_optimizer(model, tc.lr, tc.weight_decay, buckets=mp.flat_buckets(reducers))
    x = tokens(64, (2, 16), seed=rank)
    _, _, applied = mp.train_step(model, opt, reducers, [(x, x)], pg, mc, tc, cpu, autocast, 0)
    is_expert = {id(m): placement(piece.param).expert
                 for fb in opt.buckets for piece, m in zip(fb.pieces, fb.masters)}
    held = {"dense": 0, "expert": 0}
    for m, state in opt.state.items():
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == m.shape
        held["expert" if is_expert[id(m)] else "dense"] += state["exp_avg"].numel()
    pieces = [(piece, m) for fb in opt.buckets for piece, m in zip(fb.pieces, fb.masters)]
    copies = sum(m.numel() for piece, m in pieces
                 if m.untyped_storage().data_ptr() != piece.param.untyped_storage().data_ptr())
    bf16_pieces = sum(m.numel() for piece, m in pieces if piece.param.dtype == torch.bfloat16)
    weights = {kind: sum(p.numel() for p in model.parameters() if placement(p).expert == expert)
               for kind, expert in (("dense", False), ("expert", True))}
    padding = {kind: sum(fb.numel - fb.offsets[-1] for fb in mp.flat_buckets(reducers)
                         if placement(fb.params[0]).expert == (kind == "expert"))
               for kind in ("dense", "expert")}
    with open(os.path.join(result_dir, f"{dtype}_{rank}.json"), "w") as f:
        json.dump({"applied": applied, "held": held, "weights": weights, "padding": padding, "master_copies": copies,
                   "bf16_pieces": bf16_pieces, "buckets": len(opt.buckets)}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_distributed_optimizer_state_per_rank_is_the_total_over_its_sharers(dtype, tmp_path):
    """DP4 x EP2: each rank holds 1/4 of the dense weights' moments and 1/2 of its experts' (each
    expert is on 2 ranks), within one bucket's padding; summed over the ranks, every element once.
    bf16 weights also get fp32 masters for exactly the elements whose moments the rank holds."""
    import torch.multiprocessing as tmp_mp
    world = 4
    tmp_mp.spawn(_optimizer_state_worker, args=(world, free_port(), str(tmp_path), dtype), nprocs=world, join=True)
    ranks = [json.load(open(tmp_path / f"{dtype}_{r}.json")) for r in range(world)]
    for r in ranks:
        assert r["applied"] and r["buckets"] == 2  # one dense and one expert bucket in the tiny model
        for kind, sharers in (("dense", 4), ("expert", 2)):
            share = r["weights"][kind] / sharers
            assert share - r["padding"][kind] <= r["held"][kind] <= share, (kind, r)
            assert r["padding"][kind] < sharers
        # fp32 weights are their own masters (views, no copy); bf16 weights (all but the fp32
        # routers) get an fp32 copy of exactly the pieces whose moments the rank holds
        assert r["master_copies"] == r["bf16_pieces"]
        assert r["bf16_pieces"] == 0 if dtype == "float32" else \
            r["bf16_pieces"] > 0.9 * (r["held"]["dense"] + r["held"]["expert"])
    assert sum(r["held"]["dense"] for r in ranks) == ranks[0]["weights"]["dense"]
    assert sum(r["held"]["expert"] for r in ranks) == 2 * ranks[0]["weights"]["expert"]  # 2 EP ranks' experts


@pytest.fixture(scope="module")
def zero1_reference(tmp_path_factory):
    """One process, global batch 8 = 2 per micro-batch x 4 micro-batches."""
    return shared_parity_run(tmp_path_factory, 1, [], 4)[1]


# name: (ranks, layout flags, micro-batches per DP rank)
ZERO1_LAYOUTS = {
    "dp2": (2, [], 2),
    "dp4_ep2": (4, ["--expert-parallel-size", "2"], 1),  # experts sharded over their 2 replicas
    "tp2_dp2": (4, ["--tensor-parallel-size", "2"], 2),
    "pp2_dp2": (4, ["--pipeline-parallel-size", "2"], 2),
    "tp2_pp2_dp2": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], 2),
}


@pytest.mark.parametrize("name", list(ZERO1_LAYOUTS))
def test_distributed_optimizer_matches_one_process_and_the_layout_without_it(name, zero1_reference, tmp_path,
                                                                            tmp_path_factory):
    """Losses within 1e-6 of the same layout without the flag. Weights within 1e-5 (0.1% of an AdamW
    step): over 4 ranks gloo's reduce-scatter sums in another order than its all-reduce, and Adam
    scales such rounding up for weights whose gradient is nearly zero (see assert_same_training)."""
    nproc, layout, micro = ZERO1_LAYOUTS[name]
    sharded = parity_run(tmp_path, name + "_zero1", nproc, layout, micro, ZERO1)
    worst = assert_same_training(zero1_reference, sharded)
    same = assert_same_training(shared_parity_run(tmp_path_factory, nproc, layout, micro)[1], sharded, rel=1e-6,
                                weight_atol=1e-5)
    print(f"{name} --use-distributed-optimizer: vs one process {worst:.2e}, vs the same layout without it {same:.2e}")


def test_distributed_optimizer_at_dp1_changes_nothing_and_says_so(tmp_path, capsys):
    mp.main(TINY_FLAGS + ["--max-steps", "2", "--metrics-file", str(tmp_path / "plain.jsonl")])
    capsys.readouterr()
    mp.main(TINY_FLAGS + ZERO1 + ["--max-steps", "2", "--metrics-file", str(tmp_path / "flag.jsonl")])
    assert "changes nothing at DP 1" in capsys.readouterr().out
    assert without_timing(train_records(str(tmp_path / "flag.jsonl"))) == \
        without_timing(train_records(str(tmp_path / "plain.jsonl")))


def test_distributed_optimizer_with_muon_exits_2_with_one_error_line():
    r = run_cli(TINY_FLAGS + ZERO1 + ["--max-steps", "2", "--optimizer", "muon"], timeout=60)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--use-distributed-optimizer" in errors[0] and "whole" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


TP2 = ["--tensor-parallel-size", "2"]


@pytest.fixture(scope="module")
def zero1_full_runs(tmp_path_factory):
    """Uninterrupted 6-step runs saving at 3 and 6: TP2 x DP2 with the flag, DP2 without it."""
    tmp = tmp_path_factory.mktemp("zero1_full_runs")
    return tmp, {"tp2_dp2_zero1": run_for_resume(tmp, "tp2_dp2_zero1", 4, TP2 + ZERO1, 2),
                 "dp2": run_for_resume(tmp, "dp2", 2, [], 2)}


def test_resume_with_the_distributed_optimizer_is_exact(zero1_full_runs, tmp_path):
    tmp, runs = zero1_full_runs
    shutil.copytree(tmp / "tp2_dp2_zero1", tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 4, TP2 + ZERO1, 2, load=interrupted_at_3(tmp_path / "ck"))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert without_timing(resumed) == without_timing(runs["tp2_dp2_zero1"][3:])  # bitwise


# case: (saved run, ranks, layout flags of the resumed run, micro-batches)
ZERO1_RESHARDS = {
    "flag_on_to_off": ("tp2_dp2_zero1", 4, TP2, 2),
    "flag_off_to_on": ("dp2", 2, ZERO1, 2),
    "flag_on_to_pp2_dp2_on": ("tp2_dp2_zero1", 4, ["--pipeline-parallel-size", "2"] + ZERO1, 2),
    "flag_on_to_one_process": ("tp2_dp2_zero1", 1, [], 4),
}


@pytest.mark.parametrize("case", list(ZERO1_RESHARDS))
def test_distributed_optimizer_checkpoints_reshard(case, zero1_full_runs, tmp_path):
    tmp, runs = zero1_full_runs
    saved, nproc, layout, micro = ZERO1_RESHARDS[case]
    shutil.copytree(tmp / saved, tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", nproc, layout, micro, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(runs[saved], resumed)
    print(f"{case}: max relative loss difference {worst:.2e}")
