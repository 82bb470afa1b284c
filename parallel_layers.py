"""The tensor-, sequence- and expert-parallel building blocks the model in moe_layers.py uses.

Which slice of the model a rank builds (ModelParallel, the layers of a pipeline stage), the
autograd functions whose forward and backward are collectives, and the parallel layers built on
them. Every function here also runs in one process, where it is the plain operation.

With tensor parallelism (TP) q/k/v and gate/up are split by columns, o and down by rows
(Megatron-LM, Shoeybi et al. 2019); the vocabulary is split for the embedding and LM head.
With sequence parallelism (SP) the residual stream between those projections is split by
sequence over the TP ranks as well (Korthikanti et al. 2022): norms and residual adds run on
(B, T/TP, D) slices, all-gathered before the column-parallel projections and reduce-scattered
after the row-parallel ones.
With expert parallelism (EP) each rank holds E / EP experts and tokens travel to them by
all-to-all (GShard, Lepikhin et al. 2020).

Shapes as in moe_layers.py: B batch, T sequence, D hidden, N = B*T tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelParallel:
    """Which slice of the full model this rank builds and the groups its layers talk over.

    The default is the whole model in one process."""

    tp_group: Any = None  # ranks that split heads, FFN columns and the vocabulary
    tp_rank: int = 0
    tp_size: int = 1
    ep_group: Any = None  # ranks that split the experts of each MoE layer
    ep_rank: int = 0
    ep_size: int = 1
    layer_start: int = 0  # first (global) layer index built on this pipeline stage
    layer_end: int = -1  # one past the last; -1 means num_layers
    first_stage: bool = True  # holds the embedding (used by its first model chunk)
    last_stage: bool = True  # holds the final norm and the LM head (used by its last model chunk)
    chunks: tuple[tuple[int, int], ...] = ()  # [start, end) of each model chunk (interleaved 1F1B: several);
    # () = the one chunk [layer_start, layer_end)
    sequence_parallel: bool = False  # residual stream split by sequence over TP: (B, T/TP, D) between layers


def stage_layers(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """Layers [start, end) of a pipeline stage: as even as possible, earlier stages take the remainder."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def chunk_layers(num_layers: int, pp: int, stage: int, layers_per_chunk: int = 0) -> list[tuple[int, int]]:
    """Layers [start, end) of each model chunk of pipeline rank `stage`.

    layers_per_chunk 0: one chunk, stage_layers. Otherwise the interleaved schedule's virtual
    stages (Narayanan et al. 2021, sec. 2.2; Megatron-LM's assignment): the layers are cut into
    num_layers / layers_per_chunk virtual stages and rank p holds virtual stages p, p + PP,
    p + 2 PP, ... as its chunks 0, 1, 2, ... (8 layers, PP 2, 2 per chunk: rank 0 holds 0-1 and 4-5)."""
    if not layers_per_chunk:
        return [stage_layers(num_layers, pp, stage)]
    n = layers_per_chunk
    return [((v * pp + stage) * n, (v * pp + stage + 1) * n) for v in range(num_layers // (pp * n))]


# ------------------------------------------------------------------ the launch's layout
@dataclass(frozen=True)
class Layout:
    """Every size of a parallel launch and one rank's place in it, resolved and checked once
    (launch.resolve_layout) and passed to whoever needs a size: nothing else derives one.

    world = PP x DP x TP; global rank = (pp_rank * DP + dp_rank) * TP + tp_rank (TP fastest, then
    DP, then PP). EP carves the DP x TP ranks of a stage into groups of EP consecutive ranks that
    split the experts; the ranks of a stage holding the same experts (expert-DP) sum their gradients."""

    world_size: int = 1
    tp: int = 1  # tensor-parallel ranks
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert-parallel ranks (resolved: never 0)
    sequence_parallel: bool = False
    layers_per_chunk: int = 0  # interleaved 1F1B's virtual stage size; 0 = one chunk per rank
    num_microbatches: int = 1  # per DP rank and step
    micro_batch_size: int = 1  # sequences per micro-batch
    rank: int = 0  # this rank (0 for a plan of the whole launch)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def stage_size(self) -> int:  # ranks of one pipeline stage
        return self.dp * self.tp

    @property
    def expert_dp_size(self) -> int:  # ranks of a stage holding the same experts
        return self.stage_size // self.ep

    @property
    def global_batch(self) -> int:  # sequences per optimizer step
        return self.micro_batch_size * self.num_microbatches * self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.stage_size

    @property
    def dp_rank(self) -> int:
        return self.rank % self.stage_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.stage_size % self.ep

    @property
    def expert_dp_rank(self) -> int:  # this rank's place among the ranks holding its experts
        return self.rank % self.stage_size // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def chunks(self, num_layers: int, stage: int | None = None) -> list[tuple[int, int]]:
        """Layers [start, end) of each model chunk of `stage` (default: this rank's)."""
        return chunk_layers(num_layers, self.pp, self.pp_rank if stage is None else stage, self.layers_per_chunk)


# ------------------------------------------------------------ where a weight lives
@dataclass(frozen=True)
class Placement:
    """Where one parameter's elements live across the ranks and how its gradient is completed:
    the one record of these facts, set where the layer builds the weight (place) and read by the
    layout-free init, gradient sync, the distributed optimizer, the gradient norm, checkpoints,
    Muon and the memory planner.

    A weight is whole on every rank (shard None), or this rank holds slice `rank` of `size` equal
    slices along `dim` of a `full_shape` tensor: "tp" split over the TP ranks, "ep" experts split
    over the EP ranks of a stage. Either way the other ranks of its replica group hold the same
    slice; replicas() says how many ranks hold each element."""

    full_shape: tuple[int, ...]
    shard: str | None = None  # None | "tp" | "ep"
    dim: int = 0
    rank: int = 0
    size: int = 1
    init_std: float = 0.02  # std of its layout-free normal initialisation
    tp_partial_grad: bool = False  # each TP rank's gradient is a part of it (router, q/k norms, SP norms): summed over TP
    pipeline_copy: str | None = None  # MTP under PP: the embedding's copy on the "first" or "last" stage
    # Weights stored side by side along the last dim as one tensor, so that one GEMM computes them
    # all (an expert's gate and up: ("w_gate", "w_up")). Each part is its own weight everywhere
    # else: initialised from its own name, saved under its own checkpoint key, orthogonalised alone.
    parts: tuple[str, ...] = ()

    @property
    def expert(self) -> bool:  # reduced over the ranks holding the same experts, not over DP
        return self.shard == "ep"

    @property
    def part_shape(self) -> tuple[int, ...]:
        """The full shape of each weight stored side by side (full_shape itself without parts)."""
        return self.full_shape[:-1] + (self.full_shape[-1] // max(len(self.parts), 1),)

    def split_parts(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """A tensor shaped like this weight (or its local slice) -> {part name: its view}; {"": t} without parts."""
        if not self.parts:
            return {"": t}
        return dict(zip(self.parts, t.chunk(len(self.parts), dim=-1)))

    def replicas(self, layout: Layout) -> int:
        """Ranks of the whole launch that hold each element of this weight: DP for a TP slice, the
        expert's replicas for an expert, DP x TP for a replicated weight; twice that for the
        embedding held on two stages (MTP under PP)."""
        per_stage = {"tp": layout.dp, "ep": layout.expert_dp_size}.get(self.shard, layout.dp * layout.tp)
        return per_stage * (2 if self.pipeline_copy else 1)

    def reduce_group_size(self, layout: Layout) -> int:
        """Ranks its gradient is reduced over by the trainer's reducers: an expert's replicas, else DP."""
        return layout.expert_dp_size if self.expert else layout.dp

    def written_by(self, layout: Layout) -> bool:
        """Whether `layout`'s rank writes this weight to a checkpoint: one copy of every slice over the
        whole world (the first replica of it). The last stage's copy of the embedding is equal to the
        first stage's: never written."""
        if self.pipeline_copy == "last":
            return False
        if self.expert:
            return layout.rank % layout.stage_size < layout.ep  # the first EP group of the stage
        if self.shard == "tp":
            return layout.dp_rank == 0
        return layout.dp_rank == 0 and layout.tp_rank == 0


def placement(p: torch.Tensor) -> Placement:
    """p's placement; a weight built without one is whole on every rank."""
    return getattr(p, "placement", None) or Placement(tuple(p.shape))


def place(p: nn.Parameter, **facts: Any) -> nn.Parameter:
    """Record (or update) facts of p's placement, e.g. place(w, shard="tp", dim=0, rank=r, size=TP,
    full_shape=...) or place(norm.weight, tp_partial_grad=True)."""
    p.placement = dataclasses.replace(placement(p), **facts)
    return p


# ------------------------------------------------ tensor-parallel autograd collectives
class _CopyToGroup(torch.autograd.Function):
    """Identity forward; sum of gradients backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)  # each rank's columns gave part of dL/dx: sum them
        return g, None


class _ReduceFromGroup(torch.autograd.Function):
    """Sum forward (output of a row-parallel layer); identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)  # sum the partial products of the row shards
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class _SplitTokens(torch.autograd.Function):
    """Keep this rank's contiguous chunk of rows forward; all-gather the gradient backward.

    Used where TP ranks hold the same tokens but each should route only 1/TP of them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(size, dim=0)[rank].contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        parts = [torch.empty_like(g) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, g.contiguous(), group=ctx.group)  # every rank's rows get their grad
        return torch.cat(parts, dim=0), None


class _GatherTokens(torch.autograd.Function):
    """All-gather rows forward; keep this rank's chunk of the (identical) gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)  # rebuild all N tokens' outputs
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return g.chunk(size, dim=0)[rank].contiguous(), None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of x in (x's own dtype outside autocast)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _all_gather_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(B, T/TP, D) this rank's positions -> (B, T, D) every rank's, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)  # every rank's positions of every sequence
    return torch.cat(parts, dim=1)


class _ProjectEach(torch.autograd.Function):
    """Several column-parallel projections of one input (q, k, v; gate, up), with dL/dx summed
    inside the GEMMs: backward starts from the last layer's g W and adds each other layer's into it
    with addmm (beta = 1), instead of one (B*T, D) product per layer and an add kernel between
    them. The products are the ones autograd would run, added in its order (last layer first).

    Under sequence parallelism (`group` given; Korthikanti et al. 2022, sec. 4.2.2; Megatron-LM's
    linear with sequence parallelism) forward all-gathers the (B, T/TP, D) slices to (B, T, D) and
    multiplies the whole sequence by each weight (this rank's output columns); backward all-gathers
    the slices again for the weight gradients and reduce-scatters dL/dx (each rank's columns gave
    part of it for every position). Only the slice is kept between forward and backward, so no TP
    rank holds the whole (B, T, D) input for backward: one more all-gather per backward buys 1/TP
    of that memory. The products run in the autocast dtype when autocast is on (recorded here, as
    backward runs outside it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dtype, ctx.group = compute_dtype(x), group
        ctx.save_for_backward(x, *weights)
        whole = (x if group is None else _all_gather_sequence(x, group)).to(ctx.dtype)  # (B, T, D)
        with torch.autocast(x.device.type, enabled=False):
            return tuple(F.linear(whole, w.to(ctx.dtype)) for w in weights)  # (B, T, out / TP) each

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, *weights = ctx.saved_tensors
        whole = x if ctx.group is None else _all_gather_sequence(x, ctx.group)  # (B, T, D), gathered again
        whole = whole.to(ctx.dtype).flatten(0, 1)  # (B*T, D)
        grad_whole, grad_weights = None, []
        for g, w in reversed(list(zip(grads, weights))):  # last first: the order autograd adds separate layers' in
            g, w = g.flatten(0, 1).to(ctx.dtype), w.to(ctx.dtype)  # (B*T, out / TP), (out / TP, D)
            # (B*T, D): this rank's part of dL/dx, the other layers' added inside the GEMM
            grad_whole = g @ w if grad_whole is None else torch.addmm(grad_whole, g, w)
            grad_weights.insert(0, g.T @ whole)  # (out / TP, D)
        grad_x = grad_whole.view(*grads[0].shape[:2], -1)  # (B, T, D)
        if ctx.group is not None:
            grad_x = _reduce_scatter_sequence(grad_x, ctx.group)  # (B, T/TP, D)
        return (grad_x, None, *grad_weights)


class _ReduceScatterSequence(torch.autograd.Function):
    """Sum partial outputs and keep this rank's sequence slice forward (B, T, D) -> (B, T/TP, D);
    all-gather the gradient backward. The output of a row-parallel layer under sequence parallelism."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _all_gather_sequence(g, ctx.group), None  # (B, T, D): the gradient of every position


def _reduce_scatter_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(B, T, D) partial sums on every rank -> (B, T/TP, D) sums of this rank's positions."""
    chunks = [c.contiguous() for c in x.chunk(dist.get_world_size(group), dim=1)]  # (B, T/TP, D) each
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)  # rank r receives the sum of every rank's chunk r
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(back, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def copy_to_tp(x: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    return x if par.tp_size == 1 else _CopyToGroup.apply(x, par.tp_group)


def reduce_from_tp(x: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    return x if par.tp_size == 1 else _ReduceFromGroup.apply(x, par.tp_group)


def column_parallel(x: torch.Tensor, par: ModelParallel, *layers: ColumnParallelLinear) -> tuple[torch.Tensor, ...]:
    """Each column-parallel layer applied to the whole input, whatever the layout: x (B, T, D)
    (backward: all-reduce of the partial dL/dx), or under SP this rank's slice (B, T/TP, D),
    all-gathered (backward: reduce-scatter). Returns one (B, T, out / TP) tensor per layer.

    The layers run as separate GEMMs on the same input (`_ProjectEach`). One GEMM over their weights
    stacked by rows was tried (fewer, larger kernels): it sums dL/dx over all layers' columns at
    once, and the TP layouts then no longer reproduced one process's weights to the parity tests'
    tolerance (the DeepSeek recipe with capacity under TP2 x EP2), so it is not used."""
    weights = [layer.weight for layer in layers]
    if par.sequence_parallel:
        return _ProjectEach.apply(x, par.tp_group, *weights)
    x = copy_to_tp(x, par)  # (B, T, D)
    return _ProjectEach.apply(x, None, *weights) if len(layers) > 1 else (layers[0](x),)


def split_tokens(x: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    """(N, D) the same on every TP rank -> (N / TP, D) this rank's contiguous chunk of rows."""
    return _SplitTokens.apply(x, par.tp_group)


def gather_tokens(x: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    """(N / TP, D) this rank's rows -> (N, D) every rank's, in rank order."""
    return _GatherTokens.apply(x, par.tp_group)


def gather_tp_rows(t: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    """All TP ranks' rows of a tensor, no gradient: the whole micro-batch's routing decisions."""
    if par.tp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(par.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=par.tp_group)  # each rank routed N / TP tokens
    return torch.cat(parts)


def reduce_scatter_sequence(x: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    return _ReduceScatterSequence.apply(x, par.tp_group)


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


# ------------------------------------------------------------ tensor-parallel layers
class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over TP ranks; each rank returns its columns of y."""

    def __init__(self, in_features: int, out_features: int, par: ModelParallel, std: float = 0.02):
        super().__init__()
        assert out_features % par.tp_size == 0
        self.par = par
        self.weight = nn.Parameter(torch.empty(out_features // par.tp_size, in_features))
        place(self.weight, full_shape=(out_features, in_features), shard="tp", dim=0, rank=par.tp_rank,
              size=par.tp_size, init_std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., out / TP); caller applied copy_to_tp to x


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over TP ranks; partial sums are all-reduced
    (reduce-scattered by sequence under sequence parallelism)."""

    def __init__(self, in_features: int, out_features: int, par: ModelParallel, std: float = 0.02):
        super().__init__()
        assert in_features % par.tp_size == 0
        self.par = par
        self.weight = nn.Parameter(torch.empty(out_features, in_features // par.tp_size))
        place(self.weight, full_shape=(out_features, in_features), shard="tp", dim=1, rank=par.tp_rank,
              size=par.tp_size, init_std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, T, out) this rank's partial sum
        if self.par.sequence_parallel:
            return reduce_scatter_sequence(y, self.par)  # (B, T/TP, out): summed over TP, this rank's positions
        return reduce_from_tp(y, self.par)  # (B, T, out)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; a rank looks up only the ids it owns."""

    def __init__(self, vocab_size: int, dim: int, par: ModelParallel, std: float = 0.02):
        super().__init__()
        self.par = par
        self.v_local = vocab_size // par.tp_size
        self.v_start = par.tp_rank * self.v_local
        self.weight = nn.Parameter(torch.empty(self.v_local, dim))
        place(self.weight, full_shape=(vocab_size, dim), shard="tp", dim=0, rank=par.tp_rank, size=par.tp_size,
              init_std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_size == 1:
            return F.embedding(ids, self.weight)  # (B, T, D)
        local = ids - self.v_start
        outside = (local < 0) | (local >= self.v_local)
        emb = F.embedding(local.masked_fill(outside, 0), self.weight)
        emb = emb.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.par.sequence_parallel:  # exactly one rank gave each row; keep this rank's positions
            return reduce_scatter_sequence(emb, self.par)  # (B, T/TP, D)
        return reduce_from_tp(emb, self.par)  # (B, T, D): exactly one rank gave each row


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary, never building the full (N, V) logits.

    Per token: loss = log(sum_v exp(z_v)) - z_target, with the max, the sum of exponentials
    and the target logit each all-reduced over the TP group (Megatron-LM)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, v_start: int, group: Any):
        logits = logits.float()  # (N, V_local)
        z_max = logits.max(dim=-1).values
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)  # global max per token
        z = logits - z_max.unsqueeze(-1)
        local = targets - v_start
        mine = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)
        z_target = z.gather(1, idx.unsqueeze(1)).squeeze(1) * mine
        exp = z.exp()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([z_target, sum_exp])  # (2, N)
        dist.all_reduce(both, group=group)  # target logit lives on one rank; sum of exps over all
        z_target, sum_exp = both
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), idx, mine)
        return sum_exp.log() - z_target  # (N,)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        softmax, idx, mine = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, idx.unsqueeze(1), -mine.to(grad.dtype).unsqueeze(1))  # softmax - onehot
        return grad * g.unsqueeze(-1), None, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean token cross-entropy of the LM head's logits h W^T, the head's backward folded in.

    Forward as the separate layers compute it: the logits in `dtype`, log_softmax in their dtype
    (fp32 sums inside the kernel), the target's -log p, the mean in fp32; only the (N, V)
    log-probabilities are kept (as log_softmax keeps them). Backward: dL/dlogits is
    (softmax - onehot) x g / N, so the scalar g / N multiplies the (N, D) and (V, D) products of the
    head's backward instead of the (N, V) gradient: softmax is exp(log p) in one pass, p - 1 at the
    targets is taken in fp32 (it cancels near p = 1), and no (N, V) tensor is read or written again
    (separately: nll_loss's zero (N, V) gradient, then log_softmax's backward reading two and
    writing one)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            logits = F.linear(h.to(dtype), weight.to(dtype))  # (N, V)
            logp = F.log_softmax(logits, dim=-1)  # (N, V), the logits' dtype
        ctx.dtype = dtype
        ctx.save_for_backward(h, weight, targets, logp)
        return -logp.gather(1, targets[:, None]).squeeze(1).float().mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, weight, targets, logp = ctx.saved_tensors
        grad = logp.exp()  # (N, V) softmax
        grad.scatter_(1, targets[:, None], logp.gather(1, targets[:, None]).float().exp().sub(1).to(grad.dtype))
        scale = g / h.shape[0]  # d mean / d loss_i, times the upstream gradient
        grad_h = (grad @ weight.to(ctx.dtype)).mul_(scale)  # (N, D)
        grad_w = (grad.T @ h.to(ctx.dtype)).mul_(scale)  # (V, D)
        return grad_h, grad_w, None, None


def lm_head_cross_entropy(h: torch.Tensor, head: ColumnParallelLinear, targets: torch.Tensor,
                          par: ModelParallel, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean token cross-entropy of the LM head on the final norm's output h (B, T, D) (SP: this
    rank's slice), targets (B, T); the head runs in `dtype` (the autocast dtype, else h's). One
    process or DP / PP / EP only: `_LinearCrossEntropy`; under TP the head's vocabulary slice and
    `vocab_parallel_cross_entropy`."""
    if par.tp_size == 1:
        return _LinearCrossEntropy.apply(h.flatten(0, 1), head.weight, targets.flatten(), dtype or h.dtype)
    with torch.autocast(h.device.type, dtype=dtype or h.dtype, enabled=dtype is not None):
        logits, = column_parallel(h, par, head)  # (B, T, V / TP)
    return vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), par)


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 par: ModelParallel) -> torch.Tensor:
    """Mean token cross-entropy; logits (N, V_local), targets (N,) global ids."""
    if par.tp_size == 1:
        # In the logits' dtype (bf16 with bf16 weights): log_softmax sums its exponentials in fp32
        # inside the kernel and writes bf16 log-probabilities, so no fp32 (N, V) copy of the logits
        # (nor of their gradient) is made; the N per-token losses are averaged in fp32.
        return F.cross_entropy(logits, targets, reduction="none").float().mean()
    v_start = par.tp_rank * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, targets, v_start, par.tp_group).mean()
