"""Memory per rank: what a run needs before anything is allocated, and --dry-run's plan.

Kept beside minimal_pretrain.py because it is a concern with its own vocabulary (bytes per
parameter, activations per micro-batch, micro-batches in flight) used in two places: the
trainer's start-up check, which refuses a run that cannot fit, and `--dry-run`, which prints
the plan of a launch in one process with no GPU and no process group.

    params_per_stage        parameters one rank of each pipeline stage holds, by formula
    state_bytes             weights, gradients and optimizer state of a rank's parameters
    activation_bytes        what one micro-batch leaves saved for backward on a stage
    stage_bytes             all of it for one rank of a stage: the figure both users share
    estimate_rank_bytes     (state, activations) of the busiest rank: the start-up check
    available_memory_bytes  the GPU's free memory, or this host's available RAM per rank
    check_memory            refuse a run that cannot fit (NotEnoughMemory)
    plan_stages, describe_plan   --dry-run: each stage's slice built on the meta device

Bytes per parameter (AdamW, Megatron-LM's mixed precision; ZeRO, Rajbhandari et al. 2020, for
the distributed optimizer): fp32 runs keep weights and gradients in fp32 (4 + 4) and two
moments (8); bf16 runs keep bf16 weights and gradients (2 + 2) and in the optimizer fp32
masters, their fp32 gradients during the step and two moments (16). A distributed optimizer
divides the optimizer's part by the ranks holding the same weights: DP for dense weights, the
replicas of an expert for expert weights (at DP 1 it shards nothing: the trainer then runs the
ordinary optimizer). Gradients reduced over replicas also need a flat
copy during the all-reduce (OverlappedGradReduce). Routers (fp32 in every run) are counted
at the run's dtype: they are a ten-thousandth of the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moe_layers import ModelConfig, MoETransformer
from parallel_layers import Layout, ModelParallel, chunk_layers, placement

GIB = 2**30


class NotEnoughMemory(ValueError):
    """A run that cannot fit in this rank's memory; local to a machine, so ranks agree before exiting."""


# ============================================================== parameters and state
def stage_blocks(mc: ModelConfig, pp: int, stage: int, layers_per_chunk: int = 0) -> list[int]:
    """The transformer blocks a rank of `stage` builds, by global layer index: its one chunk, or
    every chunk of the interleaved schedule; on the last stage also the MTP modules' blocks
    (num_layers + k - 1)."""
    chunks = chunk_layers(mc.num_layers, pp, stage, layers_per_chunk)
    return [i for start, end in chunks for i in range(start, end)] + (mc.mtp_layers if stage == pp - 1 else [])


def params_per_stage(mc: ModelConfig, tp: int, pp: int, ep: int, layers_per_chunk: int = 0) -> list[int]:
    """Parameters one rank of each pipeline stage holds (TP and EP slices, all its model chunks),
    without building the model."""
    d, dh = mc.hidden_size, mc.attn_head_dim
    attn = d * dh * (2 * mc.num_attention_heads + 2 * mc.num_kv_heads) // tp + 2 * dh + 2 * d
    moe = d * mc.num_experts + 3 * d * mc.moe_ffn_hidden_size * mc.num_experts // ep \
        + 3 * d * mc.shared_ffn_hidden_size // tp
    counts = []
    for stage in range(pp):
        n = sum(attn + (moe if i in mc.all_moe_layers else 3 * d * mc.ffn_hidden_size // tp)
                for i in stage_blocks(mc, pp, stage, layers_per_chunk))
        n += mc.vocab_size * d // tp if stage == 0 else 0  # input embedding
        n += mc.vocab_size * d // tp + d if stage == pp - 1 else 0  # LM head and final norm
        if stage == pp - 1 and mc.mtp_num_layers:  # per MTP module: enorm, hnorm, eh_proj, final norm
            n += mc.mtp_num_layers * (3 * d + 2 * d * d) + (mc.vocab_size * d // tp if pp > 1 else 0)  # + embedding copy
        counts.append(n)
    return counts


def expert_params_per_stage(mc: ModelConfig, pp: int, ep: int, layers_per_chunk: int = 0) -> list[int]:
    """The expert weights among them (E / EP experts of each MoE layer of the stage)."""
    per_layer = 3 * mc.hidden_size * mc.moe_ffn_hidden_size * mc.num_experts // ep
    return [per_layer * sum(i in mc.all_moe_layers for i in stage_blocks(mc, pp, s, layers_per_chunk))
            for s in range(pp)]


@dataclass
class StateBytes:
    weights: int
    gradients: int  # including the flat all-reduce copies of gradients reduced over replicas
    optimizer: int  # fp32 masters (bf16 runs) and AdamW moments, each rank holding all of its own
    distributed_optimizer: int  # the same, divided by the ranks holding the same weights


def state_bytes(dense: int, experts: int, dp: int, expert_replicas: int, bf16: bool) -> StateBytes:
    """Bytes of a rank holding `dense` parameters replicated over DP and `experts` expert parameters
    held by `expert_replicas` ranks each (see the module docstring for the bytes per parameter)."""
    el = 2 if bf16 else 4
    optim = 16 if bf16 else 8
    reduced = (dense if dp > 1 else 0) + (experts if expert_replicas > 1 else 0)
    sharing = expert_replicas if dp > 1 else 1  # the flag changes nothing at DP 1
    return StateBytes(weights=(dense + experts) * el, gradients=(dense + experts + reduced) * el,
                      optimizer=(dense + experts) * optim,
                      distributed_optimizer=-(-dense * optim // dp) + -(-experts * optim // sharing))


# ====================================================================== activations
def layer_activation_bytes(mc: ModelConfig, layer: int, tokens: int, tp: int, ep: int, el: int,
                           grouped: bool, sp: bool = False) -> int:
    """What one block saves for backward over `tokens` tokens, in bytes (el: bytes per activation).

    Counted tensor by tensor from the code (and checked against saved-tensor hooks on the CPU):
    each RMSNorm keeps its input, the normalised input and 1/rms, and its output is kept by the
    next matmul; attention keeps q and k before their norms, q, k, v after rotary, the output and
    the log-sum-exp per head; a dense SwiGLU keeps gate, up, silu(gate) and their product. An MoE
    layer routes tokens / TP tokens on each TP rank and keeps per routed copy (K per token): on
    the expert loop (the CPU) gate and up pre-activations, and the output when the routing
    weights scale it (F >= D; EP: the expert input too); with grouped GEMMs the expert input, gate
    and up, their SwiGLU product h, the output, and the unweighted y (F >= D) or h (F < D) again for
    the weights' gradient (measured with saved-tensor hooks on the CPU). The router keeps
    fp32 scores, logits, top-k indices and weights, and the sorted token ids.
    Sequence parallelism (`sp`) keeps a norm's input, normalised input, output and 1/rms (and
    the MoE layer's input) for this rank's tokens / TP positions only: the column-parallel
    projections after a norm keep its output's slice and all-gather it again in backward."""
    d, dh = mc.hidden_size, mc.attn_head_dim
    h, g = mc.num_attention_heads // tp, mc.num_kv_heads // tp
    norm = el * 3 * d + 4  # input, normalised input, output (kept by the matmul after it), fp32 1/rms
    norms = 2 * (tokens // tp if sp else tokens) * norm  # before attention and before the MLP
    attn = el * 4 * (h + g) * dh + 4 * (2 * h + g)  # q, k before and after norm / rotary, v, output; 1/rms, lse
    if layer not in mc.all_moe_layers:
        return norms + tokens * (attn + el * 4 * mc.ffn_hidden_size // tp)
    k, e, f = mc.num_experts_per_token, mc.num_experts, mc.moe_ffn_hidden_size
    # The routing weights scale h or y (ModelConfig.routing_weight_on_hidden); their gradient keeps the
    # unweighted one of the two.
    on_hidden = mc.routing_weight_on_hidden
    if grouped:  # input, [gate | up], h, the weighted tensor's factor, the output (kept by index_add)
        experts = el * k * (2 * d + 3 * f + (f if on_hidden else d))
    else:
        experts = el * k * (2 * f + (0 if on_hidden else d)) + (el * k * d if ep > 1 else 0)  # EP: its input too
    router = 8 * e + 28 * k + 8 + el * k + (4 * d if el == 2 else 0)  # fp32 copy of bf16 router input
    shared = el * 4 * mc.shared_ffn_hidden_size // tp
    return norms + tokens * (attn + shared) + tokens // tp * (experts + router)


@dataclass
class Activations:
    per_microbatch: int  # saved for backward by one micro-batch on this stage
    per_microbatch_recompute: int  # with --recompute: only each block's input
    recompute_layer: int  # --recompute: the one block re-run during backward, once per rank
    transient: int  # once per rank: the global batch of token ids, the last stage's fp32 logits


def activation_bytes(mc: ModelConfig, layout: Layout, stage: int, el: int, grouped: bool) -> Activations:
    """Activations of one rank of `stage` (el: bytes per activation; grouped: grouped-GEMM experts)."""
    tp, pp, ep, sp = layout.tp, layout.pp, layout.ep, layout.sequence_parallel
    tokens = layout.micro_batch_size * mc.seq_length
    stream = tokens // tp if sp else tokens  # positions of the residual stream on this rank
    blocks = stage_blocks(mc, pp, stage, layout.layers_per_chunk)
    layers = [layer_activation_bytes(mc, i, tokens, tp, ep, el, grouped, sp) for i in blocks]
    edges = tokens * 8 if stage == 0 else 0  # token ids kept by the embedding
    d, mtp_inputs, mtp_module = mc.hidden_size, 0, 0
    if stage == pp - 1:  # final norm (its output's slice kept by the LM head), fp32 log-softmax kept by the
        # cross-entropy, targets; once more per MTP module, whose embedding also keeps its ids
        heads = 1 + mc.mtp_num_layers
        edges += heads * (stream * (el * 3 * d + 4) + tokens * (4 * mc.vocab_size // tp + 8))
        edges += tokens * 8 * mc.mtp_num_layers
        # an MTP module around its block: enorm's input, normalised input and 1/rms, hnorm's normalised
        # input and 1/rms (its input, the previous hidden state, is kept already), the 2D-wide concatenation
        # eh_proj keeps; --recompute keeps only the embedded input instead
        mtp_module, mtp_inputs = stream * (el * 5 * d + 8), stream * el * d * mc.mtp_num_layers
    # every rank draws the global batch of (input, target) ids (int64) and keeps its micro-batches
    transient = 2 * 8 * layout.global_batch * (mc.seq_length + 1)
    if stage == pp - 1:  # the logits and the fp32 gradient of the log-softmax, alive together in backward
        transient += tokens * (el + 4) * mc.vocab_size // tp
    n_main = len(blocks) - (mc.mtp_num_layers if stage == pp - 1 else 0)
    main, mtp = layers[:n_main], [block + mtp_module for block in layers[n_main:]]  # an MTP module, whole
    return Activations(per_microbatch=sum(main) + sum(mtp) + edges,
                       per_microbatch_recompute=stream * el * d * len(main) + mtp_inputs + edges,
                       recompute_layer=max(main + mtp, default=0), transient=transient)


def in_flight(pp: int, stage: int, num_microbatches: int, chunks: int = 1) -> float:
    """Micro-batches whose activations a stage holds at once under 1F1B: PP - stage (warm-up + 1).

    Interleaved (`chunks` > 1): warm-up + 1 chunk-sized pieces, Megatron's warm-up of
    (PP - stage - 1) * 2 + (chunks - 1) * PP forwards (all M * chunks when M == PP); a piece
    holds 1/chunks of the stage's layers, so the count is in whole micro-batches of the stage."""
    if chunks == 1:
        return min(pp - stage, num_microbatches)
    total = num_microbatches * chunks
    warmup = total if num_microbatches == pp else min(total, (pp - stage - 1) * 2 + (chunks - 1) * pp)
    return min(warmup + 1, total) / chunks


# ============================================================================ a stage
@dataclass
class StagePlan:
    """One rank of a pipeline stage: every rank of a stage holds the same amounts (equal TP and
    EP slices, which validation guarantees), so one rank stands for its stage."""

    stage: int
    ranks: tuple[int, int]  # first and last global rank of the stage
    layers: list[tuple[int, int]]  # [start, end) of each model chunk (one without interleaving)
    dense_params: int  # replicated over DP (TP slices of attention, dense MLPs, embeddings, routers)
    expert_params: int  # this rank's experts
    experts_per_rank: int
    expert_replicas: int  # ranks of the stage holding the same experts
    state: StateBytes
    activations: Activations
    in_flight: float  # micro-batches of this stage's activations alive at once

    def total(self, distributed: bool = False, recompute: bool = False) -> int:
        optimizer = self.state.distributed_optimizer if distributed else self.state.optimizer
        a = self.activations
        acts = int(a.per_microbatch_recompute * self.in_flight + a.recompute_layer if recompute
                   else a.per_microbatch * self.in_flight)
        return self.state.weights + self.state.gradients + optimizer + acts + a.transient


def stage_bytes(mc: ModelConfig, layout: Layout, stage: int, dense: int, experts: int,
                bf16: bool, grouped: bool) -> StagePlan:
    per_stage = layout.stage_size
    chunks = layout.chunks(mc.num_layers, stage)
    return StagePlan(stage=stage, ranks=(stage * per_stage, (stage + 1) * per_stage - 1),
                     layers=chunks, dense_params=dense, expert_params=experts,
                     experts_per_rank=mc.num_experts // layout.ep if mc.num_experts else 0,
                     expert_replicas=layout.expert_dp_size,
                     state=state_bytes(dense, experts, layout.dp, layout.expert_dp_size, bf16),
                     activations=activation_bytes(mc, layout, stage, 2 if bf16 else 4, grouped),
                     in_flight=in_flight(layout.pp, stage, layout.num_microbatches, len(chunks)))


def formula_plans(mc: ModelConfig, layout: Layout, bf16: bool, grouped: bool) -> list[StagePlan]:
    """The plan of every stage by formula (no model built)."""
    pp, ep, per_chunk = layout.pp, layout.ep, layout.layers_per_chunk
    totals = params_per_stage(mc, layout.tp, pp, ep, per_chunk)
    experts = expert_params_per_stage(mc, pp, ep, per_chunk)
    return [stage_bytes(mc, layout, s, totals[s] - experts[s], experts[s], bf16, grouped) for s in range(pp)]


def estimate_rank_bytes(mc: ModelConfig, layout: Layout, bf16: bool, grouped: bool = False, *,
                        distributed: bool = False, recompute: bool = False) -> tuple[int, int]:
    """(weights + gradients + optimizer state, activations) in bytes of the busiest rank, by formula,
    with the optimizer state sharded when `distributed` (--use-distributed-optimizer)."""
    busiest = max(formula_plans(mc, layout, bf16, grouped), key=lambda p: p.total(distributed, recompute))
    optimizer = busiest.state.distributed_optimizer if distributed else busiest.state.optimizer
    state = busiest.state.weights + busiest.state.gradients + optimizer
    return state, busiest.total(distributed, recompute) - state


def optimizer_bytes_per_rank(mc: ModelConfig, layout: Layout, bf16: bool, distributed: bool) -> int:
    """The optimizer state (bf16 runs' fp32 masters and AdamW's moments) of the rank holding the most, by formula."""
    plans = formula_plans(mc, layout, bf16, grouped=False)
    return max(p.state.distributed_optimizer if distributed else p.state.optimizer for p in plans)


def available_memory_bytes(device_type: str, local_rank: int) -> int | None:
    """Free memory for one rank: the GPU's free memory, or this host's available RAM shared by its ranks."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info(local_rank)[0]
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None  # not Linux: no check
    return avail // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def check_memory(mc: ModelConfig, layout: Layout, local_rank: int, device_type: str, bf16: bool, *,
                 distributed: bool, recompute: bool) -> None:
    """Refuse, before allocating, a run that cannot fit: an OOM kill prints nothing at all."""
    state, acts = estimate_rank_bytes(mc, layout, bf16, grouped=device_type == "cuda", distributed=distributed,
                                      recompute=recompute)
    avail = available_memory_bytes(device_type, local_rank)
    if avail is not None and state + acts > avail:
        raise NotEnoughMemory(f"this run needs about {(state + acts) / GIB:.1f} GiB per rank (weights, gradients "
                              f"and AdamW state {state / GIB:.1f} GiB, activations {acts / GIB:.1f} GiB) but "
                              f"{avail / GIB:.1f} GiB is free on this {device_type}; shrink the model or "
                              f"--micro-batch-size, or split it over more ranks (TP / PP / EP); "
                              f"--dry-run --world-size N plans a layout")


# =========================================================================== --dry-run
def built_params(mc: ModelConfig, layout: Layout, stage: int) -> tuple[int, int]:
    """(dense, expert) parameters of rank 0 of `stage` (TP rank 0, EP rank 0, all its model chunks),
    counted on the model built for it on the meta device: shapes without storage, so a 100B model
    takes seconds."""
    par = ModelParallel(tp_size=layout.tp, ep_size=layout.ep, first_stage=stage == 0,
                        last_stage=stage == layout.pp - 1, chunks=tuple(layout.chunks(mc.num_layers, stage)))
    with torch.device("meta"):
        model = MoETransformer(mc, par, seed=0)
    experts = sum(p.numel() for p in model.parameters() if placement(p).expert)
    return sum(p.numel() for p in model.parameters()) - experts, experts


def plan_stages(mc: ModelConfig, layout: Layout, bf16: bool, grouped: bool) -> list[StagePlan]:
    """The plan of every stage, from the slices built on the meta device (the layout already validated)."""
    plans = []
    for stage in range(layout.pp):
        dense, experts = built_params(mc, layout, stage)
        plans.append(stage_bytes(mc, layout, stage, dense, experts, bf16, grouped))
    return plans


def layers_text(chunks: list[tuple[int, int]]) -> str:
    """`layers 0-3`, or with interleaving `chunks 0-1, 4-5` (each chunk's first and last layer)."""
    ranges = ", ".join(f"{start}-{end - 1}" if end - start > 1 else f"{start}" for start, end in chunks)
    return f"chunks {ranges}" if len(chunks) > 1 else f"layers {ranges}"


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def describe_plan(mc: ModelConfig, layout: Layout, device_type: str, bf16: bool, *, distributed: bool,
                  recompute: bool) -> str:
    """--dry-run's report: per stage, one rank's parameters and bytes, with and without the
    distributed optimizer and --recompute, then the busiest rank (as flagged: `distributed`, `recompute`)."""
    tp, pp, ep, dp, world_size = layout.tp, layout.pp, layout.ep, layout.dp, layout.world_size
    grouped = device_type == "cuda"
    plans = plan_stages(mc, layout, bf16, grouped)
    schedule = "interleaved 1F1B" if len(plans[0].layers) > 1 else "1F1B"
    precision = ("bf16 weights, activations and gradients; fp32 masters and AdamW moments" if bf16 else
                 "fp32 weights, activations, gradients and AdamW moments")
    experts = "grouped-GEMM experts" if grouped else "expert loop"
    sp = " with sequence parallelism" if layout.sequence_parallel else ""
    lines = [f"dry run: world {world_size} = PP {pp} x DP {dp} x TP {tp}{sp}, EP {ep} | planned for {device_type} "
             f"({precision}; {experts}) | {layout.num_microbatches} micro-batch"
             f"{'es' if layout.num_microbatches > 1 else ''} of {layout.micro_batch_size} x "
             f"{mc.seq_length} tokens per step and DP rank",
             f"model: {sum(params_per_stage(mc, 1, 1, 1)):,} parameters; one rank of each stage holds:"]
    for p in plans:
        a, s = p.activations, p.state
        where = " + embedding" if p.stage == 0 else ""
        where += " + LM head" if p.stage == pp - 1 else ""
        where += f" + {mc.mtp_num_layers} MTP modules" if p.stage == pp - 1 and mc.mtp_num_layers else ""
        where += " (and an embedding copy)" if p.stage == pp - 1 and mc.mtp_num_layers and pp > 1 else ""
        expert_text = (f"{p.experts_per_rank} of {mc.num_experts} experts per MoE layer, each expert on "
                       f"{p.expert_replicas} rank{'s' if p.expert_replicas > 1 else ''}" if mc.num_experts else "dense")
        lines += [
            f"stage {p.stage} (ranks {p.ranks[0]}-{p.ranks[1]}): {layers_text(p.layers)}{where}; {expert_text}",
            f"  parameters        {p.dense_params + p.expert_params:,} ({p.dense_params:,} replicated over DP "
            f"{dp}, {p.expert_params:,} in experts)",
            f"  weights           {gib(s.weights)}",
            f"  gradients         {gib(s.gradients)} (with the all-reduce copies)",
            f"  optimizer state   {gib(s.optimizer)}; distributed optimizer {gib(s.distributed_optimizer)} "
            f"(dense / DP {dp}, experts / {p.expert_replicas})",
            f"  activations       {gib(a.per_microbatch)} per micro-batch x {p.in_flight:g} in flight ({schedule}); "
            f"--recompute {gib(a.per_microbatch_recompute)} x {p.in_flight:g} + {gib(a.recompute_layer)} (one block "
            f"re-run); + {gib(a.transient)} once (batch ids" + (", fp32 logits)" if p.stage == pp - 1 else ")"),
            f"  total             {gib(p.total())}; distributed optimizer {gib(p.total(distributed=True))}; "
            f"--recompute {gib(p.total(recompute=True))}; both {gib(p.total(True, True))}"]
    busiest = max(plans, key=lambda p: p.total(distributed, recompute))
    lines.append(f"busiest rank: stage {busiest.stage}, {gib(busiest.total(distributed, recompute))} "
                 f"as flagged (--recompute {'on' if recompute else 'off'}, "
                 f"{'' if distributed else 'no '}distributed optimizer); all ranks together "
                 f"{gib(sum(p.total(distributed, recompute) * (p.ranks[1] - p.ranks[0] + 1) for p in plans))}")
    return "\n".join(lines)
