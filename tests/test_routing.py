"""Routers and routing: top-k, sigmoid and group-limited choice, expert bias, capacity, expert choice,
round robin, jitter, the balancing and z losses by hand, load health, routing without a host sync
(fake tensors) and dropped rows as padding, and every routing method under DP x EP and PP against
one process."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint as ckpt_io
import metrics as metrics_mod
import minimal_pretrain as mp
from moe_layers import (ModelConfig, MoETransformer, SparseMoELayer, Router, layout_free_init_,
                        load_balancing_loss, router_z_loss)
from helpers import (assert_same_training, expert_weights, interrupted_at_3, moe_layer, parity_run, reference_moe, run_cli,
                     run_for_resume, run_script, smoke, swiglu, tiny_config, TINY_FLAGS, train_records,
                     without_timing)


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
                expected[t] += r.weights[t, j] * swiglu(x[0, t], *expert_weights(e, i))
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
            expected[t] += probs[t, i] * swiglu(x[0, t], *expert_weights(e, i))
    assert torch.allclose(y[0], expected, atol=1e-5)


class NaNPastTheGroups(TorchDispatchMode):
    """Every (rows, K) x (E, K, N) torch._grouped_mm, forward or backward, writes NaN into the output rows
    past its last group: what it leaves unwritten, as uninitialised memory may hold."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._grouped_mm.default and args[0].dim() == 2 and args[1].dim() == 3:
            offs = kwargs["offs"] if "offs" in kwargs else args[2]
            out[offs[-1]:] = float("nan")
        return out


@pytest.mark.parametrize("width", [24, 8], ids=["weights_on_y", "weights_on_h"])
def test_dropped_rows_are_padding_that_the_grouped_gemms_never_write(width):
    """With a capacity the dropped rows stay, as padding after the real ones (no host sync), and
    torch._grouped_mm leaves their rows unwritten. Written with NaN there, in forward and backward,
    the grouped path must still equal the expert loop (which computes only the real rows) in output
    and in every gradient, weights routed on y (F > D) and on h (F < D)."""
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, moe_capacity_factor=0.5, moe_ffn_hidden_size=width)
    x = torch.randn(1, 24, cfg.hidden_size)
    results = []
    for grouped in (False, True):
        layer = moe_layer(cfg, 14)
        layer.experts.use_grouped_mm = grouped
        xg = x.clone().requires_grad_()
        with NaNPastTheGroups():
            y, stats = layer(xg)
            (y.square().sum() + stats.aux_loss + stats.z_loss).backward()
        results.append([y, xg.grad, *(p.grad for p in layer.parameters())])
    assert stats.dropped.item() > 0
    for loop, grouped in zip(*results):
        assert torch.isfinite(grouped).all() and torch.allclose(grouped, loop, atol=1e-9)


@pytest.mark.parametrize("kw", [dict(moe_capacity_factor=1.0), dict(router_type="expert-choice"), {}],
                         ids=["capacity", "expert_choice", "dropless"])
def test_routing_needs_no_host_sync(kw):
    """A fake tensor has no values: an op whose output shape or result needs them (a boolean mask,
    nonzero, .tolist(), .item()) raises there. Forward and backward of the grouped path (bf16, as on
    a GPU) run on fake tensors: routing waits for no GPU result, whatever the router type."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, **kw)
    layer = moe_layer(cfg).to(torch.bfloat16)
    layer.experts.use_grouped_mm = True
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 8, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        y, stats = layer(x)
        (y.float().sum() + stats.aux_loss + stats.z_loss).backward()
        assert x.grad.shape == x.shape and layer.experts.w_down.grad.shape == layer.experts.w_down.shape


@smoke
def test_round_robin_routing_is_perfectly_balanced():
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, router_type="round-robin")
    layer = moe_layer(cfg, 16)
    x = torch.randn(2, 6, cfg.hidden_size)
    y, stats = layer(x)
    assert stats.counts.tolist() == [6, 6, 6, 6]
    e = layer.experts
    expected = torch.stack([sum(0.5 * swiglu(tok, *expert_weights(e, i)) for i in ((2 * t) % 4,
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
    summary = r.stdout[r.stdout.index("run summary"):].splitlines()
    assert all(len(line) <= metrics_mod.LINE_WIDTH for line in summary), summary
    pytest.importorskip("matplotlib")
    r = run_script("plot_metrics.py", [str(metrics), "--out", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / "plots" / f).stat().st_size > 0 for f in ("load_cv.png", "dead_experts.png",
                                                                      "ep_rank_rows.png"))


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


def test_first_k_dense_and_moe_layer_list_pick_the_layers_by_hand():
    assert tiny_config(num_layers=6, first_k_dense_layers=3).moe_layers == [3, 4, 5]  # DeepSeek-V3's shape
    assert tiny_config(num_layers=6, first_k_dense_layers=2, moe_layer_interval=2).moe_layers == [3, 5]
    assert tiny_config(num_layers=6, moe_layer_list="5,1,3").moe_layers == [1, 3, 5]
    assert tiny_config(num_layers=6, moe_layer_list="0").moe_layers == [0]
    assert tiny_config(num_layers=6, first_k_dense_layers=3, num_experts=0).moe_layers == []
    model = MoETransformer(tiny_config(num_layers=4, moe_layer_list="0,2"))
    assert [type(b.mlp).__name__ for b in model.layers.values()] == ["SparseMoELayer", "DenseMLP"] * 2
