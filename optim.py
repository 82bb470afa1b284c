"""The optimizer and the learning-rate schedule.

Kept beside minimal_pretrain.py because both are a concern of their own, shared with the
benchmarks (scripts/bench_train.py builds the same optimizer) and with checkpoint.py (which
saves and reloads the optimizer's state, fp32 masters included).

    build_optimizer   AdamW, or Muon on the hidden matrices and AdamW on the rest; fp32 master
                      weights when the model holds bf16 weights; the distributed AdamW when given
                      flat buckets
    FlatBucket        the distributed optimizer's shard bookkeeping: weights laid end to end in
                      one flat buffer, the slice of it each rank of a group owns, this rank's
                      pieces of the weights and their fp32 masters
    DistributedAdamW  AdamW on this rank's pieces only (ZeRO stage 1)
    newton_schulz     the quintic Newton-Schulz orthogonalisation Muon applies to an update
    LRSchedule        linear warm-up, stable, decay to a floor (cosine, linear or 1 - sqrt),
                      constant after the decay
    lr_schedule       the schedule a run's flags describe, defaults resolved

Shapes: a weight matrix is (A, B); a stack of E_local experts is (E_local, A, B), one matrix each;
a flat bucket is (numel,), numel = S x N for a group of N ranks each owning a shard of S elements.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from parallel_layers import placement

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
        # Multi-tensor copies, not one cast kernel per weight: the bf16 gradients into fp32 gradients
        # of the masters (views of one flat buffer, freed after the step), and after AdamW the masters
        # rounded into the model's weights.
        lower = [(p, m) for p, m in self.master.items() if m is not p and p.grad is not None]
        if lower:
            flat = torch.empty(sum(p.numel() for p, _ in lower), dtype=torch.float32, device=lower[0][1].device)
            for (p, m), g in zip(lower, flat.split([p.numel() for p, _ in lower])):
                m.grad = g.view_as(m)
            torch._foreach_copy_([m.grad for _, m in lower], [p.grad for p, _ in lower])  # upcast
        self.update()
        if lower:
            torch._foreach_copy_([p for p, _ in lower], [m for _, m in lower])  # round to bf16
        for p, m in self.master.items():
            if m is not p:
                m.grad = None

    def update(self) -> None:
        self.inner.step()


# Muon's constants, as torch.optim.Muon and Moonlight (Liu et al. 2025) use them.
MUON_MOMENTUM = 0.95
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic iteration, slope 3.4 at zero (Jordan et al. 2024)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximately orthogonal matrix with the singular vectors of g (A, B): U S' V^T for
    g = U S V^T, with every singular value S' of five steps in about [0.7, 1.2] rather than 1.

    The quintic X <- a X + (b X X^T + c (X X^T)^2) X pushes small singular values up fast and
    stops short of converging (Jordan et al. 2024). The same operations as torch.optim.Muon, so
    that in bf16 the two agree bit for bit; fp32 on the CPU (bf16 matmuls are slow there)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T  # iterate on the wide side: the Gram matrix is min(A, B) square
    x = x / x.norm().clamp(min=NS_EPS)  # spectral norm <= Frobenius norm = 1: inside the basin
    for _ in range(steps):
        gram = x @ x.T  # (min, min)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return (x.T if tall else x).to(g.dtype)


def match_rms_adamw(shape: tuple[int, ...]) -> float:
    """The LR factor that gives an orthogonalised (A, B) update the RMS of an AdamW update.

    Its singular values are ~1, so its RMS is sqrt(min(A, B) / (A B)) = 1 / sqrt(max(A, B));
    AdamW's is about 0.2, hence 0.2 sqrt(max(A, B)) (Moonlight, Liu et al. 2025, eq. 4;
    torch.optim.Muon's adjust_lr_fn="match_rms_adamw"). One --lr then serves both."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class Muon(MasterWeightAdamW):
    """Muon on the hidden layers' weight matrices, AdamW on the rest, on fp32 masters.

    Per matrix: momentum (an EMA of the gradient, 0.95) with a Nesterov look-ahead, then the
    update orthogonalised by Newton-Schulz, scaled by match_rms_adamw and applied with AdamW's
    decoupled weight decay (Jordan et al. 2024; Moonlight, Liu et al. 2025): the arithmetic of
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw"). A stack of experts (E_local, A, B) is
    E_local matrices, each orthogonalised on its own (an expert's gate and up, stored side by side,
    as two: Placement.parts); EP keeps every expert whole on one rank,
    so experts need no communication. A tensor-parallel shard is orthogonalised as part of the
    whole matrix: its TP group all-gathers the update, every TP rank runs Newton-Schulz on the
    same full matrix and keeps its slice, so any layout applies the one-process update.

    `muon_params` maps Muon's masters to the model's weights (whose shard attributes say how
    each is split); `state` is one table keyed by master: AdamW's moments for its weights,
    `momentum_buffer` for Muon's (checkpoint.py saves both)."""

    def __init__(self, model: torch.nn.Module, adamw_groups: list[dict], muon_weights: list[torch.nn.Parameter],
                 weight_decay: float, ns_dtype: torch.dtype, **adamw: Any):
        super().__init__(model, adamw_groups, **adamw)
        self.tp_group, self.ns_dtype = model.par.tp_group, ns_dtype
        self.muon_params = {self.master[p]: p for p in muon_weights}
        self.muon_group = {"params": list(self.muon_params), "lr": adamw["lr"], "weight_decay": weight_decay,
                           "momentum": MUON_MOMENTUM}
        self.param_groups = self.inner.param_groups + [self.muon_group]  # the trainer sets each group's lr

    def update(self) -> None:
        self.inner.step()  # AdamW: embedding, LM head, norms, routers
        lr, wd, mu = self.muon_group["lr"], self.muon_group["weight_decay"], self.muon_group["momentum"]
        for m, p in self.muon_params.items():
            if m.grad is None:
                continue
            buf = self.state[m].setdefault("momentum_buffer", torch.zeros_like(m))
            buf.lerp_(m.grad, 1 - mu)  # EMA of the gradient
            nesterov = m.grad.lerp(buf, mu)  # the gradient seen one momentum step ahead
            m.mul_(1 - lr * wd)  # decoupled weight decay with the unscaled lr, as AdamW's
            m.add_(self.orthogonalise(nesterov, p), alpha=-lr * match_rms_adamw(placement(p).part_shape))

    def orthogonalise(self, update: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        """Newton-Schulz of the whole matrix (or matrices) that this rank's `update` belongs to."""
        where = placement(p)
        if where.expert:  # (E_local, A, B): every expert whole on this rank; gate and up each on its own
            return torch.cat([torch.stack([newton_schulz(u, dtype=self.ns_dtype) for u in part])
                              for part in where.split_parts(update).values()], dim=-1)
        if where.shard == "tp" and where.size > 1:
            parts = [torch.empty_like(update) for _ in range(where.size)]
            dist.all_gather(parts, update.contiguous(), group=self.tp_group)  # every TP rank's rows (or columns)
            full = torch.cat(parts, dim=where.dim)  # where.full_shape
            return newton_schulz(full, dtype=self.ns_dtype).chunk(where.size, dim=where.dim)[where.rank]
        return newton_schulz(update, dtype=self.ns_dtype)


def uses_muon(name: str, p: torch.nn.Parameter) -> bool:
    """Whether Muon updates this weight: the matrices of attention, dense MLPs and experts.

    Not the embedding (a lookup table: each row sees only its token's gradient) nor the LM
    head (a classifier whose rows see very unequal gradients), as in Jordan et al. and
    Moonlight; not norms (vectors). Not the router either: it is a small classifier too (E
    rows), and orthogonalising its update would move every expert's logit at the same rate
    whatever its gradient, which works against the load-balancing terms."""
    return p.dim() >= 2 and not name.startswith(("embed_tokens.", "lm_head.")) and not name.endswith("router.weight")


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool | None = None,
                    kind: str = "adamw", buckets: list[FlatBucket] = ()) -> torch.optim.Optimizer:
    """AdamW (kind "adamw"), or Muon on the hidden matrices and AdamW on the rest ("muon");
    weight decay on matrices (embeddings, projections, experts, router), not on norms. Given the
    flat buckets of the distributed optimizer, AdamW on this rank's shards of them.

    On CUDA the fused AdamW kernel (one launch for every tensor of a group, instead of a
    dozen element-wise kernels per tensor) and Newton-Schulz in bf16; on the CPU the
    reference AdamW and fp32, whose rounding the parity and transformers-equality tests are
    written against. A model with bf16 weights gets fp32 master weights."""
    cuda = next(model.parameters()).is_cuda
    if fused is None:
        fused = cuda
    adamw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)
    if buckets:
        return DistributedAdamW(buckets, weight_decay, **adamw)
    muon = [p for name, p in model.named_parameters() if kind == "muon" and uses_muon(name, p)]
    rest = [p for p in model.parameters() if id(p) not in {id(q) for q in muon}]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "muon":
        return Muon(model, groups, muon, weight_decay, torch.bfloat16 if cuda else torch.float32, **adamw)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return MasterWeightAdamW(model, groups, **adamw)
    return torch.optim.AdamW(groups, **adamw)


def clipped_step(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], scale: torch.Tensor | None) -> None:
    """optimizer.step() on the gradients `grads` multiplied by `scale` (the clip factor; None: as they are).

    torch's fused AdamW can multiply the gradients as it reads them: it divides each by the
    optimizer's `grad_scale` tensor, the protocol torch.amp.GradScaler uses to unscale. For a
    fused AdamW that steps every weight (not Muon, not the distributed optimizer) the clip
    factor goes in that way, saving a read and a write of every gradient; with bf16 weights the
    fp32 gradients of the masters are the ones scaled, so the product is not rounded to bf16."""
    inner = getattr(optimizer, "inner", optimizer)
    if scale is not None and type(optimizer) in (torch.optim.AdamW, MasterWeightAdamW) and inner.defaults.get("fused"):
        inner.grad_scale = scale.reciprocal()  # (), on the weights' device: grad / (1 / scale)
        try:
            optimizer.step()
        finally:
            del inner.grad_scale
        return
    if scale is not None:
        torch._foreach_mul_(grads, scale)
    optimizer.step()


# ========================================================== distributed optimizer
class Piece(NamedTuple):
    """The part of one weight inside this rank's shard of a flat bucket."""

    param: torch.nn.Parameter
    first: int  # its first element, counted in the weight's flattened elements
    end: int  # one past its last
    offset: int  # where it starts in this rank's shard

    @property
    def numel(self) -> int:
        return self.end - self.first


class FlatBucket:
    """Weights laid end to end in one flat buffer that the ranks of `group` share out (ZeRO
    stage 1, Rajbhandari et al. 2020; Megatron-LM's DistributedOptimizer).

    The buffer is padded to a multiple of the group's `size`, so rank r of the group owns the
    elements [r S, (r + 1) S) with S = numel / size, the same S on every rank; a weight may
    straddle two or more shards. `pieces` are this rank's parts of the weights and `masters`
    their fp32 masters: a view into the weight itself when it is fp32 (the update lands in the
    model directly), a copy when it is bf16. Every rank of the group builds the same bucket from
    the same weights, so shard r means the same elements everywhere."""

    def __init__(self, params: list[torch.nn.Parameter], group: Any, size: int, rank: int):
        self.params, self.group, self.size, self.rank = params, group, size, rank
        self.offsets = [0]  # where each weight starts in the flat buffer
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.index = {id(p): i for i, p in enumerate(params)}
        self.numel = -(-self.offsets[-1] // size) * size
        self.shard_numel = self.numel // size
        # One dtype per buffer: fp32 if any weight is (a bf16 model's routers), as torch.cat would promote.
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
        begin, end = rank * self.shard_numel, (rank + 1) * self.shard_numel  # this rank's shard
        self.pieces: list[Piece] = []
        for p, start in zip(params, self.offsets):
            lo, hi = max(begin, start), min(end, start + p.numel())  # the weight's overlap with the shard
            if lo < hi:
                self.pieces.append(Piece(p, lo - start, hi - start, lo - begin))
        self.masters: list[torch.nn.Parameter] = []
        for piece in self.pieces:
            part = piece.param.detach().view(-1)[piece.first:piece.end]
            self.masters.append(torch.nn.Parameter(part.float()))  # .float() copies bf16, returns fp32 itself

    def owner(self, p: torch.nn.Parameter) -> int:
        """The rank of the group whose shard holds the first element of `p`."""
        return self.offsets[self.index[id(p)]] // self.shard_numel

    def flatten(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """(numel,) the tensors (one per weight) end to end in the bucket's dtype; zeros for None and the padding."""
        flat = torch.zeros(self.numel, dtype=self.dtype, device=self.params[0].device)
        for t, start in zip(tensors, self.offsets):
            if t is not None:
                flat[start:start + t.numel()].copy_(t.reshape(-1))
        return flat

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The weights' parts of a (numel,) buffer, each shaped like its weight."""
        return [flat[start:start + p.numel()].view(p.shape) for p, start in zip(self.params, self.offsets)]

    def set_master_grads(self, shard: torch.Tensor) -> None:
        """shard (S,): this rank's part of the reduced gradients -> its masters' fp32 gradients
        (None for a weight that got no gradient this step: AdamW leaves it, as it would the whole)."""
        for piece, m in zip(self.pieces, self.masters):
            m.grad = None if piece.param.grad is None else shard[piece.offset:piece.offset + piece.numel].float()

    def shard_of(self, tensors: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """(S,) one tensor per piece (None: zeros) laid out as this rank's shard, in `dtype`."""
        shard = torch.zeros(self.shard_numel, dtype=dtype, device=self.params[0].device)
        for piece, t in zip(self.pieces, tensors):
            if t is not None:
                shard[piece.offset:piece.offset + piece.numel].copy_(t.detach())
        return shard


class DistributedAdamW:
    """AdamW on this rank's shards of the flat buckets: each rank keeps the moments (and, for bf16
    weights, the fp32 masters) of 1/N of the weights it holds, N the ranks holding the same
    weights (DP for dense weights, an expert's replicas for expert weights).

    torch's AdamW steps the masters of the pieces. AdamW is element-wise, so a piece gets
    exactly the update its elements get inside the whole tensor; weight decay goes to the pieces
    of matrices, as build_optimizer decides it. The trainer reduce-scatters the gradients onto
    the masters (FlatBucket.set_master_grads) and, after `step()`, all-gathers the updated
    shards (weight_shard) over each bucket's group into the model. `state` is keyed by master."""

    def __init__(self, buckets: list[FlatBucket], weight_decay: float, **adamw: Any):
        self.buckets = buckets
        pieces = [(piece, m) for fb in buckets for piece, m in zip(fb.pieces, fb.masters)]
        self.pieces_of: dict[torch.nn.Parameter, list[tuple[Piece, torch.nn.Parameter]]] = {}
        for piece, m in pieces:
            self.pieces_of.setdefault(piece.param, []).append((piece, m))
        groups = [{"params": [m for piece, m in pieces if piece.param.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [m for piece, m in pieces if piece.param.dim() < 2], "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW(groups, **adamw)
        self.param_groups, self.state, self.defaults = self.inner.param_groups, self.inner.state, self.inner.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        for fb in self.buckets:
            for p in fb.params:
                p.grad = None
            for m in fb.masters:
                m.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()

    def weight_shard(self, fb: FlatBucket) -> torch.Tensor:
        """(S,) this rank's updated masters in the bucket's dtype (rounded to bf16 for bf16 weights)."""
        return fb.shard_of(fb.masters, fb.dtype)

    def state_shard(self, fb: FlatBucket, key: str) -> torch.Tensor:
        """(S,) this rank's part of AdamW's moment `key` in fp32; zeros before the first step."""
        return fb.shard_of([self.state.get(m, {}).get(key) for m in fb.masters], torch.float32)

    def step_count(self, p: torch.nn.Parameter) -> float | None:
        """AdamW's step count of weight `p` (every piece of it steps together); None before its first step."""
        state = self.state.get(self.pieces_of[p][0][1], {})
        return float(state["step"]) if "step" in state else None

    @torch.no_grad()
    def load_weight(self, p: torch.nn.Parameter, full: torch.Tensor) -> None:
        """Set the masters of `p`'s pieces from its whole fp32 value (full: shaped like p)."""
        for piece, m in self.pieces_of.get(p, []):
            m.copy_(full.reshape(-1)[piece.first:piece.end])

    def load_state(self, p: torch.nn.Parameter, state: dict) -> None:
        """Set AdamW's state of `p`'s pieces from its whole state ({"step", "exp_avg", "exp_avg_sq"}, shaped like p)."""
        for piece, m in self.pieces_of.get(p, []):
            self.state[m] = {"step": state["step"].clone(), **{k: state[k].reshape(-1)[piece.first:piece.end].clone()
                                                                for k in ("exp_avg", "exp_avg_sq")}}


# ====================================================================== schedule
# The decay's shape: the fraction of (lr - min_lr) left at progress 0..1 through the decay.
DECAY_SHAPES = {
    "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
    "linear": lambda x: 1 - x,
    "sqrt": lambda x: 1 - math.sqrt(x),  # fast early, gentle at the end (Hägele et al. 2024; MiniCPM)
}


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to `lr` over `warmup_steps`, `lr` until `decay_start`, a decay of shape
    `decay_style` to `min_lr` at `decay_steps`, then `min_lr` for as long as training goes on.
    Steps count from 0 (the first update).

    The cosine schedule decays from the end of the warm-up (decay_start = warmup_steps);
    warmup-stable-decay (WSD: MiniCPM, Hu et al. 2024; Hägele et al. 2024) only over the last
    part, so a run can be extended from any checkpoint of its stable phase."""

    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay_start: int
    decay_style: str

    def at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.lr
        progress = (step - self.decay_start) / max(1, self.decay_steps - self.decay_start)
        return self.min_lr + (self.lr - self.min_lr) * DECAY_SHAPES[self.decay_style](min(progress, 1.0))

    def describe(self) -> str:
        stable = f", stable to step {self.decay_start}" if self.decay_start > self.warmup_steps else ""
        return (f"warm-up {self.warmup_steps} steps to {self.lr:.2e}{stable}, {self.decay_style} decay to "
                f"{self.min_lr:.2e} at step {self.decay_steps}, constant after")


def default_warmup_steps(decay_steps: int) -> int:
    return min(WARMUP_CAP, int(WARMUP_FRACTION * decay_steps))


def lr_schedule(lr: float, min_lr: float, warmup_steps: int, decay_steps: int, max_steps: int, kind: str,
                decay_fraction: float, decay_style: str) -> LRSchedule:
    """The schedule of a run's flags: --lr-decay-steps 0 decays over --max-steps, and
    --warmup-steps -1 warms up over a tenth of the decay steps (at most WARMUP_CAP).

    kind "cosine": a cosine from the end of the warm-up. kind "wsd": the decay takes the last
    `decay_fraction` of the decay steps, in `decay_style`, never starting before the warm-up ends."""
    decay = decay_steps or max_steps
    warmup = warmup_steps if warmup_steps >= 0 else default_warmup_steps(decay)
    if kind == "cosine":
        return LRSchedule(lr, min_lr, warmup, decay, warmup, "cosine")
    start = max(warmup, decay - round(decay_fraction * decay))
    return LRSchedule(lr, min_lr, warmup, decay, start, decay_style)
