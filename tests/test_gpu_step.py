"""The CUDA training step, checked on the CPU: the benchmark seam (scripts/bench_train.make_step)."""

from __future__ import annotations

import math

import pytest
import torch

from bench_train import make_step
from moe_layers import ModelConfig, MoEExpert


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=4, num_experts_per_token=2,
                moe_layer_interval=2, seq_length=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("cuda_choices", [None, True])
def test_make_step_trains_a_tiny_model_on_the_cpu(cuda_choices):
    """The seam the benchmark and the GPU cost model build their step with: two steps on random
    tokens give finite losses near ln V (an untrained model); CUDA's choices give bf16 weights (the
    optimizer keeps fp32 masters), fp32 routers and grouped-GEMM experts even on the CPU."""
    cfg = tiny_cfg()
    step, model = make_step(cfg, 2, device=torch.device("cpu"), cuda_choices=cuda_choices, seed=0)
    losses = [step(0), step(1)]
    assert all(math.isfinite(loss) and abs(loss - math.log(cfg.vocab_size)) < 1.0 for loss in losses)
    experts = [m for m in model.modules() if isinstance(m, MoEExpert)]
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
