"""Layers against slow references: experts, the MoE layer (per-token loop), the expert loop's
gradients, RMSNorm, grouped-query attention and its cache, --head-dim, block and transformer, the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_layers import (Assignments, Attention, apply_rotary, Experts, MoETransformer, MoETransformerBlock, RMSNorm,
                        RotaryEmbedding, SparseMoELayer, SwiGLU, ExpertLoop, layout_free_init_)
from parallel_layers import ColumnParallelLinear, lm_head_cross_entropy, ModelParallel
from helpers import cuda, moe_layer, expert_weights, reference_moe, smoke, swiglu, tiny_config


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
        expected = swiglu(rows, *expert_weights(experts, e))
        assert torch.allclose(y[start:start + c], expected, atol=1e-6)
        start += c


@smoke
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 10, 0, 0]])
@pytest.mark.parametrize("width,weighted", [(24, False), (24, True), (40, True)])
def test_grouped_and_loop_experts_match_reference_in_outputs_and_gradients(grouped, counts, width, weighted):
    """torch._grouped_mm also runs fp32 on the CPU, so both paths are checked here (zero-token
    experts, all rows on one expert, a non-contiguous incoming gradient), without and with routing
    weights: applied to the hidden h when F (24) < D (32), to the output y when F (40) > D; the
    reference scales each row's output y."""
    cfg = tiny_config(moe_ffn_hidden_size=width)
    experts = Experts(cfg, ModelParallel())
    assert experts.scale_hidden == (width < cfg.hidden_size)
    layout_free_init_(experts, 4)
    experts.use_grouped_mm = grouped
    counts = torch.tensor(counts)
    x = torch.randn(10, cfg.hidden_size, requires_grad=True)
    weight = torch.rand(10, requires_grad=True) if weighted else None
    y = experts(x, counts, weight)
    g = torch.randn(cfg.hidden_size, 10).T  # non-contiguous, as after a transpose in the caller
    inputs = [x, experts.w_gate_up, experts.w_down] + ([weight] if weighted else [])
    grads = torch.autograd.grad(y, inputs, g)
    ref = torch.cat([swiglu(rows, *expert_weights(experts, e))
                     for e, rows in enumerate(x.split(counts.tolist()))])
    if weighted:
        ref = ref * weight[:, None]
    ref_grads = torch.autograd.grad(ref, inputs, g)
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
    h, stats = block(torch.randn(3, 10, 32), rope(torch.arange(10)))
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


# --------------------------------------------- fast paths against slow references (CPU expert loop, norm, GQA)
def per_row_reference(tokens: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, splits: list[int],
                      experts: Experts) -> torch.Tensor:
    """out[t] = sum over rows r with rows[r] = t of weight[r] * expert_of(r)(tokens[t]), one row at a time."""
    out = [torch.zeros_like(tokens[0]) for _ in range(tokens.shape[0])]
    expert_of_row = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor(splits))
    for r, (t, e) in enumerate(zip(rows.tolist(), expert_of_row.tolist())):
        out[t] = out[t] + weight[r] * swiglu(tokens[t], *expert_weights(experts, e))
    return torch.stack(out)


def assert_grads_match(out, ref, inputs, atol=1e-5):
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.allclose(a, b, atol=atol), (a - b).abs().max()


# ------------------------------------------------------------------ expert loop
@pytest.mark.parametrize("width", [32, 16])  # F = D: weights on y; F < D: on h
def test_gather_and_combine_matches_per_row_reference_in_outputs_and_gradients(width):
    """Tokens on several experts, one expert without rows, unequal combine weights."""
    cfg = tiny_config(moe_ffn_hidden_size=width)
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
    assert_grads_match(out, ref, [tokens, weight, experts.w_gate_up, experts.w_down])


@pytest.mark.parametrize("gathered,weighted", [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("scale_hidden", [False, True])
def test_expert_loop_backward_passes_gradcheck_in_float64(gathered, weighted, scale_hidden):
    """The hand-written backward against finite differences, every mode: gathered rows with weights
    (one process), grouped rows without weights, and with them (expert parallelism); the weights
    applied to the output y or to the hidden h."""
    torch.manual_seed(0)
    e, d, f, n = 3, 8, 6, 5
    w = [torch.randn(e, d, 2 * f, dtype=torch.double, requires_grad=True),  # [gate | up]
         torch.randn(e, f, d, dtype=torch.double, requires_grad=True)]
    splits = [2, 0, 4]
    rows = torch.tensor([1, 4, 0, 1, 3, 4]) if gathered else None
    x = torch.randn(n if gathered else 6, d, dtype=torch.double, requires_grad=True)
    num_out = x.shape[0]
    if weighted:
        weight = torch.rand(6, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, wt, a, b: ExpertLoop.apply(x, rows, wt, splits, a, b, num_out, scale_hidden), (x, weight, *w))
    else:
        assert torch.autograd.gradcheck(
            lambda x, a, b: ExpertLoop.apply(x, rows, None, splits, a, b, num_out, scale_hidden), (x, *w))


def test_swiglu_of_fused_gate_up_passes_gradcheck_and_equals_silu_times_up():
    """The grouped-GEMM path's SwiGLU on [gate | up] (M, 2F): its hand-written backward against finite
    differences, its forward against silu(gate) * up written out."""
    torch.manual_seed(0)
    gate_up = torch.randn(7, 2 * 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate_up,))
    gate, up = gate_up[:, :5], gate_up[:, 5:]
    assert torch.allclose(SwiGLU.apply(gate_up), gate / (1 + torch.exp(-gate)) * up, rtol=0, atol=1e-12)


@pytest.mark.parametrize("width", [32, 16])  # F = D: weights on y; F < D: on h
def test_moe_layer_one_pass_path_matches_dispatch_and_combine_path(width):
    """The fused CPU path against the dispatch -> experts -> combine path (grouped GEMMs, fp32 on the CPU)."""
    cfg = tiny_config(num_experts=4, num_experts_per_token=2, moe_ffn_hidden_size=width)
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
    assert layer.experts.w_gate_up.grad.dtype == torch.float32 and torch.isfinite(layer.experts.w_down.grad).all()


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
    q, k = apply_rotary(q, k, rope(torch.arange(t)))
    groups = attn.n_heads // attn.n_kv
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, Dh)
    scores = (q @ k.transpose(-1, -2)) / attn.head_dim ** 0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v  # (B, H, T, Dh)
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_rotate_half_formula_bit_for_bit(dtype):
    """RoFormer's rotation as Llama / Qwen3 / transformers write it, tables built here from theta:
    x cos + [-x2, x1] sin, at positions 3..10; the same bits forward and backward."""
    dh, theta, pos = 16, 1000.0, torch.arange(3, 11)
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = torch.cat([torch.outer(pos.float(), inv)] * 2, dim=-1)  # (T, Dh)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def textbook(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    q = torch.randn(2, 4, 8, dh).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 8, dh).to(dtype).requires_grad_()
    ours = apply_rotary(q, k, RotaryEmbedding(dh, 16, theta)(pos, dtype))
    ref = (textbook(q), textbook(k))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    g = [torch.randn_like(t) for t in ref]
    grads = torch.autograd.grad(ours, (q, k), g)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(ref, (q, k), g)))


def test_grouped_query_attention_matches_repeated_kv_reference():
    cfg = tiny_config(num_attention_heads=4, num_kv_heads=2)
    attn = Attention(cfg, ModelParallel())
    layout_free_init_(attn, 5)
    rope = RotaryEmbedding(cfg.attn_head_dim, cfg.seq_length, cfg.rope_theta)
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)
    y, ref = attn(x, rope(torch.arange(9))), repeated_kv_attention(attn, x, rope)
    assert torch.allclose(y, ref, atol=1e-5)
    assert_grads_match(y, ref, [x] + list(attn.parameters()))


def test_grouped_query_attention_with_cache_matches_one_full_pass():
    """Prefill 5 positions, then 2 at once (bottom-right causal mask), then 1: the last outputs equal a full pass."""
    cfg = tiny_config(num_attention_heads=4, num_kv_heads=2)
    attn = Attention(cfg, ModelParallel())
    layout_free_init_(attn, 6)
    rope = RotaryEmbedding(cfg.attn_head_dim, cfg.seq_length, cfg.rope_theta)
    x = torch.randn(1, 8, cfg.hidden_size)
    full = attn(x, rope(torch.arange(8)))
    cache: dict = {}
    parts = [attn(x[:, a:b], rope(torch.arange(a, b)), cache) for a, b in ((0, 5), (5, 7), (7, 8))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


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


# ---- recipes: --head-dim, load-balance health, multi-token prediction (issue 14)
def slow_attention(attn: Attention, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """Causal attention head by head with explicit matrices (no SDPA): softmax(q k^T / sqrt(Dh) + mask) v."""
    b, t, _ = x.shape
    dh, group = attn.head_dim, attn.n_heads // attn.n_kv
    q = attn.q_norm((x @ attn.q_proj.weight.T).view(b, t, attn.n_heads, dh)).transpose(1, 2)
    k = attn.k_norm((x @ attn.k_proj.weight.T).view(b, t, attn.n_kv, dh)).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(b, t, attn.n_kv, dh).transpose(1, 2)
    q, k = apply_rotary(q, k, rope(torch.arange(t)))
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
        assert (attn(x, rope(torch.arange(cfg.seq_length))) - slow_attention(attn, x, rope)).abs().max() < 1e-5


# ------------------------------------------------------------------- the loss
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lm_head_cross_entropy_equals_the_formula_in_float64(dtype, tol):
    """The fused LM head + cross-entropy (training's loss at TP 1) against mean(logsumexp(z) - z_t)
    with z = h W^T in float64: the loss, and dL/dh and dL/dW under an upstream gradient of 3.7.
    Two rows are made near-certain (p of the target ~ 1 - 1e-3), whose small gradients are checked
    on their own in fp32."""
    torch.manual_seed(0)
    n, d, v = 12, 16, 40
    h = torch.randn(2, n // 2, d)
    w = torch.randn(v, d) * 0.3
    t = torch.randint(0, v, (2, n // 2))
    for b, i in ((0, 0), (1, 2)):  # the target's logit 11.5, about 7 above the rest's log-sum-exp
        w[t[b, i]] = h[b, i] * (11.5 / h[b, i].dot(h[b, i]))
    head = ColumnParallelLinear(d, v, ModelParallel()).to(dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    h_ours = h.to(dtype).clone().requires_grad_()
    loss = lm_head_cross_entropy(h_ours, head, t, ModelParallel())
    (loss * 3.7).backward()
    h64, w64 = (a.to(dtype).detach().double().requires_grad_() for a in (h, w))
    z = h64.flatten(0, 1) @ w64.T
    ref = (torch.logsumexp(z, -1) - z.gather(1, t.flatten()[:, None]).squeeze(1)).mean()
    (ref * 3.7).backward()
    assert z.softmax(-1).gather(1, t.flatten()[:, None]).max() > 0.99
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < tol * abs(ref.item())
    for ours, theirs in ((h_ours.grad, h64.grad), (head.weight.grad, w64.grad)):
        assert (ours.double() - theirs).abs().max() < tol * theirs.abs().max()
    if dtype == torch.float32:  # the near-certain rows on their own (bf16 log-probabilities round p - 1 there)
        for b, i in ((0, 0), (1, 2)):
            ours, theirs = h_ours.grad[b, i].double(), h64.grad[b, i]
            assert (ours - theirs).norm() < 2e-3 * theirs.norm()
