"""Sequence parallelism: parity with one process, checkpoints with and without it, its refusals,
its activation estimate and the gather-then-project building block."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from moe_layers import ModelConfig
from parallel_layers import ModelParallel
from helpers import (assert_clean_refusal, assert_same_training, free_port, parity_run, refusal_in_process, run_cli,
                     shared_parity_run, SP, TINY_FLAGS)


# Routing decisions that read a token's global index in the micro-batch: capacity ties, the
# sequence of a token (sequence-wise aux loss) and its jitter noise; shared experts gather too.
SP_GLOBAL_INDEX_FLAGS = ["--moe-capacity-factor", "1.0", "--router-aux-loss-type", "sequence",
                         "--router-jitter-noise", "0.1", "--num-shared-experts", "1"]


@pytest.fixture(scope="module")
def sp_references(tmp_path_factory):
    """One-process runs (8 sequences per step) and the folder of their checkpoints."""
    tmp = tmp_path_factory.mktemp("sp_references")
    return tmp, {"plain": shared_parity_run(tmp_path_factory, 1, [], 4)[1],  # shared with other files
                 "global_index": parity_run(tmp, "global_index", 1, [], 4, SP_GLOBAL_INDEX_FLAGS),
                 "layers4": parity_run(tmp, "layers4", 1, [], 4, ["--num-layers", "4"]),
                 "expert_choice": parity_run(tmp, "expert_choice", 1, [], 4, ["--router-type", "expert-choice"])}


@pytest.fixture(scope="module")
def tp2_sp_run(tmp_path_factory):
    """TP2 + SP, 4 micro-batches of 2 sequences: the same global batch; and its checkpoint's folder."""
    tmp = tmp_path_factory.mktemp("tp2_sp")
    return tmp, parity_run(tmp, "tp2_sp", 2, SP, 4)


def test_tp2_sequence_parallel_matches_one_process(sp_references, tp2_sp_run):
    worst = assert_same_training(sp_references[1]["plain"], tp2_sp_run[1])
    print(f"tp2_sp: max relative loss difference {worst:.2e}")


# name: (ranks, layout flags, micro-batches per DP rank, reference, extra flags)
SP_LAYOUTS = {
    "tp2_pp2_dp2_sp": (8, SP + ["--pipeline-parallel-size", "2"], 2, "plain", []),
    "tp2_sp_capacity_sequence_jitter_shared": (2, SP, 4, "global_index", SP_GLOBAL_INDEX_FLAGS),
    # interleaved 1F1B carries the (B, T/TP, D) slices between chunks: 2 chunks of 1 layer per rank
    "tp2_pp2_sp_interleaved": (4, SP + ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "1"], 4,
                               "layers4", ["--num-layers", "4"]),
    # EP spanning DP: each rank dispatches the tokens of its sequence slice to 4 expert ranks
    "dp2_tp2_ep4_sp": (4, SP + ["--expert-parallel-size", "4"], 2, "plain", []),
    # the norms' partial gradients summed over TP on the distributed optimizer's shards
    "dp2_tp2_sp_distributed_optimizer": (4, SP + ["--use-distributed-optimizer"], 2, "plain", []),
    # experts pick their tokens among the whole micro-batch's, numbered globally
    "tp2_sp_expert_choice": (2, SP, 4, "expert_choice", ["--router-type", "expert-choice"]),
}


@pytest.mark.parametrize("name", list(SP_LAYOUTS))
def test_sequence_parallel_matches_one_process(name, sp_references, tmp_path):
    nproc, layout, micro, ref, extra = SP_LAYOUTS[name]
    worst = assert_same_training(sp_references[1][ref], parity_run(tmp_path, name, nproc, layout, micro, extra))
    print(f"{name}: max relative loss difference {worst:.2e}")


def eval_only_loss(checkpoint: Path, nproc: int, layout: list[str]) -> float:
    r = run_cli(["--load", str(checkpoint), "--eval-only", "--eval-iters", "2", "--no-progress",
                 "--dist-timeout", "60"] + layout, nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("eval-only:")][0]
    return float(line.split("val loss ")[1].split()[0])


def test_checkpoints_load_with_and_without_sequence_parallelism(sp_references, tp2_sp_run, tmp_path_factory):
    """SP changes no parameter: a TP2 + SP checkpoint evaluates on one process, and the one-process
    checkpoint under TP2 + SP, both to the one-process checkpoint's own validation loss."""
    reference_dir, sp_dir = shared_parity_run(tmp_path_factory, 1, [], 4)[0], tp2_sp_run[0]  # sp_references' plain
    want = eval_only_loss(reference_dir, 1, [])
    assert math.isclose(eval_only_loss(sp_dir / "tp2_sp", 1, []), want, rel_tol=1e-4)
    assert math.isclose(eval_only_loss(reference_dir, 2, SP), want, rel_tol=1e-4)


@pytest.mark.parametrize("flags,words", [
    (["--sequence-parallel"], "--tensor-parallel-size > 1"),
    (SP + ["--seq-length", "15"], "must divide --seq-length (15)"),
])
def test_sequence_parallel_without_tp_or_with_an_odd_sequence_exits_2_at_once(flags, words, capsys, monkeypatch):
    """In-process as rank 0 of 2 (no peer); the first case also as a real process."""
    argv = TINY_FLAGS + ["--max-steps", "2"] + flags
    start = time.time()
    assert words in refusal_in_process(argv, capsys, monkeypatch, 2)
    assert time.time() - start < 30
    if flags == ["--sequence-parallel"]:
        assert_clean_refusal(run_cli(argv, timeout=60, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}), words)


def test_sequence_parallel_activation_estimate_is_within_5_percent_of_what_2_ranks_keep():
    """memory.py's activations per TP rank, with and without SP, against saved-tensor hooks on 2 gloo ranks."""
    import bench_activation_memory as bench
    kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=8, num_kv_heads=4,
              ffn_hidden_size=256, moe_ffn_hidden_size=128, num_experts=8, num_experts_per_token=2,
              moe_layer_interval=2, seq_length=64)
    kept = {sp: max(bench.measure(2, sp, kw, 4)) for sp in (False, True)}
    for sp, measured in kept.items():
        estimate = bench.estimate(ModelConfig(**kw), 2, sp, 4)
        assert abs(estimate - measured) <= 0.05 * measured, (sp, estimate, measured)
    assert kept[True] < 0.9 * kept[False]


def _gather_then_project_worker(rank: int, port: int, result_dir: str) -> None:
    """Rank `rank` of TP2 + SP: q/k/v-like projections of its sequence slice through column_parallel."""
    import torch.distributed as dist
    from parallel_layers import ColumnParallelLinear, column_parallel
    torch.set_num_threads(1)  # one thread a rank: the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    par = ModelParallel(tp_group=dist.group.WORLD, tp_rank=rank, tp_size=2, sequence_parallel=True)
    torch.manual_seed(0)
    x, whole_weights = torch.randn(2, 8, 16), [torch.randn(12, 16), torch.randn(4, 16), torch.randn(4, 16)]
    layers = []
    for w in whole_weights:
        layer = ColumnParallelLinear(16, w.shape[0], par)
        layer.weight.data.copy_(w.chunk(2, dim=0)[rank])  # this rank's output rows
        layers.append(layer)
    result = {}
    for autocast in (False, True):
        x_slice = x[:, 4 * rank:4 * rank + 4].clone().requires_grad_(True)  # (B, T/TP, D)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                outs = column_parallel(x_slice, par, *layers)  # (B, T, out / TP) each
        sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        result[autocast] = {"outs": [o.detach().float() for o in outs], "x_grad": x_slice.grad,
                            "w_grads": [layer.weight.grad.clone() for layer in layers], "saved": saved}
        for layer in layers:
            layer.weight.grad = None
    torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_sequence_parallel_projections_equal_whole_sequence_matmuls_and_keep_only_the_slice(tmp_path):
    """column_parallel under SP against plain matmuls of the whole input on one process: outputs,
    dL/dx of each rank's slice and the weight gradients (fp32 to rounding, bf16 autocast within its
    precision); and autograd keeps the (B, T/TP, D) slice, never the gathered (B, T, D) input."""
    import torch.multiprocessing as tmp_mp
    tmp_mp.spawn(_gather_then_project_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    x, whole_weights = torch.randn(2, 8, 16), [torch.randn(12, 16), torch.randn(4, 16), torch.randn(4, 16)]
    x.requires_grad_(True)
    outs = [x @ w.T for w in whole_weights]  # (B, T, out): the reference, whole
    sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    for autocast, tol in ((False, 1e-5), (True, 5e-2)):
        for r, got in enumerate(ranks):
            got = got[autocast]
            for i, (o, want, w_grad, w) in enumerate(zip(got["outs"], outs, got["w_grads"], whole_weights)):
                rows = slice(r * w.shape[0] // 2, (r + 1) * w.shape[0] // 2)
                assert torch.allclose(o, want[..., rows].detach(), atol=tol * 10, rtol=tol)
                # dL/dW = sum over all B x T positions of (i + 1) x_t: the whole sequence, from a slice
                want_grad = (i + 1) * x.detach().sum((0, 1)).expand(w.shape[0] // 2, 16)
                assert torch.allclose(w_grad, want_grad, atol=tol * 10, rtol=tol)
            assert torch.allclose(got["x_grad"], x.grad[:, 4 * r:4 * r + 4], atol=tol * 10, rtol=tol)
            # the slice (B, T/TP, D) and this rank's weights: no gathered (B, T, D) tensor
            assert sorted(got["saved"]) == sorted([2 * 4 * 16] + [w.numel() // 2 for w in whole_weights])
