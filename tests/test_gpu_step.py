"""The CUDA training step, checked on the CPU: the benchmark seam (scripts/bench_train.make_step)
and where each activation's dtype is decided under CUDA's autocast rules.

CUDA autocast cannot run without a GPU, so `EmulatedCudaAutocast` applies the part of its policy
(torch's ATen/autocast_mode.h, CUDA lists) that decides the dtypes checked here: matmuls and
attention in bf16; norms, exp / log / pow, logsumexp in fp32; softmax, log_softmax, sum and
cumsum with fp32 outputs. On the CPU torch's own autocast has other lists (rms_norm stays bf16
there), so it would not catch a norm whose output goes back to fp32 on a GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bench_train import make_step
from moe_layers import Attention, ModelConfig, Experts, RMSNorm, Router

LOWER = {"linear", "matmul", "mm", "bmm", "addmm", "scaled_dot_product_attention"}
FP32 = {"rms_norm", "layer_norm", "exp", "log", "pow", "rsqrt", "logsumexp", "nll_loss"}
FP32_OUTPUT = {"softmax", "log_softmax", "sum", "cumsum"}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=4, num_experts_per_token=2,
                moe_layer_interval=2, seq_length=16)
    base.update(kw)
    return ModelConfig(**base)


class EmulatedCudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts at the function level, with torch.autocast, is_autocast_enabled and
    get_autocast_dtype patched to read this mode's stack (as the code under test asks them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        super().__init__()
        self.stack = [(False, torch.bfloat16)]
        self.sdpa_dtypes: list[torch.dtype] = []
        self.log_softmax_inputs: list[torch.dtype] = []  # the logits', wherever the LM head runs
        mode = self

        class Autocast:
            def __init__(self, device_type: str = "cuda", dtype: torch.dtype | None = None, enabled: bool = True,
                         cache_enabled: bool | None = None):
                self.state = (bool(enabled), dtype or mode.stack[-1][1])

            def __enter__(self) -> None:
                mode.stack.append(self.state)

            def __exit__(self, *exc: object) -> None:
                mode.stack.pop()

        monkeypatch.setattr(torch, "autocast", Autocast)
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: mode.stack[-1][0])
        monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type=None: mode.stack[-1][1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        enabled, dtype = self.stack[-1]
        if enabled and torch._C._current_autograd_node() is None:  # autocast is off in backward
            if name in LOWER:
                args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            elif name in FP32:
                args = tuple(a.float() if torch.is_tensor(a) and a.dtype == torch.bfloat16 else a for a in args)
            elif name in FP32_OUTPUT and args and torch.is_tensor(args[0]) and args[0].dtype == torch.bfloat16:
                kwargs.setdefault("dtype", torch.float32)
        if name == "scaled_dot_product_attention":
            self.sdpa_dtypes += [a.dtype for a in args[:3]]
        if name == "log_softmax":
            self.log_softmax_inputs.append(args[0].dtype)
        return func(*args, **kwargs)


def test_emulated_cuda_autocast_returns_fp32_norms_as_cuda_does(monkeypatch):
    """The emulation itself: under it a bare F.rms_norm of bf16 returns fp32, as CUDA autocast does."""
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    with EmulatedCudaAutocast(monkeypatch) as mode, torch.autocast("cuda", dtype=torch.bfloat16):
        assert F.rms_norm(x, (8,), w, 1e-6).dtype == torch.float32
        assert F.linear(x.float(), w.float()[None]).dtype == torch.bfloat16
    assert mode.stack == [(False, torch.bfloat16)]


@pytest.mark.parametrize("cuda_choices", [None, True])
def test_make_step_trains_a_tiny_model_on_the_cpu(cuda_choices):
    """The seam the benchmark and the GPU cost model build their step with: two steps on random
    tokens give finite losses near ln V (an untrained model); CUDA's choices give bf16 weights (the
    optimizer keeps fp32 masters), fp32 routers and grouped-GEMM experts even on the CPU."""
    cfg = tiny_cfg()
    step, model = make_step(cfg, 2, device=torch.device("cpu"), cuda_choices=cuda_choices, seed=0)
    losses = [step(0), step(1)]
    assert all(math.isfinite(loss) and abs(loss - math.log(cfg.vocab_size)) < 1.0 for loss in losses)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    weight_dtype = model.embed_tokens.weight.dtype
    if cuda_choices:
        assert weight_dtype == torch.bfloat16 and all(m.use_grouped_mm for m in experts)
        assert model.layers["1"].mlp.router.weight.dtype == torch.float32  # routers stay fp32
    else:
        assert weight_dtype == torch.float32 and not any(m.use_grouped_mm for m in experts)


def test_make_step_same_seed_same_losses():
    cfg = tiny_cfg()
    runs = [make_step(cfg, 2, device=torch.device("cpu"), seed=3)[0] for _ in range(2)]
    assert [runs[0](i) for i in range(2)] == [runs[1](i) for i in range(2)]


def record_dtypes(model: torch.nn.Module) -> dict[str, set[torch.dtype]]:
    """Forward hooks noting the dtypes where each kind of activation is decided."""
    seen: dict[str, set[torch.dtype]] = {}

    def note(kind: str, t: torch.Tensor) -> None:
        seen.setdefault(kind, set()).add(t.dtype)

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.register_forward_hook(lambda m, inp, out: note("norm output", out))
        elif isinstance(module, Attention):
            module.register_forward_hook(lambda m, inp, out: note("attention input", inp[0]))
            module.q_norm.register_forward_pre_hook(lambda m, inp: note("q/k/v output", inp[0]))  # q, projected
        elif isinstance(module, Router):
            module.register_forward_hook(lambda m, inp, out: note("router logits", out.logits))
            module.register_forward_hook(lambda m, inp, out: note("router probs", out.probs))
        elif isinstance(module, Experts):
            module.register_forward_pre_hook(lambda m, inp: note("expert input", inp[0]))
    for name in ("0", "1"):
        block = model.layers[name]
        block.mlp.register_forward_pre_hook(lambda m, inp: note("mlp input", inp[0]))
    return seen


def test_cuda_step_keeps_activations_bf16_and_the_router_fp32(monkeypatch):
    """A training step as CUDA runs it (bf16 weights, fp32 masters, bf16 autocast, grouped GEMMs):
    norm outputs, attention / MLP / expert inputs, q/k/v and the logits are bf16, the router's
    logits and probabilities fp32. A norm whose output went back to fp32 under autocast fails here."""
    step, model = make_step(tiny_cfg(), 2, device=torch.device("cpu"), cuda_choices=True)
    seen = record_dtypes(model)
    with EmulatedCudaAutocast(monkeypatch) as mode:
        loss = step(0)
    assert math.isfinite(loss)
    bf16, fp32 = {torch.bfloat16}, {torch.float32}
    expected = {"norm output": bf16, "attention input": bf16, "q/k/v output": bf16, "mlp input": bf16,
                "expert input": bf16, "router logits": fp32, "router probs": fp32}
    assert seen == expected
    assert set(mode.sdpa_dtypes) == bf16
    assert mode.log_softmax_inputs == [torch.bfloat16]  # the logits: the loss's log_softmax reads them once


def test_a_moe_block_on_the_grouped_gemm_path_compiles_whole_and_gives_eagers_gradients():
    """--compile compiles each block: with the CUDA path's grouped GEMM experts (bf16, which
    torch._grouped_mm also runs on the CPU) dynamo must see one graph, forward and backward (no
    graph break: a break would split Inductor's fusions), and the compiled gradients equal eager's."""
    from moe_layers import MoETransformer
    cfg = tiny_cfg(moe_ffn_hidden_size=16)
    model = MoETransformer(cfg, seed=0).to(torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "use_grouped_mm"):
            module.use_grouped_mm = True
    block = model.layers["1"]
    assert block.is_moe
    x = torch.randn(2, cfg.seq_length, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)

    def loss(x: torch.Tensor) -> torch.Tensor:
        y, stats = block(x, model.rope(torch.arange(cfg.seq_length)))
        return y.float().square().sum() + stats.aux_loss

    explained = torch._dynamo.explain(loss)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    weights = [x, block.mlp.experts.w_gate_up, block.mlp.experts.w_down, block.self_attn.q_proj.weight]
    eager = torch.autograd.grad(loss(x), weights)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(x), weights)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
