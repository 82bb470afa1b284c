"""The optimizer and the learning-rate schedule.

Kept beside minimal_pretrain.py because both are a concern of their own, shared with the
benchmarks (scripts/bench_train.py builds the same optimizer) and with checkpoint.py (which
saves and reloads the optimizer's state, fp32 masters included).

    build_optimizer   AdamW; fp32 master weights when the model holds bf16 weights
    LRSchedule        linear warm-up, cosine decay to a floor, constant after the decay
    lr_schedule       the schedule a run's flags describe, defaults resolved
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Warm-up when --warmup-steps is not given: this fraction of the decay steps, at most WARMUP_CAP
# steps (DeepSeek-V3 warms up for 2000 steps; a 400-step laptop run gets 40).
WARMUP_FRACTION, WARMUP_CAP = 0.1, 2000


# ===================================================================== optimizer
class MasterWeightAdamW:
    """AdamW on fp32 master copies of the model's bf16 weights: mixed precision as in Megatron-LM
    (Micikevicius et al. 2018), without a loss scale (bf16 has fp32's exponent range).

    The model computes with bf16 weights, so nothing re-casts them for every micro-batch;
    backward leaves bf16 gradients, which are reduced and clipped in place. `step()` upcasts
    them onto the fp32 masters, runs AdamW there (moments in fp32) and rounds the new masters
    into the model. Weights that are fp32 already (the routers) are their own masters.
    Checkpoints hold the masters, so a resume is exact. `master` maps model weight -> master;
    `state` is keyed by master, as torch's optimizers key it."""

    def __init__(self, model: torch.nn.Module, groups: list[dict], **adamw: Any):
        self.master = {p: torch.nn.Parameter(p.detach().float().clone()) if p.dtype != torch.float32 else p
                       for p in model.parameters()}
        self.inner = torch.optim.AdamW([dict(g, params=[self.master[p] for p in g["params"]]) for g in groups],
                                       **adamw)
        self.param_groups, self.state, self.defaults = self.inner.param_groups, self.inner.state, self.inner.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.master:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self.master.items():
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in self.master.items():
            if m is not p:
                p.copy_(m)  # round to bf16
                m.grad = None


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings, projections, experts, router), not on norms.

    On CUDA the fused kernel (one launch for every tensor of a group, instead of a dozen
    element-wise kernels per tensor); on the CPU the reference implementation, whose
    rounding the parity and transformers-equality tests are written against. A model with
    bf16 weights gets fp32 master weights (MasterWeightAdamW)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = next(model.parameters()).is_cuda
    adamw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return MasterWeightAdamW(model, groups, **adamw)
    return torch.optim.AdamW(groups, **adamw)


# ====================================================================== schedule
@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to `lr` over `warmup_steps`, cosine decay to `min_lr` at `decay_steps`,
    then `min_lr` for as long as training goes on. Steps count from 0 (the first update)."""

    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int

    def at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))

    def describe(self) -> str:
        return (f"warm-up {self.warmup_steps} steps to {self.lr:.2e}, cosine to {self.min_lr:.2e} at step "
                f"{self.decay_steps}, constant after")


def default_warmup_steps(decay_steps: int) -> int:
    return min(WARMUP_CAP, int(WARMUP_FRACTION * decay_steps))


def lr_schedule(lr: float, min_lr: float, warmup_steps: int, decay_steps: int, max_steps: int) -> LRSchedule:
    """The schedule of a run's flags: --lr-decay-steps 0 decays over --max-steps, and
    --warmup-steps -1 warms up over a tenth of the decay steps (at most WARMUP_CAP)."""
    decay = decay_steps or max_steps
    warmup = warmup_steps if warmup_steps >= 0 else default_warmup_steps(decay)
    return LRSchedule(lr, min_lr, warmup, decay)
