"""Tests of the MoE toolkit. `python test_moe.py` runs the quick smoke set; `python -m pytest` all.

Every test compares against something independent of the code under test: a per-token loop,
a formula by hand, or a single-process run of the same flags (the parity backbone)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt_io
import data
import launch
import memory
import metrics as metrics_mod
import minimal_pretrain as mp
import optim
import parallel_layers
from moe_layers import (Assignments, Attention, ModelConfig, Experts, MoETransformer, MoETransformerBlock, RMSNorm,
                        RotaryEmbedding, SparseMoELayer, Router, ExpertLoop, layout_free_init_,
                        load_balancing_loss, router_z_loss)
from parallel_layers import Layout, ModelParallel, placement, stage_layers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "scripts"))
import export_hf  # noqa: E402  (scripts/: the extras are imported inside their functions)
import generate  # noqa: E402
import import_hf  # noqa: E402
import compare_optimizers  # noqa: E402
import compare_routing  # noqa: E402
import upcycle  # noqa: E402
smoke = pytest.mark.smoke


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=4, num_experts_per_token=2,
                seq_length=16)
    base.update(kw)
    return ModelConfig(**base)


def moe_layer(cfg: ModelConfig, seed: int = 0) -> SparseMoELayer:
    layer = SparseMoELayer(cfg, ModelParallel())
    layout_free_init_(layer, seed)
    return layer


# ------------------------------------------------------------- slow references
def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for one expert, weights as stored (D, F), (D, F), (F, D)."""
    gate = x @ w_gate
    return ((gate / (1 + torch.exp(-gate))) * (x @ w_up)) @ w_down


def reference_moe(layer: SparseMoELayer, x: torch.Tensor) -> torch.Tensor:
    """Per token: the router-weighted sum of its K experts applied to that token alone."""
    e = layer.experts
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        logits = token.float() @ layer.router.weight.float().T  # (E,)
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
        order = sorted(range(len(probs)), key=lambda i: -probs[i].item())[:layer.top_k]
        weights = torch.stack([probs[i] for i in order])
        if layer.router.normalize:
            weights = weights / weights.sum()
        acc = torch.zeros_like(token)
        for w, i in zip(weights, order):
            acc = acc + w * swiglu(token, e.w_gate[i], e.w_up[i], e.w_down[i])
        out.append(acc)
    return torch.stack(out).view_as(x)


# ----------------------------------------------------------------------- router
@smoke
def test_router_topk_equals_k_largest_logits():
    cfg = tiny_config(num_experts=8, num_experts_per_token=3)
    router = Router(cfg)
    layout_free_init_(router, 1)
    x = torch.randn(50, cfg.hidden_size)
    r = router(x)
    logits = (x @ router.weight.T).tolist()
    for n in range(50):
        expected = sorted(range(8), key=lambda i: -logits[n][i])[:3]
        assert r.indices[n].tolist() == expected


@smoke
def test_router_weights_sum_to_one_when_renormalised():
    x = torch.randn(40, 32)
    for normalize in (True, False):
        router = Router(tiny_config(num_experts=8, num_experts_per_token=2, norm_topk_prob=normalize))
        layout_free_init_(router, 2)
        r = router(x)
        sums = r.weights.sum(-1)
        if normalize:
            assert torch.allclose(sums, torch.ones(40), atol=1e-6)
        else:  # plain softmax probabilities of the chosen experts
            assert torch.allclose(r.weights, r.probs.gather(1, r.indices))
            assert (sums < 1).all()


@smoke
def test_router_math_is_fp32_under_bf16_autocast():
    router = Router(tiny_config())
    layout_free_init_(router, 3)
    x = torch.randn(10, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.logits.dtype == r.probs.dtype == r.weights.dtype == torch.float32
    expected = (x.float() @ router.weight.T).softmax(-1)
    assert torch.allclose(r.probs, expected, atol=1e-6)


# ---------------------------------------------------------------------- experts
@smoke
def test_expert_equals_handwritten_swiglu():
    cfg = tiny_config()
    experts = Experts(cfg, ModelParallel())
    layout_free_init_(experts, 4)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, cfg.hidden_size)
    y = experts(x, counts)
    start = 0
    for e, c in enumerate(counts.tolist()):
        rows = x[start:start + c]
        expected = swiglu(rows, experts.w_gate[e], experts.w_up[e], experts.w_down[e])
        assert torch.allclose(y[start:start + c], expected, atol=1e-6)
        start += c


@smoke
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 10, 0, 0]])
def test_grouped_and_loop_experts_match_reference_in_outputs_and_gradients(grouped, counts):
    """torch._grouped_mm also runs fp32 on the CPU, so both paths are checked here (zero-token
    experts, all rows on one expert, a non-contiguous incoming gradient)."""
    cfg = tiny_config(moe_ffn_hidden_size=24)
    experts = Experts(cfg, ModelParallel())
    layout_free_init_(experts, 4)
    experts.use_grouped_mm = grouped
    counts = torch.tensor(counts)
    x = torch.randn(10, cfg.hidden_size, requires_grad=True)
    y = experts(x, counts)
    g = torch.randn(cfg.hidden_size, 10).T  # non-contiguous, as after a transpose in the caller
    grads = torch.autograd.grad(y, [x, experts.w_gate, experts.w_up, experts.w_down], g)
    ref = torch.cat([swiglu(rows, experts.w_gate[e], experts.w_up[e], experts.w_down[e])
                     for e, rows in enumerate(x.split(counts.tolist()))])
    ref_grads = torch.autograd.grad(ref, [x, experts.w_gate, experts.w_up, experts.w_down], g)
    assert torch.allclose(y, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


# -------------------------------------------------------------------- MoE layer
@smoke
@pytest.mark.parametrize("top_k,normalize", [(1, True), (2, True), (2, False), (4, True)])
def test_moe_layer_matches_per_token_reference(top_k, normalize):
    cfg = tiny_config(num_experts=4, num_experts_per_token=top_k, norm_topk_prob=normalize)
    layer = moe_layer(cfg, 5)
    x = torch.randn(2, 7, cfg.hidden_size, requires_grad=True)
    y, _ = layer(x)
    ref = reference_moe(layer, x)
    assert torch.allclose(y, ref, atol=1e-5)
    # gradients of the inputs and of every weight match the reference's too
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(layer.parameters()), g)
    ref_grads = torch.autograd.grad(ref, [x] + list(layer.parameters()), g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


@smoke
def test_no_token_dropped_when_router_sends_all_tokens_to_one_expert():
    cfg = tiny_config(num_experts=4, num_experts_per_token=2)
    layer = moe_layer(cfg, 6)
    x = torch.randn(1, 32, cfg.hidden_size)
    direction = x.mean(dim=(0, 1))
    with torch.no_grad():  # every token now prefers expert 2, then expert 0
        layer.router.weight.zero_()
        layer.router.weight[2] = 2 * direction / direction.norm() ** 2
        layer.router.weight[0] = 1 * direction / direction.norm() ** 2
        x += 10 * direction  # the direction dominates each token: logits about 22, 11, 0, 0
    y, stats = layer(x)
    assert stats.counts.tolist() == [32, 0, 32, 0]  # every token got exactly its 2 experts
    assert torch.allclose(y, reference_moe(layer, x), atol=1e-5)


# ----------------------------------------------------------- routing methods
def run_layer(layer: SparseMoELayer, x: torch.Tensor):
    y, stats = layer(x)
    return y, stats


@smoke
def test_shared_expert_output_is_a_dense_swiglu_added_to_the_routed_output():
    cfg = tiny_config(num_shared_experts=2, shared_expert_ffn_hidden_size=8)
    layer = moe_layer(cfg, 11)
    x = torch.randn(2, 5, cfg.hidden_size)
    y, _ = layer(x)
    sh = layer.shared_experts
    shared = swiglu(x, sh.gate_proj.weight.T, sh.up_proj.weight.T, sh.down_proj.weight.T)
    assert sh.gate_proj.weight.shape == (16, cfg.hidden_size)  # 2 experts x 8 side by side
    assert torch.allclose(y, reference_moe(layer, x) + shared, atol=1e-5)


@smoke
def test_sigmoid_router_weights_are_normalised_sigmoid_scores_of_the_top_k():
    router = Router(tiny_config(num_experts=6, num_experts_per_token=2, router_score_function="sigmoid",
                                    norm_topk_prob=False))
    layout_free_init_(router, 12)
    x = torch.randn(20, 32)
    r = router(x)
    gates = 1 / (1 + torch.exp(-(x @ router.weight.T)))
    for n in range(20):
        best = sorted(range(6), key=lambda i: -gates[n, i].item())[:2]
        assert r.indices[n].tolist() == best
        expected = gates[n, best] / gates[n, best].sum()
        assert torch.allclose(r.weights[n], expected, atol=1e-6)


@smoke
def test_expert_bias_changes_the_choice_but_not_the_weights():
    router = Router(tiny_config(num_experts=4, num_experts_per_token=1, norm_topk_prob=False))
    layout_free_init_(router, 13)
    x = torch.randn(30, 32)
    with torch.no_grad():
        router.expert_bias[3] = 10.0  # far above any probability: every token now picks expert 3
    r = router(x)
    assert (r.indices == 3).all()
    assert torch.allclose(r.weights[:, 0], (x @ router.weight.T).softmax(-1)[:, 3])


@smoke
def test_bias_update_moves_each_expert_by_the_rate_against_its_load():
    cfg = tiny_config(num_layers=2, num_experts=4)
    model = MoETransformer(cfg)
    counts = torch.tensor([[10.0, 0.0, 5.0, 5.0], [1.0, 2.0, 3.0, 6.0]])  # means 5 and 3
    mp.update_expert_bias(model, cfg, counts, 0.5)
    assert model.layers["0"].mlp.router.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    assert model.layers["1"].mlp.router.expert_bias.tolist() == [0.5, 0.5, 0.0, -0.5]


def slow_capacity_keep(scores: torch.Tensor, indices: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per expert: list its assignments, keep the `capacity` with the highest scores."""
    keep = torch.zeros_like(indices, dtype=torch.bool)
    for e in range(int(indices.max()) + 1):
        mine = [(scores[t, j].item(), t, j) for t in range(indices.shape[0]) for j in range(indices.shape[1])
                if indices[t, j] == e]
        for _, t, j in sorted(mine, key=lambda m: -m[0])[:capacity]:
            keep[t, j] = True
    return keep


@smoke
def test_capacity_drops_exactly_the_lowest_scored_assignments():
    from moe_layers import capacity_keep_mask, priority
    torch.manual_seed(0)
    scores = (torch.randperm(80).float() / 80).view(40, 2)  # distinct scores, far apart
    indices = torch.stack([torch.randint(0, 3, (40,)), torch.randint(3, 5, (40,))], 1)  # 5 experts, uneven
    keys = priority(scores, torch.arange(40)[:, None], 40)
    for capacity in (1, 7, 16, 40):
        assert torch.equal(capacity_keep_mask(keys, indices, capacity, 5), slow_capacity_keep(scores, indices, capacity))
    # an exact tie goes to the earlier token, as the slow reference's stable sort does
    tied = torch.full((6, 1), 0.5)
    keep = capacity_keep_mask(priority(tied, torch.arange(6)[:, None], 6), torch.zeros(6, 1, dtype=torch.long), 2, 1)
    assert keep.view(-1).tolist() == [True, True, False, False, False, False]


@smoke
def test_capacity_layer_output_equals_reference_without_the_dropped_assignments():
    torch.manual_seed(0)  # no near-ties within the 2^-16 ranking quantum
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, moe_capacity_factor=0.5, norm_topk_prob=False)
    layer = moe_layer(cfg, 14)
    x = torch.randn(1, 24, cfg.hidden_size)
    y, stats = layer(x)
    r = layer.router(x.view(24, -1))
    capacity = math.ceil(0.5 * 24 * 2 / 4)
    keep = slow_capacity_keep(r.scores.gather(1, r.indices), r.indices, capacity)
    e = layer.experts
    expected = torch.zeros(24, cfg.hidden_size)
    for t in range(24):
        for j in range(2):
            if keep[t, j]:
                i = r.indices[t, j]
                expected[t] += r.weights[t, j] * swiglu(x[0, t], e.w_gate[i], e.w_up[i], e.w_down[i])
    assert torch.allclose(y[0], expected, atol=1e-5)
    assert stats.dropped.item() == (~keep).sum().item() > 0
    assert (stats.counts <= capacity).all() and stats.counts.sum() == keep.sum()


@smoke
def test_expert_choice_gives_each_expert_exactly_its_capacity_of_best_tokens():
    torch.manual_seed(0)  # no near-ties within the 2^-16 ranking quantum
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, router_type="expert-choice")
    layer = moe_layer(cfg, 15)
    x = torch.randn(1, 20, cfg.hidden_size)
    y, stats = layer(x)
    capacity = math.ceil(20 * 2 / 4)
    assert stats.counts.tolist() == [capacity] * 4
    probs = (x[0] @ layer.router.weight.T).softmax(-1)  # (N, E)
    e = layer.experts
    expected = torch.zeros(20, cfg.hidden_size)
    for i in range(4):
        for t in sorted(range(20), key=lambda t: -probs[t, i].item())[:capacity]:
            expected[t] += probs[t, i] * swiglu(x[0, t], e.w_gate[i], e.w_up[i], e.w_down[i])
    assert torch.allclose(y[0], expected, atol=1e-5)


@smoke
def test_round_robin_routing_is_perfectly_balanced():
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, router_type="round-robin")
    layer = moe_layer(cfg, 16)
    x = torch.randn(2, 6, cfg.hidden_size)
    y, stats = layer(x)
    assert stats.counts.tolist() == [6, 6, 6, 6]
    e = layer.experts
    expected = torch.stack([sum(0.5 * swiglu(tok, e.w_gate[i], e.w_up[i], e.w_down[i]) for i in ((2 * t) % 4,
                                                                                            (2 * t + 1) % 4))
                            for t, tok in enumerate(x.view(12, -1))])
    assert torch.allclose(y.view(12, -1), expected, atol=1e-5)


@smoke
def test_sequence_balancing_loss_by_hand():
    cfg = tiny_config(num_experts=2, num_experts_per_token=1, router_aux_loss_type="sequence")
    layer = moe_layer(cfg, 17)
    x = torch.randn(2, 3, cfg.hidden_size)  # 2 sequences of 3 tokens
    _, stats = layer(x)
    probs = (x.view(6, -1) @ layer.router.weight.T).softmax(-1)
    choice = probs.argmax(-1)
    expected = 0.0
    for s in range(2):
        rows = range(3 * s, 3 * s + 3)
        f = [sum(int(choice[t] == i) for t in rows) / 3 for i in range(2)]
        p = [sum(probs[t, i].item() for t in rows) / 3 for i in range(2)]
        expected += 2 * (f[0] * p[0] + f[1] * p[1]) / 2
    assert math.isclose(stats.aux_loss.item(), expected, rel_tol=1e-5)


@smoke
def test_global_batch_balancing_uses_the_given_global_frequencies():
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, router_aux_loss_type="global-batch")
    layer = moe_layer(cfg, 18)
    x = torch.randn(1, 10, cfg.hidden_size)
    layer.global_counts = torch.tensor([30, 10, 0, 40])
    _, stats = layer(x)
    p = (x[0] @ layer.router.weight.T).softmax(-1).mean(0)
    expected = 4 * sum(c / 80 * p[i].item() for i, c in enumerate([30, 10, 0, 40]))
    assert math.isclose(stats.aux_loss.item(), expected, rel_tol=1e-5)


@smoke
def test_jitter_changes_training_routing_inputs_only_with_a_seed_and_in_training():
    cfg = tiny_config(router_jitter_noise=0.5)
    layer = moe_layer(cfg, 19)
    x = torch.randn(1, 16, cfg.hidden_size)
    plain = layer(x)[0]
    a, b, c = layer(x, noise_seed=1)[0], layer(x, noise_seed=1)[0], layer(x, noise_seed=2)[0]
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, plain)
    layer.eval()
    assert torch.equal(layer(x, noise_seed=1)[0], plain)


ROUTING_METHODS = {
    "shared_sigmoid_bias_jitter_sequence": ["--num-shared-experts", "1", "--router-score-function", "sigmoid",
                                           "--router-bias-update-rate", "0.01", "--router-jitter-noise", "0.1",
                                           "--router-aux-loss-type", "sequence"],
    "global_batch_capacity": ["--router-aux-loss-type", "global-batch", "--moe-capacity-factor", "1.0"],
    "expert_choice": ["--router-type", "expert-choice"],
    "round_robin": ["--router-type", "round-robin"],
}
# layout name: (ranks, flags, micro-batches per DP rank)
METHOD_LAYOUTS = {"dp2_ep2": (2, ["--expert-parallel-size", "2"], 2),
                  "pp2": (2, ["--pipeline-parallel-size", "2"], 4),
                  "tp2": (2, ["--tensor-parallel-size", "2"], 4)}


@pytest.fixture(scope="module")
def method_references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    return {m: parity_run(tmp, m, 1, [], 4, flags) for m, flags in ROUTING_METHODS.items()}


# Every method under DP2 x EP2 and PP2; TP2 only changes whole-micro-batch decisions
# (capacity, expert choice), so those two run under TP2 as well.
METHOD_CASES = [(m, lay) for m in ROUTING_METHODS for lay in ("dp2_ep2", "pp2")] + \
    [("global_batch_capacity", "tp2"), ("expert_choice", "tp2")]


@pytest.mark.parametrize("method,layout", METHOD_CASES)
def test_routing_method_matches_one_process(method, layout, method_references, tmp_path):
    nproc, flags, micro = METHOD_LAYOUTS[layout]
    run = parity_run(tmp_path, f"{method}_{layout}", nproc, flags, micro, ROUTING_METHODS[method])
    worst = assert_same_training(method_references[method], run)
    print(f"{method} on {layout}: max relative loss difference {worst:.2e}")


def test_router_bias_survives_a_checkpoint_round_trip(tmp_path):
    flags = ["--router-bias-update-rate", "0.05", "--router-score-function", "sigmoid"]
    full = run_for_resume(tmp_path, "full", 1, flags, 2)
    bias = ckpt_io.read_checkpoint(str(tmp_path / "full" / "step_00000003")).params["layers.0.mlp.router.expert_bias"]
    assert bias[0]["tensor"].abs().sum() > 0
    resumed = run_for_resume(tmp_path, "resumed", 1, flags, 2, load=interrupted_at_3(tmp_path / "full"))
    assert without_timing(resumed) == without_timing(full[3:])

# ------------------------------------------------------------- router losses
@smoke
def test_aux_loss_equals_formula_on_hand_made_routing():
    # 4 tokens, 2 experts, top-1: tokens 0-2 go to expert 0, token 3 to expert 1
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    indices = torch.tensor([[0], [0], [0], [1]])
    f = [3 / 4, 1 / 4]
    p = [(0.9 + 0.8 + 0.6 + 0.3) / 4, (0.1 + 0.2 + 0.4 + 0.7) / 4]
    expected = 2 * (f[0] * p[0] + f[1] * p[1])
    assert math.isclose(load_balancing_loss(probs, indices, 2).item(), expected, rel_tol=1e-6)


@smoke
def test_aux_loss_is_one_for_uniform_routing():
    e, n = 8, 64
    probs = torch.full((n, e), 1 / e)
    indices = torch.tensor([[(2 * i) % e, (2 * i + 1) % e] for i in range(n)])  # top-2, each expert 16 times
    assert math.isclose(load_balancing_loss(probs, indices, e).item(), 1.0, rel_tol=1e-6)
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1
    assert math.isclose(load_balancing_loss(collapsed, torch.zeros(n, 1, dtype=torch.long), e).item(), e)


@smoke
def test_z_loss_equals_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.e + math.e ** 2 + math.e ** 3), math.log(3)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-6)


def _train_collapsed_router(aux_coef: float) -> tuple[float, float]:
    """Max/mean expert load before and after 60 Adam steps from a router that sends all to 2 experts."""
    torch.manual_seed(0)
    cfg = tiny_config(num_experts=8, num_experts_per_token=2, moe_ffn_hidden_size=32)
    layer = moe_layer(cfg, 0)
    c = torch.randn(32)
    c = c / c.norm()
    x = torch.randn(1, 256, 32) * 0.5 + 2 * c
    with torch.no_grad():
        layer.router.weight[0] += 3 * c
        layer.router.weight[1] += 2.5 * c
    target = torch.randn(1, 256, 32)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)

    def max_over_mean() -> float:
        with torch.no_grad():
            counts = layer(x)[1].counts.float()
        return (counts.max() / counts.mean()).item()

    before = max_over_mean()
    for _ in range(60):
        y, stats = layer(x)
        loss = F.mse_loss(y, target) + aux_coef * stats.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, max_over_mean()


def test_aux_loss_rebalances_a_collapsed_router_and_nothing_else_does():
    before, with_aux = _train_collapsed_router(0.1)
    _, without_aux = _train_collapsed_router(0.0)
    assert before == 4.0  # all 2 x 256 assignments on 2 of 8 experts
    assert with_aux < 1.6
    assert without_aux > 3.5


# ------------------------------------------------------- block and transformer
@smoke
def test_moe_layer_placement_by_interval_and_dense_mode():
    cfg = tiny_config(num_layers=6, moe_layer_interval=2)
    model = MoETransformer(cfg)
    assert [i for i, b in model.layers.items() if b.is_moe] == ["1", "3", "5"]
    dense = MoETransformer(tiny_config(num_experts=0))
    assert not any(b.is_moe for b in dense.layers.values())
    assert not any("router" in n or "experts" in n for n, _ in dense.named_parameters())
    out = dense(torch.randint(0, 64, (2, 8)))
    assert out.aux_loss.item() == 0 and out.stats == {}


@smoke
def test_block_and_transformer_shapes():
    cfg = tiny_config()
    block = MoETransformerBlock(cfg, ModelParallel(), 0)
    layout_free_init_(block, 0)
    rope = RotaryEmbedding(cfg.attn_head_dim, cfg.seq_length, cfg.rope_theta)
    h, stats = block(torch.randn(3, 10, 32), rope, torch.arange(10))
    assert h.shape == (3, 10, 32) and stats.counts.shape == (4,) and stats.counts.sum() == 3 * 10 * 2
    out = MoETransformer(cfg)(torch.randint(0, 64, (3, 10)))
    assert out.output.shape == (3, 10, 64)
    assert set(out.stats) == {0, 1}


@smoke
def test_changing_token_t_changes_no_logit_before_t():
    cfg = tiny_config()
    model = MoETransformer(cfg)
    x = torch.randint(0, 64, (1, 12))
    t = 7
    x2 = x.clone()
    x2[0, t] = (x[0, t] + 1) % 64
    a, b = model(x).output, model(x2).output
    # Not bitwise: the changed token regroups the expert GEMMs, which changes float rounding.
    assert torch.allclose(a[0, :t], b[0, :t], atol=1e-5, rtol=0)
    assert (a[0, t:] - b[0, t:]).abs().max() > 1e-3


@smoke
def test_initialisation_does_not_depend_on_construction_order():
    """Each weight is drawn from (seed, name): the same whether built whole or stage by stage."""
    cfg = tiny_config(num_layers=3)
    whole = dict(MoETransformer(cfg, seed=7).named_parameters())
    stage = MoETransformer(cfg, ModelParallel(layer_start=2, first_stage=False), seed=7)
    for name, p in stage.named_parameters():
        assert torch.equal(p, whole[name]), name


@smoke
def test_loss_falls_on_a_fixed_batch():
    cfg = tiny_config()
    model = MoETransformer(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(30):
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.output.flatten(0, 1), x[:, 1:].flatten()) + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------ data and schedule
@smoke
def test_batches_depend_on_seed_and_step_only():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = data.get_batch(tokens, 1, 0, 5, 4, 8)
    x2, _ = data.get_batch(tokens, 1, 0, 5, 4, 8)
    x3, _ = data.get_batch(tokens, 1, 0, 6, 4, 8)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the next tokens
    assert (x1[:, 1:] - x1[:, :-1] == 1).all()  # contiguous windows of the corpus


@smoke
def test_unigram_entropy_by_hand():
    tokens = np.array([0, 0, 1, 2], dtype=np.uint8)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert math.isclose(data.unigram_entropy(tokens, 256), expected)


@smoke
def test_lr_warmup_then_cosine():
    tc = launch.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert math.isclose(tc.schedule().at(0), 0.1)
    assert math.isclose(tc.schedule().at(9), 1.0)
    assert math.isclose(tc.schedule().at(60), 0.55)  # half way down the cosine
    assert math.isclose(tc.schedule().at(110), 0.1)
    assert math.isclose(tc.schedule().at(500), 0.1)  # constant after the decay


@pytest.mark.parametrize("max_steps,decay,want_warmup", [(3, 0, 0), (50, 0, 5), (400, 0, 40), (999, 0, 99),
                                                         (100_000, 0, 2000), (50, 300, 30)])
def test_default_warmup_is_a_tenth_of_the_decay_steps_at_most_2000(max_steps, decay, want_warmup):
    schedule = launch.TrainConfig(lr=1.0, min_lr=0.0, max_steps=max_steps, lr_decay_steps=decay).schedule()
    assert schedule.warmup_steps == want_warmup and schedule.decay_steps == (decay or max_steps)
    if want_warmup:  # the formula by hand: linear to the peak at the last warm-up step
        assert math.isclose(schedule.at(want_warmup - 1), 1.0) and math.isclose(schedule.at(0), 1 / want_warmup)
    else:
        assert schedule.at(0) == 1.0
    explicit = launch.TrainConfig(max_steps=max_steps, warmup_steps=7).schedule()
    assert explicit.warmup_steps == 7  # an explicit value is kept


@smoke
def test_builtin_corpus_holds_out_a_fixed_tenth_of_files():
    train, val = data.split_files(data.builtin_corpus_files())
    assert len(train) > 100 and len(val) >= len(train) // 10 and not set(train) & set(val)


# --------------------------------------------- fast paths against slow references (CPU expert loop, norm, GQA)
def per_row_reference(tokens: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, splits: list[int],
                      experts: Experts) -> torch.Tensor:
    """out[t] = sum over rows r with rows[r] = t of weight[r] * expert_of(r)(tokens[t]), one row at a time."""
    out = [torch.zeros_like(tokens[0]) for _ in range(tokens.shape[0])]
    expert_of_row = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor(splits))
    for r, (t, e) in enumerate(zip(rows.tolist(), expert_of_row.tolist())):
        out[t] = out[t] + weight[r] * swiglu(tokens[t], experts.w_gate[e], experts.w_up[e], experts.w_down[e])
    return torch.stack(out)


def assert_grads_match(out, ref, inputs, atol=1e-5):
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.allclose(a, b, atol=atol), (a - b).abs().max()


# ------------------------------------------------------------------ expert loop
def test_gather_and_combine_matches_per_row_reference_in_outputs_and_gradients():
    """Tokens on several experts, one expert without rows, unequal combine weights."""
    cfg = tiny_config()
    experts = Experts(cfg, ModelParallel())
    layout_free_init_(experts, 1)
    torch.manual_seed(0)
    tokens = torch.randn(6, cfg.hidden_size, requires_grad=True)
    splits = [3, 0, 4, 2]  # rows per expert, grouped by expert
    rows = torch.tensor([0, 2, 5, 0, 1, 3, 5, 2, 4])  # token of each row; tokens 0, 2, 5 have two experts
    weight = torch.rand(9, requires_grad=True)
    out = experts.gather_and_combine(tokens, Assignments(rows, weight, torch.tensor(splits)))
    ref = per_row_reference(tokens, rows, weight, splits, experts)
    assert torch.allclose(out, ref, atol=1e-6)
    assert_grads_match(out, ref, [tokens, weight, experts.w_gate, experts.w_up, experts.w_down])


@pytest.mark.parametrize("gathered", [True, False])
def test_expert_loop_backward_passes_gradcheck_in_float64(gathered):
    """The hand-written backward against finite differences, both modes (gathered rows, grouped rows)."""
    torch.manual_seed(0)
    e, d, f, n = 3, 8, 6, 5
    w = [torch.randn(e, d, f, dtype=torch.double, requires_grad=True),
         torch.randn(e, d, f, dtype=torch.double, requires_grad=True),
         torch.randn(e, f, d, dtype=torch.double, requires_grad=True)]
    splits = [2, 0, 4]
    if gathered:
        x = torch.randn(n, d, dtype=torch.double, requires_grad=True)
        rows = torch.tensor([1, 4, 0, 1, 3, 4])
        weight = torch.rand(6, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, wt, a, b, c: ExpertLoop.apply(x, rows, wt, splits, a, b, c, n),
                                        (x, weight, *w))
    else:
        x = torch.randn(6, d, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, a, b, c: ExpertLoop.apply(x, None, None, splits, a, b, c, 6),
                                        (x, *w))


def test_moe_layer_one_pass_path_matches_dispatch_and_combine_path():
    """The fused CPU path against the dispatch -> experts -> combine path (grouped GEMMs, fp32 on the CPU)."""
    cfg = tiny_config(num_experts=4, num_experts_per_token=2)
    fused, grouped = SparseMoELayer(cfg, ModelParallel()), SparseMoELayer(cfg, ModelParallel())
    layout_free_init_(fused, 3)
    grouped.load_state_dict(fused.state_dict())
    grouped.experts.use_grouped_mm = True
    x = torch.randn(2, 7, cfg.hidden_size, requires_grad=True)
    y, ref = fused(x)[0], grouped(x)[0]
    assert torch.allclose(y, ref, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(fused.parameters()), g)
    ref_grads = torch.autograd.grad(ref, [x] + list(grouped.parameters()), g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_moe_layer_under_bf16_autocast_stays_within_bf16_rounding_of_fp32():
    """Tolerance: bf16 keeps 8 significant bits, so outputs agree to a few 2^-8 of their scale;
    the weights' gradients come back in fp32, the parameters' dtype."""
    cfg = tiny_config(num_experts=4, num_experts_per_token=2)
    layer = SparseMoELayer(cfg, ModelParallel())
    layout_free_init_(layer, 4)
    x = torch.randn(2, 8, cfg.hidden_size)
    ref = layer(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)[0]
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 3 * 2 ** -8 * ref.abs().max()
    y.float().sum().backward()
    assert layer.experts.w_gate.grad.dtype == torch.float32 and torch.isfinite(layer.experts.w_down.grad).all()


# ------------------------------------------------------------------------- norm
def qwen3_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3RMSNorm, written out."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_qwen3_formula_in_values_dtype_and_gradients(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (3 * torch.randn(4, 5, 16)).to(dtype).requires_grad_()
    y, ref = norm(x), qwen3_rms_norm(x, norm.weight, 1e-6)
    assert y.dtype == ref.dtype  # fp32 weight times a bf16 input: fp32, as in Qwen3
    assert torch.allclose(y, ref, atol=1e-6, rtol=1e-6)
    assert_grads_match(y, ref, [x, norm.weight], atol=1e-5)


# -------------------------------------------------------------------- attention
def repeated_kv_attention(attn: Attention, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """The same attention with k and v copied to every query head (repeat_interleave) and an explicit softmax."""
    b, t, _ = x.shape
    q = attn.q_norm(attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(b, t, attn.n_kv, attn.head_dim)).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
    q, k = rope(q, k, torch.arange(t))
    groups = attn.n_heads // attn.n_kv
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, Dh)
    scores = (q @ k.transpose(-1, -2)) / attn.head_dim ** 0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v  # (B, H, T, Dh)
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def test_grouped_query_attention_matches_repeated_kv_reference():
    cfg = tiny_config(num_attention_heads=4, num_kv_heads=2)
    attn = Attention(cfg, ModelParallel())
    layout_free_init_(attn, 5)
    rope = RotaryEmbedding(cfg.attn_head_dim, cfg.seq_length, cfg.rope_theta)
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)
    y, ref = attn(x, rope, torch.arange(9)), repeated_kv_attention(attn, x, rope)
    assert torch.allclose(y, ref, atol=1e-5)
    assert_grads_match(y, ref, [x] + list(attn.parameters()))


def test_grouped_query_attention_with_cache_matches_one_full_pass():
    """Prefill 5 positions, then 2 at once (bottom-right causal mask), then 1: the last outputs equal a full pass."""
    cfg = tiny_config(num_attention_heads=4, num_kv_heads=2)
    attn = Attention(cfg, ModelParallel())
    layout_free_init_(attn, 6)
    rope = RotaryEmbedding(cfg.attn_head_dim, cfg.seq_length, cfg.rope_theta)
    x = torch.randn(1, 8, cfg.hidden_size)
    full = attn(x, rope, torch.arange(8))
    cache: dict = {}
    parts = [attn(x[:, a:b], rope, torch.arange(a, b), cache) for a, b in ((0, 5), (5, 7), (7, 8))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


# ---------------------------------------------------------------- CLI runs
TINY_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-kv-heads", "2",
              "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--num-experts", "4",
              "--num-experts-per-token", "2", "--seq-length", "16", "--micro-batch-size", "2",
              "--router-aux-loss-coef", "0.1", "--router-z-loss-coef", "0.01", "--lr", "1e-2",
              "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--no-progress"]


def run_cli(args: list[str], nproc: int = 1, timeout: float = 240, env: dict | None = None,
            extra_torchrun: list[str] | None = None) -> subprocess.CompletedProcess:
    """minimal_pretrain.py in a subprocess: plain python for one rank, torchrun for more."""
    if nproc == 1 and not extra_torchrun:
        cmd = [sys.executable, os.path.join(HERE, "minimal_pretrain.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + (extra_torchrun or []) + \
              [os.path.join(HERE, "minimal_pretrain.py")]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def train_records(path: str) -> list[dict]:
    return [r for r in read_metrics(path) if "loss" in r]


@smoke
def test_cli_tiny_run_writes_valid_metrics(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--num-microbatches", "2", "--eval-interval", "2",
                              "--eval-iters", "2", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert "Step 4 | Loss: " in r.stdout and "| Aux Loss: " in r.stdout and "samples/s" in r.stdout
    records = read_metrics(metrics)
    train = [x for x in records if "loss" in x]
    evals = [x for x in records if "val_loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and [x["step"] for x in evals] == [2, 4]
    keys = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec", "expert_load"}
    for x in train:
        assert keys <= set(x)
        assert math.isclose(x["loss"], x["lm_loss"] + 0.1 * x["aux_loss"] + 0.01 * x["z_loss"], rel_tol=1e-9)
        assert set(x["expert_load"]) == {"0", "1"}
        for load in x["expert_load"].values():
            assert len(load) == 4 and math.isclose(sum(load), 1.0, rel_tol=1e-9)
    assert "final val loss" in r.stdout and "unigram entropy" in r.stdout


def test_default_run_beats_the_unigram_baseline(tmp_path):
    """`python minimal_pretrain.py` with no model flags: the README's first command (about 90 s)."""
    r = run_cli(["--no-progress", "--metrics-file", str(tmp_path / "m.jsonl")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("final val loss")][0]
    val, unigram = float(line.split()[3]), float(line.split("unigram entropy ")[1].split()[0])
    assert val < unigram - 1.0, line


@smoke
@pytest.mark.parametrize("flags,message", [
    (["--num-experts-per-token", "5"], "--num-experts-per-token"),
    (["--num-attention-heads", "3"], "--num-attention-heads"),
    (["--num-kv-heads", "3"], "--num-kv-heads"),
    (["--data", "/no/such/file"], "/no/such/file"),
    (["--max-steps", "0"], "--max-steps"),
])
def test_invalid_flags_exit_2_with_one_error_line(flags, message):
    r = run_cli(TINY_FLAGS + ["--max-steps", "2"] + flags, timeout=60)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


@smoke
def test_help_lists_every_contract_flag():
    r = run_cli(["--help"], timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--num-experts", "--num-experts-per-token", "--moe-layer-interval", "--router-aux-loss-coef",
                 "--router-z-loss-coef", "--tensor-parallel-size", "--expert-parallel-size",
                 "--pipeline-parallel-size", "--num-microbatches", "--max-steps", "--hidden-size", "--num-layers",
                 "--num-attention-heads", "--num-kv-heads", "--ffn-hidden-size", "--moe-ffn-hidden-size",
                 "--seq-length", "--micro-batch-size", "--lr", "--min-lr", "--warmup-steps", "--weight-decay",
                 "--grad-clip", "--seed", "--data", "--eval-interval", "--eval-iters", "--log-interval",
                 "--metrics-file", "--save", "--save-interval", "--load", "--device", "--dtype"):
        assert flag + " " in r.stdout, flag


def test_eval_only_reports_the_checkpoints_val_loss_and_summary_names_experts(tmp_path):
    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--eval-interval", "4", "--eval-iters", "3", "--save", str(save),
                              "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert "run summary" in r.stdout and "layer 1: most loaded expert" in r.stdout
    assert f"checkpoints: {save} (latest: step_00000004)" in r.stdout
    val = [x for x in read_metrics(metrics) if "val_loss" in x][-1]["val_loss"]
    r = run_cli(["--load", str(save), "--eval-only", "--eval-iters", "3", "--no-progress"])
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("eval-only:")][0]
    loss = float(line.split("val loss ")[1].split()[0])
    assert math.isclose(loss, val, abs_tol=1e-4)
    assert f"perplexity {math.exp(val):.3f}" in line and f"{val / math.log(2):.4f} bits per byte" in line


@smoke
def test_too_short_data_exits_2(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(short)], timeout=60)
    assert r.returncode == 2 and "data too short" in r.stderr


@smoke
def test_text_folder_and_token_files_train(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(12):
        (folder / f"f{i:02d}.txt").write_text(("hello moe world %d " % i) * 50)
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(folder)])
    assert r.returncode == 0, r.stderr
    assert "12 text files (10.0% of the bytes held out)" in r.stdout
    bins = tmp_path / "bins"
    bins.mkdir()
    np.arange(5000, dtype=np.uint16).__mod__(100).astype(np.uint16).tofile(bins / "train.bin")
    np.arange(500, dtype=np.uint16).astype(np.uint16).__mod__(100).astype(np.uint16).tofile(bins / "val.bin")
    (bins / "meta.json").write_text(json.dumps({"vocab_size": 100}))
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(bins), "--num-experts", "0"])
    assert r.returncode == 0, r.stderr
    assert '"vocab_size": 100' in r.stdout



# ------------------------------------------------ parallel layouts vs one process
PARITY_STEPS = 5


def parity_run(tmp_path, name: str, nproc: int, layout: list[str], micro: int, extra: list[str] = ()):
    """Train PARITY_STEPS steps; return (train records, full weights gathered from the checkpoint)."""
    out = tmp_path / name
    args = TINY_FLAGS + list(extra) + layout + ["--max-steps", str(PARITY_STEPS), "--num-microbatches",
                                                str(micro), "--metrics-file", str(out) + ".jsonl",
                                                "--save", str(out), "--dist-timeout", "60"]
    r = run_cli(args, nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return train_records(str(out) + ".jsonl"), ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(out)))


def assert_same_training(reference, candidate, rel: float = 1e-4, weight_atol: float = 1e-4) -> float:
    """Every step's loss and lm_loss within `rel`; the trained weights equal to float rounding.

    weight_atol is 1% of one AdamW step at lr 1e-2: Adam divides by sqrt(v), so a weight whose
    gradient is nearly zero moves by rounding-sized differences scaled up towards the step size."""
    (ref_records, ref_weights), (records, weights) = reference, candidate
    assert [r["step"] for r in records] == list(range(1, PARITY_STEPS + 1))
    worst = 0.0
    for a, b in zip(ref_records, records):
        for key in ("loss", "lm_loss"):
            diff = abs(a[key] - b[key]) / abs(a[key])
            worst = max(worst, diff)
            assert diff < rel, (a["step"], key, a[key], b[key])
    assert a["aux_loss"] > 0 and a["z_loss"] > 0
    assert set(weights) == set(ref_weights)
    for name, w in ref_weights.items():
        assert torch.allclose(weights[name], w, atol=weight_atol, rtol=0), name
    return worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Single-process references: global batch 8 sequences = 2 per micro-batch x 4 micro-batches."""
    tmp = tmp_path_factory.mktemp("one_process")
    return {"interval1": parity_run(tmp, "interval1", 1, [], 4),
            "interval2": parity_run(tmp, "interval2", 1, [], 4, ["--moe-layer-interval", "2"])}


# name: (ranks, layout flags, micro-batches per DP rank, reference, extra flags)
LAYOUTS = {
    "dp2": (2, [], 2, "interval1", []),
    "tp2_ep2": (2, ["--tensor-parallel-size", "2"], 4, "interval1", []),
    "ep2_over_dp2": (2, ["--expert-parallel-size", "2"], 2, "interval1", []),
    "pp2_1f1b_4mb": (2, ["--pipeline-parallel-size", "2"], 4, "interval1", []),
    "dp2_tp2_ep4": (4, ["--tensor-parallel-size", "2", "--expert-parallel-size", "4"], 2, "interval1", []),
    "tp2_pp2_dp2_ep2": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], 2, "interval1", []),
    "pp2_moe_interval2": (2, ["--pipeline-parallel-size", "2"], 4, "interval2", ["--moe-layer-interval", "2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, one_process, tmp_path):
    nproc, layout, micro, ref, extra = LAYOUTS[name]
    worst = assert_same_training(one_process[ref], parity_run(tmp_path, name, nproc, layout, micro, extra))
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


# name: (world size, flags, words the error line must hold)
BAD_LAYOUTS = {
    "world_vs_sizes": (3, ["--tensor-parallel-size", "2"], "world size 3"),
    "heads_vs_tp": (4, ["--tensor-parallel-size", "4", "--num-kv-heads", "2"], "--num-kv-heads"),
    "experts_vs_ep": (2, ["--expert-parallel-size", "2", "--num-experts", "3", "--num-experts-per-token", "1"],
                      "--num-experts"),
    "ep_vs_stage_ranks": (2, ["--expert-parallel-size", "4"], "ranks of a pipeline stage"),
    "layers_vs_pp": (4, ["--pipeline-parallel-size", "4", "--num-layers", "2"], "--num-layers"),
    "microbatches_vs_pp": (2, ["--pipeline-parallel-size", "2", "--num-microbatches", "1"], "--num-microbatches"),
    "vocab_vs_tp": (2, ["--tensor-parallel-size", "2", "--vocab-size", "255", "--data", "BINS"], "vocabulary"),
    "shared_width_vs_tp": (2, ["--tensor-parallel-size", "2", "--num-shared-experts", "1",
                               "--shared-expert-ffn-hidden-size", "7"], "shared experts"),
}


@pytest.fixture(scope="module")
def odd_vocab_bins(tmp_path_factory):
    """train.bin / val.bin with a 255-token vocabulary (odd, so TP2 cannot split it)."""
    d = tmp_path_factory.mktemp("bins255")
    (np.arange(4000) % 255).astype(np.uint16).tofile(d / "train.bin")
    (np.arange(400) % 255).astype(np.uint16).tofile(d / "val.bin")
    return str(d)


@smoke
@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_invalid_layout_exits_2_before_any_collective(name, odd_vocab_bins):
    """Every rank validates alone, so rank 0 of a would-be world fails at once (no peer needed)."""
    world, flags, words = BAD_LAYOUTS[name]
    flags = [odd_vocab_bins if f == "BINS" else f for f in flags]
    start = time.time()
    r = run_cli(TINY_FLAGS + ["--max-steps", "2"] + flags, timeout=60,
                env={"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"})
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr
    assert time.time() - start < 30


def test_invalid_layout_under_torchrun_ends_every_rank_fast():
    start = time.time()
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--tensor-parallel-size", "2", "--num-kv-heads", "1",
                              "--num-attention-heads", "2"], nproc=2, timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--num-kv-heads" in errors[0]  # rank 0 alone speaks
    assert 'minimal_pretrain.py", line' not in r.stderr  # no worker traceback (torchrun prints its own)
    assert "exitcode  : 2" in r.stderr
    assert time.time() - start < 60


def _dispatch_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    """One rank of the dispatcher test: tokens go to their expert's rank and come back in order."""
    import torch.distributed as dist
    from moe_layers import combine_from_experts, dispatch_to_experts
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


# -------------------------------------------------------------------- checkpoints
RESUME_STEPS = 6  # runs of 6 steps saving at 3; a resumed run continues from the step-3 checkpoint


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in records]


def interrupted_at_3(root) -> str:
    """Make `root` look like a run that stopped after saving step 3 (later checkpoints gone)."""
    for d in ckpt_io.list_checkpoints(str(root)):
        if d != ckpt_io.step_dir_name(3):
            shutil.rmtree(os.path.join(str(root), d))
    (root / "latest").write_text(ckpt_io.step_dir_name(3))
    return str(root)


def run_for_resume(tmp_path, name: str, nproc: int, layout: list[str], micro: int,
                   load: str | None = None) -> list[dict]:
    """RESUME_STEPS steps (from scratch, or resumed from `load`), saving every 3; return train records."""
    save = tmp_path / name
    metrics = str(save) + ".jsonl"
    args = TINY_FLAGS + layout + ["--max-steps", str(RESUME_STEPS), "--num-microbatches", str(micro),
                                  "--save", str(save), "--save-interval", "3", "--metrics-file", metrics,
                                  "--dist-timeout", "60"]
    if load:
        args += ["--load", load]
    r = run_cli(args, nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    if load:
        assert "resumed from" in r.stdout and "at step 3" in r.stdout
    return train_records(metrics)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Uninterrupted 6-step runs on one process and on 8 ranks (TP2 x PP2 x DP2), checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("full_runs")
    return tmp, {"one": run_for_resume(tmp, "one", 1, [], 4),
                 "tp2_pp2_dp2": run_for_resume(tmp, "tp2_pp2_dp2", 8, ["--tensor-parallel-size", "2",
                                                                         "--pipeline-parallel-size", "2"], 2)}


@smoke
def test_resume_is_exact_in_one_process(full_runs, tmp_path):
    tmp, runs = full_runs
    shutil.copytree(tmp / "one", tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 1, [], 4, load=interrupted_at_3(tmp_path / "ck"))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert without_timing(resumed) == without_timing(runs["one"][3:])  # bitwise: every float of every record


def test_resume_is_exact_on_4_ranks(tmp_path):
    layout = ["--tensor-parallel-size", "2", "--expert-parallel-size", "4"]
    full = run_for_resume(tmp_path, "full", 4, layout, 2)
    resumed = run_for_resume(tmp_path, "resumed", 4, layout, 2, load=interrupted_at_3(tmp_path / "full"))
    assert without_timing(resumed) == without_timing(full[3:])


def _assert_continues_like(reference: list[dict], resumed: list[dict]) -> float:
    assert [r["step"] for r in resumed] == [4, 5, 6]
    worst = 0.0
    for a, b in zip(reference[3:], resumed):
        for key in ("loss", "lm_loss"):
            worst = max(worst, abs(a[key] - b[key]) / a[key])
    assert worst < 1e-4
    return worst


@pytest.mark.parametrize("target", ["one_process", "pp2_dp2_ep2"])
def test_checkpoint_of_8_ranks_reshards_onto_other_layouts(full_runs, tmp_path, target):
    tmp, runs = full_runs
    shutil.copytree(tmp / "tp2_pp2_dp2", tmp_path / "ck")
    nproc, layout, micro = {"one_process": (1, [], 4),
                            "pp2_dp2_ep2": (4, ["--pipeline-parallel-size", "2", "--expert-parallel-size", "2"], 2),
                            }[target]
    resumed = run_for_resume(tmp_path, "resumed", nproc, layout, micro, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(runs["tp2_pp2_dp2"], resumed)
    print(f"8 ranks -> {target}: max relative loss difference {worst:.2e}")


def test_checkpoint_of_one_process_reshards_onto_8_ranks(full_runs, tmp_path):
    tmp, runs = full_runs
    shutil.copytree(tmp / "one", tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size",
                                                      "2"], 2, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(runs["one"], resumed)
    print(f"1 rank -> 8 ranks: max relative loss difference {worst:.2e}")


def tiny_checkpoint_at_step_3(root) -> tuple[MoETransformer, torch.optim.Optimizer, dict, dict]:
    """A one-rank checkpoint of a tiny model at step 3 in `root`: (model, optimizer, meta, saved weights)."""
    model = MoETransformer(tiny_config(), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 3, "skipped_steps": 0,
            "model": {}, "train": {}, "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    ckpt_io.save_checkpoint(str(root), 3, ckpt_io.rank_payload(model, opt, Layout()), meta, 0, 1)
    return model, opt, meta, ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(root)))


@smoke
def test_save_that_crashes_between_files_leaves_latest_loadable(tmp_path, monkeypatch):
    model, opt, meta, before = tiny_checkpoint_at_step_3(tmp_path)
    real_write = ckpt_io._fsync_write

    def crash_on_meta(path, write):  # the rank file is written, then the process "dies"
        if path.endswith("meta.json"):
            raise KeyboardInterrupt("killed")
        real_write(path, write)

    monkeypatch.setattr(ckpt_io, "_fsync_write", crash_on_meta)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(str(tmp_path), 6, ckpt_io.rank_payload(model, opt, Layout()),
                                dict(meta, step=6), 0, 1)
    assert (tmp_path / "latest").read_text() == "step_00000003"
    after = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path)))
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(ckpt_io, "_fsync_write", real_write)  # the next save cleans up and succeeds
    ckpt_io.save_checkpoint(str(tmp_path), 6, ckpt_io.rank_payload(model, opt, Layout()), dict(meta, step=6), 0, 1)
    assert ckpt_io.read_checkpoint(str(tmp_path)).meta["step"] == 6
    assert not any(d.startswith(".tmp") for d in os.listdir(tmp_path))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--save", str(tmp_path / "ck"), "--save-interval", "1",
                              "--keep-last", "2"])
    assert r.returncode == 0, r.stderr
    assert ckpt_io.list_checkpoints(str(tmp_path / "ck")) == ["step_00000003", "step_00000004"]


def _worker_pids(marker: str) -> list[int]:
    """Pids of minimal_pretrain.py workers (not the torchrun agent) whose command line holds `marker`."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        args = [c.decode(errors="replace") for c in cmd]
        if marker in args and any(a.endswith("minimal_pretrain.py") for a in args) \
                and "torch.distributed.run" not in args:
            pids.append(int(pid))
    return pids


def test_killed_worker_restarts_from_latest_and_finishes_like_an_uninterrupted_run(tmp_path):
    steps = 30
    args = TINY_FLAGS + ["--max-steps", str(steps), "--num-microbatches", "2", "--dist-timeout", "30"]
    clean = run_cli(args + ["--metrics-file", str(tmp_path / "clean.jsonl")], nproc=2)
    assert clean.returncode == 0, clean.stderr[-3000:]
    save = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           os.path.join(HERE, "minimal_pretrain.py")]
    cmd += args + ["--save", str(save), "--save-interval", "2", "--metrics-file", str(tmp_path / "killed.jsonl")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (save / "step_00000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    victims = _worker_pids(str(save))
    assert victims and not (save / f"step_{steps:08d}").exists(), "the run ended before it could be killed"
    os.kill(victims[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("resumed from") == 1  # the restarted workers found `latest` by themselves
    final_clean = train_records(str(tmp_path / "clean.jsonl"))[-1]
    final_killed = train_records(str(tmp_path / "killed.jsonl"))[-1]
    assert final_killed["step"] == steps and final_killed["loss"] == final_clean["loss"]
    # The restart redid the steps after its checkpoint: each step is in the metrics file once.
    assert [r["step"] for r in train_records(str(tmp_path / "killed.jsonl"))] == list(range(1, steps + 1))


# ---------------------------------------------- resume semantics, log intervals, help (issue 17)
def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """The documented schedule, by hand (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (decay - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def test_resume_with_a_longer_max_steps_keeps_the_saved_schedule_unless_told(tmp_path, capsys):
    flags = TINY_FLAGS + ["--min-lr", "1e-3", "--save-interval", "6"]
    mp.main(flags + ["--max-steps", "6", "--save", str(tmp_path / "a"), "--metrics-file", str(tmp_path / "a.jsonl")])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    # Longer run, no schedule flag: the cosine of the 6-step run has ended, the LR stays at --min-lr.
    mp.main(flags + ["--max-steps", "9", "--save", str(tmp_path / "a"), "--metrics-file", str(tmp_path / "a.jsonl")])
    out = capsys.readouterr().out
    assert "note: the checkpoint's LR schedule goes on: its decay ends at step 6" in out
    lrs = [r["lr"] for r in train_records(str(tmp_path / "a.jsonl"))]
    assert lrs[:6] == pytest.approx([cosine_lr(s, 1e-2, 1e-3, 1, 6) for s in range(6)], rel=1e-12)
    assert lrs[6:] == [1e-3] * 3
    # Asked for: the cosine is recomputed over 12 steps from step 6 on, and the start says how the LR jumps.
    mp.main(flags + ["--max-steps", "9", "--lr-decay-steps", "12", "--save", str(tmp_path / "b"),
                     "--metrics-file", str(tmp_path / "b.jsonl")])
    out = capsys.readouterr().out
    jump = f"the LR goes from {cosine_lr(6, 1e-2, 1e-3, 1, 6):.2e} to {cosine_lr(6, 1e-2, 1e-3, 1, 12):.2e}"
    assert f"note: the LR schedule changes at step 6 (--lr-decay-steps 6 -> 12): {jump}" in out
    lrs = [r["lr"] for r in train_records(str(tmp_path / "b.jsonl"))]  # steps 7, 8, 9
    assert lrs == pytest.approx([cosine_lr(s, 1e-2, 1e-3, 1, 12) for s in (6, 7, 8)], rel=1e-12)


def test_a_changed_global_batch_on_resume_is_refused_or_derived(tmp_path):
    flags = TINY_FLAGS + ["--max-steps", "4", "--save-interval", "2"]
    two = run_cli(flags + ["--save", str(tmp_path / "two"), "--metrics-file", str(tmp_path / "two.jsonl")], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    for name in ("refused", "derived", "allowed"):
        shutil.copytree(tmp_path / "two", tmp_path / name)
        (tmp_path / name / "latest").write_text(ckpt_io.step_dir_name(2))
        shutil.rmtree(tmp_path / name / ckpt_io.step_dir_name(4))
    # DP 2 x 1 micro-batch of 2 = 4 sequences; one rank with --num-microbatches 1 would train on 2.
    refused = run_cli(flags + ["--num-microbatches", "1", "--save", str(tmp_path / "refused")], timeout=60)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "global batch of 4 sequences" in errors[0] and "--num-microbatches 2" in errors[0]
    # Not given: derived so that one rank sees the same 4 sequences per step, and trains on like the 2 ranks.
    derived = run_cli(flags + ["--save", str(tmp_path / "derived"), "--metrics-file", str(tmp_path / "d.jsonl")])
    assert derived.returncode == 0, derived.stderr[-2000:]
    assert "note: --num-microbatches 2 keeps the checkpoint's global batch of 4 sequences on DP 1" in derived.stdout
    reference, resumed = train_records(str(tmp_path / "two.jsonl"))[2:], train_records(str(tmp_path / "d.jsonl"))
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(reference, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    allowed = run_cli(flags + ["--num-microbatches", "1", "--allow-global-batch-change", "--save",
                               str(tmp_path / "allowed")])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "note: the global batch changes from 4 to 2 sequences" in allowed.stdout


def test_weights_only_checkpoint_says_the_optimizer_and_warmup_start_fresh(tmp_path, capsys):
    mp.main(TINY_FLAGS + ["--max-steps", "1", "--save", str(tmp_path / "trained")])
    trained = ckpt_io.read_checkpoint(str(tmp_path / "trained"))  # one rank: one whole slice per tensor
    ckpt_io.save_full_state(str(tmp_path / "imported"), {n: s[0]["tensor"] for n, s in trained.params.items()},
                            trained.meta["model"], {})  # as import_hf.py and upcycle.py write them
    mp.main(TINY_FLAGS + ["--warmup-steps", "4", "--max-steps", "2", "--load", str(tmp_path / "imported"),
                          "--metrics-file", str(tmp_path / "m.jsonl")])
    assert "holds weights only (imported or upcycled): the optimizer state is fresh" in capsys.readouterr().out
    assert [r["lr"] for r in train_records(str(tmp_path / "m.jsonl"))] == pytest.approx([1e-2 / 4, 2e-2 / 4])


def test_logged_records_are_means_over_the_log_interval(tmp_path):
    every = tmp_path / "every.jsonl"
    mp.main(TINY_FLAGS + ["--max-steps", "6", "--metrics-file", str(every)])
    thirds = tmp_path / "thirds.jsonl"
    mp.main(TINY_FLAGS + ["--max-steps", "6", "--log-interval", "3", "--metrics-file", str(thirds)])
    steps, means = train_records(str(every)), train_records(str(thirds))
    assert [r["step"] for r in means] == [3, 6]
    for i, record in enumerate(means):
        window = steps[3 * i:3 * i + 3]
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"):  # router losses sum in fp32
            assert record[key] == pytest.approx(sum(r[key] for r in window) / 3, rel=1e-6), key
        assert record["lr"] == window[-1]["lr"]
        for layer, load in record["expert_load"].items():  # every step routes as many tokens
            want = [sum(r["expert_load"][layer][e] for r in window) / 3 for e in range(len(load))]
            assert load == pytest.approx(want, rel=1e-9)


def test_dead_expert_rule_by_hand():
    dead = metrics_mod.DeadExperts()
    alive, starved = [0.3, 0.3, 0.3, 0.1], [0.34, 0.33, 0.33, 0.0024]  # 0.0024 < 1% of the mean 0.25
    assert dead.update({"0": starved}) == [] and dead.update({"0": starved}) == []
    warned = dead.update({"0": starved})
    assert len(warned) == 1 and "layer 0 expert 3 is dead" in warned[0]
    assert dead.update({"0": starved}) == []  # said once
    assert dead.update({"0": alive}) == [] and dead.update({"0": starved}) == []  # recovered: counts again


def test_collapsed_router_gets_a_dead_expert_warning(tmp_path, capsys):
    save = tmp_path / "ck"
    mp.main(TINY_FLAGS + ["--max-steps", "1", "--save", str(save)])
    rank_file = save / ckpt_io.step_dir_name(1) / "rank_00000.pt"
    payload = torch.load(rank_file, weights_only=False)
    bias = [name for name in payload["params"] if name.endswith("expert_bias")]
    assert bias, "the routing bias is saved"
    payload["params"]["layers.1.mlp.router.expert_bias"]["tensor"][2] = -1e4  # expert 2 of layer 1 never chosen
    torch.save(payload, rank_file)
    meta_path = save / ckpt_io.step_dir_name(1) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sizes"] = [rank_file.stat().st_size]  # the edit is deliberate: record the new size
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    mp.main(TINY_FLAGS + ["--max-steps", "5", "--save", str(save)])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert any("layer 1 expert 2 is dead" in w for w in warnings), warnings


def test_help_lists_every_flag_once_under_its_group():
    groups = [title for title, _ in launch.FLAG_GROUPS]
    grouped = [name for _, names in launch.FLAG_GROUPS for name in names]
    fields = [f.name for cls in (ModelConfig, launch.TrainConfig) for f in dataclasses.fields(cls)]
    assert sorted(grouped) == sorted(fields) and len(set(grouped)) == len(grouped)
    text = launch.build_arg_parser().format_help()
    starts = [text.index(f"\n{title}:\n") for title in groups]
    assert starts == sorted(starts)  # in the guide's order
    for (title, names), start, end in zip(launch.FLAG_GROUPS, starts, starts[1:] + [len(text)]):
        section = text[start:end]
        for name in names:
            assert f"--{name.replace('_', '-')}" in section, (title, name)
    assert "default: -1" in text and "a tenth of the decay steps" in text  # the warm-up default says what it does


def test_banner_says_device_dtype_sizes_and_memory(capsys):
    mp.main(TINY_FLAGS + ["--max-steps", "1"])
    out = capsys.readouterr().out
    mc = launch.parse_config(TINY_FLAGS)[0]
    params = dict(MoETransformer(mc, seed=0).named_parameters())
    total = sum(p.numel() for p in params.values())
    # A token multiplies by every weight but the embedding (a lookup) and by K of the E experts.
    active = sum(p.numel() for name, p in params.items() if ".experts." not in name and "embed_tokens" not in name)
    active += sum(p.numel() for name, p in params.items() if ".experts." in name) * 2 // 4
    banner = out[:out.index("model config:")]
    assert "device: cpu (no CUDA device visible) x 1 rank | weights fp32" in banner or torch.cuda.is_available()
    assert f"model: {total:,} parameters, {active:,} active per token" in banner
    assert "memory per rank (estimate):" in banner and "warm-up 1 steps to 1.00e-02" in banner


def test_tensorboard_events_hold_the_metrics_once_after_a_restart(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board, save, metrics = tmp_path / "tb", tmp_path / "ck", tmp_path / "m.jsonl"
    flags = TINY_FLAGS + ["--max-steps", "4", "--save-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
                          "--tensorboard", str(board), "--save", str(save), "--metrics-file", str(metrics)]
    mp.main(flags)
    (save / "latest").write_text(ckpt_io.step_dir_name(2))  # as if killed after saving step 2
    shutil.rmtree(save / ckpt_io.step_dir_name(4))
    mp.main(flags)  # redoes steps 3 and 4
    events = EventAccumulator(str(board), purge_orphaned_data=True)
    events.Reload()
    records = train_records(str(metrics))
    for name in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm"):
        scalars = events.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == [1, 2, 3, 4], name  # the first run's steps 3 and 4 are purged
        assert [e.value for e in scalars] == pytest.approx([r[name] for r in records], rel=1e-6), name
    evals = [r for r in read_metrics(str(metrics)) if "val_loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("eval/val_loss")] == \
        [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in evals]
    assert [e.step for e in events.Scalars("expert_load/layer0/max_over_mean")] == [1, 2, 3, 4]


@smoke
def test_non_finite_loss_skips_the_update_and_stops_after_too_many(tmp_path, monkeypatch):
    real_ce = parallel_layers.vocab_parallel_cross_entropy
    calls = {"n": 0}

    def nan_on_steps_2_and_3(logits, targets, par):  # one micro-batch per step
        calls["n"] += 1
        loss = real_ce(logits, targets, par)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(mp, "vocab_parallel_cross_entropy", nan_on_steps_2_and_3)
    metrics = tmp_path / "m.jsonl"
    save = tmp_path / "ck"
    mp.main(TINY_FLAGS + ["--max-steps", "5", "--metrics-file", str(metrics), "--save", str(save)])
    records = train_records(str(metrics))
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] not in (2, 3))
    # A skipped step leaves the weights alone: the norm of step 4's update sees step 1's weights.
    calls["n"] = 0
    monkeypatch.setattr(mp, "vocab_parallel_cross_entropy",
                        lambda lg, tg, par: real_ce(lg, tg, par) * float("nan"))
    with pytest.raises(SystemExit) as stop:
        mp.main(TINY_FLAGS + ["--max-steps", "9", "--save", str(tmp_path / "ck2"), "--max-skipped-steps", "3"])
    assert stop.value.code == 2
    assert ckpt_io.read_checkpoint(str(tmp_path / "ck2")).meta["step"] == 2  # final checkpoint, 3 bad steps


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--save", str(d)])
    assert r.returncode == 0, r.stderr
    return d


def _bad_input(tmp_path, saved_tiny, case: str) -> tuple[list[str], str]:
    """Flags for one bad-input case and the words its error line must hold."""
    ck = tmp_path / "ck"
    shutil.copytree(saved_tiny, ck)
    step = ck / "step_00000002"
    if case == "missing_folder":
        return ["--load", str(tmp_path / "nothing")], "no such folder"
    if case == "missing_rank_file":
        (step / "rank_00000.pt").unlink()
        return ["--load", str(ck)], "rank_00000.pt: missing"
    if case == "truncated_rank_file":
        data = (step / "rank_00000.pt").read_bytes()
        (step / "rank_00000.pt").write_bytes(data[:len(data) // 2])
        return ["--load", str(ck)], "rank_00000.pt: unreadable"
    if case == "foreign_meta":
        (step / "meta.json").write_text(json.dumps({"format": "something-else"}))
        return ["--load", str(ck)], "not a checkpoint of this trainer"
    if case == "conflicting_model_flag":
        return ["--load", str(ck), "--hidden-size", "64"], "--hidden-size 64 conflicts"
    if case == "unwritable_save":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        return ["--save", str(blocker / "sub")], "not writable"
    if case == "corrupt_data_file":
        bins = tmp_path / "bins"
        bins.mkdir()
        (bins / "train.bin").write_bytes(b"\x01\x00\x02")  # odd size: not uint16
        (bins / "val.bin").write_bytes(b"\x01\x00")
        (bins / "meta.json").write_text('{"vocab_size": 256}')
        return ["--data", str(bins)], "train.bin: odd size"
    raise AssertionError(case)


@smoke
@pytest.mark.parametrize("case", ["missing_folder", "missing_rank_file", "truncated_rank_file", "foreign_meta",
                                  "conflicting_model_flag", "unwritable_save", "corrupt_data_file"])
def test_bad_checkpoint_or_data_exits_2_and_harms_nothing(case, tmp_path, saved_tiny):
    flags, words = _bad_input(tmp_path, saved_tiny, case)
    before = {p: p.read_bytes() for p in (tmp_path / "ck").rglob("*") if p.is_file()}
    r = run_cli(TINY_FLAGS + ["--max-steps", "4"] + flags, timeout=60)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert before == {p: p.read_bytes() for p in (tmp_path / "ck").rglob("*") if p.is_file()}


def test_inspect_checkpoint_prints_step_layout_and_shapes(saved_tiny):
    r = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "inspect_checkpoint.py"), str(saved_tiny)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "step: 2" in r.stdout and "world 1 = PP 1 x DP 1 x TP 1" in r.stdout
    assert "layers.1.mlp.experts.3.down_proj.weight" in r.stdout and "(32, 32)" in r.stdout


# ------------------------------------------------------ hardening: bad input, lost checkpoints, preemption
def assert_clean_refusal(r: subprocess.CompletedProcess, words: str) -> None:
    """Exit status 2, exactly one `error:` line holding `words`, no traceback."""
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def tree_bytes(root) -> dict:
    """Every file below `root` (links not followed) -> its bytes: to prove nothing was touched."""
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            if os.path.isfile(p) and not os.path.islink(p) and n != ".lock":
                out[p] = open(p, "rb").read()
    return out


def _token_folder(d, train, val, meta: dict | None, dtype=np.uint16):
    d.mkdir()
    np.asarray(train).astype(dtype).tofile(d / "train.bin")
    np.asarray(val).astype(dtype).tofile(d / "val.bin")
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta))
    return str(d)


def _bad_trainer_input(case: str, tmp_path, saved_tiny) -> tuple[list[str], str]:
    """Flags of one hostile case (files made under tmp_path) and the words its error line holds."""
    ck = tmp_path / "ck"
    shutil.copytree(saved_tiny, ck, symlinks=True)
    step = ck / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    ok_train, ok_val = np.arange(3000) % 50, np.arange(300) % 50
    flags = {
        "lr_nan": (["--lr", "nan"], "--lr"),
        "min_lr_over_lr": (["--min-lr", "1"], "--min-lr"),
        "rope_theta_0": (["--rope-theta", "0"], "--rope-theta"),
        "rms_eps_negative": (["--rms-norm-eps", "-1"], "--rms-norm-eps"),
        "init_std_0": (["--init-std", "0"], "--init-std"),
        "weight_decay_negative": (["--weight-decay", "-0.1"], "--weight-decay"),
        "aux_coef_negative": (["--router-aux-loss-coef", "-1"], "--router-aux-loss-coef"),
        "z_coef_inf": (["--router-z-loss-coef", "inf"], "--router-z-loss-coef"),
        "capacity_inf": (["--moe-capacity-factor", "inf"], "--moe-capacity-factor"),
        "jitter_one": (["--router-jitter-noise", "1"], "--router-jitter-noise"),
        "seed_negative": (["--seed", "-1"], "--seed"),
        "dist_timeout_0": (["--dist-timeout", "0"], "--dist-timeout"),
        "grad_clip_nan": (["--grad-clip", "nan"], "--grad-clip"),
        "keep_last_negative": (["--keep-last", "-1"], "--keep-last"),
        "experts_too_many_for_memory": (["--num-experts", "2000000"], "GiB per rank"),
        "micro_batch_too_big_for_memory": (["--micro-batch-size", "4000000000"], "GiB per rank"),
        "metrics_file_is_a_folder": (["--metrics-file", str(tmp_path)], "is a folder"),
        "flag_not_a_number": (["--lr", "fast"], "argument --lr: invalid float value"),
    }
    if case in flags:
        return flags[case]
    if case == "empty_train_bin":
        d = _token_folder(tmp_path / "tok", [], ok_val, {"vocab_size": 50})
        return ["--data", d], "train.bin: empty"
    if case == "val_id_over_vocab":
        d = _token_folder(tmp_path / "tok", ok_train, np.append(ok_val, 77), {"vocab_size": 50})
        return ["--data", d], "val.bin holds token 77"
    if case == "meta_max_id_over_vocab":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val,
                          {"vocab_size": 50, "max_id": {"train": 49, "val": 60}})
        return ["--data", d], "val.bin holds token 60"
    if case == "uint32_file_read_as_uint16":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val,
                          {"vocab_size": 50, "dtype": "uint16", "tokens": {"train": 3000, "val": 300}}, np.uint32)
        return ["--data", d], "meta.json says 3000"
    if case == "unknown_dtype":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val, {"vocab_size": 50, "dtype": "int8"})
        return ["--data", d], "\"dtype\""
    if case == "vocab_too_big_for_uint16":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val, {"vocab_size": 70000, "dtype": "uint16"})
        return ["--data", d], "does not fit uint16"
    if case == "token_meta_json_is_a_fifo":
        d = _token_folder(tmp_path / "tok", ok_train, ok_val, None)
        os.mkfifo(os.path.join(d, "meta.json"))  # reading it would block forever
        return ["--data", d], "meta.json: not a regular file"
    if case == "data_is_a_fifo":
        os.mkfifo(tmp_path / "fifo")
        return ["--data", str(tmp_path / "fifo")], "not a regular file"
    if case == "meta_missing_files":
        meta.pop("files")
        (step / "meta.json").write_text(json.dumps(meta))
        return ["--load", str(ck)], "\"files\""
    if case == "meta_missing_layout":
        meta.pop("layout")
        (step / "meta.json").write_text(json.dumps(meta))
        return ["--load", str(ck)], "\"layout\""
    if case == "meta_step_not_integer":
        (step / "meta.json").write_text(json.dumps(dict(meta, step="two")))
        return ["--load", str(ck)], "\"step\""
    if case == "meta_unknown_model_field":
        (step / "meta.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], n_embd=3))))
        return ["--load", str(ck)], "unknown fields ['n_embd']"
    if case == "meta_model_field_wrong_type":
        (step / "meta.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], hidden_size="32"))))
        return ["--load", str(ck)], "hidden_size"
    if case == "latest_is_a_folder":
        (ck / "latest").unlink()
        (ck / "latest").mkdir()
        return ["--load", str(ck)], "latest: unreadable"
    if case == "latest_is_a_symlink_loop_on_auto_resume":
        (ck / "latest").unlink()
        os.symlink(ck / "latest", ck / "latest")
        return ["--save", str(ck)], "latest: unreadable"
    if case == "latest_is_a_fifo":
        (ck / "latest").unlink()
        os.mkfifo(ck / "latest")  # reading it would block forever
        return ["--save", str(ck)], "latest: unreadable (not a regular file)"
    if case == "meta_json_is_a_fifo":
        (step / "meta.json").unlink()
        os.mkfifo(step / "meta.json")
        return ["--load", str(step)], "meta.json: unreadable"
    if case == "latest_names_a_path_outside":
        (ck / "latest").write_text("../../etc")
        return ["--load", str(ck)], "not a step folder"
    if case == "save_holds_steps_but_no_latest":
        (ck / "latest").unlink()
        return ["--save", str(ck)], "no `latest`"
    if case == "foreign_torch_save_as_rank_file":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, step / "rank_00000.pt")
        return ["--load", str(ck)], "not a rank file of this trainer"
    if case == "checkpoint_of_another_model":
        # meta.json says the tiny model; its tensors are of a wider one
        other = tmp_path / "other"
        r = run_cli(TINY_FLAGS + ["--max-steps", "1", "--hidden-size", "64", "--save", str(other)])
        assert r.returncode == 0, r.stderr
        shutil.copy(other / "step_00000001" / "rank_00000.pt", step / "rank_00000.pt")
        # its size recorded too, so that the shapes (not the size check) are what refuses it
        (step / "meta.json").write_text(json.dumps(dict(meta, sizes=[(step / "rank_00000.pt").stat().st_size])))
        return ["--load", str(ck)], "the model needs"
    raise AssertionError(case)


HOSTILE_TRAINER_CASES = [
    "lr_nan", "min_lr_over_lr", "rope_theta_0", "rms_eps_negative", "init_std_0", "weight_decay_negative",
    "aux_coef_negative", "z_coef_inf", "capacity_inf", "jitter_one", "seed_negative", "dist_timeout_0",
    "grad_clip_nan", "keep_last_negative", "experts_too_many_for_memory", "micro_batch_too_big_for_memory",
    "metrics_file_is_a_folder", "empty_train_bin", "val_id_over_vocab", "meta_max_id_over_vocab",
    "uint32_file_read_as_uint16", "unknown_dtype", "vocab_too_big_for_uint16", "data_is_a_fifo",
    "token_meta_json_is_a_fifo",
    "meta_missing_files", "meta_missing_layout", "meta_step_not_integer", "meta_unknown_model_field",
    "meta_model_field_wrong_type", "latest_is_a_folder", "latest_is_a_symlink_loop_on_auto_resume",
    "latest_is_a_fifo", "meta_json_is_a_fifo", "flag_not_a_number",
    "latest_names_a_path_outside", "save_holds_steps_but_no_latest", "foreign_torch_save_as_rank_file",
    "checkpoint_of_another_model"]


# A FIFO that the code wrongly opened would block forever: those cases run as processes with a timeout.
FIFO_CASES = ["data_is_a_fifo", "token_meta_json_is_a_fifo", "latest_is_a_fifo", "meta_json_is_a_fifo"]


@pytest.mark.parametrize("case", [c for c in HOSTILE_TRAINER_CASES if c not in FIFO_CASES])
def test_hostile_input_exits_2_with_one_error_line_fast_and_touches_nothing(case, tmp_path, saved_tiny, capsys):
    """In-process (main() as the CLI calls it) so that 35 cases cost seconds, not minutes; the
    next test runs the FIFO cases and a few others as real processes."""
    flags, words = _bad_trainer_input(case, tmp_path, saved_tiny)
    before = tree_bytes(tmp_path / "ck")
    capsys.readouterr()
    start = time.time()
    with pytest.raises(SystemExit) as stop:
        mp.main(TINY_FLAGS + ["--max-steps", "4"] + flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert time.time() - start < 30
    assert tree_bytes(tmp_path / "ck") == before


@pytest.mark.parametrize("case", ["lr_nan", "flag_not_a_number", "checkpoint_of_another_model"] + FIFO_CASES)
def test_hostile_input_as_a_process_exits_2_without_traceback(case, tmp_path, saved_tiny):
    flags, words = _bad_trainer_input(case, tmp_path, saved_tiny)
    before = tree_bytes(tmp_path / "ck")
    r = run_cli(TINY_FLAGS + ["--max-steps", "4"] + flags, timeout=60)
    assert_clean_refusal(r, words)
    assert tree_bytes(tmp_path / "ck") == before


def test_text_folder_counts_each_real_file_once_and_skips_special_files(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    made = []
    for i in range(3):
        (root / f"a{i}.txt").write_text(f"text {i}")
        made.append(str(root / f"a{i}.txt"))
    (root / "sub" / "b.txt").write_text("more")
    made.append(str(root / "sub" / "b.txt"))
    os.symlink(root, root / "sub" / "loop")  # a link to an ancestor: walking it would never end
    os.symlink(root / "a0.txt", root / "sub" / "copy_of_a0.txt")  # the same real file twice
    os.mkfifo(root / "pipe")  # reading it would block forever
    os.symlink(root / "missing", root / "dangling")
    files, skipped = data.text_files_under(str(root))
    assert sorted(os.path.realpath(f) for f in files) == sorted(os.path.realpath(f) for f in made)
    assert skipped == 2  # the FIFO and the dangling link


def test_uint32_token_files_are_read_exactly(tmp_path):
    vocab = 70_000  # over 65,536: needs uint32
    train = (np.arange(4000, dtype=np.int64) * 7919) % vocab
    val = (np.arange(400, dtype=np.int64) * 104729) % vocab
    d = _token_folder(tmp_path / "tok", train, val, {"vocab_size": vocab, "dtype": "uint32",
                                                     "tokens": {"train": 4000, "val": 400}}, np.uint32)
    corpus = data.load_corpus(d, None)
    assert corpus.vocab_size == vocab and corpus.train.dtype == np.uint32
    assert np.array_equal(np.asarray(corpus.train), train) and np.array_equal(np.asarray(corpus.val), val)
    x, y = data.get_batch(corpus.train, 3, 0, 0, 4, 16, vocab)
    starts = np.random.default_rng([3, 0, 0]).integers(0, len(train) - 17, size=4)  # get_batch's own draw
    assert torch.equal(x, torch.from_numpy(np.stack([train[s:s + 16] for s in starts])))
    assert x.max() > 65_535 or y.max() > 65_535


def test_ids_over_the_vocabulary_in_a_large_split_fail_at_the_batch_that_reads_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SCAN_LIMIT_TOKENS", 10)  # as if the split were too large to scan at start
    d = _token_folder(tmp_path / "tok", np.full(3000, 99), np.arange(300) % 50, {"vocab_size": 50})
    corpus = data.load_corpus(d, None)  # not scanned: opens fine
    with pytest.raises(data.DataError, match="holds token 99 >= vocab size 50"):
        data.get_batch(corpus.train, 0, 0, 0, 2, 16, corpus.vocab_size)


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 4), (1, 3, 1)])
def test_memory_planner_counts_the_parameters_each_stage_builds(layout):
    tp, pp, ep = layout
    mc = tiny_config(num_layers=3, vocab_size=64, num_experts=4, moe_layer_interval=2, num_shared_experts=1)
    counted = memory.params_per_stage(mc, tp, pp, ep)
    for stage in range(pp):
        start, end = stage_layers(mc.num_layers, pp, stage)
        par = ModelParallel(tp_size=tp, ep_size=ep, layer_start=start, layer_end=end,
                            first_stage=stage == 0, last_stage=stage == pp - 1)
        model = MoETransformer(mc, par)
        assert counted[stage] == sum(p.numel() for p in model.parameters()), (layout, stage)


def test_rewind_with_keep_last_keeps_the_new_checkpoint_and_latest(tmp_path):
    save = tmp_path / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "6", "--save", str(save), "--save-interval", "2"])
    assert r.returncode == 0, r.stderr
    later = tree_bytes(save / "step_00000006")
    # Rewind to step 2 and train to 4 with --keep-last 1: the later step 6 is another timeline.
    r = run_cli(TINY_FLAGS + ["--max-steps", "4", "--load", str(save / "step_00000002"), "--save", str(save),
                              "--keep-last", "1"])
    assert r.returncode == 0, r.stderr
    assert "also holds later checkpoints ['step_00000004', 'step_00000006']" in r.stdout
    assert (save / "latest").read_text() == "step_00000004"
    assert ckpt_io.read_checkpoint(str(save)).meta["step"] == 4
    assert ckpt_io.list_checkpoints(str(save)) == ["step_00000004", "step_00000006"]
    assert tree_bytes(save / "step_00000006") == later


def test_resave_of_the_latest_step_that_crashes_midway_still_loads(tmp_path, monkeypatch):
    model, opt, meta, before = tiny_checkpoint_at_step_3(tmp_path)
    real_replace = os.replace

    def die_before_the_new_folder_moves_in(src, dst):
        if os.path.basename(src).startswith(".tmp-step_"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_io.os, "replace", die_before_the_new_folder_moves_in)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(str(tmp_path), 3, ckpt_io.rank_payload(model, opt, Layout()), meta, 0, 1)
    monkeypatch.setattr(ckpt_io.os, "replace", real_replace)
    assert not (tmp_path / "step_00000003").exists()  # the crash fell between the two renames
    after = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path)))  # `latest` -> the old copy
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt_io.save_checkpoint(str(tmp_path), 3, ckpt_io.rank_payload(model, opt, Layout()), meta, 0, 1)
    resaved = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path)))
    assert all(torch.equal(before[k] + 1.0, resaved[k]) for k in before if k.endswith("weight"))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003"]


def test_second_run_on_the_same_save_folder_is_refused_while_the_first_trains(tmp_path):
    save = tmp_path / "ck"
    first = subprocess.Popen([sys.executable, os.path.join(HERE, "minimal_pretrain.py")] + TINY_FLAGS +
                             ["--max-steps", "100000", "--save", str(save)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (save / ".lock").exists() or not (save / ".lock").read_text():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        second = run_cli(TINY_FLAGS + ["--max-steps", "4", "--save", str(save)], timeout=60)
        assert_clean_refusal(second, "is in use by another run")
        assert first.poll() is None  # the first run trains on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert ckpt_io.read_checkpoint(str(save)).meta["step"] >= 1  # it saved where it stopped


def test_sigterm_saves_a_checkpoint_from_which_resume_is_exact(tmp_path):
    steps = 40
    args = TINY_FLAGS + ["--max-steps", str(steps)]
    clean = run_cli(args + ["--metrics-file", str(tmp_path / "clean.jsonl")])
    assert clean.returncode == 0, clean.stderr
    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "minimal_pretrain.py")] + args +
                            ["--save", str(save), "--metrics-file", str(metrics)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM after step" in out and "Traceback" not in err
    stopped_at = ckpt_io.read_checkpoint(str(save)).meta["step"]
    assert 3 <= stopped_at < steps
    resumed = run_cli(args + ["--save", str(save), "--metrics-file", str(metrics)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {save / ckpt_io.step_dir_name(stopped_at)}" in resumed.stdout
    clean_records = {r["step"]: r["loss"] for r in train_records(str(tmp_path / "clean.jsonl"))}
    for r in train_records(str(metrics)):
        assert r["loss"] == clean_records[r["step"]], r["step"]  # bitwise: the same run
    nothing = run_cli(args + ["--save", str(save)])
    assert nothing.returncode == 0 and "nothing to do: the checkpoint is at step 40" in nothing.stdout


def test_bad_data_on_another_node_fails_every_rank_fast_with_its_message(tmp_path):
    """Two torchrun "nodes" on loopback; only node 1's --data is missing. With --dist-timeout 300,
    rank 0 must not wait for it: both end in seconds, rank 0 printing rank 1's message."""
    port = str(free_port())
    procs = []
    start = time.time()
    for node, path in ((0, ""), (1, str(tmp_path / "not_on_this_node"))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               os.path.join(HERE, "minimal_pretrain.py")] + TINY_FLAGS + ["--max-steps", "2", "--data", path]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outputs = [p.communicate(timeout=200) for p in procs]
    assert time.time() - start < 120
    assert all(p.returncode != 0 for p in procs)
    errors = [line for line in outputs[0][1].splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1: --data {tmp_path / 'not_on_this_node'}: no such file or folder"], outputs[0][1]
    assert not any(line.startswith("error:") for line in outputs[1][1].splitlines())  # rank 0 alone speaks
    assert "exitcode  : 2" in outputs[0][1] + outputs[1][1]


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


def test_recompute_gives_identical_losses(tmp_path):
    runs = {}
    for name, extra in (("eager", []), ("recompute", ["--recompute"])):
        metrics = tmp_path / f"{name}.jsonl"
        r = run_cli(TINY_FLAGS + ["--max-steps", "3", "--num-microbatches", "2", "--metrics-file", str(metrics),
                                  "--mtp-num-layers", "1"] + extra)  # the MTP module is recomputed too
        assert r.returncode == 0, r.stderr
        runs[name] = without_timing(train_records(str(metrics)))
    assert runs["eager"] == runs["recompute"]


def test_compile_gives_the_same_losses_to_rounding(tmp_path):
    runs = {}
    for name, extra in (("eager", []), ("compile", ["--compile"])):
        metrics = tmp_path / f"{name}.jsonl"
        r = run_cli(TINY_FLAGS + ["--max-steps", "3", "--metrics-file", str(metrics), "--mtp-num-layers", "1"] + extra,
                    timeout=400)  # the MTP module's block is compiled too
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = train_records(str(metrics))
    for a, b in zip(runs["eager"], runs["compile"]):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_state_round_trips_through_a_checkpoint_fused_or_not(fused):
    """The fused AdamW the trainer uses on CUDA (runnable on the CPU too) resumes exactly like the reference."""
    tc = launch.TrainConfig()

    def fresh() -> tuple[MoETransformer, torch.optim.Optimizer]:
        model = MoETransformer(tiny_config(), seed=0)
        return model, optim.build_optimizer(model, tc.lr, tc.weight_decay, fused=fused)

    def step(model: MoETransformer, opt: torch.optim.Optimizer, seed: int) -> None:
        x = tokens(64, seed=seed)
        out = model(x)
        F.cross_entropy(out.output.flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()

    model, opt = fresh()
    assert bool(opt.defaults.get("fused")) == fused
    for seed in range(2):
        step(model, opt, seed)
    payload = ckpt_io.rank_payload(model, opt, Layout())
    saved = ckpt_io.Checkpoint(path="memory", meta={}, params={k: [v] for k, v in payload["params"].items()},
                               optim={k: [v] for k, v in payload["optim"].items()}, rng={0: payload["rng"]})
    resumed, resumed_opt = fresh()
    ckpt_io.load_into(saved, resumed, resumed_opt)
    step(model, opt, 2)
    step(resumed, resumed_opt, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_compiled_blocks_compile_once_across_steps_and_microbatches():
    """The step's micro-batch index must not reach the compiled blocks as a new int each time
    (dynamo guards on an int argument's value, so each one recompiles). Reference: the graphs
    compiled for a step that passes no seeds at all. Round-robin routing keeps the expert counts
    fixed, so any extra graph here is the trainer's doing."""
    from torch._dynamo.utils import counters
    mc = tiny_config(router_type="round-robin")
    tc = launch.TrainConfig(micro_batch_size=2, num_microbatches=2)
    pg = mp.build_process_groups(launch.resolve_layout(mc, tc, 1))

    def graphs_compiled(steps: list[int | None]) -> int:
        model = MoETransformer(mc, seed=0)
        torch._dynamo.reset()
        counters.clear()
        for block in model.layers.values():
            block.compile(backend="eager")  # dynamo's tracing and guards, without code generation
        for i, step in enumerate(steps):
            x = tokens(64, (4, 16), seed=i)
            mp.run_microbatches(model, list(zip(x.split(2), x.split(2))), pg, mc, tc, torch.device("cpu"), None,
                                train=True, step=step)
        n = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
        return n

    assert graphs_compiled([0, 1, 2]) == graphs_compiled([None]) > 0


# ------------------------------------------------------------- bf16 weights with fp32 master weights
def test_bf16_model_holds_bf16_weights_and_the_optimizer_fp32_masters_it_rounds_from():
    mc = tiny_config()
    tc = launch.TrainConfig(dtype="bfloat16")
    pg = mp.build_process_groups(launch.resolve_layout(mc, tc, 1))
    model = mp.build_model(mc, tc, pg, torch.device("cpu"), torch.bfloat16)
    reference = MoETransformer(mc, seed=tc.seed)  # the same init in fp32
    opt = optim.build_optimizer(model, tc.lr, tc.weight_decay)
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        want = torch.float32 if name.endswith("router.weight") else torch.bfloat16
        assert p.dtype == want and opt.master[p].dtype == torch.float32, name
        assert torch.equal(opt.master[p], ref.detach().to(want).float()), name  # the init, rounded (as Megatron)
    assert all(b.dtype == torch.float32 for b in model.buffers())  # expert bias and rotary tables
    x = tokens(64, (4, 16))
    for step in range(2):
        mp.train_step(model, opt, [], [(x, x)], pg, mc, tc, torch.device("cpu"), torch.bfloat16, step)
    for name, p in model.named_parameters():
        assert torch.equal(p, opt.master[p].to(p.dtype)), name  # the model is its masters, rounded
        assert opt.state[opt.master[p]]["exp_avg"].dtype == torch.float32, name


def _bf16_run(tmp_path, name: str, extra: list[str], nproc: int = 1):
    out = tmp_path / name
    r = run_cli(TINY_FLAGS + ["--dtype", "bfloat16", "--metrics-file", f"{out}.jsonl", "--save", str(out),
                              "--dist-timeout", "60"] + extra, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return train_records(f"{out}.jsonl"), out


def test_bf16_training_tracks_fp32_within_a_stated_tolerance(tmp_path):
    """bf16 weights and activations against the fp32 reference, 30 steps at lr 5e-3. Stated
    tolerances: the first 10 losses within 0.2% relative (rounding alone, before routing
    decisions drift apart), the mean over all 30 within 1% and every one within 5%, and the
    trained (master) weights within 0.1 (a 5e-3 learning rate moves a weight by up to 0.15).
    Seen: 0.06%, 0.34%, 2.4% and 0.047; the fp32-weight autocast scheme gives 0.07%, 0.18%,
    1.9% and 0.046 on the same run."""
    flags = ["--max-steps", "30", "--num-microbatches", "2", "--lr", "5e-3"]
    bf16, bf16_ck = _bf16_run(tmp_path, "bf16", flags)
    r = run_cli(TINY_FLAGS + flags + ["--metrics-file", str(tmp_path / "fp32.jsonl"), "--save", str(tmp_path / "fp32")])
    assert r.returncode == 0, r.stderr
    fp32 = train_records(str(tmp_path / "fp32.jsonl"))
    diffs = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(fp32, bf16)]
    w32 = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / "fp32")))
    w16 = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(bf16_ck)))
    weights = max((w16[k] - w32[k]).abs().max().item() for k in w32)
    print(f"bf16 vs fp32: first 10 {max(diffs[:10]):.2e}, mean {sum(diffs) / len(diffs):.2e}, "
          f"worst {max(diffs):.2e}, weights {weights:.2e}")
    assert len(diffs) == 30
    assert max(diffs[:10]) < 2e-3 and sum(diffs) / len(diffs) < 1e-2 and max(diffs) < 5e-2, diffs
    assert all(w16[k].dtype == torch.float32 for k in w16)  # checkpoints hold the fp32 masters
    assert weights < 0.1


def test_bf16_resume_is_exact(tmp_path):
    whole, ck = _bf16_run(tmp_path, "whole", ["--max-steps", "8", "--save-interval", "4"])
    resumed, _ = _bf16_run(tmp_path, "resumed", ["--max-steps", "8", "--load", str(ck / "step_00000004")])
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[4:]]  # bit for bit


def test_bf16_pipeline_and_tensor_parallel_track_one_process(tmp_path):
    """Activations cross pipeline stages in bf16; PP2 x TP2 stays within bf16 rounding of one process."""
    flags = ["--max-steps", "5", "--num-microbatches", "2"]
    one, _ = _bf16_run(tmp_path, "one", flags)
    four, _ = _bf16_run(tmp_path, "pp2_tp2", flags + ["--pipeline-parallel-size", "2", "--tensor-parallel-size", "2"],
                        nproc=4)
    assert max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one, four)) < 1e-2


def test_bench_train_times_the_trainers_own_step(monkeypatch, capsys):
    """scripts/bench_train.py has no step of its own: every step it times is minimal_pretrain.train_step."""
    import bench_train
    steps = []
    real = bench_train.train_step

    def counted(*args, **kw):
        steps.append(args[-1])
        return real(*args, **kw)

    monkeypatch.setattr(bench_train, "train_step", counted)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--num-layers", "1", "--hidden-size", "32",
                                      "--num-attention-heads", "2", "--num-kv-heads", "1", "--ffn-hidden-size", "32",
                                      "--moe-ffn-hidden-size", "16", "--seq-length", "16", "--micro-batch-size", "2",
                                      "--steps", "2", "--warmup", "1", "--json"])
    bench_train.main()
    assert steps == [0, 1, 2]
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(record["loss"]) and record["step_ms"] > 0 and record["total_params"] > 0


def test_flops_formula_counts_the_active_parameters_of_a_built_model():
    cfg = tiny_config(num_layers=3, moe_layer_interval=2, num_experts=4, num_experts_per_token=2)
    model = MoETransformer(cfg)
    by_hand = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        by_hand += p.numel() * (2 / 4 if "experts" in name else 1.0)
    assert cfg.active_params_per_token() == by_hand
    assert cfg.flops_per_token() == 6 * by_hand + 12 * 3 * 32 * 16


# ---------------------------------------------------------------- CUDA (GPU machines)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_moe_layer_matches_per_token_reference_fp32_and_grouped_bf16():
    from moe_layers import can_use_grouped_mm
    cfg = tiny_config(hidden_size=64, moe_ffn_hidden_size=32, num_experts=8, num_experts_per_token=2)
    layer = moe_layer(cfg, 9).cuda()
    x = torch.randn(2, 64, 64, device="cuda")
    ref = reference_moe(layer, x)
    y, _ = layer(x)
    assert torch.allclose(y, ref, atol=1e-4)
    assert can_use_grouped_mm(torch.device("cuda"), cfg, torch.bfloat16) == \
        (torch.cuda.get_device_capability()[0] >= 9)
    if can_use_grouped_mm(torch.device("cuda"), cfg, torch.bfloat16):
        layer.experts.use_grouped_mm = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yb, _ = layer(x)
        assert (yb.float() - ref).abs().max() < 2e-2 * ref.abs().max()
        yb.float().pow(2).sum().backward()  # grouped backward runs (gradients checked on CPU)
        assert torch.isfinite(layer.experts.w_down.grad).all()


@cuda
def test_cuda_training_run_bf16(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + ["--max-steps", "20", "--device", "cuda", "--metrics-file", str(metrics),
                              "--hidden-size", "64", "--moe-ffn-hidden-size", "64"])
    assert r.returncode == 0, r.stderr
    assert "autocast torch.bfloat16" in r.stdout
    records = train_records(str(metrics))
    assert records[-1]["loss"] < records[0]["loss"]

# --------------------------------------- use the model: export, import, generate, plot
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, args: list, timeout: float = 240) -> subprocess.CompletedProcess:
    """A script of scripts/ in a subprocess (arguments may be paths or numbers)."""
    return subprocess.run([sys.executable, os.path.join(HERE, "scripts", name)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=HERE)


def save_in_process(model: MoETransformer, root) -> str:
    """A one-rank checkpoint of `model` as the trainer writes it (no optimizer state)."""
    payload = ckpt_io.rank_payload(model, torch.optim.AdamW(model.parameters()), Layout())
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 0, "skipped_steps": 0,
            "model": dataclasses.asdict(model.cfg), "train": {"router_aux_loss_coef": 0.01},
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    return ckpt_io.save_checkpoint(str(root), 0, payload, meta, 0, 1)


def briefly_train(model: MoETransformer, steps: int = 3) -> None:
    """A few AdamW steps on random tokens, so that norms and router weights move off their init."""
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, model.cfg.vocab_size, (4, model.cfg.seq_length + 1), generator=gen)
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.output.flatten(0, 1), x[:, 1:].flatten()) + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def our_logits(path: str, x: torch.Tensor) -> torch.Tensor:
    ckpt = ckpt_io.read_checkpoint(path)
    model = MoETransformer(ModelConfig(**ckpt.meta["model"]))
    ckpt_io.load_into(ckpt, model, None)
    with torch.no_grad():
        return model(x).output


def hf_logits(folder: str, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        return model(x).logits, type(model).__name__


def tokens(vocab: int, shape: tuple[int, int] = (2, 16), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 6-step run (eval every 3) with checkpoint and metrics: exported, imported, sampled, plotted."""
    d = tmp_path_factory.mktemp("trained")
    r = run_cli(TINY_FLAGS + ["--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2",
                              "--metrics-file", str(d / "m.jsonl"), "--save", str(d / "ck")])
    assert r.returncode == 0, r.stderr
    return d


# --------------------------------------------------------------------------- export
EXPORT_CONFIGS = {
    "dense": dict(num_experts=0),
    "every_layer_top2_normalised_gqa": dict(),
    "interval2_top1": dict(num_layers=3, moe_layer_interval=2, num_experts_per_token=1),
    "top2_unnormalised": dict(norm_topk_prob=False),
    "mha_top1_unnormalised": dict(num_kv_heads=4, num_experts_per_token=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("trained_steps", [0, 3])
@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_export_gives_transformers_the_same_logits(name, trained_steps, tmp_path):
    pytest.importorskip("safetensors")
    cfg = tiny_config(**EXPORT_CONFIGS[name])
    model = MoETransformer(cfg, seed=3)
    if trained_steps:
        briefly_train(model, trained_steps)
    ck = save_in_process(model, tmp_path / "ck")
    export_hf.export(ck, str(tmp_path / "hf"))
    x = tokens(cfg.vocab_size)
    theirs, arch = hf_logits(tmp_path / "hf", x)
    assert arch == ("Qwen3MoeForCausalLM" if cfg.num_experts else "Qwen3ForCausalLM")
    assert (our_logits(ck, x) - theirs).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp2") / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "3", "--tensor-parallel-size", "2", "--save", str(d)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.parametrize("run", ["one_process", "tp2"])
def test_checkpoint_of_a_training_run_exports_to_the_same_logits(run, trained, tp2_run, tmp_path):
    pytest.importorskip("safetensors")
    ck = str(trained / "ck") if run == "one_process" else str(tp2_run)
    meta = ckpt_io.read_checkpoint(ck).meta
    assert meta["layout"]["tp"] == (2 if run == "tp2" else 1) and len(meta["files"]) == meta["layout"]["world_size"]
    export_hf.export(ck, str(tmp_path / "hf"))
    x = tokens(256)
    theirs, _ = hf_logits(tmp_path / "hf", x)
    assert (our_logits(ck, x) - theirs).abs().max() < 1e-4


def test_export_cli_writes_config_and_bf16_weights(trained, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    r = run_script("export_hf.py", ["--checkpoint", str(trained / "ck"), "--out", str(tmp_path / "hf"),
                                    "--dtype", "bfloat16"])
    assert r.returncode == 0, r.stderr
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["model_type"] == "qwen3_moe" and config["torch_dtype"] == "bfloat16"
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 2, 32)
    weights = safetensors.load_file(str(tmp_path / "hf" / "model.safetensors"))
    ours = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(trained / "ck")))
    assert len(weights) == sum(not k.endswith(".expert_bias") for k in ours)  # zero biases are left out
    assert torch.equal(weights["model.layers.1.mlp.gate.weight"], ours["layers.1.mlp.router.weight"].bfloat16())
    assert torch.equal(weights["model.layers.0.mlp.experts.3.down_proj.weight"],
                       ours["layers.0.mlp.experts.3.down_proj.weight"].bfloat16())


def test_export_refuses_options_qwen3_cannot_express(trained, tmp_path):
    pytest.importorskip("safetensors")
    ck = tmp_path / "ck"
    shutil.copytree(trained / "ck", ck)
    meta_path = ck / "step_00000006" / "meta.json"
    meta = json.load(open(meta_path))
    meta["model"]["num_shared_experts"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(export_hf.UnsupportedModel, match="num_shared_experts"):
        export_hf.export(str(ck), str(tmp_path / "hf"))
    model = MoETransformer(tiny_config(), seed=3)
    model.layers["1"].mlp.router.expert_bias[2] = 0.5  # aux-loss-free balancing moved it
    with pytest.raises(export_hf.UnsupportedModel, match="layers.1.mlp.router.expert_bias is non-zero"):
        export_hf.export(save_in_process(model, tmp_path / "biased"), str(tmp_path / "hf"))


# --------------------------------------------------------------------------- import
def test_export_then_import_gives_identical_weights_and_training_continues(trained, tmp_path):
    pytest.importorskip("safetensors")
    export_hf.export(str(trained / "ck"), str(tmp_path / "hf"))
    r = run_script("import_hf.py", ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
    assert r.returncode == 0, r.stderr
    before, after = ckpt_io.read_checkpoint(str(trained / "ck")), ckpt_io.read_checkpoint(str(tmp_path / "imported"))
    a, b = ckpt_io.full_state_dict(before), ckpt_io.full_state_dict(after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert after.meta["model"] == before.meta["model"]
    assert (after.meta["step"], after.optim, after.meta["layout"]["world_size"]) == (0, {}, 1)
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(tmp_path / "imported"), "--max-steps", "2", "--micro-batch-size", "2",
                 "--log-interval", "1", "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    records = train_records(str(metrics))
    assert [x["step"] for x in records] == [1, 2] and all(math.isfinite(x["loss"]) for x in records)


def hf_model(kind: str):
    """A tiny transformers model built from a config (no download), every weight perturbed off its init."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=16, rope_theta=5000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        moe = dict(moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
        if kind == "qwen3_moe_interval2_top1":
            common["num_hidden_layers"] = 3
            moe.update(decoder_sparse_step=2, num_experts_per_tok=1, norm_topk_prob=False)
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**common, **moe))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_moe_interval2_top1", "qwen3"])
def test_import_of_a_transformers_model_gives_its_logits(kind, tmp_path):
    pytest.importorskip("safetensors")
    model = hf_model(kind)
    model.save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    x = tokens(256)
    with torch.no_grad():
        theirs = model(x).logits
    assert (our_logits(str(tmp_path / "ck"), x) - theirs).abs().max() < 1e-4


def test_pretraining_continues_from_an_imported_transformers_model(tmp_path):
    pytest.importorskip("safetensors")
    hf_model("qwen3_moe").save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(tmp_path / "ck"), "--max-steps", "3", "--micro-batch-size", "2", "--log-interval", "1",
                 "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics),
                 "--save", str(tmp_path / "ck")])
    assert r.returncode == 0, r.stderr
    records = train_records(str(metrics))
    assert [x["step"] for x in records] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in records)
    assert ckpt_io.read_checkpoint(str(tmp_path / "ck")).meta["step"] == 3


def test_import_reads_sharded_files_and_fused_experts(tmp_path):
    """transformers 5.x holds experts fused (gate_up_proj (E, 2F, D), down_proj (E, D, F)); big models shard."""
    st = pytest.importorskip("safetensors.torch")
    model = hf_model("qwen3_moe")
    model.save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "plain"))
    weights = st.load_file(str(tmp_path / "hf" / "model.safetensors"))
    fused = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([weights.pop(f"{p}.{e}.gate_proj.weight"), weights.pop(f"{p}.{e}.up_proj.weight")])
                   for e in range(4)]  # (2F, D) each
        fused[f"{p}.gate_up_proj"] = torch.stack(gate_up)  # (E, 2F, D)
        fused[f"{p}.down_proj"] = torch.stack([weights.pop(f"{p}.{e}.down_proj.weight") for e in range(4)])
    rest = weights  # everything but the experts
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    st.save_file(rest, str(out / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    st.save_file(fused, str(out / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in rest},
                  **{k: "model-00002-of-00002.safetensors" for k in fused}}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    import_hf.import_hf(str(out), str(tmp_path / "from_sharded"))
    a = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / "plain")))
    b = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / "from_sharded")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


VALID_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=32, intermediate_size=64,
                       moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                       norm_topk_prob=True, max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, hidden_act="silu")


@pytest.mark.parametrize("change,words", [
    (dict(mlp_only_layers=[0, 1]), "mlp_only_layers"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(model_type="mixtral"), "model_type 'mixtral'"),
])
def test_import_refuses_configs_we_cannot_represent(change, words):
    assert import_hf.model_config_from_hf(VALID_QWEN3_MOE).num_experts == 4
    with pytest.raises(import_hf.UnsupportedModel, match=words):
        import_hf.model_config_from_hf({**VALID_QWEN3_MOE, **change})


def test_import_cli_refusal_exits_2_with_one_error_line_and_writes_nothing(tmp_path):
    pytest.importorskip("safetensors")  # without it the script's first error is the missing extra
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**VALID_QWEN3_MOE, "attention_bias": True}))
    r = run_script("import_hf.py", ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")])
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "attention_bias" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def sampler(trained):
    return generate.load_model(str(trained / "ck"))


def test_kv_cache_logits_equal_full_recompute(sampler):
    """Prompt of 5, a chunk of 4 (bottom-right causal mask), then one token at a time up to seq_length."""
    x = tokens(256, (1, 16), seed=5)
    with torch.no_grad():
        full = sampler(x).output[0]  # (T, V)
        caches = [{} for _ in sampler.layers]
        got = [sampler(x[:, :5], positions=torch.arange(5), kv_caches=caches).output[0],
               sampler(x[:, 5:9], positions=torch.arange(5, 9), kv_caches=caches).output[0]]
        for t in range(9, 16):
            got.append(sampler(x[:, t:t + 1], positions=torch.tensor([t]), kv_caches=caches).output[0])
    assert caches[0]["k"].shape[2] == 16
    assert (torch.cat(got) - full).abs().max() < 1e-5


def test_greedy_with_cache_equals_greedy_recomputed_and_stops_at_seq_length(sampler):
    prompt = list(b"def ")
    cached, stopped = generate.generate(sampler, prompt, 12, temperature=0)
    plain, _ = generate.generate(sampler, prompt, 12, temperature=0, use_cache=False)
    assert cached == plain and len(cached) == 12 and not stopped
    # by hand: argmax of the full forward pass, one token at a time
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(sampler(torch.tensor([ids])).output[0, -1].argmax()))
    assert ids[4:] == cached
    # past the rotary table: the cache stops after the token fed at position 15 predicts one more
    long_cached, stopped = generate.generate(sampler, prompt, 20, temperature=0)
    long_plain, _ = generate.generate(sampler, prompt, 20, temperature=0, use_cache=False)
    assert stopped and len(long_cached) == 16 - len(prompt) + 1 and len(long_plain) == 20
    assert long_plain[:len(long_cached)] == long_cached


def test_seeded_sampling_is_reproducible_and_the_same_with_and_without_cache(sampler):
    draw = dict(temperature=1.5, top_k=0, top_p=1.0)
    a, _ = generate.generate(sampler, [10], 15, seed=1, **draw)
    assert a == generate.generate(sampler, [10], 15, seed=1, **draw)[0]
    assert a == generate.generate(sampler, [10], 15, seed=1, use_cache=False, **draw)[0]
    long_a, _ = generate.generate(sampler, [10], 40, seed=1, use_cache=False, **draw)
    long_b, _ = generate.generate(sampler, [10], 40, seed=2, use_cache=False, **draw)
    assert long_a[:15] == a and long_a != long_b  # 40 draws at temperature 1.5: a repeat is hopeless


def test_top_k_1_and_tiny_top_p_equal_greedy(sampler):
    greedy, _ = generate.generate(sampler, list(b"import"), 10, temperature=0)
    assert generate.generate(sampler, list(b"import"), 10, temperature=1.0, top_k=1, seed=3)[0] == greedy
    assert generate.generate(sampler, list(b"import"), 10, temperature=1.0, top_p=1e-6, seed=4)[0] == greedy


def test_sampling_probs_by_hand():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    assert torch.allclose(generate.sampling_probs(logits, 1.0), p)
    assert torch.allclose(generate.sampling_probs(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(generate.sampling_probs(logits, 1.0, top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert torch.allclose(generate.sampling_probs(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    root = p.sqrt()  # temperature 2: p^(1/2), renormalised
    assert torch.allclose(generate.sampling_probs(logits, 2.0), root / root.sum())


def test_generate_cli_prints_the_greedy_text_and_refuses_long_prompts(trained, sampler):
    r = run_script("generate.py", ["--checkpoint", str(trained / "ck"), "--prompt", "def ", "--max-new-tokens", "8",
                                   "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    expected = bytes(list(b"def ") + generate.generate(sampler, list(b"def "), 8, temperature=0)[0])
    assert r.stdout.rstrip("\n") == expected.decode("utf-8", errors="replace")
    assert "tokens/s" in r.stderr
    r = run_script("generate.py", ["--checkpoint", str(trained / "ck"), "--prompt", "x" * 17])
    assert r.returncode == 2 and "more than the model's seq_length 16" in r.stderr and "Traceback" not in r.stderr


def test_generate_cli_takes_and_prints_ids_for_token_vocabularies(tmp_path):
    model = MoETransformer(tiny_config(vocab_size=64), seed=5).eval()
    ck = save_in_process(model, tmp_path / "ck")
    r = run_script("generate.py", ["--checkpoint", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                                   "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).output[0, -1].argmax()))
    assert r.stdout.strip() == ",".join(map(str, ids))


# ---------------------------------------------------------------------------- plots
def test_plot_metrics_writes_every_figure_as_small_pngs(trained, tmp_path):
    pytest.importorskip("matplotlib")
    records = [json.loads(line) for line in open(trained / "m.jsonl")]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    r = run_script("plot_metrics.py", [str(trained / "m.jsonl"), "--out", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    expected = {"loss.png", "router_losses.png", "lr.png", "grad_norm.png", "throughput.png", "load_balance.png",
                "load_cv.png", "dead_experts.png", "expert_load_layer0.png", "expert_load_layer1.png"}
    # byte-level data: the evaluations report bits per byte, which get their own chart
    assert set(os.listdir(tmp_path / "plots")) == expected | {"overview.png", "val_bpb.png"}
    for name in expected:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 1000 < len(data) < 60_000, (name, len(data))
    assert 1000 < (tmp_path / "plots" / "overview.png").stat().st_size < 200_000


# ------------------------------------------- upcycling and the routing comparison
def build(path) -> MoETransformer:
    """The model a checkpoint describes, with its weights."""
    ckpt = ckpt_io.read_checkpoint(str(path))
    model = MoETransformer(ModelConfig(**ckpt.meta["model"]))
    ckpt_io.load_into(ckpt, model, None)
    return model.eval()


# ---------------------------------------------------------------- upcycling
@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """A dense tiny model trained 3 steps (norms and weights off their init), then upcycled by the CLI."""
    root = tmp_path_factory.mktemp("upcycle")
    r = run_cli(TINY_FLAGS + ["--num-experts", "0", "--max-steps", "3", "--save", str(root / "dense")])
    assert r.returncode == 0, r.stderr
    r = run_script("upcycle.py", ["--checkpoint", root / "dense", "--out", root / "moe", "--num-experts", 4,
                                  "--num-experts-per-token", 2, "--seed", 5])
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "--load" in r.stdout
    return root


@pytest.mark.parametrize("interval", [1, 2])
def test_upcycled_model_gives_the_dense_models_logits(dense_ckpt, tmp_path, interval):
    upcycle.upcycle(str(dense_ckpt / "dense"), str(tmp_path / "moe"), 4, 2, interval, seed=1)
    dense, moe = build(dense_ckpt / "dense"), build(tmp_path / "moe")
    assert sorted(moe.moe_layers()) == ([0, 1] if interval == 1 else [1])
    assert all(isinstance(moe.layers[str(i)].mlp, SparseMoELayer) for i in moe.moe_layers())
    x = torch.randint(0, dense.cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(x).output, moe(x).output  # (B, T, V)
        r = moe.layers[str(max(moe.moe_layers()))].mlp.router(torch.randn(64, moe.cfg.hidden_size))
    assert (got - want).abs().max().item() < 1e-5
    assert len(set(r.indices[:, 0].tolist())) > 1  # the fresh router really spreads tokens over experts


def test_upcycled_experts_are_the_dense_mlp_and_the_router_is_fresh(dense_ckpt):
    dense = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(dense_ckpt / "dense")))
    ckpt = ckpt_io.read_checkpoint(str(dense_ckpt / "moe"))
    moe = ckpt_io.full_state_dict(ckpt)
    cfg = ckpt.meta["model"]
    assert (cfg["num_experts"], cfg["num_experts_per_token"], cfg["moe_layer_interval"]) == (4, 2, 1)
    assert cfg["moe_ffn_hidden_size"] == 64 and cfg["norm_topk_prob"]  # the dense --ffn-hidden-size
    assert ckpt.meta["step"] == 0 and ckpt.optim == {} and ckpt.meta["layout"]["world_size"] == 1
    gen = torch.Generator().manual_seed(5)  # --seed 5, no noise: the routers are the only draws, layer order
    for layer in (0, 1):
        prefix = f"layers.{layer}.mlp"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{prefix}.{proj}.weight" not in moe
            for e in range(4):
                assert torch.equal(moe[f"{prefix}.experts.{e}.{proj}.weight"], dense[f"{prefix}.{proj}.weight"])
        assert torch.equal(moe[f"{prefix}.router.weight"], torch.randn(4, 32, generator=gen) * 0.02)
        assert torch.equal(moe[f"{prefix}.router.expert_bias"], torch.zeros(4))
    others = [k for k in dense if ".mlp." not in k]
    assert len(others) == len(dense) - 6 and all(torch.equal(moe[k], dense[k]) for k in others)


def test_noise_scales_each_expert_copy_by_its_own_factors(dense_ckpt, tmp_path):
    upcycle.upcycle(str(dense_ckpt / "dense"), str(tmp_path / "moe"), 4, 2, noise=0.01, seed=2)
    dense = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(dense_ckpt / "dense")))
    moe = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / "moe")))
    w = dense["layers.0.mlp.up_proj.weight"]  # (F, D) = (64, 32): 2048 factors per expert
    factors = [moe[f"layers.0.mlp.experts.{e}.up_proj.weight"] / w for e in range(4)]
    for f in factors:
        assert abs(f.mean().item() - 1) < 1e-3 and 0.009 < f.std().item() < 0.011
    assert not torch.allclose(factors[0], factors[1])


def test_upcycled_checkpoint_trains_on_with_load(dense_ckpt, tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(dense_ckpt / "moe"), "--max-steps", "10", "--micro-batch-size", "8", "--lr", "1e-2",
                 "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--no-progress",
                 "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at step 0" in r.stdout
    losses = [x["lm_loss"] for x in train_records(metrics)]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert set(train_records(metrics)[-1]["expert_load"]) == {"0", "1"}


@pytest.mark.parametrize("case", ["missing_folder", "not_dense", "out_taken"])
def test_upcycle_bad_input_exits_2_with_one_error_line(dense_ckpt, tmp_path, case):
    src, out, words = {"missing_folder": (tmp_path / "nothing", tmp_path / "o", "no such folder"),
                       "not_dense": (dense_ckpt / "moe", tmp_path / "o", "already an MoE model"),
                       "out_taken": (dense_ckpt / "dense", dense_ckpt / "moe", "already holds a checkpoint")}[case]
    r = run_script("upcycle.py", ["--checkpoint", src, "--out", out, "--num-experts", 4, "--num-experts-per-token", 2])
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------ routing comparison
@pytest.fixture(scope="module")
def quick_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing")
    r = run_script("compare_routing.py", ["--quick", "--jobs", "2", "--noise-seeds", 1, "--keep-metrics",
                                          "--out", out], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, r.stdout


def table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]  # without the header


def test_quick_comparison_has_one_finite_row_per_method(quick_comparison):
    out, _ = quick_comparison
    rows = table_rows((out / "routing_comparison.md").read_text())
    assert [r[0] for r in rows] == [name for name, _ in compare_routing.methods(2)]
    for r in rows:
        val, ratio, cv = float(r[2]), float(r[3]), float(r[4])
        assert math.isfinite(val) and 0 < val < math.log(256) + 1
        assert ratio >= 1.0 and cv >= 0.0 and math.isfinite(float(r[7].replace(",", ""))) and float(r[8]) > 0
    by_name = {r[0]: r for r in rows}
    for forced in ("expert choice", "round-robin (forced balance)"):  # balanced by construction
        assert (by_name[forced][3], by_name[forced][4]) == ("1.00", "0.00")
    assert float(by_name["capacity factor 1.0 (drops)"][6].rstrip("%")) > 0
    assert by_name["top-k softmax + aux (baseline)"][6] == "0.0%" and by_name["expert choice"][6] == "–"


def test_quick_comparison_numbers_match_the_runs_metrics(quick_comparison):
    out, _ = quick_comparison
    rows = table_rows((out / "routing_comparison.md").read_text())
    for i in (0, 6):  # baseline, capacity factor 1.0
        records = read_metrics(out / "runs" / f"{i:02d}.jsonl")
        val = [x["val_loss"] for x in records if "val_loss" in x][-1]
        last = [x for x in records if "loss" in x][-3:]  # --quick: the last 3 logged steps
        loads = [load for x in last for load in x["expert_load"].values()]
        ratio = sum(max(load) * len(load) for load in loads) / len(loads)
        assert rows[i][2] == f"{val:.4f}" and rows[i][3] == f"{ratio:.2f}"
    last = [x for x in read_metrics(out / "runs" / "06.jsonl") if "loss" in x][-3:]
    drops = [d for x in last for d in x["dropped_fraction"].values()]
    assert rows[6][6] == f"{sum(drops) / len(drops):.1%}"
    other_seed = [x["val_loss"] for x in read_metrics(out / "runs" / "11.jsonl") if "val_loss" in x][-1]
    md = (out / "routing_comparison.md").read_text()
    assert f"val loss {other_seed:.4f} (--seed 1235) against {rows[0][2]}" in md


def test_quick_comparison_writes_the_png(quick_comparison):
    pytest.importorskip("matplotlib")
    out, stdout = quick_comparison
    png = out / "routing_comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000
    assert f"wrote {png}" in stdout


# --------------------------------------------------------------- scripts: bad input (issue 16, cause 6)
# Every script of scripts/ given hostile input: exit status 2, exactly one line starting with
# `error:` that names what to change, no traceback, no hang, and nothing that existed before changed.
SCRIPT_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=2, num_kv_heads=2, ffn_hidden_size=64,
            moe_ffn_hidden_size=32, num_experts=4, seq_length=32)
SCRIPT_FLAGS = [a for k, v in SCRIPT_MODEL.items() for a in (f"--{k.replace('_', '-')}", str(v))] + \
             ["--micro-batch-size", "2", "--max-steps", "2", "--eval-interval", "0", "--log-interval", "1",
              "--no-progress"]
SCRIPT_STEP = "step_00000002"  # the step folder of the tiny run


def snapshot(*roots: Path) -> dict[str, object]:
    """Every path under `roots` -> a hash of its bytes (regular files), its target (links) or its kind.
    FIFOs are never opened and linked folders never entered, so this cannot block or loop."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    state[path] = ("link", os.readlink(path))
                elif stat.S_ISREG(mode):
                    state[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                else:
                    state[path] = stat.S_IFMT(mode)
    return state


def save_model(model: MoETransformer, root: Path) -> Path:
    """A one-rank checkpoint of a dense model (its parameter names are the checkpoint's keys)."""
    assert model.cfg.num_experts == 0
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt_io.save_full_state(str(root), tensors, dataclasses.asdict(model.cfg), {})
    return root


@dataclass
class World:
    """Good inputs shared by every case, read-only: each case copies what it spoils into its own folder."""
    root: Path
    moe: Path  # a run's --save folder (latest + step folder) written by minimal_pretrain.py
    metrics: Path  # that run's --metrics-file
    dense: Path  # a dense checkpoint root
    tokens: Path  # a dense checkpoint of a 64-token vocabulary


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    r = subprocess.run([sys.executable, os.path.join(HERE, "minimal_pretrain.py")] + SCRIPT_FLAGS +
                       ["--save", str(root / "moe"), "--metrics-file", str(root / "m.jsonl")],
                       capture_output=True, text=True, timeout=300, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    dense = save_model(MoETransformer(ModelConfig(**{**SCRIPT_MODEL, "num_experts": 0}), seed=1), root / "dense")
    tokens = save_model(MoETransformer(ModelConfig(**{**SCRIPT_MODEL, "num_experts": 0, "vocab_size": 64}), seed=2),
                        root / "tokens")
    return World(root, root / "moe", root / "m.jsonl", dense, tokens)


# ------------------------------------------------------------------ spoiled inputs, built per case
def copy_run(tmp: Path, w: World, edit_meta: Callable[[dict], None] | None = None) -> Path:
    """A copy of the MoE run, its meta.json edited by `edit_meta`."""
    ck = Path(shutil.copytree(w.moe, tmp / "ck"))
    if edit_meta:
        meta_path = ck / SCRIPT_STEP / "meta.json"
        meta = json.loads(meta_path.read_text())
        edit_meta(meta)
        meta_path.write_text(json.dumps(meta))
    return ck


def nan_weights(tmp: Path) -> Path:
    model = MoETransformer(ModelConfig(**{**SCRIPT_MODEL, "num_experts": 0}), seed=1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    return save_model(model, tmp / "nan")


def hf_folder(tmp: Path, w: World, edit_config: Callable[[dict], None] | None = None) -> Path:
    """The MoE run exported to transformers' format (in-process), its config.json edited by `edit_config`."""
    hf = tmp / "hf"
    export_hf.export(str(w.moe), str(hf))
    if edit_config:
        config = json.loads((hf / "config.json").read_text())
        edit_config(config)
        (hf / "config.json").write_text(json.dumps(config))
    return hf


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def text_folder(tmp: Path) -> Path:
    """Two text files, a link to one of them, a link to the folder itself and a FIFO."""
    d = folder(tmp / "txt")
    write(d / "a.txt", "alpha " * 50)
    write(d / "b.txt", "beta " * 50)
    os.symlink(d / "a.txt", d / "a_again.txt")
    os.symlink(d, d / "self")
    fifo(d / "pipe")
    return d


def metrics_with_expert_counts(path: Path, counts: list[int]) -> Path:
    """Train records, one per step, whose layer 0 has these numbers of experts."""
    record = dict(loss=3.0, lm_loss=3.0, aux_loss=1.0, z_loss=0.1, lr=1e-3, grad_norm=1.0, tokens_per_sec=1e3)
    return write(path, "".join(json.dumps({"step": step, **record, "expert_load": {"0": [1 / n] * n}}) + "\n"
                               for step, n in enumerate(counts, 1)))


def fifo_and_self_link(tmp: Path) -> Path:
    """A folder holding nothing but a FIFO and a link to itself."""
    d = folder(tmp / "t")
    fifo(d / "pipe")
    os.symlink(d, d / "self")
    return d


def foreign_rank_file(tmp: Path, w: World) -> Path:
    """A copy of the MoE run whose rank file is some other torch.save file."""
    ck = copy_run(tmp, w)
    torch.save([1, 2, 3], ck / SCRIPT_STEP / "rank_00000.pt")
    return ck


def latest_is_a_folder(tmp: Path, w: World) -> Path:
    ck = copy_run(tmp, w)
    (ck / "latest").unlink()
    return folder(ck / "latest").parent


def hf_config_only(tmp: Path, w: World) -> Path:
    """A folder holding an exported config.json and no weights."""
    h = folder(tmp / "h")
    shutil.copy(hf_folder(tmp, w) / "config.json", h)
    return h


@dataclass
class Case:
    id: str
    script: str
    setup: Callable[[Path, World], list]  # (its folder, the shared inputs) -> the script's arguments
    words: str  # the error line holds these
    needs: str = ""  # an optional extra (requirements-extras.txt)


def gen(*args: object) -> Callable[[Path, World], list]:
    """generate.py on the MoE run with these flags."""
    return lambda tmp, w: ["--checkpoint", w.moe, *args]


def upc(*args: object, ck: Callable[[Path, World], Path] = lambda tmp, w: w.dense,
        out: Callable[[Path, World], Path] = lambda tmp, w: tmp / "out") -> Callable[[Path, World], list]:
    """upcycle.py of the dense checkpoint into a new folder, E 4, K 2, unless told otherwise."""
    return lambda tmp, w: ["--checkpoint", ck(tmp, w), "--out", out(tmp, w),
                           *(args or ("--num-experts", 4, "--num-experts-per-token", 2))]


def imp(hf: Callable[[Path, World], Path], *args: object) -> Callable[[Path, World], list]:
    """import_hf.py of the folder `hf` builds into a new folder."""
    return lambda tmp, w: ["--hf", hf(tmp, w), "--out", tmp / "out", *args]


CASES = [
    # ------------------------------------------------------------ inspect_checkpoint.py
    Case("inspect_missing", "inspect_checkpoint.py", lambda tmp, w: [tmp / "nothing"], "no such folder"),
    Case("inspect_latest_is_a_folder", "inspect_checkpoint.py",
         lambda tmp, w: [latest_is_a_folder(tmp, w)], "latest"),
    # ----------------------------------------------------------------------- generate.py
    Case("gen_missing_checkpoint", "generate.py", lambda tmp, w: ["--checkpoint", tmp / "no", "--prompt", "a"],
         "--checkpoint"),
    Case("gen_temperature_text", "generate.py", gen("--prompt", "a", "--temperature", "hot"), "--temperature"),
    # ------------------------------------------------------------------ plot_metrics.py
    Case("plot_missing_file", "plot_metrics.py", lambda tmp, w: [tmp / "m.jsonl", "--out", tmp / "p"],
         "no such file", "matplotlib"),
    Case("plot_empty_file", "plot_metrics.py", lambda tmp, w: [write(tmp / "m.jsonl", ""), "--out", tmp / "p"],
         "no train records", "matplotlib"),
    Case("plot_folder", "plot_metrics.py", lambda tmp, w: [folder(tmp / "m"), "--out", tmp / "p"],
         "not a regular file", "matplotlib"),
    Case("plot_fifo", "plot_metrics.py", lambda tmp, w: [fifo(tmp / "m"), "--out", tmp / "p"],
         "not a regular file", "matplotlib"),
    Case("plot_not_json", "plot_metrics.py",
         lambda tmp, w: [write(tmp / "m.jsonl", "step 1 loss 3\n\x00\xff\n"), "--out", tmp / "p"],
         "no train records", "matplotlib"),
    Case("plot_records_missing_fields", "plot_metrics.py",
         lambda tmp, w: [write(tmp / "m.jsonl", '{"step": 1, "loss": 3.0}\n[1, 2]\n{"loss": 2}\n'),
                         "--out", tmp / "p"], "no train records", "matplotlib"),
    Case("plot_out_is_a_file", "plot_metrics.py", lambda tmp, w: [w.metrics, "--out", write(tmp / "p", "x")],
         "--out", "matplotlib"),
    # ------------------------------------------------------------------ prepare_data.py
    Case("prep_fifo_input", "prepare_data.py", lambda tmp, w: [fifo(tmp / "p"), "--out", tmp / "d"],
         "not a regular file"),
    Case("prep_only_fifo_and_self_link", "prepare_data.py",
         lambda tmp, w: [fifo_and_self_link(tmp), "--out", tmp / "d"], "no text files"),
    Case("prep_val_fraction_text", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "tenth"], "--val-fraction"),
    Case("prep_out_holds_data", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", write(tmp / "d" / "train.bin", b"\1\0").parent], "already holds"),
    # ---------------------------------------------------------------------- export_hf.py
    Case("export_out_not_empty", "export_hf.py",
         lambda tmp, w: ["--checkpoint", w.moe, "--out", write(tmp / "hf" / "keep.txt", "mine").parent],
         "not an empty folder", "safetensors"),
    Case("export_out_inside_checkpoint", "export_hf.py",
         lambda tmp, w: ["--checkpoint", w.moe, "--out", w.moe / "hf"], "inside the checkpoint", "safetensors"),
    # ---------------------------------------------------------------------- import_hf.py
    Case("import_out_is_a_run", "import_hf.py", lambda tmp, w: ["--hf", hf_folder(tmp, w), "--out", w.moe],
         "already holds a checkpoint", "safetensors"),
    Case("import_out_is_a_step_folder", "import_hf.py",
         lambda tmp, w: ["--hf", hf_folder(tmp, w), "--out", w.moe / SCRIPT_STEP], "already holds", "safetensors"),
    Case("import_config_is_a_fifo", "import_hf.py",
         imp(lambda tmp, w: fifo(tmp / "h" / "config.json").parent), "not a regular file", "safetensors"),
    Case("import_weights_fifo", "import_hf.py",
         imp(lambda tmp, w: fifo(hf_config_only(tmp, w) / "model.safetensors").parent), "not a regular file",
         "safetensors"),
    # ----------------------------------------------------------------------- upcycle.py
    Case("upcycle_out_is_a_run", "upcycle.py", upc(out=lambda tmp, w: w.moe), "already holds a checkpoint"),
    Case("upcycle_out_is_the_dense_run", "upcycle.py", upc(out=lambda tmp, w: w.dense), "already holds"),
    Case("upcycle_out_inside_the_dense_run", "upcycle.py", upc(out=lambda tmp, w: w.dense / "sub"),
         "inside the dense checkpoint"),
    # ----------------------------------------------------------------- compare_routing.py
    Case("routing_zero_jobs", "compare_routing.py", lambda tmp, w: ["--jobs", 0, "--out", tmp / "r"], "--jobs"),
]
# The same contract checked in-process through the script's main(), because one torch import per
# process costs seconds: every case that cannot hang. Above, as processes: what could hang (FIFOs),
# the --out refusals issue 16 names, and for each script at least one case that shows the process
# itself exits 2 with no traceback.
IN_PROCESS_CASES = [
    Case("inspect_file", "inspect_checkpoint.py", lambda tmp, w: [w.metrics], "no such folder"),
    Case("inspect_empty_folder", "inspect_checkpoint.py", lambda tmp, w: [folder(tmp / "e")], "latest"),
    Case("inspect_meta_not_json", "inspect_checkpoint.py",
         lambda tmp, w: [write(copy_run(tmp, w) / SCRIPT_STEP / "meta.json", "{").parent], "meta.json"),
    Case("inspect_meta_without_layout", "inspect_checkpoint.py",
         lambda tmp, w: [copy_run(tmp, w, lambda m: m.pop("layout"))], "layout"),
    Case("inspect_foreign_torch_file", "inspect_checkpoint.py",
         lambda tmp, w: [foreign_rank_file(tmp, w)], "rank_00000.pt"),
    Case("gen_checkpoint_is_a_file", "generate.py", lambda tmp, w: ["--checkpoint", w.metrics, "--prompt", "a"],
         "no such folder"),
    Case("gen_empty_prompt", "generate.py", gen("--prompt", ""), "empty"),
    Case("gen_prompt_longer_than_seq_length", "generate.py", gen("--prompt", "x" * 33), "seq_length 32"),
    Case("gen_ids_over_vocab", "generate.py", gen("--prompt-ids", "1,256"), "[0, 256)"),
    Case("gen_text_for_token_vocab", "generate.py",
         lambda tmp, w: ["--checkpoint", w.tokens, "--prompt", "hi"], "--prompt-ids"),
    Case("gen_model_config_of_another_kind", "generate.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(hidden_size="wide")),
                         "--prompt", "a"], "--checkpoint"),
    Case("gen_invalid_model_config", "generate.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(num_attention_heads=3)),
                         "--prompt", "a"], "model config is invalid"),
    Case("gen_nan_weights", "generate.py", lambda tmp, w: ["--checkpoint", nan_weights(tmp), "--prompt", "a"],
         "NaN"),
    Case("gen_ids_not_numbers", "generate.py", gen("--prompt-ids", "1,two"), "--prompt-ids"),
    Case("gen_ids_empty_item", "generate.py", gen("--prompt-ids", "1,,2"), "--prompt-ids"),
    Case("gen_ids_negative", "generate.py", gen("--prompt-ids", "-1"), "[0, 256)"),
    Case("gen_prompt_and_ids", "generate.py", gen("--prompt", "a", "--prompt-ids", "1"), "exactly one"),
    Case("gen_no_prompt", "generate.py", gen(), "exactly one"),
    Case("gen_temperature_nan", "generate.py", gen("--prompt", "a", "--temperature", "nan"), "--temperature"),
    Case("gen_temperature_inf", "generate.py", gen("--prompt", "a", "--temperature", "inf"), "--temperature"),
    Case("gen_temperature_negative", "generate.py", gen("--prompt", "a", "--temperature", "-1"), "--temperature"),
    Case("gen_top_p_zero", "generate.py", gen("--prompt", "a", "--top-p", "0"), "--top-p"),
    Case("gen_top_p_over_one", "generate.py", gen("--prompt", "a", "--top-p", "1.5"), "--top-p"),
    Case("gen_top_p_nan", "generate.py", gen("--prompt", "a", "--top-p", "nan"), "--top-p"),
    Case("gen_top_k_negative", "generate.py", gen("--prompt", "a", "--top-k", "-1"), "--top-k"),
    Case("gen_max_new_tokens_negative", "generate.py", gen("--prompt", "a", "--max-new-tokens", "-3"),
         "--max-new-tokens"),
    Case("gen_seed_negative", "generate.py", gen("--prompt", "a", "--seed", "-1"), "--seed"),
    Case("gen_cuda_without_gpu", "generate.py", gen("--prompt", "a", "--device", "cuda"), "--device"),
    Case("plot_expert_count_changes", "plot_metrics.py",
         lambda tmp, w: [metrics_with_expert_counts(tmp / "m.jsonl", [2, 4]), "--out", tmp / "p"],
         "number of experts", "matplotlib"),
    Case("prep_missing_input", "prepare_data.py", lambda tmp, w: [tmp / "no", "--out", tmp / "d"], "no such"),
    Case("prep_empty_folder", "prepare_data.py", lambda tmp, w: [folder(tmp / "t"), "--out", tmp / "d"],
         "no text files"),
    Case("prep_empty_file", "prepare_data.py", lambda tmp, w: [write(tmp / "a.txt", ""), "--out", tmp / "d"],
         "split is empty"),
    Case("prep_binary_only", "prepare_data.py",
         lambda tmp, w: [write(tmp / "t" / "a.bin", b"\0\1\2" * 10).parent, "--out", tmp / "d"], "no text files"),
    Case("prep_val_fraction_zero", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "0"], "--val-fraction"),
    Case("prep_val_fraction_one", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "1"], "--val-fraction"),
    Case("prep_val_fraction_nan", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "nan"], "--val-fraction"),
    Case("prep_out_is_a_file", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", write(tmp / "d", "x")], "--out"),
    Case("export_missing_checkpoint", "export_hf.py", lambda tmp, w: ["--checkpoint", tmp / "no", "--out", tmp / "hf"],
         "no such folder", "safetensors"),
    Case("export_out_is_a_file", "export_hf.py", lambda tmp, w: ["--checkpoint", w.moe, "--out", w.metrics],
         "not an empty folder", "safetensors"),
    Case("export_shapes_do_not_fit_config", "export_hf.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(moe_ffn_hidden_size=16)),
                         "--out", tmp / "hf"], "shape", "safetensors"),
    Case("export_config_claims_a_billion_layers", "export_hf.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(num_layers=10**9)),
                         "--out", tmp / "hf"], "more layers or experts", "safetensors"),
    Case("export_model_config_of_another_kind", "export_hf.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(num_layers=None)),
                         "--out", tmp / "hf"], "--checkpoint", "safetensors"),
    Case("export_bad_dtype", "export_hf.py", lambda tmp, w: ["--checkpoint", w.moe, "--out", tmp / "hf",
                                                             "--dtype", "float8"], "--dtype", "safetensors"),
    Case("import_config_is_a_folder", "import_hf.py",
         imp(lambda tmp, w: folder(tmp / "h" / "config.json").parent), "not a regular file", "safetensors"),
    Case("import_weights_garbage", "import_hf.py",
         imp(lambda tmp, w: write(hf_folder(tmp, w) / "model.safetensors", b"\xff" * 100).parent), "safetensors",
         "safetensors"),
    Case("import_index_names_missing_shard", "import_hf.py",
         imp(lambda tmp, w: write(hf_config_only(tmp, w) / "model.safetensors.index.json",
                                  '{"weight_map": {"lm_head.weight": "s1.safetensors"}}').parent), "s1.safetensors",
         "safetensors"),
    Case("import_out_is_a_file", "import_hf.py", lambda tmp, w: ["--hf", hf_folder(tmp, w), "--out", w.metrics],
         "--out", "safetensors"),
    Case("import_hf_missing", "import_hf.py", imp(lambda tmp, w: tmp / "no"), "no such folder", "safetensors"),
    Case("import_hf_is_a_file", "import_hf.py", imp(lambda tmp, w: w.metrics), "--hf", "safetensors"),
    Case("import_config_not_json", "import_hf.py",
         imp(lambda tmp, w: write(tmp / "h" / "config.json", "{'model_type':").parent), "config.json", "safetensors"),
    Case("import_config_is_a_list", "import_hf.py",
         imp(lambda tmp, w: write(tmp / "h" / "config.json", "[1]").parent), "JSON object", "safetensors"),
    Case("import_config_size_is_text", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(hidden_size="32"))), "hidden_size", "safetensors"),
    Case("import_config_lacks_vocab_size", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.pop("vocab_size"))), "vocab_size", "safetensors"),
    Case("import_config_claims_a_billion_layers", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(num_hidden_layers=10**9))), "more than the",
         "safetensors"),
    Case("import_config_zero_heads", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(num_attention_heads=0))), "num_attention_heads",
         "safetensors"),
    Case("import_config_rope_not_an_object", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(rope_scaling=[1]))), "rope", "safetensors"),
    Case("import_weights_do_not_fit_config", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(moe_intermediate_size=16))), "shape",
         "safetensors"),
    Case("import_seq_length_zero", "import_hf.py", imp(lambda tmp, w: hf_folder(tmp, w), "--seq-length", 0),
         "--seq-length", "safetensors"),
    Case("upcycle_out_is_a_file", "upcycle.py", upc(out=lambda tmp, w: w.metrics), "--out"),
    Case("upcycle_not_dense", "upcycle.py", upc(ck=lambda tmp, w: w.moe), "already an MoE model"),
    Case("upcycle_missing_checkpoint", "upcycle.py", upc(ck=lambda tmp, w: tmp / "no"), "no such folder"),
    Case("upcycle_zero_experts", "upcycle.py", upc("--num-experts", 0, "--num-experts-per-token", 1),
         "--num-experts"),
    Case("upcycle_top_k_over_experts", "upcycle.py", upc("--num-experts", 2, "--num-experts-per-token", 3),
         "--num-experts-per-token"),
    Case("upcycle_experts_beyond_memory", "upcycle.py",
         upc("--num-experts", 10**12, "--num-experts-per-token", 2), "GiB"),
    Case("upcycle_no_moe_layer", "upcycle.py",
         upc("--num-experts", 4, "--num-experts-per-token", 2, "--moe-layer-interval", 3), "--moe-layer-interval"),
    Case("upcycle_noise_nan", "upcycle.py", upc("--num-experts", 4, "--num-experts-per-token", 2, "--noise", "nan"),
         "--noise"),
    Case("upcycle_noise_negative", "upcycle.py",
         upc("--num-experts", 4, "--num-experts-per-token", 2, "--noise", "-0.1"), "--noise"),
    Case("upcycle_router_std_inf", "upcycle.py",
         upc("--num-experts", 4, "--num-experts-per-token", 2, "--router-init-std", "inf"), "--router-init-std"),
    Case("upcycle_experts_not_a_number", "upcycle.py", upc("--num-experts", "four", "--num-experts-per-token", 2),
         "--num-experts"),
    Case("routing_negative_steps", "compare_routing.py", lambda tmp, w: ["--steps", -1, "--out", tmp / "r"],
         "--steps"),
    Case("routing_out_is_a_file", "compare_routing.py", lambda tmp, w: ["--quick", "--out", w.metrics], "--out"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_error_line_and_changes_nothing(case, world, tmp_path):
    if case.needs:
        pytest.importorskip(case.needs)
    args = case.setup(tmp_path, world)
    before = snapshot(world.root, tmp_path)
    r = run_script(case.script, args, timeout=60)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    assert len(errors) == 1 and case.words in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert snapshot(world.root, tmp_path) == before  # nothing written, moved or removed


@pytest.mark.parametrize("case", IN_PROCESS_CASES, ids=[c.id for c in IN_PROCESS_CASES])
def test_bad_input_in_process_exits_2_with_one_error_line_and_changes_nothing(case, world, tmp_path, capsys,
                                                                             monkeypatch):
    if case.needs:
        pytest.importorskip(case.needs)
    if case.id == "gen_cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    args = case.setup(tmp_path, world)
    before = snapshot(world.root, tmp_path)
    monkeypatch.setattr(sys, "argv", [case.script] + [str(a) for a in args])
    with pytest.raises(SystemExit) as stop:  # any other exception is a traceback: the test fails
        importlib.import_module(case.script.removesuffix(".py")).main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2, err
    assert len(errors) == 1 and case.words in errors[0], err
    assert snapshot(world.root, tmp_path) == before


# ------------------------------------------------------------- what bad input must not break
def test_prepare_data_reads_each_real_file_once_and_never_opens_a_fifo(tmp_path):
    d = text_folder(tmp_path)
    r = run_script("prepare_data.py", [d, d / "a.txt", "--out", tmp_path / "data", "--val-fraction", "0.5"],
                   timeout=60)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert "2 files (0 binary and 1 special files skipped)" in r.stdout  # a.txt once; the FIFO skipped
    ids = np.concatenate([np.fromfile(tmp_path / "data" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    text = ids[ids != 0]  # the eos (NUL) ids out: the bytes of both files, each once
    assert sorted(text.tobytes()[::2]) == sorted(("alpha " * 50 + "beta " * 50).encode())
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == len(text)
    assert sorted(os.listdir(tmp_path / "data")) == ["meta.json", "train.bin", "val.bin"]  # no .part left


def test_plot_metrics_skips_malformed_lines_with_one_warning(world, tmp_path):
    pytest.importorskip("matplotlib")
    lines = world.metrics.read_text().splitlines()
    spoiled = [lines[0][:20], "not json", '{"step": 9, "loss": "high"}'] + lines  # a line cut by a crash, ...
    r = run_script("plot_metrics.py", [write(tmp_path / "m.jsonl", "\n".join(spoiled) + "\n"), "--out", tmp_path / "p"])
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 3 line(s)" in warnings[0] and "line 1" in warnings[0]
    assert "loss.png" in os.listdir(tmp_path / "p")


def test_export_writes_a_new_or_empty_folder_and_leaves_no_temporary_folder(world, tmp_path):
    pytest.importorskip("safetensors")
    out = folder(tmp_path / "empty")
    r = run_script("export_hf.py", ["--checkpoint", world.moe, "--out", out])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]  # a byte-level run: its byte tokenizer
    assert sorted(os.listdir(tmp_path)) == ["empty"]


# ---- tokenizers and prepared data (issue 12) ----

WORDS = ["héllo", "wörld", "☃", "日本語", "𝄞", "def", "return", "the", "moe", "expert", "router", "\n", "  "]


def document_text(seed: int, words: int) -> str:
    """Deterministic text with 1-, 2-, 3- and 4-byte UTF-8 characters."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=words))


def text_corpus(root: Path, word_counts: list[int]) -> dict[str, str]:
    """One file per entry of `word_counts`; returns file name -> text."""
    root.mkdir(parents=True)
    texts = {f"doc{i:02d}.txt": document_text(i, n) for i, n in enumerate(word_counts)}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    return texts


def prepare(inputs: list, out: Path, *flags: object) -> dict:
    r = run_script("prepare_data.py", [*inputs, "--out", out, *flags], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "meta.json").read_text())


def split_ids(out: Path, meta: dict) -> dict[str, np.ndarray]:
    return {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}


def parts(ids: np.ndarray, eos: int) -> list[list[int]]:
    """The documents of a split: its ids cut after every eos (each split ends with one)."""
    assert len(ids) and ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    return [ids[a + 1:b].tolist() for a, b in zip(np.concatenate([[-1], cuts[:-1]]), cuts)]


def test_prepare_bytes_puts_each_document_whole_in_one_split_followed_by_eos(tmp_path):
    texts = text_corpus(tmp_path / "t", [10] * 60)  # each document within twice the tolerance: none is cut
    meta = prepare([tmp_path / "t"], tmp_path / "d")
    assert {k: meta[k] for k in ("vocab_size", "dtype", "tokenizer", "eos_id", "bos_id")} == \
        {"vocab_size": 256, "dtype": "uint16", "tokenizer": "bytes", "eos_id": 0, "bos_id": None}
    ids = split_ids(tmp_path / "d", meta)
    docs = {s: [bytes(p).decode("utf-8") for p in parts(ids[s], 0)] for s in ids}
    assert sorted(docs["train"] + docs["val"]) == sorted(texts.values())  # every document once, whole
    val_share = sum(len(d.encode()) for d in docs["val"]) / sum(len(t.encode()) for t in texts.values())
    assert abs(val_share - 0.1) <= 0.01 and len(docs["val"]) in (5, 6, 7)
    for s in ids:
        assert meta["tokens"][s] == len(ids[s]) and meta["max_id"][s] == int(ids[s].max())
        assert meta["bytes"][s] == sum(len(d.encode()) for d in docs[s])


def test_prepare_jsonl_takes_the_text_field_one_document_per_record(tmp_path):
    records = [{"body": document_text(i, 8), "id": i} for i in range(100)]  # small: none is cut
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:50]) + "\n\n")  # a blank line
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[50:]))
    meta = prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "d", "--text-field", "body",
                   "--val-fraction", "0.25")
    ids = split_ids(tmp_path / "d", meta)
    docs = [bytes(p).decode("utf-8") for s in ids for p in parts(ids[s], 0)]
    assert sorted(docs) == sorted(r["body"] for r in records)


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_prepare_holds_out_the_fraction_of_bytes_whatever_the_file_sizes(tmp_path, fraction):
    """Nine files from 7 to 3000 words (one is a third of the corpus): the held-out share of the text's
    bytes is within the stated 10% of the fraction (0.1 -> [0.09, 0.11])."""
    texts = text_corpus(tmp_path / "t", [400, 3, 3000, 60, 900, 7, 1500, 250, 2500])
    meta = prepare([tmp_path / "t"], tmp_path / "d", "--val-fraction", fraction)
    ids = split_ids(tmp_path / "d", meta)
    held = int((ids["val"] != 0).sum())  # text bytes in val, counted from the file
    total = sum(len(t.encode()) for t in texts.values())
    assert int((ids["train"] != 0).sum()) + held == total and meta["bytes"]["val"] == held
    assert abs(held / total - fraction) <= 0.1 * fraction


def test_prepare_bpe_round_trips_every_document_and_unseen_bytes_and_is_deterministic(tmp_path):
    texts = text_corpus(tmp_path / "t", [30] * 60)  # none is cut
    metas = [prepare([tmp_path / "t"], tmp_path / d, "--tokenizer", "bpe", "--vocab-size", 300) for d in "ab"]
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):  # two runs, byte-identical
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    meta = metas[0]
    assert (meta["vocab_size"], meta["tokenizer"], meta["eos_id"], meta["dtype"]) == (300, "tokenizer.json", 0, "uint16")
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))  # the library, not our wrapper
    assert reference.id_to_token(0) == "<|endoftext|>"
    ids = split_ids(tmp_path / "a", meta)
    docs = [reference.decode(p) for s in ids for p in parts(ids[s], 0)]
    assert sorted(docs) == sorted(texts.values())
    for p in parts(ids["train"], 0):
        assert p == reference.encode(reference.decode(p), add_special_tokens=False).ids
    tokenizer = data.load_tokenizer(str(tmp_path / "a"))
    unseen = "Ωμέγα ∮ 🚀 \x01\x7f\u0300 ÿ"  # characters and bytes the training text never held
    encoded = tokenizer.encode(unseen)
    assert tokenizer.decode(encoded) == unseen and max(encoded) < 300 and tokenizer.eos_id == 0


def big_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json of 70,260 tokens (over uint16): 70,000 added words w0x ... w69999x."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=260, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([f"w{i}x" for i in range(70_000)])
    tok.save(str(path))
    return path


def test_prepare_with_a_tokenizer_json_over_65536_writes_uint32_read_back_exactly(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer
    path = big_tokenizer(tmp_path / "big.json")
    (tmp_path / "t").mkdir()
    texts = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}x hello" for j in range(8)) for i in range(60)]  # no cut
    for i, text in enumerate(texts):
        (tmp_path / "t" / f"{i}.txt").write_text(text)
    meta = prepare([tmp_path / "t"], tmp_path / "d", "--tokenizer", path)
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"]) == ("uint32", 70_260, 0)  # </s> found as eos
    reference = Tokenizer.from_file(str(path))
    ids = split_ids(tmp_path / "d", meta)
    want = sorted(reference.encode(t, add_special_tokens=False).ids for t in texts)
    assert sorted(p for s in ids for p in parts(ids[s], 0)) == want
    assert max(meta["max_id"].values()) > 65_535
    corpus = data.load_corpus(str(tmp_path / "d"), None)
    assert corpus.train.dtype == np.uint32 and np.array_equal(np.asarray(corpus.train), ids["train"])
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == path.read_bytes()


def nul_late(tmp: Path) -> Path:
    return write(tmp / "t" / "a.txt", b"x" * 9000 + b"\0tail")  # past git's 8000-byte binary check


def no_eos_tokenizer(tmp: Path) -> Path:
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    tok.save(str(tmp / "tok.json"))
    return tmp / "tok.json"


PREP_REFUSALS = [
    ("bpe_without_vocab", lambda tmp: [text_folder(tmp), "--tokenizer", "bpe"], "--vocab-size"),
    ("bpe_vocab_below_bytes", lambda tmp: [text_folder(tmp), "--tokenizer", "bpe", "--vocab-size", 200], "257"),
    ("vocab_for_bytes", lambda tmp: [text_folder(tmp), "--vocab-size", 300], "--vocab-size"),
    ("tokenizer_missing", lambda tmp: [text_folder(tmp), "--tokenizer", tmp / "nope.json"], "--tokenizer"),
    ("tokenizer_without_eos", lambda tmp: [text_folder(tmp), "--tokenizer", no_eos_tokenizer(tmp)], "</s>"),
    ("nul_in_bytes_document", lambda tmp: [nul_late(tmp)], "a.txt: holds a NUL"),
    ("latin1_for_bpe", lambda tmp: [write(tmp / "t" / "a.txt", "café ".encode("latin-1") * 99),
                                    "--tokenizer", "bpe", "--vocab-size", 300], "not UTF-8"),
    ("jsonl_bad_json", lambda tmp: [write(tmp / "a.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n')],
     "a.jsonl:3: not a JSON record"),
    ("jsonl_missing_field", lambda tmp: [write(tmp / "a.jsonl", '{"text": "a"}\n{"body": "b"}\n')],
     "a.jsonl:2: no string field 'text'"),
    ("jsonl_not_an_object", lambda tmp: [write(tmp / "a.jsonl", '["text"]\n')], "a.jsonl:1"),
    ("jsonl_field_not_text", lambda tmp: [write(tmp / "a.jsonl", '{"text": 3}\n'), "--text-field", "text"],
     "a.jsonl:1"),
]


@pytest.mark.parametrize("case", PREP_REFUSALS, ids=[c[0] for c in PREP_REFUSALS])
def test_prepare_refuses_bad_input_with_one_error_line_and_writes_nothing(case, tmp_path):
    pytest.importorskip("tokenizers")
    _, setup, words = case
    args = [str(a) for a in setup(tmp_path)]
    before = snapshot(tmp_path)
    r = run_script("prepare_data.py", args + ["--out", tmp_path / "out"], timeout=60)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and words in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and snapshot(tmp_path) == before  # not even the --out folder


def token_folder(root: Path, meta: dict) -> Path:
    return Path(_token_folder(root, np.arange(3000) % 50, np.arange(300) % 50, meta))


@pytest.mark.parametrize("change,words", [
    ({"eos_id": 50}, '"eos_id" must be null or an id in [0, 50)'),
    ({"bos_id": -1}, '"bos_id"'),
    ({"eos_id": True}, '"eos_id"'),
    ({"tokenizer": "bytes"}, "not 256"),
    ({"tokenizer": "../tok.json"}, "file name in the same folder"),
    ({"bytes": {"train": 10, "val": -1}}, '"bytes"'),
])
def test_meta_json_tokenizer_fields_are_checked(change, words, tmp_path):
    d = token_folder(tmp_path / "tok", {"vocab_size": 50, **change})
    with pytest.raises(data.DataError) as refused:
        data.load_corpus(str(d), None)
    assert words in str(refused.value)


def test_trainer_refuses_an_eos_id_over_the_vocabulary_with_one_error_line(tmp_path):
    d = token_folder(tmp_path / "tok", {"vocab_size": 50, "eos_id": 77})
    r = run_cli(TINY_FLAGS + ["--max-steps", "1", "--data", str(d)], timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and '"eos_id"' in errors[0] and "Traceback" not in r.stderr


def model_on(folder: Path, seed: int = 4) -> MoETransformer:
    """A random tiny model of a prepared folder's vocabulary."""
    vocab = json.loads((folder / "meta.json").read_text())["vocab_size"]
    return MoETransformer(tiny_config(vocab_size=vocab), seed=seed).eval()


def save_trained_on(model: MoETransformer, folder: Path, root: Path) -> str:
    """A checkpoint of `model` that says it was trained with --data folder (as the trainer writes it)."""
    ck = save_in_process(model, root)
    meta_path = Path(ck) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["train"]["data"] = str(folder)
    meta_path.write_text(json.dumps(meta))
    return ck


def greedy_by_hand(model: MoETransformer, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).output[0, -1].argmax()))
    return ids


def make_eos_come_at_step(model: MoETransformer, prompt: list[int], eos: int, steps: int = 12) -> int:
    """Swap the LM-head rows of eos and of a token the greedy continuation draws later, so that eos comes
    at that step instead (the steps before keep their argmax); return that step (1-based)."""
    new = greedy_by_hand(model, prompt, steps)[len(prompt):]
    k = next(i for i in range(2, steps) if new[i] != eos and new[i] not in new[:i])
    with torch.no_grad():
        w = model.lm_head.weight
        w[[eos, new[k]]] = w[[new[k], eos]]
    return k + 1


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """The same small corpus prepared as bytes and as a 300-token BPE."""
    root = tmp_path_factory.mktemp("prepared")
    text_corpus(root / "t", [200] * 10)
    prepare([root / "t"], root / "bytes")
    prepare([root / "t"], root / "bpe", "--tokenizer", "bpe", "--vocab-size", 300)
    return {"bytes": root / "bytes", "bpe": root / "bpe"}


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_generate_decodes_with_the_runs_tokenizer_and_stops_at_eos(kind, prepared, tmp_path):
    tokenizer = data.load_tokenizer(str(prepared[kind]))
    prompt_text = "héllo ☃"
    prompt = tokenizer.encode(prompt_text)
    model = model_on(prepared[kind])
    stop = make_eos_come_at_step(model, prompt, tokenizer.eos_id, 16 - len(prompt))
    ck = save_trained_on(model, prepared[kind], tmp_path / "ck")
    want = greedy_by_hand(model, prompt, stop)
    assert want[-1] == tokenizer.eos_id and tokenizer.eos_id not in want[len(prompt):-1]
    r = run_script("generate.py", ["--checkpoint", ck, "--prompt", prompt_text, "--temperature", 0,
                                   "--max-new-tokens", 16 - len(prompt)])
    assert r.returncode == 0, r.stderr
    assert r.stdout == tokenizer.decode(want[:-1]) + "\n"  # the eos ends it and is not printed
    assert f"{stop} tokens in" in r.stderr
    r = run_script("generate.py", ["--checkpoint", ck, "--prompt-ids", ",".join(map(str, prompt)),
                                   "--temperature", 0, "--max-new-tokens", 16 - len(prompt)])
    assert r.returncode == 0 and r.stdout.strip() == ",".join(map(str, want)), r.stderr


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_transformers_pipeline_on_the_export_continues_as_generate_does(kind, prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    tokenizer = data.load_tokenizer(str(prepared[kind]))
    prompt_text = "def héllo"
    prompt = tokenizer.encode(prompt_text)
    model = model_on(prepared[kind])
    make_eos_come_at_step(model, prompt, tokenizer.eos_id, 16 - len(prompt))
    ck = save_trained_on(model, prepared[kind], tmp_path / "ck")
    r = run_script("export_hf.py", ["--checkpoint", ck, "--out", tmp_path / "hf"])
    assert r.returncode == 0, r.stderr
    ours = run_script("generate.py", ["--checkpoint", ck, "--prompt", prompt_text, "--temperature", 0,
                                      "--max-new-tokens", 16 - len(prompt)])
    assert ours.returncode == 0, ours.stderr
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sample = "Ωμέγα 🚀 def héllo\n"
    assert hf_tokenizer(sample)["input_ids"] == tokenizer.encode(sample)
    if kind == "bytes":
        assert hf_tokenizer(sample)["input_ids"] == list(sample.encode())  # id i is byte i
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.model_max_length) == (tokenizer.eos_id, 16)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    theirs = pipe(prompt_text, max_new_tokens=16 - len(prompt), do_sample=False)[0]["generated_text"]
    universal = (theirs + "\n").replace("\r\n", "\n").replace("\r", "\n")  # as run_script's text mode reads ours
    assert universal == ours.stdout


def test_eval_only_prints_bits_per_byte_of_bpe_data(prepared, tmp_path):
    save = tmp_path / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--data", str(prepared["bpe"]), "--save", str(save)])
    assert r.returncode == 0, r.stderr
    r = run_cli(["--load", str(save), "--eval-only", "--eval-iters", "2", "--no-progress"])
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("eval-only:")][0]
    loss = float(line.split("val loss ")[1].split()[0])
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(str(prepared["bpe"] / "tokenizer.json"))
    val = np.fromfile(prepared["bpe"] / "val.bin", dtype=np.uint16)
    text_bytes = sum(len(reference.decode(p).encode()) for p in parts(val, 0))  # from the ids, not meta.json
    assert f"{loss / math.log(2) * len(val) / text_bytes:.4f} bits per byte" in line
    assert text_bytes < len(val) * 3  # several bytes per token: bits per byte is not bits per token


# ---- memory planner and scalable loading (issue 11) ----

PLAN_LAYOUTS = {  # name -> (world size, flags)
    "one": (1, []),
    "tp2": (2, ["--tensor-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-parallel-size", "2", "--num-microbatches", "2"]),
    "ep2_over_dp2": (2, ["--expert-parallel-size", "2"]),
    "tp2_pp2_ep4_shared": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                               "--expert-parallel-size", "4", "--num-microbatches", "2", "--num-shared-experts", "1"]),
}
PLAN_MODEL = ["--hidden-size", "32", "--num-layers", "3", "--num-attention-heads", "4", "--num-kv-heads", "2",
              "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "24", "--num-experts", "4",
              "--moe-layer-interval", "2", "--vocab-size", "64", "--seq-length", "16", "--micro-batch-size", "2"]


@pytest.mark.parametrize("name", list(PLAN_LAYOUTS))
def test_dry_run_counts_the_parameters_of_every_rank_built_on_the_cpu(name):
    world, flags = PLAN_LAYOUTS[name]
    mc, tc, _ = launch.parse_config(PLAN_MODEL + flags)
    tp, pp = tc.tensor_parallel_size, tc.pipeline_parallel_size
    ep = tc.expert_parallel_size or tp
    plans = memory.plan_stages(mc, launch.resolve_layout(mc, tc, world), bf16=False, grouped=False)
    formula = memory.params_per_stage(mc, tp, pp, ep)
    for rank in range(world):  # every rank, not only the one the plan builds for its stage
        stage, in_stage = divmod(rank, world // pp)
        start, end = stage_layers(mc.num_layers, pp, stage)
        par = ModelParallel(tp_rank=in_stage % tp, tp_size=tp, ep_rank=in_stage % ep, ep_size=ep, layer_start=start,
                            layer_end=end, first_stage=stage == 0, last_stage=stage == pp - 1)
        model = MoETransformer(mc, par)
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts.w_" in n)
        assert plans[stage].expert_params == experts, (name, rank)
        assert plans[stage].dense_params + experts == sum(p.numel() for p in model.parameters()) == formula[stage]


def test_dry_run_prints_the_plan_and_bad_layouts_exit_2_as_a_launch(capsys):
    mp.main(PLAN_MODEL + PLAN_LAYOUTS["tp2_pp2_ep4_shared"][1] + ["--dry-run", "--world-size", "8"])
    out = capsys.readouterr().out
    assert "world 8 = PP 2 x DP 2 x TP 2, EP 4" in out and out.count("distributed optimizer") >= 2
    assert "stage 0 (ranks 0-3)" in out and "stage 1 (ranks 4-7)" in out
    for flags, words in ((["--dry-run", "--world-size", "6", "--tensor-parallel-size", "4"], "world size 6"),
                         (["--dry-run", "--world-size", "4", "--expert-parallel-size", "3"], "--expert-parallel-size"),
                         (["--world-size", "4"], "--dry-run")):
        with pytest.raises(SystemExit) as stop:
            mp.main(PLAN_MODEL + flags)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert stop.value.code == 2 and len(errors) == 1 and words in errors[0], err


def test_dry_run_plans_a_100b_model_in_seconds(capsys):
    flags = ["--hidden-size", "7168", "--num-layers", "32", "--num-attention-heads", "56", "--num-kv-heads", "8",
             "--ffn-hidden-size", "18432", "--moe-ffn-hidden-size", "2048", "--num-experts", "80",
             "--num-experts-per-token", "8", "--vocab-size", "129280", "--seq-length", "4096",
             "--micro-batch-size", "1", "--num-microbatches", "16", "--tensor-parallel-size", "2",
             "--pipeline-parallel-size", "8", "--expert-parallel-size", "16", "--dry-run", "--world-size", "128"]
    start = time.time()
    mp.main(flags)
    assert time.time() - start < 60  # about 3 s alone on 2 cores; the suite shares them
    out = capsys.readouterr().out
    mc, tc, _ = launch.parse_config(flags)
    total = sum(memory.params_per_stage(mc, 1, 1, 1))
    assert total > 100e9 and f"model: {total:,} parameters" in out


def saved_activation_bytes(mc: ModelConfig, batch: int, recompute: bool) -> int:
    """Bytes autograd keeps for backward after one micro-batch's forward and loss, weights left out:
    every tensor the saved-tensor hook sees, each storage once (an independent measurement)."""
    model = MoETransformer(mc, seed=0)
    model.recompute = recompute
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, mc.vocab_size, (batch, mc.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, mtp_targets=x if mc.mtp_num_layers else None)  # the MTP modules run in training
        loss = parallel_layers.vocab_parallel_cross_entropy(out.output.flatten(0, 1), x.flatten(), model.par)
        loss = loss + mp.mtp_loss(out.mtp_logits, x, model.par)
        (loss + out.aux_loss + out.z_loss).backward()
    return sum(kept.values())


@pytest.mark.parametrize("kw", [dict(num_experts=0), dict(num_experts=4), dict(num_experts=8, num_experts_per_token=1),
                                dict(num_experts=4, num_shared_experts=1, moe_layer_interval=2, num_layers=3),
                                dict(num_experts=4, mtp_num_layers=2), dict(num_experts=0, mtp_num_layers=1)])
def test_activation_estimate_is_within_3_percent_of_what_autograd_keeps_on_the_cpu(kw):
    mc = tiny_config(hidden_size=64, ffn_hidden_size=128, moe_ffn_hidden_size=48, seq_length=64, vocab_size=256, **kw)
    tc = launch.TrainConfig(micro_batch_size=4)
    plan = memory.activation_bytes(mc, launch.resolve_layout(mc, tc, 1), stage=0, el=4, grouped=False)
    for recompute, estimate in ((False, plan.per_microbatch), (True, plan.per_microbatch_recompute)):
        measured = saved_activation_bytes(mc, 4, recompute)
        assert abs(estimate - measured) <= 0.03 * measured, (kw, recompute, estimate, measured)


def mapped_bytes(folder: str) -> int:
    """Resident bytes of this process's memory maps of files under `folder` (/proc/self/smaps): the
    pages of checkpoint files actually read, as the kernel counts them."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and len(parts[1]) == 4:  # a mapping's header
                inside = len(parts) > 5 and parts[5].startswith(folder)
            elif inside and line.startswith("Rss:"):
                total += int(parts[1]) * 1024
    return total


def stage_parallel(mc: ModelConfig, rank: int, tp: int, pp: int, ep: int, world: int) -> tuple[ModelParallel, int, int]:
    """(ModelParallel, dp rank, rank within the stage) of global `rank`, as build_process_groups numbers them."""
    stage, in_stage = divmod(rank, world // pp)
    start, end = stage_layers(mc.num_layers, pp, stage)
    return (ModelParallel(tp_rank=in_stage % tp, tp_size=tp, ep_rank=in_stage % ep, ep_size=ep, layer_start=start,
                          layer_end=end, first_stage=stage == 0, last_stage=stage == pp - 1), in_stage // tp, in_stage)


def write_sharded_checkpoint(root, mc: ModelConfig, tp: int, pp: int, ep: int) -> str:
    """A checkpoint as `world = TP x PP` ranks (DP 1) write it, made in one process: each rank's slice
    (seed 0) with AdamW moments 2 w and 3 w, its file, and meta.json (the documented format)."""
    world = tp * pp
    step = root / "step_00000001"
    step.mkdir(parents=True)
    for rank in range(world):
        par, dp_rank, in_stage = stage_parallel(mc, rank, tp, pp, ep, world)
        model = MoETransformer(mc, par, seed=0)
        opt = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": 2 * p.detach(), "exp_avg_sq": 3 * p.detach()}
        torch.save(ckpt_io.rank_payload(model, opt, Layout(world_size=world, tp=tp, pp=pp, ep=ep, rank=rank)),
                   step / f"rank_{rank:05d}.pt")
    files = [f"rank_{r:05d}.pt" for r in range(world)]
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 1, "model": dataclasses.asdict(mc),
            "train": {}, "layout": {"world_size": world, "tp": tp, "pp": pp, "dp": 1, "ep": ep}, "files": files,
            "sizes": [(step / f).stat().st_size for f in files]}
    (step / "meta.json").write_text(json.dumps(meta))
    return str(step)


def load_as_rank(path: str, mc: ModelConfig, rank: int, tp: int, pp: int, ep: int) -> tuple[int, MoETransformer, dict]:
    """(checkpoint bytes paged in, model, optimizer state) after loading `path` into rank `rank`'s slice."""
    par, _, _ = stage_parallel(mc, rank, tp, pp, ep, tp * pp)
    model = MoETransformer(mc, par, seed=1)  # other weights than the saved ones
    opt = torch.optim.AdamW(model.parameters())
    ckpt = ckpt_io.read_checkpoint(path)
    assert mapped_bytes(path) == 0  # opening reads the files' headers, no tensor
    ckpt_io.load_into(ckpt, model, opt)
    paged = mapped_bytes(path)
    del ckpt
    gc.collect()
    return paged, model, opt.state


def test_each_of_4_ranks_reads_about_a_quarter_of_a_4_rank_checkpoint(tmp_path):
    """TP2 x PP2 with EP2: each rank holds a quarter of the weights and moments, and reads about a
    quarter of the checkpoint (what the kernel paged in of its files); one process reads all of it."""
    mc = tiny_config(hidden_size=128, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=256,
                     moe_ffn_hidden_size=512, num_experts=8, vocab_size=256)
    path = write_sharded_checkpoint(tmp_path, mc, tp=2, pp=2, ep=2)
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".pt"))
    shares = []
    for rank in range(4):
        paged, model, state = load_as_rank(path, mc, rank, 2, 2, 2)
        shares.append(paged / total)
        saved = MoETransformer(mc, stage_parallel(mc, rank, 2, 2, 2, 4)[0], seed=0)  # the weights that were saved
        for (name, p), q in zip(model.named_parameters(), saved.parameters()):
            assert torch.equal(p, q) and torch.equal(state[p]["exp_avg_sq"], 3 * q), name
    one, _, _ = load_as_rank(path, mc, 0, 1, 1, 1)
    print(f"share of the checkpoint paged in per rank: {[f'{s:.3f}' for s in shares]}, one process: {one / total:.3f}")
    assert all(0.2 <= s <= 0.3 for s in shares), shares  # a quarter, give or take page fault-around
    assert one >= 0.97 * total


def test_rank_file_of_another_size_than_meta_json_recorded_is_refused(tmp_path):
    mc = tiny_config()
    path = write_sharded_checkpoint(tmp_path, mc, tp=1, pp=1, ep=1)
    with open(os.path.join(path, "rank_00000.pt"), "ab") as f:
        f.write(b"\0" * 10)  # still a readable zip: only the recorded size tells
    with pytest.raises(ckpt_io.CheckpointError, match="meta.json recorded"):
        ckpt_io.read_checkpoint(path)


# ---- Muon and WSD (issue 13) ----
def polar_reference(g: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U V^T, U p(S) V^T) of g = U S V^T in float64, where p applies the quintic
    x -> a x + b x^3 + c x^5 `steps` times to each singular value over ||g||_F: what the
    Newton-Schulz iteration computes on the singular values, written independently of it."""
    a, b, c = optim.NS_COEFFICIENTS
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    x = s / g.double().norm()
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return u @ vh, u @ torch.diag(x) @ vh


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (64, 64)])
def test_newton_schulz_keeps_the_singular_vectors_and_maps_each_singular_value_by_the_quintic(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    polar, by_hand = polar_reference(g, optim.NS_STEPS)
    out = optim.newton_schulz(g)
    assert out.dtype == torch.float32 and out.shape == g.shape
    assert (out.double() - by_hand).abs().max() < 1e-5  # fp32 rounding of 5 steps
    s = torch.linalg.svdvals(out.double())
    if shape[0] != shape[1]:  # well conditioned: every singular value lands in NS5's band, near U V^T
        assert 0.68 < s.min() and s.max() < 1.2, s
        assert (out.double() - polar).norm() / polar.norm() < 0.25  # singular values off by at most 0.32
        assert torch.equal(optim.newton_schulz(g.T), out.T)  # iterates on the wide side either way
    else:  # a square Gaussian has singular values near 0 that 5 steps lift only part of the way
        assert s.max() < 1.21


def test_newton_schulz_converges_to_u_vt_with_more_steps_of_the_cubic():
    """Not what Muon runs, but a check that the iteration is the polar factor's: with the
    classic cubic's fixed point at 1 the same loop reaches U V^T to fp32 rounding."""
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    polar, _ = polar_reference(g, 0)
    x = g / g.norm()
    for _ in range(40):  # x <- 1.5 x - 0.5 x x^T x (Newton-Schulz for the polar factor)
        x = 1.5 * x - 0.5 * x @ x.T @ x
    assert (x.double() - polar).abs().max() < 1e-5


def muon_toy_model() -> torch.nn.Module:
    """One plain 2-D weight for Muon and a 1-D gain for AdamW (an optimizer needs both groups)."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(48, 32, generator=torch.Generator().manual_seed(0)) * 0.1)
    model.gain = torch.nn.Parameter(torch.ones(32))
    model.par = ModelParallel()
    return model


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_muon_equals_torch_optim_muon_on_a_plain_matrix():
    """torch.optim.Muon(adjust_lr_fn="match_rms_adamw") runs Newton-Schulz in bf16: with ours in
    bf16 too, the weights agree bit for bit over 5 steps of changing gradients."""
    ours = muon_toy_model()
    opt = optim.build_optimizer(ours, lr=0.02, weight_decay=0.1, kind="muon")
    assert list(opt.muon_params.values()) == [ours.w]
    opt.ns_dtype = torch.bfloat16
    theirs = torch.nn.Parameter(ours.w.detach().clone())
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                 adjust_lr_fn="match_rms_adamw")
    for step in range(5):
        grad = torch.randn(48, 32, generator=torch.Generator().manual_seed(10 + step))
        ours.w.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
        assert torch.equal(ours.w, theirs), step


def test_muon_update_by_hand_in_fp32():
    """One step from zero momentum: buf = 0.05 g, look-ahead u = 0.05 g + 0.95 buf, then
    w <- w (1 - lr wd) - lr 0.2 sqrt(48) NS(u); NS from the SVD reference."""
    model = muon_toy_model()
    w0, g = model.w.detach().clone(), torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    opt = optim.build_optimizer(model, lr=0.02, weight_decay=0.1, kind="muon")
    model.w.grad = g.clone()
    opt.step()
    u = 0.05 * g.double() + 0.95 * (0.05 * g.double())
    _, ns = polar_reference(u, optim.NS_STEPS)
    want = w0.double() * (1 - 0.02 * 0.1) - 0.02 * 0.2 * math.sqrt(48) * ns
    assert (model.w.double() - want).abs().max() < 1e-6
    assert torch.allclose(opt.state[model.w]["momentum_buffer"], 0.05 * g)


def test_muon_takes_hidden_matrices_and_experts_adamw_the_rest():
    model = MoETransformer(tiny_config(), seed=0)
    opt = optim.build_optimizer(model, 1e-2, 0.1, kind="muon")
    muon = {name for name, p in model.named_parameters() if p in opt.muon_params}
    assert muon == {f"layers.{i}.{m}" for i in range(2) for m in
                    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.experts.w_gate", "mlp.experts.w_up", "mlp.experts.w_down")}
    adamw = {id(p) for group in opt.inner.param_groups for p in group["params"]}
    assert {name for name, p in model.named_parameters() if id(p) in adamw} == \
        {name for name, _ in model.named_parameters()} - muon  # embedding, LM head, norms, routers


def test_muon_orthogonalises_each_expert_of_a_stack_on_its_own():
    model = MoETransformer(tiny_config(), seed=0)
    opt = optim.build_optimizer(model, 1e-2, 0.1, kind="muon")
    w = model.layers["0"].mlp.experts.w_gate  # (E, D, F)
    update = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    out = opt.orthogonalise(update, w)
    for e in range(w.shape[0]):
        _, by_hand = polar_reference(update[e], optim.NS_STEPS)
        assert (out[e].double() - by_hand).abs().max() < 1e-5, e


@smoke
def test_wsd_learning_rates_at_the_phase_boundaries_by_hand():
    """lr 1, min 0.1, warm-up 10, 110 decay steps, the last half decays: stable from step 10 to
    55, decay over steps 55..110. At step 66 the decay is 11/55 = 0.2 done."""
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, lr_schedule="wsd", lr_decay_fraction=0.5)
    at_66 = {"linear": 0.1 + 0.9 * 0.8, "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi)),
             "sqrt": 0.1 + 0.9 * (1 - math.sqrt(0.2))}
    assert math.isclose(at_66["cosine"], 0.9140576, rel_tol=1e-7) and math.isclose(at_66["sqrt"], 0.5975078,
                                                                                   rel_tol=1e-7)
    for style, want in at_66.items():
        s = launch.TrainConfig(lr_decay_style=style, **base).schedule()
        assert (s.warmup_steps, s.decay_start, s.decay_steps) == (10, 55, 110)
        assert math.isclose(s.at(0), 0.1) and math.isclose(s.at(9), 1.0)  # warm-up
        assert s.at(10) == s.at(54) == s.at(55) == 1.0  # stable; the decay starts from the peak
        assert math.isclose(s.at(66), want), style
        assert math.isclose(s.at(110), 0.1) and math.isclose(s.at(500), 0.1)  # floor after the decay
        assert "stable to step 55" in s.describe() and f"{style} decay" in s.describe()
    whole = launch.TrainConfig(**dict(base, lr_decay_fraction=1.0)).schedule()
    assert whole.decay_start == 10  # a decay longer than what follows the warm-up starts where it ends


def test_wsd_flags_are_validated():
    with pytest.raises(launch.ConfigError, match="--lr-decay-fraction must be in"):
        launch.TrainConfig(lr_schedule="wsd", lr_decay_fraction=0.0).validate()
    with pytest.raises(launch.ConfigError, match="add --lr-schedule wsd"):
        launch.TrainConfig(lr_decay_style="linear").validate()
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--lr-decay-fraction", "0.5"], timeout=60)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "--lr-schedule wsd" in errors[0], r.stderr


# 5 steps, warm-up 1, decay over the last 40% (steps 3..5), 1 - sqrt; layer 0 dense, layer 1 MoE, so
# Muon meets column- and row-parallel MLP shards, attention shards and expert stacks.
MUON_FLAGS = ["--optimizer", "muon", "--lr-schedule", "wsd", "--lr-decay-fraction", "0.4", "--lr-decay-style",
              "sqrt", "--moe-layer-interval", "2"]


@pytest.fixture(scope="module")
def muon_one_process(tmp_path_factory):
    return parity_run(tmp_path_factory.mktemp("muon_one"), "one", 1, [], 4, MUON_FLAGS)


def test_muon_wsd_run_logs_the_formulas_lr(muon_one_process):
    records, _ = muon_one_process
    peak, floor = 1e-2, 2e-4  # TINY_FLAGS' --lr, the default --min-lr
    want = [peak, peak, peak, peak, floor + (peak - floor) * (1 - math.sqrt(0.5))]  # steps 0-3, then half-way
    assert [r["lr"] for r in records] == pytest.approx(want, rel=1e-12)


MUON_LAYOUTS = {
    "dp2": (2, [], 2),
    "tp2": (2, ["--tensor-parallel-size", "2"], 4),
    "dp2_ep2": (2, ["--expert-parallel-size", "2"], 2),
    "pp2": (2, ["--pipeline-parallel-size", "2"], 4),
    "tp2_pp2_dp2": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], 2),
}


@pytest.mark.parametrize("name", list(MUON_LAYOUTS))
def test_muon_layout_matches_one_process(name, muon_one_process, tmp_path):
    nproc, layout, micro = MUON_LAYOUTS[name]
    worst = assert_same_training(muon_one_process, parity_run(tmp_path, name, nproc, layout, micro, MUON_FLAGS))
    print(f"muon {name}: max relative loss difference {worst:.2e}")


@pytest.fixture(scope="module")
def muon_full_run(tmp_path_factory):
    """An uninterrupted 6-step Muon + WSD run on one process, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("muon_full")
    return tmp, run_for_resume(tmp, "one", 1, MUON_FLAGS, 4)


def test_muon_resume_is_exact_and_keeps_the_checkpoints_optimizer(muon_full_run, tmp_path):
    tmp, full = muon_full_run
    saved = ckpt_io.read_checkpoint(str(tmp / "one" / ckpt_io.step_dir_name(3)))
    assert set(saved.optim["layers.0.mlp.gate_proj.weight"][0]) == {"momentum_buffer"}
    assert set(saved.optim["layers.1.mlp.experts.2.down_proj.weight"][0]) == {"momentum_buffer"}
    assert set(saved.optim["lm_head.weight"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    shutil.copytree(tmp / "one", tmp_path / "ck")
    # no Muon or WSD flags: --optimizer and the schedule default to the checkpoint's
    resumed = run_for_resume(tmp_path, "resumed", 1, [], 4, load=interrupted_at_3(tmp_path / "ck"))
    assert without_timing(resumed) == without_timing(full[3:])  # bitwise


def test_muon_state_reshards_from_one_process_onto_tp2_pp2(muon_full_run, tmp_path):
    tmp, full = muon_full_run
    shutil.copytree(tmp / "one", tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 4, ["--tensor-parallel-size", "2", "--pipeline-parallel-size",
                                                      "2"], 4, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(full, resumed)
    print(f"muon 1 rank -> TP2 x PP2: max relative loss difference {worst:.2e}")


def test_adamw_checkpoint_loaded_by_muon_keeps_the_adamw_moments_and_starts_muons_fresh():
    model = MoETransformer(tiny_config(), seed=0)
    adamw = optim.build_optimizer(model, 1e-2, 0.1)
    x = tokens(64, seed=0)
    F.cross_entropy(model(x).output.flatten(0, 1), x.flatten()).backward()
    adamw.step()
    payload = ckpt_io.rank_payload(model, adamw, Layout())
    saved = ckpt_io.Checkpoint(path="memory", meta={}, params={k: [v] for k, v in payload["params"].items()},
                               optim={k: [v] for k, v in payload["optim"].items()}, rng={0: payload["rng"]})
    resumed = MoETransformer(tiny_config(), seed=1)
    muon = optim.build_optimizer(resumed, 1e-2, 0.1, kind="muon")
    ckpt_io.load_into(saved, resumed, muon)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        if q in muon.muon_params:
            assert q not in muon.state, name  # fresh momentum
        else:
            assert torch.equal(muon.state[q]["exp_avg"], adamw.state[p]["exp_avg"]), name


def test_resumed_run_takes_the_checkpoints_optimizer_and_wsd_flags_and_notes_a_switch():
    saved_train = dataclasses.asdict(launch.TrainConfig(optimizer="muon", lr_schedule="wsd", lr_decay_fraction=0.3,
                                                    lr_decay_style="linear", max_steps=10))
    resume = ckpt_io.Checkpoint(path="ck", meta={"step": 3, "train": saved_train, "layout": {"dp": 1}},
                                params={}, optim={"w": [{}]}, rng={})
    given = launch.TrainConfig(max_steps=10)
    tc, notes = launch.continue_saved_run(given, resume, set(), 1)
    assert notes == [] and given == launch.TrainConfig(max_steps=10)  # the given config is not changed
    assert (tc.optimizer, tc.lr_schedule, tc.lr_decay_fraction, tc.lr_decay_style) == ("muon", "wsd", 0.3, "linear")
    switched = launch.TrainConfig(max_steps=10, optimizer="adamw")
    switched, notes = launch.continue_saved_run(switched, resume, {"optimizer"}, 1)
    assert switched.optimizer == "adamw" and len(notes) == 1 and "starts fresh" in notes[0]
    old = dict(saved_train)
    for name in ("optimizer", "lr_schedule", "lr_decay_fraction", "lr_decay_style"):
        del old[name]  # a checkpoint from before issue 13
    before = launch.TrainConfig(max_steps=10)
    before, _ = launch.continue_saved_run(before, dataclasses.replace(resume, meta=dict(resume.meta, train=old)),
                                          set(), 1)
    assert (before.optimizer, before.lr_schedule) == ("adamw", "cosine")


def test_muon_on_a_bf16_model_steps_fp32_masters_with_fp32_momentum():
    mc, tc = tiny_config(), launch.TrainConfig(dtype="bfloat16", optimizer="muon")
    pg = mp.build_process_groups(launch.resolve_layout(mc, tc, 1))
    model = mp.build_model(mc, tc, pg, torch.device("cpu"), torch.bfloat16)
    opt = optim.build_optimizer(model, tc.lr, tc.weight_decay, kind=tc.optimizer)
    x = tokens(64, (4, 16))
    for step in range(2):
        mp.train_step(model, opt, [], [(x, x)], pg, mc, tc, torch.device("cpu"), torch.bfloat16, step)
    q = model.layers["0"].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16 and opt.state[opt.master[q]]["momentum_buffer"].dtype == torch.float32
    for name, p in model.named_parameters():
        assert torch.equal(p, opt.master[p].to(p.dtype)), name  # the model is its masters, rounded


# ---- plots and routing comparison (issue 17) ----
def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk that every PNG starts with, read here, not by the code under test."""
    data = path.read_bytes()[:24]
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def capacity_run_metrics(path: Path) -> Path:
    """Ten train records of a 2-layer run with a capacity factor (dropped_fraction) and two evaluations
    that report bits per byte, as the trainer writes them."""
    lines = []
    for step in range(1, 11):
        load = [0.4 - 0.02 * step, 0.3, 0.2, 0.1 + 0.02 * step]
        lines.append({"step": step, "loss": 4 - 0.1 * step, "lm_loss": 3.9 - 0.1 * step, "aux_loss": 1.1,
                      "z_loss": 0.2, "lr": 1e-3, "grad_norm": 2.0 / step, "tokens_per_sec": 900.0 + step,
                      "expert_load": {"0": load, "1": [0.25] * 4},
                      "dropped_fraction": {"0": 0.2 - 0.01 * step, "1": 0.05}})
        if step % 5 == 0:
            lines.append({"step": step, "val_loss": 3.5 - 0.1 * step, "val_bpb": (3.5 - 0.1 * step) / math.log(2)})
    return write(path, "".join(json.dumps(r) + "\n" for r in lines))


def test_plot_metrics_writes_an_overview_and_laptop_sized_figures(tmp_path):
    pytest.importorskip("matplotlib")
    r = run_script("plot_metrics.py", [capacity_run_metrics(tmp_path / "m.jsonl"), "--out", tmp_path / "p"])
    assert r.returncode == 0 and not r.stderr, r.stderr
    names = set(os.listdir(tmp_path / "p"))
    assert names == {"overview.png", "loss.png", "router_losses.png", "lr.png", "grad_norm.png", "throughput.png",
                     "val_bpb.png", "load_balance.png", "dropped_fraction.png", "expert_load_layer0.png",
                     "expert_load_layer1.png"}
    width, height = png_size(tmp_path / "p" / "overview.png")
    assert width >= 1920 and height >= 1200 and (tmp_path / "p" / "overview.png").stat().st_size < 200_000
    for name in names - {"overview.png"}:
        width, height = png_size(tmp_path / "p" / name)
        assert width >= 1200 and height >= 750 and (tmp_path / "p" / name).stat().st_size < 60_000, name


def test_plot_metrics_skips_the_optional_figures_silently_when_the_fields_are_absent(tmp_path):
    pytest.importorskip("matplotlib")
    plain = [json.loads(line) for line in capacity_run_metrics(tmp_path / "m.jsonl").read_text().splitlines()]
    for r in plain:
        r.pop("dropped_fraction", None)
        r.pop("val_bpb", None)
    r = run_script("plot_metrics.py", [write(tmp_path / "plain.jsonl", "".join(json.dumps(x) + "\n" for x in plain)),
                                       "--out", tmp_path / "p"])
    assert r.returncode == 0 and not r.stderr, r.stderr
    names = set(os.listdir(tmp_path / "p"))
    assert "overview.png" in names and not names & {"dropped_fraction.png", "val_bpb.png"}


def test_compare_routing_refuses_an_out_that_holds_a_table_without_overwrite(tmp_path, capsys, monkeypatch):
    out = write(tmp_path / "docs" / "routing_comparison.md", "the committed table").parent
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compare_routing.py", "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        compare_routing.main()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1
    assert "already holds routing_comparison.md" in errors[0] and "--overwrite" in errors[0]
    assert snapshot(tmp_path) == before


def without_timings(path: Path) -> list[dict]:
    """A kept metrics file without tokens_per_sec, the one field that depends on the machine's load."""
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in read_metrics(path)]


def test_quick_comparison_gives_the_same_numbers_whatever_jobs_and_threads(quick_comparison, tmp_path):
    # The fixture ran --jobs 2 under OMP_NUM_THREADS=1; here --jobs 3 under OMP_NUM_THREADS=2, which
    # (were it passed on) changes the trainer's grad norm from step 1 at this size. Into a folder that
    # holds a table: --overwrite replaces it.
    first, _ = quick_comparison
    out = write(tmp_path / "again" / "routing_comparison.md", "an older table").parent
    r = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "compare_routing.py"), "--quick", "--jobs", "3",
                        "--noise-seeds", "1", "--keep-metrics", "--overwrite", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = sorted(os.listdir(first / "runs"))
    assert runs == sorted(os.listdir(out / "runs")) and len(runs) == 12
    for name in runs:  # every loss, load, norm and drop of every logged step, bit for bit
        assert without_timings(first / "runs" / name) == without_timings(out / "runs" / name), name
    tables = [table_rows((d / "routing_comparison.md").read_text()) for d in (first, out)]
    assert [row[:7] for row in tables[0]] == [row[:7] for row in tables[1]]  # all but tokens/s and wall s


def test_quick_optimizer_comparison_equals_a_direct_run_and_keeps_its_table(tmp_path):
    """Each row's val loss is what the trainer gives for those flags (run here directly, one thread), and a
    second run into the same folder is refused without --overwrite."""
    out = tmp_path / "co"
    r = run_script("compare_optimizers.py", ["--quick", "--seeds", 1, "--jobs", 2, "--out", out], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {(row[0], row[1]): float(row[2]) for row in table_rows((out / "optimizer_comparison.md").read_text())}
    assert set(rows) == set(compare_optimizers.COMBINATIONS)
    metrics = tmp_path / "direct.jsonl"
    common = compare_optimizers.QUICK["flags"] + ["--max-steps", "6", "--log-interval", "1", "--eval-interval", "6",
                                                  "--no-progress"]
    direct = run_cli(common + ["--optimizer", "muon", "--lr-schedule", "wsd", "--metrics-file", str(metrics)])
    assert direct.returncode == 0, direct.stderr[-2000:]
    val = [x["val_loss"] for x in read_metrics(str(metrics)) if "val_loss" in x][-1]
    assert rows[("muon", "wsd")] == float(f"{val:.4f}")
    before = (out / "optimizer_comparison.md").read_bytes()
    again = run_script("compare_optimizers.py", ["--quick", "--seeds", 1, "--out", out], timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (out / "optimizer_comparison.md").read_bytes() == before


# ---- distributed optimizer (issue 11) ----
ZERO1 = ["--use-distributed-optimizer"]


def _optimizer_state_worker(rank: int, world: int, port: int, result_dir: str, dtype: str) -> None:
    """One rank of DP4 x EP2 with the distributed optimizer: one step, then count the state it holds."""
    import torch.distributed as dist
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
    return parity_run(tmp_path_factory.mktemp("zero1_reference"), "one", 1, [], 4)


# name: (ranks, layout flags, micro-batches per DP rank)
ZERO1_LAYOUTS = {
    "dp2": (2, [], 2),
    "dp4_ep2": (4, ["--expert-parallel-size", "2"], 1),  # experts sharded over their 2 replicas
    "tp2_dp2": (4, ["--tensor-parallel-size", "2"], 2),
    "pp2_dp2": (4, ["--pipeline-parallel-size", "2"], 2),
    "tp2_pp2_dp2": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], 2),
}


@pytest.mark.parametrize("name", list(ZERO1_LAYOUTS))
def test_distributed_optimizer_matches_one_process_and_the_layout_without_it(name, zero1_reference, tmp_path):
    """Losses within 1e-6 of the same layout without the flag. Weights within 1e-5 (0.1% of an AdamW
    step): over 4 ranks gloo's reduce-scatter sums in another order than its all-reduce, and Adam
    scales such rounding up for weights whose gradient is nearly zero (see assert_same_training)."""
    nproc, layout, micro = ZERO1_LAYOUTS[name]
    sharded = parity_run(tmp_path, name + "_zero1", nproc, layout, micro, ZERO1)
    worst = assert_same_training(zero1_reference, sharded)
    same = assert_same_training(parity_run(tmp_path, name, nproc, layout, micro), sharded, rel=1e-6,
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


# ---- sequence parallelism (issue 15) ----
SP = ["--tensor-parallel-size", "2", "--sequence-parallel"]
# Routing decisions that read a token's global index in the micro-batch: capacity ties, the
# sequence of a token (sequence-wise aux loss) and its jitter noise; shared experts gather too.
SP_GLOBAL_INDEX_FLAGS = ["--moe-capacity-factor", "1.0", "--router-aux-loss-type", "sequence",
                         "--router-jitter-noise", "0.1", "--num-shared-experts", "1"]


@pytest.fixture(scope="module")
def sp_references(tmp_path_factory):
    """One-process runs (8 sequences per step) and the folder of their checkpoints."""
    tmp = tmp_path_factory.mktemp("sp_references")
    return tmp, {"plain": parity_run(tmp, "plain", 1, [], 4),
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


def test_checkpoints_load_with_and_without_sequence_parallelism(sp_references, tp2_sp_run):
    """SP changes no parameter: a TP2 + SP checkpoint evaluates on one process, and the one-process
    checkpoint under TP2 + SP, both to the one-process checkpoint's own validation loss."""
    reference_dir, sp_dir = sp_references[0], tp2_sp_run[0]
    want = eval_only_loss(reference_dir / "plain", 1, [])
    assert math.isclose(eval_only_loss(sp_dir / "tp2_sp", 1, []), want, rel_tol=1e-4)
    assert math.isclose(eval_only_loss(reference_dir / "plain", 2, SP), want, rel_tol=1e-4)


@pytest.mark.parametrize("flags,words", [
    (["--sequence-parallel"], "--tensor-parallel-size > 1"),
    (SP + ["--seq-length", "15"], "must divide --seq-length (15)"),
])
def test_sequence_parallel_without_tp_or_with_an_odd_sequence_exits_2_at_once(flags, words):
    start = time.time()
    r = run_cli(TINY_FLAGS + ["--max-steps", "2"] + flags, timeout=60,
                env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert_clean_refusal(r, words)
    assert time.time() - start < 30


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


# ---- interleaved 1F1B: virtual pipeline stages (issue 15)
def schedule_text(pp: int, rank: int, chunks: int, micro: int) -> str:
    """A rank's interleaved order as `F0.1` (forward of chunk 0 on micro-batch 1), ticks split by ` | `."""
    return " | ".join(" ".join(f"{s.kind}{s.chunk}.{s.micro}" for s in tick)
                      for tick in mp.interleaved_ticks(pp, rank, chunks, micro))


def test_interleaved_schedule_is_megatrons_order_on_pp2_and_pp4():
    # Written out by hand from Megatron-LM's rules: groups of PP micro-batches go through chunk 0,
    # then chunk 1; backwards take the chunks in reverse; warm-up (PP - rank - 1) * 2 + (V - 1) * PP.
    assert schedule_text(2, 0, 2, 4) == ("F0.0 | F0.1 | F1.0 | F1.1 | F0.2 B1.0 | F0.3 B1.1 | F1.2 B0.0 | "
                                         "F1.3 B0.1 | B1.2 | B1.3 | B0.2 | B0.3")
    assert schedule_text(2, 1, 2, 4) == ("F0.0 | F0.1 | F1.0 B1.0 | F1.1 B1.1 | F0.2 B0.0 | F0.3 B0.1 | "
                                         "F1.2 B1.2 | F1.3 B1.3 | B0.2 | B0.3")
    # Narayanan et al. 2021, fig. 4: 4 devices, 8 micro-batches, 2 chunks per device.
    assert schedule_text(4, 0, 2, 8) == ("F0.0 | F0.1 | F0.2 | F0.3 | F1.0 | F1.1 | F1.2 | F1.3 | F0.4 | F0.5 | "
                                         "F0.6 B1.0 | F0.7 B1.1 | F1.4 B1.2 | F1.5 B1.3 | F1.6 B0.0 | F1.7 B0.1 | "
                                         "B0.2 | B0.3 | B1.4 | B1.5 | B1.6 | B1.7 | B0.4 | B0.5 | B0.6 | B0.7")
    assert schedule_text(4, 3, 2, 8) == ("F0.0 | F0.1 | F0.2 | F0.3 | F1.0 B1.0 | F1.1 B1.1 | F1.2 B1.2 | "
                                         "F1.3 B1.3 | F0.4 B0.0 | F0.5 B0.1 | F0.6 B0.2 | F0.7 B0.3 | F1.4 B1.4 | "
                                         "F1.5 B1.5 | F1.6 B1.6 | F1.7 B1.7 | B0.4 | B0.5 | B0.6 | B0.7")
    # M == PP: every forward first (Megatron's all-warm-up case)
    assert schedule_text(2, 1, 2, 2) == "F0.0 | F0.1 | F1.0 | F1.1 | B1.0 | B1.1 | B0.0 | B0.1"
    # Megatron's layer assignment: rank p holds virtual stages p, p + PP, ...
    assert parallel_layers.chunk_layers(8, 2, 0, 2) == [(0, 2), (4, 6)] and parallel_layers.chunk_layers(8, 4, 3, 1) == [(3, 4), (7, 8)]
    assert parallel_layers.chunk_layers(6, 2, 1) == [(3, 6)]  # no interleaving: the stage's one chunk


@pytest.mark.parametrize("pp,chunks,micro", [(2, 2, 2), (2, 2, 4), (2, 3, 6), (3, 2, 6), (4, 2, 4), (4, 2, 8),
                                             (4, 3, 12)])
def test_interleaved_schedule_runs_every_step_once_after_its_inputs(pp, chunks, micro):
    for train in (True, False):
        slots = mp.interleaved_slots(pp, chunks, micro, train)
        when = {}  # (rank, kind, chunk, micro) -> (slot, place in its tick)
        for rank in range(pp):
            ticks = mp.interleaved_ticks(pp, rank, chunks, micro, train)
            assert len(slots[rank]) == len(ticks) and slots[rank] == sorted(set(slots[rank]))
            for slot, tick in zip(slots[rank], ticks):
                for place, s in enumerate(tick):
                    assert (rank, *s) not in when
                    when[rank, *s] = (slot, place)
            kinds = ("F", "B") if train else ("F",)
            assert {k[1:] for k in when if k[0] == rank} == {(k, c, m) for k in kinds for c in range(chunks)
                                                             for m in range(micro)}
        # Virtual stage j = chunk * PP + rank feeds j + 1 forward and j - 1 backward in a later slot
        # (what a slot produces is exchanged at its end); each rank backwards what it forwarded.
        stage = {(c * pp + r): (r, c) for r in range(pp) for c in range(chunks)}
        for m in range(micro):
            for j in range(1, pp * chunks):
                (r0, c0), (r1, c1) = stage[j - 1], stage[j]
                assert when[r0, "F", c0, m][0] < when[r1, "F", c1, m][0]
                if train:
                    assert when[r1, "B", c1, m][0] < when[r0, "B", c0, m][0]
            for j in range(pp * chunks if train else 0):
                assert when[stage[j][0], "F", stage[j][1], m] < when[stage[j][0], "B", stage[j][1], m]


@pytest.fixture(scope="module")
def interleaved_references(tmp_path_factory):
    """One-process references with the interleaved runs' model flags (8 layers; 8 or 16 sequences a step)."""
    tmp = tmp_path_factory.mktemp("interleaved_one_process")
    return {"layers8": parity_run(tmp, "layers8", 1, [], 4, ["--num-layers", "8"]),
            "layers8_interval3": parity_run(tmp, "layers8_interval3", 1, [], 8,
                                            ["--num-layers", "8", "--moe-layer-interval", "3"])}


# name: (ranks, layout flags, micro-batches, reference, extra model flags)
INTERLEAVED_LAYOUTS = {
    "pp2_2chunks_of_2": (2, ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "2"], 4,
                         "layers8", ["--num-layers", "8"]),
    "pp4_2chunks_all_warmup": (4, ["--pipeline-parallel-size", "4", "--num-layers-per-virtual-stage", "1"], 4,
                               "layers8", ["--num-layers", "8"]),
    # DP2: the ring's neighbours are a stage apart (2 ranks); 2 micro-batches per DP rank = PP
    "dp2_pp2_2chunks": (4, ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "2"], 2,
                        "layers8", ["--num-layers", "8"]),
    # MoE layers 2 and 5: chunks 1, 6 | 2, 7 hold one each; ranks 0 and 3 none at all
    "pp4_2chunks_moe_interval3": (4, ["--pipeline-parallel-size", "4", "--num-layers-per-virtual-stage", "1"], 8,
                                  "layers8_interval3", ["--num-layers", "8", "--moe-layer-interval", "3"]),
}


@pytest.mark.parametrize("name", list(INTERLEAVED_LAYOUTS))
def test_interleaved_pipeline_matches_one_process(name, interleaved_references, tmp_path):
    nproc, layout, micro, ref, extra = INTERLEAVED_LAYOUTS[name]
    worst = assert_same_training(interleaved_references[ref], parity_run(tmp_path, name, nproc, layout, micro, extra))
    print(f"{name}: max relative loss difference {worst:.2e}")


INTERLEAVED_PP2 = ["--num-layers", "8", "--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "2"]


@pytest.fixture(scope="module")
def interleaved_full_run(tmp_path_factory):
    """A 6-step PP2 interleaved run (2 chunks of 2 layers per rank), checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("interleaved_full_run")
    return tmp, run_for_resume(tmp, "interleaved", 2, INTERLEAVED_PP2, 4)


@pytest.mark.parametrize("target", ["one_process", "pp2_plain"])
def test_interleaved_checkpoint_reshards_onto_plain_layouts(interleaved_full_run, tmp_path, target):
    tmp, full = interleaved_full_run
    shutil.copytree(tmp / "interleaved", tmp_path / "ck")
    nproc, layout = {"one_process": (1, ["--num-layers", "8"]),
                     "pp2_plain": (2, ["--num-layers", "8", "--pipeline-parallel-size", "2"])}[target]
    resumed = run_for_resume(tmp_path, "resumed", nproc, layout, 4, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(full, resumed)
    print(f"interleaved -> {target}: max relative loss difference {worst:.2e}")


# name: (world size, flags, words the error line must hold)
BAD_INTERLEAVED = {
    "no_pipeline": (2, ["--num-layers-per-virtual-stage", "1"], "--pipeline-parallel-size > 1"),
    "layers_vs_chunks": (2, ["--pipeline-parallel-size", "2", "--num-layers", "6",
                             "--num-layers-per-virtual-stage", "2"], "must divide --num-layers (6)"),
    "microbatches_vs_pp": (4, ["--pipeline-parallel-size", "4", "--num-layers", "8", "--num-microbatches", "6",
                               "--num-layers-per-virtual-stage", "1"], "multiple of 4"),
    "negative": (2, ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "-1"], ">= 0"),
}


@pytest.mark.parametrize("name", list(BAD_INTERLEAVED))
def test_invalid_interleaving_exits_2_before_any_collective(name):
    """Rank 0 of a would-be world fails alone, at once: validation needs no peer."""
    world, flags, words = BAD_INTERLEAVED[name]
    start = time.time()
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--num-microbatches", "4"] + flags, timeout=60,
                env={"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"})
    assert_clean_refusal(r, words)
    assert time.time() - start < 30


def test_interleaved_layout_and_dry_run_show_each_ranks_chunks():
    r = run_cli(["--dry-run", "--world-size", "4", "--num-layers", "8", "--pipeline-parallel-size", "2",
                 "--num-layers-per-virtual-stage", "2", "--num-microbatches", "4", "--hidden-size", "32",
                 "--num-attention-heads", "4", "--num-kv-heads", "2", "--num-experts", "4"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "stage 0 (ranks 0-1): chunks 0-1, 4-5 + embedding" in r.stdout
    assert "stage 1 (ranks 2-3): chunks 2-3, 6-7 + LM head" in r.stdout
    # Parameters each rank builds: the sum over its chunks, counted by hand from the layer formula.
    mc = tiny_config(num_layers=8, hidden_size=32, num_experts=4)
    tc = launch.TrainConfig(pipeline_parallel_size=2, num_layers_per_virtual_stage=2, num_microbatches=4)
    whole = {name: p.numel() for name, p in MoETransformer(mc).named_parameters()}
    for stage, layers in ((0, (0, 1, 4, 5)), (1, (2, 3, 6, 7))):
        dense, experts = memory.built_params(mc, launch.resolve_layout(mc, tc, 4), stage)
        want = sum(n for name, n in whole.items() if name.startswith(tuple(f"layers.{i}." for i in layers))
                   or name.startswith("embed_tokens." if stage == 0 else ("norm.", "lm_head.")))
        assert dense + experts == want == memory.params_per_stage(mc, 1, 2, 1, layers_per_chunk=2)[stage]
    lines = launch.describe_layout(launch.resolve_layout(mc, tc, 4), mc).split("\n")
    assert lines[1] == "  rank 0: stage 0 chunks 0-1, 4-5 | dp 0 | tp 0/1 | experts 0-3"
    assert lines[4] == "  rank 3: stage 1 chunks 2-3, 6-7 | dp 1 | tp 0/1 | experts 0-3"


# ---- recipes: --head-dim, load-balance health, multi-token prediction (issue 14)
def slow_attention(attn: Attention, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """Causal attention head by head with explicit matrices (no SDPA): softmax(q k^T / sqrt(Dh) + mask) v."""
    b, t, _ = x.shape
    dh, group = attn.head_dim, attn.n_heads // attn.n_kv
    q = attn.q_norm((x @ attn.q_proj.weight.T).view(b, t, attn.n_heads, dh)).transpose(1, 2)
    k = attn.k_norm((x @ attn.k_proj.weight.T).view(b, t, attn.n_kv, dh)).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(b, t, attn.n_kv, dh).transpose(1, 2)
    q, k = rope(q, k, torch.arange(t))
    heads = []
    for h in range(attn.n_heads):
        scores = q[:, h] @ k[:, h // group].transpose(-1, -2) / math.sqrt(dh)  # (B, T, T)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, h // group])  # (B, T, Dh)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T  # (B, T, D)


def test_head_dim_independent_of_hidden_matches_slow_attention():
    cfg = tiny_config(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=16)  # H*Dh = 64 != D = 32
    torch.manual_seed(0)
    attn = Attention(cfg, ModelParallel())
    layout_free_init_(attn, 5)
    assert attn.q_proj.weight.shape == (64, 32) and attn.o_proj.weight.shape == (32, 64)
    rope = RotaryEmbedding(16, cfg.seq_length, cfg.rope_theta)
    x = torch.randn(2, cfg.seq_length, 32)
    with torch.no_grad():
        assert (attn(x, rope, torch.arange(cfg.seq_length)) - slow_attention(attn, x, rope)).abs().max() < 1e-5


def test_head_dim_flops_and_planner_count_the_built_model():
    cfg = tiny_config(num_layers=3, moe_layer_interval=2, head_dim=16)
    model = MoETransformer(cfg)
    by_hand = sum(p.numel() * (2 / 4 if "experts" in name else 1.0) for name, p in model.named_parameters()
                  if not name.startswith("embed_tokens"))
    assert cfg.active_params_per_token() == by_hand
    assert cfg.flops_per_token() == 6 * by_hand + 12 * 3 * (4 * 16) * 16  # 12 x layers x H x Dh x T
    assert memory.params_per_stage(cfg, 1, 1, 1) == [sum(p.numel() for p in model.parameters())]


def test_head_dim_import_and_export_give_transformers_logits(tmp_path):
    """A Qwen3-MoE with head_dim 16 over hidden 32 and 4 heads: import -> equal logits; export -> equal logits."""
    pytest.importorskip("safetensors")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=16, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                         moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    assert ckpt_io.read_checkpoint(str(tmp_path / "ck")).meta["model"]["head_dim"] == 16
    x = tokens(256)
    with torch.no_grad():
        theirs = model(x).logits
    assert (our_logits(str(tmp_path / "ck"), x) - theirs).abs().max() < 1e-4
    export_hf.export(str(tmp_path / "ck"), str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["head_dim"] == 16
    exported, _ = hf_logits(tmp_path / "out", x)
    assert (exported - theirs).abs().max() < 1e-4
    metrics = tmp_path / "m.jsonl"  # and it trains on, under TP2 (heads split as before)
    r = run_cli(["--load", str(tmp_path / "ck"), "--max-steps", "2", "--micro-batch-size", "2", "--seq-length", "16",
                 "--log-interval", "1", "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics),
                 "--tensor-parallel-size", "2", "--dist-timeout", "60"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in train_records(str(metrics))] == [1, 2]


def test_head_dim_under_tp2_and_pp2_matches_one_process(tmp_path):
    """Attention 4 x 16 = 64 wide over hidden 32: TP2 splits the heads as before; both layouts train as one process."""
    wide = ["--head-dim", "16"]
    reference = parity_run(tmp_path, "one", 1, [], 4, wide)
    for name, layout in (("tp2", ["--tensor-parallel-size", "2"]), ("pp2", ["--pipeline-parallel-size", "2"])):
        worst = assert_same_training(reference, parity_run(tmp_path, name, 2, layout, 4, wide))
        print(f"head-dim {name}: max relative loss difference {worst:.2e}")
    assert reference[1]["layers.0.self_attn.q_proj.weight"].shape == (64, 32)


def test_load_health_of_hand_made_counts():
    """Counts (E=4) summed over 2 steps of one EP group of 2 ranks: every figure by hand."""
    h = metrics_mod.load_health([6.0, 0.0, 2.0, 8.0], ep=2, ep_groups=1, steps=2)
    assert h["max_over_mean_load"] == 8 / 4
    assert h["load_cv"] == pytest.approx(math.sqrt((4 + 16 + 4 + 16) / 4) / 4)
    assert h["dead_experts"] == 1  # expert 1: zero rows
    assert h["ep_rank_rows"] == [(6 + 0) / 2, (2 + 8) / 2]  # experts 0-1 on EP rank 0, 2-3 on rank 1, per step
    assert "ep_rank_rows" not in metrics_mod.load_health([1.0, 1.0], ep=1, ep_groups=2, steps=1)
    assert metrics_mod.load_health([100.0, 0.5, 99.5, 100.0], 1, 1, 1)["dead_experts"] == 1  # 0.5 < 1% of 75
    assert metrics_mod.load_health([1.0, 1.0, 1.0, 1.0], 1, 1, 1)["load_cv"] == 0.0


def test_load_health_of_an_ep2_run_matches_its_expert_load(tmp_path):
    """DP2 x EP2, log interval 2: the figures against the record's expert_load, and the rows of the EP ranks
    per step add up to the routed rows by hand: 8 sequences x 16 tokens x top-2 = 256 (dropless)."""
    metrics = tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + ["--expert-parallel-size", "2", "--num-microbatches", "2", "--max-steps", "4",
                              "--log-interval", "2", "--metrics-file", str(metrics), "--dist-timeout", "60"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    records = train_records(str(metrics))
    assert [x["step"] for x in records] == [2, 4]
    for rec in records:
        for layer, load in rec["expert_load"].items():
            mean = sum(load) / 4
            assert rec["max_over_mean_load"][layer] == pytest.approx(max(load) / mean)
            assert rec["load_cv"][layer] == pytest.approx(float(np.std(load)) / mean)
            assert rec["dead_experts"][layer] == sum(share < 0.01 * mean for share in load)
            rows = rec["ep_rank_rows"][layer]
            assert sum(rows) == pytest.approx(2 * 2 * 2 * 16 * 2)
            assert rows == pytest.approx([256 * (load[0] + load[1]), 256 * (load[2] + load[3])])
    worst = max(records[-1]["max_over_mean_load"], key=records[-1]["max_over_mean_load"].get)
    assert f"Max/Mean Load: {records[-1]['max_over_mean_load'][worst]:.2f} (layer {worst})" in r.stdout
    assert "rows per EP rank per step" in r.stdout and f"cv {records[-1]['load_cv']['0']:.2f}" in r.stdout
    pytest.importorskip("matplotlib")
    r = run_script("plot_metrics.py", [str(metrics), "--out", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / "plots" / f).stat().st_size > 0 for f in ("load_cv.png", "dead_experts.png",
                                                                      "ep_rank_rows.png"))


# ---- multi-token prediction (issue 14, item 4)
MTP = ["--mtp-num-layers", "2", "--mtp-loss-coef", "0.3"]


def direct_mtp_losses(model: MoETransformer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lm loss, mean_k CE_k) by a loop over the model's modules, truncating as the DeepSeek-V3 paper does:
    module k runs on the T - k positions i whose target t_{i+k+1} exists, reading Emb(t_{i+k})."""
    t = x.shape[1]
    pos = torch.arange(t)
    h = model.embed_tokens.weight[x]  # (B, T, D)
    for block in model.layers.values():
        h, _ = block(h, model.rope, pos)
    lm = F.cross_entropy((model.norm(h) @ model.lm_head.weight.T).flatten(0, 1), y.flatten())
    ces = []
    for k, module in enumerate(model.mtp, start=1):
        n = t - k
        emb = model.embed_tokens.weight[y[:, k - 1:k - 1 + n]]  # t_{i+k} = y[:, i + k - 1], i < T - k
        joined = torch.cat([module.enorm(emb), module.hnorm(h[:, :n])], dim=-1) @ module.eh_proj.weight.T
        h, _ = module.block(joined, model.rope, pos[:n])  # (B, T - k, D)
        logits = module.final_layernorm(h) @ model.lm_head.weight.T  # the shared head
        ces.append(F.cross_entropy(logits.flatten(0, 1), y[:, k:].flatten()))  # t_{i+k+1} = y[:, i + k]
    return lm, torch.stack(ces).mean()


def test_mtp_loss_equals_a_direct_computation():
    cfg = tiny_config(mtp_num_layers=3)
    model = MoETransformer(cfg, seed=3)
    x, y = tokens(cfg.vocab_size), tokens(cfg.vocab_size, seed=1)
    with torch.no_grad():
        out = model(x, mtp_targets=y)
        lm, mtp = direct_mtp_losses(model, x, y)
    assert [tuple(l.shape) for l in out.mtp_logits] == [(2, 15, 64), (2, 14, 64), (2, 13, 64)]
    assert sorted(out.stats) == [0, 1, 2, 3, 4]  # the MTP blocks are MoE layers 2, 3, 4
    assert abs(F.cross_entropy(out.output.flatten(0, 1), y.flatten()) - lm) < 1e-5
    assert abs(mp.mtp_loss(out.mtp_logits, y, model.par) - mtp) < 1e-5


def test_mtp_loss_of_the_trainers_first_step_equals_a_direct_computation(tmp_path):
    """The first record's mtp_loss, and its loss = lm + coef x mtp + router terms, against the loop on the same batch."""
    metrics = tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + MTP + ["--max-steps", "1", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| MTP Loss: " in r.stdout
    rec = train_records(str(metrics))[0]
    mc, tc, _ = launch.parse_config(TINY_FLAGS + MTP)
    mc.vocab_size = 256
    model = MoETransformer(mc, seed=tc.seed)
    x, y = data.get_batch(data.load_corpus("", None).train, tc.seed, 0, 0, 2, 16, 256)
    with torch.no_grad():
        lm, mtp = direct_mtp_losses(model, x, y)
        stats = model(x, mtp_targets=y).stats
    aux = sum(s.aux_loss for s in stats.values()) / 4  # 2 layers + 2 MTP blocks
    z = sum(s.z_loss for s in stats.values()) / 4
    assert rec["mtp_loss"] == pytest.approx(float(mtp), rel=1e-5)
    assert rec["lm_loss"] == pytest.approx(float(lm), rel=1e-5)
    assert rec["loss"] == pytest.approx(float(lm + 0.3 * mtp + 0.1 * aux + 0.01 * z), rel=1e-5)
    assert sorted(rec["expert_load"]) == ["0", "1", "2", "3"]


@pytest.fixture(scope="module")
def mtp_one_process(tmp_path_factory):
    return parity_run(tmp_path_factory.mktemp("mtp_one_process"), "one", 1, [], 4, MTP)


@pytest.mark.parametrize("name,nproc,layout,micro", [
    ("dp2_ep2", 2, ["--expert-parallel-size", "2"], 2),
    ("pp2", 2, ["--pipeline-parallel-size", "2"], 4),
    ("tp2_ep2", 2, ["--tensor-parallel-size", "2"], 4),
    # SP: the modules read the (B, T/TP, D) slices and all-gather before the shared head
    ("tp2_sp", 2, ["--tensor-parallel-size", "2", "--sequence-parallel"], 4),
    # the embedding copy's bucket: sharded alike on both stages, its shards summed over the embedding group
    ("pp2_dp2_distributed_optimizer", 4, ["--pipeline-parallel-size", "2", "--use-distributed-optimizer"], 2),
])
def test_mtp_layout_matches_one_process(name, nproc, layout, micro, mtp_one_process, tmp_path):
    candidate = parity_run(tmp_path, name, nproc, layout, micro, MTP)
    worst = assert_same_training(mtp_one_process, candidate)
    for a, b in zip(mtp_one_process[0], candidate[0]):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    print(f"mtp {name}: max relative loss difference {worst:.2e}")


def test_mtp_under_interleaved_1f1b_matches_one_process(tmp_path):
    """4 layers, PP2 with 2 chunks of 1 layer per rank: the modules run after the last rank's
    last chunk (layer 3), and rank 1's embedding copy is summed with rank 0's first chunk."""
    layers4 = MTP + ["--num-layers", "4"]
    reference = parity_run(tmp_path, "one", 1, [], 4, layers4)
    candidate = parity_run(tmp_path, "pp2_interleaved", 2,
                           ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "1"], 4, layers4)
    worst = assert_same_training(reference, candidate)
    for a, b in zip(reference[0], candidate[0]):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    print(f"mtp pp2 interleaved: max relative loss difference {worst:.2e}")


def _mtp_pp2_worker(rank: int, port: int, result_dir: str) -> None:
    """One rank of a PP2 run of the trainer's own train_step; each rank keeps its embedding copy."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mc, tc, _ = launch.parse_config(TINY_FLAGS + MTP + ["--pipeline-parallel-size", "2", "--num-microbatches", "2"])
    mc.vocab_size = 256
    pg = mp.build_process_groups(launch.resolve_layout(mc, tc, 2, rank), embedding_groups=True)
    device = torch.device("cpu")
    model = mp.build_model(mc, tc, pg, device, None)
    reducers = mp.build_grad_reducers(model, pg)
    optimizer = optim.build_optimizer(model, tc.lr, tc.weight_decay)
    corpus = data.load_corpus("", None)
    for step in range(3):
        x, y = data.get_batch(corpus.train, tc.seed, 0, step, 4, 16, 256)
        mp.train_step(model, optimizer, reducers, mp.local_microbatches(x, y, pg, device), pg, mc, tc, device,
                      None, step)
    torch.save(model.embed_tokens.weight.detach().clone(), os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_mtp_pipeline_keeps_the_two_embedding_copies_equal(tmp_path):
    import torch.multiprocessing as tmp_mp
    tmp_mp.spawn(_mtp_pp2_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    first, last = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    initial = MoETransformer(tiny_config(vocab_size=256, mtp_num_layers=2), seed=1234).embed_tokens.weight
    assert torch.equal(first, last)  # the same summed gradient, the same AdamW step, on both stages
    assert (first - initial).abs().max() > 1e-3  # and both moved


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 2, 2), (1, 3, 1)])
def test_mtp_planner_and_flops_count_the_built_model(tp, pp, ep):
    """The last stage holds the MTP modules (and, under PP, an embedding copy): the planner's counts per stage
    against the built slices; FLOPs add 6 x the modules' active parameters and their attention."""
    mc = tiny_config(num_layers=3, moe_layer_interval=2, num_shared_experts=1, mtp_num_layers=2)
    counted, experts = memory.params_per_stage(mc, tp, pp, ep), memory.expert_params_per_stage(mc, pp, ep)
    for stage in range(pp):
        start, end = stage_layers(mc.num_layers, pp, stage)
        model = MoETransformer(mc, ModelParallel(tp_size=tp, ep_size=ep, layer_start=start, layer_end=end,
                                                 first_stage=stage == 0, last_stage=stage == pp - 1))
        assert counted[stage] == sum(p.numel() for p in model.parameters()), stage
        assert experts[stage] == sum(p.numel() for p in model.parameters() if placement(p).expert)
    if (tp, pp) == (1, 1):
        mtp = sum(p.numel() * (2 / 4 if ".experts." in n else 1.0) for n, p in model.named_parameters()
                  if n.startswith("mtp.")) + model.lm_head.weight.numel() * 2  # the shared head, once per module
        assert mc.flops_per_token() == 6 * (mc.active_params_per_token() + mtp) + 12 * (3 + 2) * 4 * 8 * 16


def test_mtp_modules_change_no_generated_logit(tmp_path):
    """Generation ignores the MTP modules: the same logits with and without them, in memory and through a checkpoint."""
    with_mtp, without = MoETransformer(tiny_config(mtp_num_layers=2), seed=3), MoETransformer(tiny_config(), seed=3)
    x = tokens(64)
    with torch.no_grad():
        assert torch.equal(with_mtp(x).output, without(x).output)
    ck = save_in_process(with_mtp, tmp_path / "ck")
    loaded = generate.load_model(ck)
    assert len(loaded.mtp) == 0
    with torch.no_grad():
        assert torch.equal(loaded(x).output, without(x).output)
    assert generate.generate(loaded, [1, 2, 3], 5, temperature=0.0) == generate.generate(without, [1, 2, 3], 5,
                                                                                         temperature=0.0)


def test_mtp_export_leaves_the_modules_out_and_gives_transformers_the_logits(tmp_path, capsys):
    pytest.importorskip("safetensors")
    model = MoETransformer(tiny_config(mtp_num_layers=2), seed=3)
    ck = save_in_process(model, tmp_path / "ck")
    export_hf.export(ck, str(tmp_path / "hf"))
    assert "2 multi-token prediction modules (mtp.*)" in capsys.readouterr().out
    x = tokens(64)
    theirs, _ = hf_logits(tmp_path / "hf", x)
    with torch.no_grad():
        assert (model(x).output - theirs).abs().max() < 1e-4


def _mtp_resume_run(tmp_path, name: str, nproc: int, layout: list[str], micro: int, load: str = "") -> list[dict]:
    save = tmp_path / name
    r = run_cli(TINY_FLAGS + MTP + layout + ["--max-steps", "6", "--num-microbatches", str(micro), "--save", str(save),
                                             "--save-interval", "3", "--metrics-file", str(save) + ".jsonl",
                                             "--dist-timeout", "60"] + (["--load", load] if load else []), nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return train_records(str(save) + ".jsonl")


def test_mtp_checkpoint_reshards_onto_pp2_which_saves_the_embedding_once(tmp_path):
    """A one-process checkpoint at step 3 continues on PP2 (the last stage's copy loaded from the one saved
    embedding) like the uninterrupted run; PP2's own checkpoint holds the embedding once."""
    reference = _mtp_resume_run(tmp_path, "one", 1, [], 4)
    shutil.copytree(tmp_path / "one", tmp_path / "ck")
    resumed = _mtp_resume_run(tmp_path, "pp2", 2, ["--pipeline-parallel-size", "2"], 4,
                              load=interrupted_at_3(tmp_path / "ck"))
    _assert_continues_like(reference, resumed)
    for a, b in zip(reference[3:], resumed):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    ckpt = ckpt_io.read_checkpoint(str(tmp_path / "pp2"))
    assert ckpt.meta["layout"]["pp"] == 2 and len(ckpt.params["embed_tokens.weight"]) == 1
    assert "mtp.1.block.mlp.experts.3.down_proj.weight" in ckpt.params


def test_mtp_pp2_dp2_distributed_optimizer_checkpoint_resumes_on_one_process(tmp_path):
    """The embedding's state, sharded over DP on both stages, saved once and read back whole."""
    layout = MTP + ["--pipeline-parallel-size", "2", "--use-distributed-optimizer"]
    full = run_for_resume(tmp_path, "zero1", 4, layout, 2)
    shutil.copytree(tmp_path / "zero1", tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 1, MTP, 4, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(full, resumed)
    print(f"mtp pp2 x dp2 distributed optimizer -> one process: max relative loss difference {worst:.2e}")


@pytest.mark.parametrize("flags,words", [
    (["--mtp-num-layers", "-1"], "--mtp-num-layers"),
    (["--mtp-num-layers", "16"], "--mtp-num-layers (16) must be below --seq-length (16)"),
    (["--mtp-loss-coef", "-0.1"], "--mtp-loss-coef"),
    (["--mtp-loss-coef", "nan"], "--mtp-loss-coef"),
])
def test_mtp_bad_flags_exit_2_with_one_error_line(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        mp.main(TINY_FLAGS + flags + ["--max-steps", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and words in errors[0], errors


# ---- DeepSeek-V3 / Kimi-K2 routing, layer pattern and their export (issue 14)
def reference_route(cfg: ModelConfig, logits: list[float], bias: list[float]) -> tuple[list[int], list[float]]:
    """One token, by hand: scores, biased choice, group scores (sum of the two best), kept groups, top-K
    among their experts, weights from the unbiased scores, renormalised, times the scaling factor."""
    e, g = cfg.num_experts, cfg.router_num_groups
    if cfg.router_score_function == "sigmoid":
        scores = [1 / (1 + math.exp(-z)) for z in logits]
    else:
        total = sum(math.exp(z) for z in logits)
        scores = [math.exp(z) / total for z in logits]
    choice = [s + b for s, b in zip(scores, bias)]
    size = e // g
    group_score = [sum(sorted(choice[j * size:(j + 1) * size], reverse=True)[:2]) for j in range(g)]
    kept = sorted(range(g), key=lambda j: -group_score[j])[:cfg.router_group_topk]
    candidates = [i for j in kept for i in range(j * size, (j + 1) * size)]
    chosen = sorted(candidates, key=lambda i: -choice[i])[:cfg.num_experts_per_token]
    weights = [scores[i] for i in chosen]
    if cfg.norm_topk_prob or cfg.router_score_function == "sigmoid":
        weights = [w / sum(weights) for w in weights]
    return chosen, [w * cfg.router_topk_scaling_factor for w in weights]


GROUP_ROUTING_CASES = {
    "sigmoid_g4_keep2_top3_bias": dict(router_score_function="sigmoid", router_num_groups=4, router_group_topk=2,
                                       num_experts_per_token=3, router_topk_scaling_factor=2.5),
    "sigmoid_g2_keep1_top2": dict(router_score_function="sigmoid", router_num_groups=2, router_group_topk=1,
                                  router_topk_scaling_factor=2.827),
    "softmax_g4_keep2_unnormalised": dict(router_num_groups=4, router_group_topk=2, norm_topk_prob=False,
                                          router_topk_scaling_factor=1.5),
    "softmax_scale_only": dict(router_topk_scaling_factor=0.5),
}


@pytest.mark.parametrize("case", list(GROUP_ROUTING_CASES))
def test_group_limited_topk_and_scaling_match_a_per_token_loop(case):
    cfg = tiny_config(num_experts=8, **GROUP_ROUTING_CASES[case])
    cfg.validate()
    router = Router(cfg)
    layout_free_init_(router, 5)
    gen = torch.Generator().manual_seed(6)
    router.weight.data.mul_(20)  # spread the scores so that groups matter
    router.expert_bias.copy_(0.1 * torch.randn(8, generator=gen))
    x = torch.randn(64, cfg.hidden_size, generator=gen)
    r = router(x)
    logits = (x.double() @ router.weight.double().T).tolist()
    changed = 0
    for n in range(64):
        chosen, weights = reference_route(cfg, logits[n], router.expert_bias.tolist())
        assert r.indices[n].tolist() == chosen, n
        assert r.weights[n].tolist() == pytest.approx(weights, rel=1e-5), n
        ungrouped, _ = reference_route(dataclasses.replace(cfg, router_num_groups=1, router_group_topk=1),
                                       logits[n], router.expert_bias.tolist())
        changed += set(chosen) != set(ungrouped)
    assert changed > 0 or cfg.router_num_groups == 1  # the groups decided some tokens' experts


def hand_router(**kw) -> Router:
    """Sigmoid router on 4 experts whose logits are the first 4 features of x (weight = identity)."""
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, router_score_function="sigmoid", **kw)
    cfg.validate()
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :4] = torch.eye(4)
    return router


def test_group_limiting_by_hand():
    """Scores 0.9, 0.1 | 0.8, 0.7 in groups {0, 1} and {2, 3}: plain top-2 takes experts 0 and 2; the
    groups score 1.0 and 1.5, so keeping one group takes 2 and 3, weights 2.5 x 0.8 / 1.5 and 2.5 x 0.7 / 1.5.
    A bias of 0.6 on expert 1 lifts group 0 to 0.9 + 0.7 = 1.6: experts 0 and 1, weights from the
    unbiased scores, 2.5 x 0.9 / 1.0 and 2.5 x 0.1 / 1.0."""
    p = torch.tensor([0.9, 0.1, 0.8, 0.7])
    x = torch.zeros(1, 32)
    x[0, :4] = torch.log(p / (1 - p))  # sigmoid(x) = p
    plain = hand_router(router_topk_scaling_factor=2.5)(x)
    assert sorted(plain.indices[0].tolist()) == [0, 2]
    router = hand_router(router_topk_scaling_factor=2.5, router_num_groups=2, router_group_topk=1)
    r = router(x)
    assert r.indices[0].tolist() == [2, 3]
    assert r.weights[0].tolist() == pytest.approx([2.5 * 0.8 / 1.5, 2.5 * 0.7 / 1.5], rel=1e-6)
    router.expert_bias[1] = 0.6
    r = router(x)
    assert sorted(r.indices[0].tolist()) == [0, 1]
    assert sorted(r.weights[0].tolist()) == pytest.approx([2.5 * 0.1, 2.5 * 0.9], rel=1e-6)


# flags -> words the error line must hold (each refused before any collective)
BAD_RECIPE_FLAGS = {
    "groups_vs_experts": (["--router-num-groups", "3"], "--router-num-groups (3) must divide --num-experts"),
    "group_topk_vs_groups": (["--router-num-groups", "2", "--router-group-topk", "3"], "--router-group-topk (3)"),
    "one_expert_per_group": (["--router-num-groups", "4", "--router-group-topk", "2"], "two best experts"),
    "topk_vs_kept_experts": (["--router-num-groups", "2", "--router-group-topk", "1", "--num-experts-per-token", "3"],
                             "--num-experts-per-token (3) must not exceed"),
    "scale_zero": (["--router-topk-scaling-factor", "0"], "--router-topk-scaling-factor must be finite and > 0"),
    "scale_nan": (["--router-topk-scaling-factor", "nan"], "--router-topk-scaling-factor"),
    "groups_with_expert_choice": (["--router-num-groups", "2", "--router-type", "expert-choice"],
                                  "--router-type expert-choice takes neither"),
    "first_k_all_layers": (["--first-k-dense-layers", "2"], "--first-k-dense-layers 2 leaves no MoE layer"),
    "first_k_negative": (["--first-k-dense-layers", "-1"], "--first-k-dense-layers must be >= 0"),
    "list_out_of_range": (["--moe-layer-list", "1,2"], "--moe-layer-list 1,2 must name distinct layers"),
    "list_repeated": (["--moe-layer-list", "1,1"], "must name distinct layers"),
    "list_not_numbers": (["--moe-layer-list", "1;2"], "--moe-layer-list must be comma-separated"),
    "list_with_interval": (["--moe-layer-list", "1", "--moe-layer-interval", "2"], "drop --first-k-dense-layers"),
    "list_when_dense": (["--moe-layer-list", "1", "--num-experts", "0"], "--moe-layer-list names MoE layers"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPE_FLAGS))
def test_recipe_flags_refuse_bad_values_naming_the_flag(case):
    flags, words = BAD_RECIPE_FLAGS[case]
    mc, tc, _ = launch.parse_config(TINY_FLAGS + flags)
    with pytest.raises(launch.ConfigError) as e:
        launch.resolve_layout(mc, tc, 1)
    assert words in str(e.value)


def test_recipe_flag_refusal_exits_2_with_one_error_line():
    assert_clean_refusal(run_cli(TINY_FLAGS + ["--router-num-groups", "3"]), "--router-num-groups")


def test_first_k_dense_and_moe_layer_list_pick_the_layers_by_hand():
    assert tiny_config(num_layers=6, first_k_dense_layers=3).moe_layers == [3, 4, 5]  # DeepSeek-V3's shape
    assert tiny_config(num_layers=6, first_k_dense_layers=2, moe_layer_interval=2).moe_layers == [3, 5]
    assert tiny_config(num_layers=6, moe_layer_list="5,1,3").moe_layers == [1, 3, 5]
    assert tiny_config(num_layers=6, moe_layer_list="0").moe_layers == [0]
    assert tiny_config(num_layers=6, first_k_dense_layers=3, num_experts=0).moe_layers == []
    model = MoETransformer(tiny_config(num_layers=4, moe_layer_list="0,2"))
    assert [type(b.mlp).__name__ for b in model.layers.values()] == ["SparseMoELayer", "DenseMLP"] * 2


@pytest.mark.parametrize("pattern", [dict(first_k_dense_layers=2), dict(moe_layer_list="0,3")])
def test_memory_planner_counts_the_parameters_each_stage_builds_for_a_layer_pattern(pattern):
    cfg = tiny_config(num_layers=4, num_shared_experts=1, **pattern)
    built = []
    for stage in range(2):
        start, end = stage_layers(4, 2, stage)
        with torch.device("meta"):
            model = MoETransformer(cfg, ModelParallel(layer_start=start, layer_end=end, first_stage=stage == 0,
                                                      last_stage=stage == 1))
        built.append(sum(p.numel() for p in model.parameters()))
    assert memory.params_per_stage(cfg, 1, 2, 1) == built
    if "first_k_dense_layers" in pattern:  # stage 0 is dense: attention, norms, embedding, 2 dense MLPs
        d, dh = cfg.hidden_size, cfg.attn_head_dim
        attn = d * dh * (2 * 4 + 2 * 2) + 2 * dh + 2 * d
        assert built[0] == 2 * (attn + 3 * d * cfg.ffn_hidden_size) + cfg.vocab_size * d


@pytest.mark.parametrize("pattern", [dict(first_k_dense_layers=1), dict(moe_layer_list="0,2")])
def test_active_parameters_of_the_flops_formula_follow_the_layer_pattern(pattern):
    """Counted off the built model: everything but the embedding, with K of E experts of each MoE layer."""
    cfg = tiny_config(num_layers=3, num_shared_experts=1, **pattern)
    model = MoETransformer(cfg)
    counted = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        counted += p.numel() * (cfg.num_experts_per_token / cfg.num_experts if ".experts." in name else 1)
    assert cfg.active_params_per_token() == counted
    assert sum(".experts." in n for n, _ in model.named_parameters()) == 3 * len(cfg.moe_layers) == 6


# The DeepSeek-V3 / Kimi-K2 recipe at tiny size: sigmoid scores with aux-loss-free bias updates, 2 groups of
# 2 experts with 1 kept, routed weights x 2.5, a shared expert, and layer 0 dense (so a PP2 stage 0 has no MoE).
DEEPSEEK_FLAGS = ["--router-score-function", "sigmoid", "--router-bias-update-rate", "0.01",
                  "--router-num-groups", "2", "--router-group-topk", "1", "--router-topk-scaling-factor", "2.5",
                  "--num-shared-experts", "1", "--first-k-dense-layers", "1"]


CAPACITY = ["--moe-capacity-factor", "1.0"]


@pytest.fixture(scope="module")
def deepseek_one_process(tmp_path_factory):
    """The one-process references of the recipe, without and with an expert capacity."""
    tmp = tmp_path_factory.mktemp("deepseek")
    return tmp / "one", {"dropless": parity_run(tmp, "one", 1, [], 4, DEEPSEEK_FLAGS),
                         "capacity": parity_run(tmp, "one_capacity", 1, [], 4, DEEPSEEK_FLAGS + CAPACITY)}


# name: (ranks, layout flags, micro-batches per DP rank, reference and its extra flags)
DEEPSEEK_LAYOUTS = {
    "dp2_ep2": (2, ["--expert-parallel-size", "2"], 2, "dropless"),
    "pp2_stage0_dense": (2, ["--pipeline-parallel-size", "2"], 4, "dropless"),
    "tp2": (2, ["--tensor-parallel-size", "2", "--expert-parallel-size", "1"], 4, "dropless"),
    "tp2_ep2_capacity": (2, ["--tensor-parallel-size", "2"], 4, "capacity"),
}


@pytest.mark.parametrize("name", list(DEEPSEEK_LAYOUTS))
def test_deepseek_style_recipe_matches_one_process(name, deepseek_one_process, tmp_path):
    nproc, layout, micro, ref = DEEPSEEK_LAYOUTS[name]
    reference = deepseek_one_process[1][ref]
    extra = DEEPSEEK_FLAGS + (CAPACITY if ref == "capacity" else [])
    worst = assert_same_training(reference, parity_run(tmp_path, name, nproc, layout, micro, extra))
    assert list(reference[0][0]["expert_load"]) == ["1"]  # layer 0 is dense
    assert reference[1]["layers.1.mlp.router.expert_bias"].abs().sum() > 0  # the bias moved
    if ref == "capacity":
        assert any(r["dropped_fraction"]["1"] > 0 for r in reference[0])  # the capacity did drop
    print(f"{name}: max relative loss difference {worst:.2e}")


def test_recipe_with_mtp_and_head_dim_under_sp_and_interleaved_tp2_pp2_matches_one_process(tmp_path):
    """Issues 14 and 15 at once: the recipe above with --head-dim 16 (attention 64 wide over hidden 32)
    and an MTP module, trained on TP2 x PP2 with sequence parallelism and 2 chunks of 1 layer per rank
    (rank 0's first chunk is the dense layer 0; the MTP module follows rank 1's last chunk)."""
    model = DEEPSEEK_FLAGS + ["--num-layers", "4", "--head-dim", "16", "--mtp-num-layers", "1"]
    reference = parity_run(tmp_path, "one", 1, [], 4, model)
    layout = SP + ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "1"]
    candidate = parity_run(tmp_path, "tp2_pp2_sp_interleaved", 4, layout, 4, model)
    worst = assert_same_training(reference, candidate)
    for a, b in zip(reference[0], candidate[0]):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    assert list(reference[0][0]["expert_load"]) == ["1", "2", "3", "4"]  # layer 0 dense; 4 is the MTP block
    print(f"recipe under TP2 x PP2, SP, interleaved: max relative loss difference {worst:.2e}")


DEEPSEEK_EXPORTS = {  # model flags -> transformers class
    "groups_scale_shared_first_k": (dict(num_layers=3, num_experts=8, router_score_function="sigmoid",
                                         router_num_groups=4, router_group_topk=2, router_topk_scaling_factor=2.5,
                                         num_shared_experts=2, first_k_dense_layers=1), "Glm4MoeForCausalLM"),
    "sigmoid_no_shared_experts": (dict(router_score_function="sigmoid"), "Glm4MoeForCausalLM"),
    "softmax_first_k_dense": (dict(num_layers=3, first_k_dense_layers=1), "Qwen3MoeForCausalLM"),
    "softmax_layer_list": (dict(num_layers=4, moe_layer_list="0,2,3"), "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("name", list(DEEPSEEK_EXPORTS))
def test_deepseek_style_export_gives_transformers_the_same_logits(name, tmp_path):
    pytest.importorskip("safetensors")
    kw, arch = DEEPSEEK_EXPORTS[name]
    cfg = tiny_config(**kw)
    model = MoETransformer(cfg, seed=3)
    briefly_train(model, 2)
    if cfg.router_score_function == "sigmoid":
        for moe in model.moe_layers().values():  # as aux-loss-free balancing leaves it
            moe.router.expert_bias.copy_(0.05 * torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(9)))
    ck = save_in_process(model, tmp_path / "ck")
    export_hf.export(ck, str(tmp_path / "hf"))
    x = tokens(cfg.vocab_size)
    theirs, got = hf_logits(tmp_path / "hf", x)
    ours = our_logits(ck, x)
    assert got == arch
    assert (ours - theirs).abs().max() < 1e-4
    if cfg.router_num_groups > 1:  # the groups change the logits, so the equality above covers them
        ungrouped = MoETransformer(dataclasses.replace(cfg, router_num_groups=1, router_group_topk=1))
        ungrouped.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (ungrouped(x).output - ours).abs().max() > 1e-3
    # and back: the same weights and model config
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    before, after = ckpt_io.read_checkpoint(ck), ckpt_io.read_checkpoint(str(tmp_path / "back"))
    a, b = ckpt_io.full_state_dict(before), ckpt_io.full_state_dict(after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert after.meta["model"] == before.meta["model"]


def test_deepseek_style_training_run_exports_to_glm4moe_with_its_moved_bias(deepseek_one_process, tmp_path):
    pytest.importorskip("safetensors")
    st = pytest.importorskip("safetensors.torch")
    path, references = deepseek_one_process
    weights = references["dropless"][1]
    export_hf.export(str(path), str(tmp_path / "hf"))
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["model_type"], config["first_k_dense_replace"], config["n_group"], config["topk_group"],
            config["routed_scaling_factor"], config["n_shared_experts"]) == ("glm4_moe", 1, 2, 1, 2.5, 1)
    saved = st.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(saved["model.layers.1.mlp.gate.e_score_correction_bias"],
                       weights["layers.1.mlp.router.expert_bias"])
    x = tokens(256)
    theirs, _ = hf_logits(tmp_path / "hf", x)
    assert (our_logits(str(path), x) - theirs).abs().max() < 1e-4


def glm4_moe_model(**kw):
    """A tiny Glm4MoeForCausalLM built by transformers (no download), every weight and bias perturbed."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=16, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                  norm_topk_prob=True, use_qk_norm=True, num_nextn_predict_layers=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0})
    config.update(kw)
    model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(model.parameters()) + [b for n, b in model.named_buffers() if "correction_bias" in n]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.mul_(20)  # spread the router scores so that the groups decide
    return model.float().eval()


def test_import_of_a_transformers_glm4moe_gives_its_logits_and_trains_on(tmp_path):
    pytest.importorskip("safetensors")
    model = glm4_moe_model()
    model.save_pretrained(str(tmp_path / "hf"))
    r = run_script("import_hf.py", ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")])
    assert r.returncode == 0, r.stderr
    meta = ckpt_io.read_checkpoint(str(tmp_path / "ck")).meta["model"]
    assert (meta["router_score_function"], meta["router_num_groups"], meta["router_group_topk"],
            meta["router_topk_scaling_factor"], meta["num_shared_experts"], meta["first_k_dense_layers"]) == \
        ("sigmoid", 4, 2, 2.5, 1, 1)
    x = tokens(256)
    with torch.no_grad():
        theirs = model(x).logits
    assert (our_logits(str(tmp_path / "ck"), x) - theirs).abs().max() < 1e-4
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(tmp_path / "ck"), "--max-steps", "2", "--micro-batch-size", "2", "--log-interval", "1",
                 "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in train_records(str(metrics))] == [1, 2]


# model flags -> words of the refusal (the flag to change)
UNEXPORTABLE = {
    "sigmoid_interval2": (dict(num_layers=4, router_score_function="sigmoid", moe_layer_interval=2),
                          "--moe-layer-interval"),
    "sigmoid_list_not_a_suffix": (dict(num_layers=3, router_score_function="sigmoid", moe_layer_list="0,2"),
                                  "--moe-layer-list"),
    "shared_width": (dict(router_score_function="sigmoid", num_shared_experts=1, shared_expert_ffn_hidden_size=16),
                     "--shared-expert-ffn-hidden-size"),
    "softmax_groups": (dict(router_num_groups=2), "--router-num-groups"),
    "softmax_scale": (dict(router_topk_scaling_factor=2.5), "--router-topk-scaling-factor"),
    "capacity": (dict(router_score_function="sigmoid", moe_capacity_factor=1.25), "--moe-capacity-factor"),
}


@pytest.mark.parametrize("case", list(UNEXPORTABLE))
def test_export_refuses_what_no_transformers_class_expresses(case, tmp_path):
    pytest.importorskip("safetensors")
    kw, words = UNEXPORTABLE[case]
    ck = save_in_process(MoETransformer(tiny_config(**kw)), tmp_path / "ck")
    with pytest.raises(export_hf.UnsupportedModel, match=words):
        export_hf.export(ck, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    if case == "sigmoid_interval2":
        r = run_script("export_hf.py", ["--checkpoint", ck, "--out", tmp_path / "hf"])
        assert_clean_refusal(r, "--moe-layer-interval")


@pytest.mark.parametrize("change,words", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}), "partial_rotary_factor 0.5"),
    (dict(use_qk_norm=False), "use_qk_norm is false"),
    (dict(norm_topk_prob=False), "norm_topk_prob is false"),
])
def test_import_refuses_glm4moe_configs_we_cannot_represent(change, words):
    valid = dict(model_type="glm4_moe", vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4,
                 num_experts_per_tok=2, max_position_embeddings=16, use_qk_norm=True, norm_topk_prob=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0})
    assert import_hf.model_config_from_hf(valid).router_score_function == "sigmoid"
    with pytest.raises(import_hf.UnsupportedModel, match=words):
        import_hf.model_config_from_hf({**valid, **change})


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-m", "smoke"]))
