"""Pretrain a sparse Mixture-of-Experts language model with DP / TP / PP / EP wired by hand.

    python minimal_pretrain.py                                  # one process, built-in corpus
    torchrun --nproc_per_node=8 minimal_pretrain.py --tensor-parallel-size 2 \
        --pipeline-parallel-size 2 --num-microbatches 4          # TP2 x PP2 x DP2, EP2

This file starts at step 0: launch.py has parsed the flags, checked every input and resolved the
one Layout of the launch. The story is told in main(): start-up -> distributed setup -> model and
optimizer -> training loop -> teardown. Every collective is visible where it happens, with its group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

import checkpoint as ckpt_io
from data import Corpus, DataError, get_batch, unigram_entropy
from launch import (ConfigError, RunInputs, StopRequest, TrainConfig, check_master_env, dry_run, fail, fail_together,
                    launch_ranks, parse_config, prepare_inputs, print_banner, resolve_autocast, resolve_device,
                    resolve_param_dtype, run_fingerprint, software, uses_cuda)
from metrics import HEALTH_FIELDS, RunLog, load_health, print_run_summary
from moe_layers import ModelConfig, MoETransformer, can_use_grouped_mm
from optim import DistributedAdamW, FlatBucket, build_optimizer, clipped_step
from parallel_layers import Layout, ModelParallel, lm_head_cross_entropy, placement, vocab_parallel_cross_entropy
from sampling import TrainingSampler


# ============================================================ distributed setup
@dataclass(frozen=True)
class ParallelGroups(Layout):
    """This rank's Layout (every size and coordinate) and the process groups it talks over."""

    tp_group: Any = None  # this stage's ranks with the same dp_rank: split heads, FFN columns, vocab
    dp_group: Any = None  # this stage's ranks with the same tp_rank: average dense gradients
    ep_group: Any = None  # EP consecutive ranks of this stage: split the experts
    expert_dp_group: Any = None  # ranks of this stage holding the same experts: sum their gradients
    embedding_group: Any = None  # MTP under PP: this (dp, tp)'s first- and last-stage ranks, which hold the embedding

    @property
    def prev_rank(self) -> int | None:  # same (dp, tp) on the previous pipeline stage
        return self.rank - self.stage_size if self.pp_rank > 0 else None

    @property
    def next_rank(self) -> int | None:
        return self.rank + self.stage_size if self.pp_rank < self.pp - 1 else None


def init_process_group(backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
    """The default group, with store keys scoped to this torchrun restart.

    torchrun --max-restarts keeps its key-value store across restarts; without the prefix the
    restarted workers would read the previous workers' (dead) connection addresses."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)


def build_process_groups(layout: Layout, embedding_groups: bool = False,
                         timeout: timedelta | None = None) -> ParallelGroups:
    """Create every process group once (all ranks call new_group for every group, in order).

    Worked example, 8 ranks, TP2 x DP2 x PP2, EP2 (rank = (pp*2 + dp)*2 + tp):
        TP groups  [0,1] [2,3] [4,5] [6,7]      heads / FFN columns / vocab split
        DP groups  [0,2] [1,3] [4,6] [5,7]      dense gradients averaged
        PP groups  [0,4] [1,5] [2,6] [3,7]      activations flow 0->4, 1->5, ...
        EP groups  [0,1] [2,3] [4,5] [6,7]      consecutive ranks of a stage split the experts
        expert-DP  [0,2] [1,3] [4,6] [5,7]      ranks with the same experts sum expert gradients
    With EP4 on the same layout the EP groups become [0,1,2,3] [4,5,6,7] and every rank of a stage
    holds different experts (expert-DP groups of one rank).
    With `embedding_groups` (MTP under PP) also: embedding [0,4] [1,5] [2,6] [3,7], the first and last
    stage's ranks of each (dp, tp), which sum the gradients of their two embedding copies (Megatron's
    embedding group); with PP 2 they are the PP groups.
    `timeout` is --dist-timeout: new_group does not inherit init_process_group's, it would wait 30 minutes."""
    tp, dp, pp, ep, rank, stage_size = layout.tp, layout.dp, layout.pp, layout.ep, layout.rank, layout.stage_size
    mine: dict[str, Any] = {}  # this rank's group of each kind
    if layout.world_size == 1:
        return ParallelGroups(**dataclasses.asdict(layout))
    for p in range(pp):
        base = p * stage_size
        for d in range(dp):
            ranks = [base + d * tp + t for t in range(tp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine["tp_group"] = group
        for t in range(tp):
            ranks = [base + d * tp + t for d in range(dp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine["dp_group"] = group
        for start in range(0, stage_size, ep):
            ranks = [base + start + i for i in range(ep)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine["ep_group"] = group
        for e in range(ep):
            ranks = [base + e + j * ep for j in range(stage_size // ep)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine["expert_dp_group"] = group
    if embedding_groups and pp > 1:
        for in_stage in range(stage_size):
            ranks = [in_stage, (pp - 1) * stage_size + in_stage]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine["embedding_group"] = group
    return ParallelGroups(**dataclasses.asdict(layout), **mine)


def model_parallel_for(pg: ParallelGroups, mc: ModelConfig) -> ModelParallel:
    return ModelParallel(tp_group=pg.tp_group, tp_rank=pg.tp_rank, tp_size=pg.tp,
                         ep_group=pg.ep_group, ep_rank=pg.ep_rank, ep_size=pg.ep,
                         first_stage=pg.first_stage, last_stage=pg.last_stage, chunks=tuple(pg.chunks(mc.num_layers)),
                         sequence_parallel=pg.sequence_parallel)


# ========================================================================= data
def local_microbatches(x: torch.Tensor, y: torch.Tensor, pg: ParallelGroups,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DP rank d takes the d-th contiguous slice of the global batch, cut into micro-batches."""
    per_rank = pg.micro_batch_size * pg.num_microbatches
    x = x[pg.dp_rank * per_rank:(pg.dp_rank + 1) * per_rank].to(device)
    y = y[pg.dp_rank * per_rank:(pg.dp_rank + 1) * per_rank].to(device)
    return list(zip(x.split(pg.micro_batch_size), y.split(pg.micro_batch_size)))


# ===================================================== pipeline schedule (1F1B)
def p2p(pg: ParallelGroups, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
        recv_prev: bool = False, recv_next: bool = False, shape: tuple[int, ...] = (),
        device: torch.device | None = None, dtype: torch.dtype = torch.float32,
        ring: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Exchange activations / gradients with neighbouring stages in one batch (no deadlock).

    ring: the last stage's next is the first stage and the first's previous the last (the
    interleaved schedule's chunk boundary). With PP 2 both neighbours are one rank: the sends
    to it (next, then previous) and its receives (previous, then next) then pair up in order."""
    next_rank, prev_rank = pg.next_rank, pg.prev_rank
    if ring:
        next_rank, prev_rank = (pg.rank + pg.stage_size) % pg.world_size, (pg.rank - pg.stage_size) % pg.world_size
    ops, from_prev, from_next = [], None, None
    if send_next is not None and next_rank is not None:
        ops.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), next_rank))
    if send_prev is not None and prev_rank is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), prev_rank))
    if recv_prev and prev_rank is not None:
        from_prev = torch.empty(shape, device=device, dtype=dtype)
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank))
    if recv_next and next_rank is not None:
        from_next = torch.empty(shape, device=device, dtype=dtype)
        ops.append(dist.P2POp(dist.irecv, from_next, next_rank))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return from_prev, from_next


@dataclass
class StepStats:
    """Sums over this rank's micro-batches, later summed over all ranks. Kept on the device: read
    back once per logged interval (reduce_step_stats), never once per micro-batch."""

    lm_loss: torch.Tensor  # sum of micro-batch mean LM losses (last stage, TP rank 0 only)
    mtp_loss: torch.Tensor  # sum of micro-batch MTP losses, mean_k CE_k (last stage, TP rank 0 only)
    aux_loss: torch.Tensor  # sum over micro-batches and this stage's MoE layers
    z_loss: torch.Tensor
    counts: torch.Tensor  # (num MoE layers, E) rows each expert computed
    routed: torch.Tensor  # (num MoE layers, E) the routers' top-k choices
    dropped: torch.Tensor  # (num MoE layers,) assignments over capacity

    @staticmethod
    def zeros(mc: ModelConfig, device: torch.device) -> StepStats:
        n_moe, width = len(mc.all_moe_layers), max(mc.num_experts, 1)
        flat = torch.zeros(4 + n_moe * (2 * width + 1), device=device)  # views of one buffer: one fill kernel
        scalars, counts, routed, dropped = flat.split([4, n_moe * width, n_moe * width, n_moe])
        return StepStats(*scalars.unbind(), counts=counts.view(n_moe, width), routed=routed.view(n_moe, width),
                         dropped=dropped)

    def add(self, other: StepStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, par: ModelParallel) -> torch.Tensor:
    """Multi-token prediction loss (DeepSeek-V3, eq. 24-25): the mean over the D modules of CE_k, module k's
    mean cross-entropy over the positions i < T - k whose target t_{i+k+1} = targets[:, i + k] exists.
    mtp_logits[k - 1] (B, T - k, V_local); targets (B, T). Zero without MTP modules (or off the last stage)."""
    if not mtp_logits:
        return torch.zeros((), device=targets.device)
    losses = [vocab_parallel_cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten(), par)
              for k, logits in enumerate(mtp_logits, start=1)]
    return torch.stack(losses).mean()


class MicroBatches:
    """One pass of a step over this rank's micro-batches: the forward and backward of one (chunk,
    micro-batch) and the exchange with the neighbouring stages, which the schedules (one_f_one_b,
    run_interleaved) call in their order.

    Each micro-batch's loss is scaled by 1/M so the gradients are those of the mean over the
    M micro-batches; the aux and z losses of every stage join that stage's backward.
    `step` seeds the router jitter of each micro-batch by its index in the global batch; training
    steps (`step` given) also run the MTP modules, evaluation measures the LM loss only.
    The `reducers` are armed before the last backward, so gradient all-reduces overlap it.
    scripts/bench_pipeline.py times a subclass of it; the trainer runs this one."""

    def __init__(self, model: MoETransformer, micro: list[tuple[torch.Tensor, torch.Tensor]], pg: ParallelGroups,
                 mc: ModelConfig, tc: TrainConfig, device: torch.device, autocast_dtype: torch.dtype | None,
                 train: bool, step: int | None, reducers: list[OverlappedGradReduce]):
        self.model, self.micro, self.pg, self.mc, self.tc = model, micro, pg, mc, tc
        self.device, self.autocast_dtype, self.train, self.step, self.reducers = (device, autocast_dtype, train,
                                                                                  step, reducers)
        self.moe_row = {layer: i for i, layer in enumerate(mc.all_moe_layers)}
        self.last_chunk = len(model.chunks) - 1
        b, t = micro[0][0].shape
        # Under sequence parallelism each TP rank sends and receives only its slice of the sequence.
        self.shape = (b, t // pg.tp if pg.sequence_parallel else t, mc.hidden_size)
        # Activations and their gradients cross stages in the weights' dtype (bf16 with bf16 weights).
        self.act_dtype = next(iter(model.layers.values())).input_layernorm.weight.dtype
        self.stats = StepStats.zeros(mc, device)
        # (chunk, micro-batch) -> its (input, output, loss), kept from its forward for its backward
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}
        self.backwards_done = 0

    def forward(self, i: int, inp: torch.Tensor | None, chunk: int = 0) -> torch.Tensor:
        """Forward of model chunk `chunk` on micro-batch i (inp: the previous stage's activation)."""
        mc, tc, pg, (x, y) = self.mc, self.tc, self.pg, self.micro[i]
        noise_seed = None  # passed only when used: torch.compile would recompile for every new int value
        if self.step is not None and mc.router_jitter_noise > 0:
            noise_seed = (tc.seed * 1_000_003 + self.step) * 65_537 + pg.dp_rank * len(self.micro) + i
        last = pg.last_stage and chunk == self.last_chunk
        mtp_targets = y if last and mc.mtp_num_layers and self.step is not None else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(x if pg.first_stage and chunk == 0 else inp, noise_seed=noise_seed, chunk=chunk,
                             mtp_targets=mtp_targets, head=False)
        loss = self.router_loss(out)
        if last:  # out.output: the final norm's output, which the loss passes through the LM head
            lm = lm_head_cross_entropy(out.output, self.model.lm_head, y, self.model.par, self.autocast_dtype)
            mtp = mtp_loss(out.mtp_logits, y, self.model.par)
            if pg.tp_rank == 0:  # summed on the device: no host sync per micro-batch
                self.stats.lm_loss += lm.detach()
                self.stats.mtp_loss += mtp.detach()
            loss = lm + tc.mtp_loss_coef * mtp + loss
        if self.train:
            self.saved[chunk, i] = (inp, out.output, loss / len(self.micro))
        return out.output

    def router_loss(self, out: Any) -> torch.Tensor:
        """This chunk's share of the router losses (means over all MoE layers of the model), and its statistics."""
        n_moe = len(self.mc.all_moe_layers)
        if not n_moe:
            return torch.zeros((), device=self.device)
        self.stats.aux_loss += out.aux_loss.detach()
        self.stats.z_loss += out.z_loss.detach()
        if out.stats:  # a chunk's MoE layers are consecutive rows: one stack and one add per statistic
            layers = list(out.stats)
            rows = slice(self.moe_row[layers[0]], self.moe_row[layers[0]] + len(layers))
            assert [self.moe_row[layer] for layer in layers] == list(range(rows.start, rows.stop))
            per_layer = out.stats.values()
            self.stats.counts[rows] += torch.stack([s.counts for s in per_layer])  # (L, E) counts, into fp32
            self.stats.routed[rows] += torch.stack([s.routed for s in per_layer])
            if any(s.dropped is not None for s in per_layer):  # a capacity limit (model-wide): drops counted
                self.stats.dropped[rows] += torch.stack([s.dropped for s in per_layer])
        return (self.tc.router_aux_loss_coef * out.aux_loss + self.tc.router_z_loss_coef * out.z_loss) / n_moe

    def backward(self, i: int, grad_out: torch.Tensor | None, chunk: int = 0) -> torch.Tensor | None:
        """Backward of chunk `chunk` on micro-batch i from the next stage's gradient; returns dL/d(input)."""
        inp, out, loss = self.saved.pop((chunk, i))
        self.backwards_done += 1
        # The last backward completes every gradient of the step. Under interleaving it is chunk 0's:
        # the other chunks' buckets, finished earlier, start in finish() instead of overlapping it.
        if self.backwards_done == len(self.micro) * (self.last_chunk + 1):
            for reducer in self.reducers:
                reducer.arm()
        if self.pg.last_stage and chunk == self.last_chunk:
            loss.backward()
        else:
            tensors, grads = [out], [grad_out]
            if loss.requires_grad:  # this stage's aux and z losses
                tensors.append(loss)
                grads.append(torch.ones_like(loss))
            torch.autograd.backward(tensors, grads)
        return inp.grad if inp is not None else None

    def exchange(self, **kw: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return p2p(self.pg, shape=self.shape, device=self.device, dtype=self.act_dtype, **kw)

    def recv_forward(self) -> torch.Tensor | None:
        if self.pg.first_stage:
            return None
        inp, _ = self.exchange(recv_prev=True)
        return inp.requires_grad_(self.train)


def run_microbatches(model: MoETransformer, micro: list[tuple[torch.Tensor, torch.Tensor]],
                     pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig, device: torch.device,
                     autocast_dtype: torch.dtype | None, train: bool, step: int | None = None,
                     reducers: list[OverlappedGradReduce] = (),
                     runner: Callable[..., MicroBatches] = MicroBatches) -> StepStats:
    """Forward (and backward when `train`) of this rank's micro-batches, pipelined over stages:
    1F1B (one_f_one_b), or the interleaved schedule when a rank holds several model chunks."""
    mb = runner(model, micro, pg, mc, tc, device, autocast_dtype, train, step, list(reducers))
    with torch.set_grad_enabled(train):
        if len(model.chunks) > 1:
            run_interleaved(mb)
        elif train:
            one_f_one_b(mb)
        else:
            forward_only(mb)
    return mb.stats


def forward_only(mb: MicroBatches) -> None:
    """Evaluation (or global-batch routing): every micro-batch forward, stage after stage."""
    for i in range(len(mb.micro)):
        out = mb.forward(i, mb.recv_forward())
        mb.exchange(send_next=None if mb.pg.last_stage else out)


def one_f_one_b(mb: MicroBatches) -> None:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): stage s runs PP-s-1 warm-up forwards, then
    alternates one forward and one backward, then drains the remaining backwards, so at most
    PP micro-batches of activations are alive. With PP = 1 it is plain gradient accumulation."""
    pg, m = mb.pg, len(mb.micro)
    send_next = (lambda out: None) if pg.last_stage else (lambda out: out)  # the last stage sends nothing on
    warmup = min(pg.pp - pg.pp_rank - 1, m)
    for i in range(warmup):
        mb.exchange(send_next=send_next(mb.forward(i, mb.recv_forward())))
    inp = mb.recv_forward() if warmup < m else None
    for i in range(warmup, m):
        out = mb.forward(i, inp)
        _, grad_out = mb.exchange(send_next=send_next(out), recv_next=True)
        in_grad = mb.backward(i - warmup, grad_out)
        if i == m - 1:
            mb.exchange(send_prev=in_grad)
        else:  # send this gradient back while receiving the next micro-batch's input
            inp, _ = mb.exchange(send_prev=in_grad, recv_prev=True)
            if inp is not None:
                inp.requires_grad_(True)
    for i in range(m - warmup, m):
        _, grad_out = mb.exchange(recv_next=True)
        mb.exchange(send_prev=mb.backward(i, grad_out))


# ============================================ interleaved 1F1B (virtual pipeline stages)
class PipeStep(NamedTuple):
    """One step of a pipeline rank: the forward ("F") or backward ("B") of one model chunk on one micro-batch."""

    kind: str
    chunk: int
    micro: int


def interleaved_ticks(pp: int, rank: int, chunks: int, num_micro: int, train: bool = True) -> list[list[PipeStep]]:
    """The interleaved 1F1B schedule of pipeline rank `rank` (Narayanan et al. 2021, sec. 2.2, in the
    order of Megatron-LM's forward_backward_pipelining_with_interleaving), as ticks: [F] in the
    warm-up, [F, B] in the steady state (forward first), [B] in the cool-down.

    The k-th forward runs chunk (k mod PP*V) // PP on micro-batch (k // (PP*V)) * PP + k mod PP:
    a group of PP micro-batches goes through chunk 0, then the same group through chunk 1, ...,
    so a rank works on its next chunk while the group travels round the other ranks. The k-th
    backward takes the chunks in reverse order. Warm-up: (PP - rank - 1) * 2 + (V - 1) * PP
    forwards, or all of them when M == PP (and without training)."""
    total = num_micro * chunks

    def nth(k: int, kind: str) -> PipeStep:
        group, in_group = divmod(k, pp * chunks)
        chunk = in_group // pp
        return PipeStep(kind, chunk if kind == "F" else chunks - 1 - chunk, group * pp + k % pp)

    if not train:
        return [[nth(k, "F")] for k in range(total)]
    warmup = total if num_micro == pp else min(total, (pp - rank - 1) * 2 + (chunks - 1) * pp)
    return ([[nth(k, "F")] for k in range(warmup)]
            + [[nth(warmup + k, "F"), nth(k, "B")] for k in range(total - warmup)]
            + [[nth(k, "B")] for k in range(total - warmup, total)])


def step_target(pp: int, chunks: int, rank: int, step: PipeStep) -> int | None:
    """The rank that needs what `step` produces, or None: a forward's output goes to the next
    rank's same chunk (the last rank's to rank 0's next chunk), an input gradient the opposite way."""
    if step.kind == "F":
        return rank + 1 if rank < pp - 1 else (0 if step.chunk < chunks - 1 else None)
    return rank - 1 if rank > 0 else (pp - 1 if step.chunk > 0 else None)


def step_source(pp: int, chunks: int, rank: int, step: PipeStep) -> tuple[int, PipeStep] | None:
    """The (rank, step) whose output `step` takes as its input (activation or output gradient), or
    None for the first chunk's forward on rank 0 (token ids) and the last chunk's backward on the
    last rank (the loss)."""
    if step.kind == "F":
        if rank > 0:
            return rank - 1, step
        return (pp - 1, step._replace(chunk=step.chunk - 1)) if step.chunk > 0 else None
    if rank < pp - 1:
        return rank + 1, step
    return (0, step._replace(chunk=step.chunk + 1)) if step.chunk < chunks - 1 else None


def interleaved_slots(pp: int, chunks: int, num_micro: int, train: bool = True) -> list[list[int]]:
    """slots[rank][t]: the slot in which `rank` runs its tick t; computed alike on every rank.

    All ranks go through the slots together: in a slot a rank runs at most one tick, then sends
    what it produced to its ring neighbours, who post the matching receives in that same slot
    (they know the sender's slots too). So every batched exchange is matched within its slot and
    no rank can wait for one that comes later: no deadlock, with gloo or NCCL. A tick takes the
    first slot after the ticks that produce its inputs."""
    ticks = [interleaved_ticks(pp, r, chunks, num_micro, train) for r in range(pp)]
    made: set[tuple[int, PipeStep] | None] = {None}  # (rank, step) already run; None: the inputs a rank has itself
    slots: list[list[int]] = [[] for _ in range(pp)]
    slot = 0
    while any(len(slots[r]) < len(ticks[r]) for r in range(pp)):
        ran = []
        for r in range(pp):
            t = len(slots[r])
            if t < len(ticks[r]) and all(step_source(pp, chunks, r, st) in made for st in ticks[r][t]):
                slots[r].append(slot)
                ran += [(r, st) for st in ticks[r][t]]
        if not ran:
            raise RuntimeError(f"interleaved schedule stalls at slot {slot} (PP {pp}, {chunks} chunks, "
                               f"{num_micro} micro-batches)")
        made.update(ran)  # after the slot: what a slot produces is received at its end
        slot += 1
    return slots


def run_interleaved(mb: MicroBatches) -> None:
    """Run this rank's interleaved 1F1B ticks slot by slot (interleaved_slots), the received
    activations and gradients kept by (chunk, micro-batch) until their step runs."""
    pp, rank, chunks, num_micro, train = mb.pg.pp, mb.pg.pp_rank, len(mb.model.chunks), len(mb.micro), mb.train
    ticks = [interleaved_ticks(pp, r, chunks, num_micro, train) for r in range(pp)]
    slots = interleaved_slots(pp, chunks, num_micro, train)
    tick_at = [dict(zip(slots[r], ticks[r])) for r in range(pp)]  # rank -> {slot: tick}
    prev, nxt = (rank - 1) % pp, (rank + 1) % pp
    inputs: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, micro) -> activation from the previous rank
    grads: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, micro) -> output gradient from the next rank
    for slot in range(max(s[-1] for s in slots) + 1):
        send_next = send_prev = None
        for st in tick_at[rank].get(slot, []):
            if st.kind == "F":
                inp = inputs.pop((st.chunk, st.micro)) if step_source(pp, chunks, rank, st) else None
                out = mb.forward(st.micro, inp, st.chunk)
                send_next = out if step_target(pp, chunks, rank, st) is not None else None
            else:
                grad = grads.pop((st.chunk, st.micro)) if step_source(pp, chunks, rank, st) else None
                in_grad = mb.backward(st.micro, grad, st.chunk)
                send_prev = in_grad if step_target(pp, chunks, rank, st) is not None else None
        # What the neighbours produced for this rank in this slot (at most one forward, one backward each).
        fwd_in = [st for st in tick_at[prev].get(slot, [])
                  if st.kind == "F" and step_target(pp, chunks, prev, st) == rank]
        bwd_in = [st for st in tick_at[nxt].get(slot, [])
                  if st.kind == "B" and step_target(pp, chunks, nxt, st) == rank]
        if send_next is None and send_prev is None and not fwd_in and not bwd_in:
            continue
        from_prev, from_next = mb.exchange(send_next=send_next, send_prev=send_prev, recv_prev=bool(fwd_in),
                                        recv_next=bool(bwd_in), ring=True)
        for st in fwd_in:  # the previous rank's chunk v is this rank's chunk v (rank 0: v + 1)
            inputs[st.chunk + (rank == 0), st.micro] = from_prev.requires_grad_(train)
        for st in bwd_in:  # the next rank's chunk v is this rank's chunk v (last rank: v - 1)
            grads[st.chunk - (rank == pp - 1), st.micro] = from_next
def reduce_step_stats(stats: StepStats, pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig,
                      steps: int = 1) -> dict:
    """Global-batch means of the losses and per-expert load fractions (same on every rank);
    `stats` may sum several steps (a log interval): the means are then over those steps."""
    n_moe = len(mc.all_moe_layers)
    losses = torch.stack([stats.lm_loss, stats.mtp_loss, stats.aux_loss, stats.z_loss])
    packed = torch.cat([losses, stats.dropped, stats.counts.flatten()]).double()
    if pg.world_size > 1:
        # lm: last stage, TP rank 0; aux / z: TP ranks hold shares, stages hold layers; counts likewise
        dist.all_reduce(packed, group=None)
    num_micro = pg.num_microbatches * pg.dp * steps
    lm, mtp = packed[0].item() / num_micro, packed[1].item() / num_micro
    aux = packed[2].item() / (num_micro * n_moe) if n_moe else 0.0
    z = packed[3].item() / (num_micro * n_moe) if n_moe else 0.0
    dropped = packed[4:4 + n_moe]
    counts = packed[4 + n_moe:].view(n_moe, max(mc.num_experts, 1))
    load = {str(layer): (counts[i] / counts[i].sum()).tolist() for i, layer in enumerate(mc.all_moe_layers)}
    result = {"loss": lm + tc.mtp_loss_coef * mtp + tc.router_aux_loss_coef * aux + tc.router_z_loss_coef * z,
              "lm_loss": lm, "aux_loss": aux, "z_loss": z, "expert_load": load}
    if mc.mtp_num_layers:
        result["mtp_loss"] = mtp
    health = {str(layer): load_health(counts[i].tolist(), pg.ep, pg.expert_dp_size, steps)
              for i, layer in enumerate(mc.all_moe_layers)}
    for name in HEALTH_FIELDS:  # {field: {layer: value}}
        if health and name in next(iter(health.values())):
            result[name] = {layer: h[name] for layer, h in health.items()}
    if mc.moe_capacity_factor > 0 and mc.router_type == "topk":
        result["dropped_fraction"] = {str(layer): (dropped[i] / (dropped[i] + counts[i].sum())).item()
                                      for i, layer in enumerate(mc.all_moe_layers)}
    return result


def global_expert_counts(stats: StepStats, pg: ParallelGroups, routed: bool) -> torch.Tensor:
    """(num MoE layers, E) router choices (or computed rows) of the whole global batch, on every rank."""
    counts = (stats.routed if routed else stats.counts).clone()
    if pg.world_size > 1:
        dist.all_reduce(counts, group=None)  # TP ranks hold slices, DP ranks batches, stages layers
    return counts


def set_global_batch_counts(model: MoETransformer, mc: ModelConfig, counts: torch.Tensor) -> None:
    """Give every MoE layer of this stage the f_i of the global batch (global-batch balancing)."""
    for layer, moe in model.moe_layers().items():
        moe.global_counts = counts[mc.all_moe_layers.index(layer)]


def update_expert_bias(model: MoETransformer, mc: ModelConfig, counts: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024): after the step, raise the routing bias
    of under-loaded experts and lower it for over-loaded ones by a fixed amount.

    counts (num MoE layers, E): rows each expert computed in the whole global batch. The bias
    only enters the top-k choice, never the weights, so it needs no gradient."""
    for layer, moe in model.moe_layers().items():
        load = counts[mc.all_moe_layers.index(layer)]
        moe.router.expert_bias += rate * torch.sign(load.mean() - load)


# ======================================================== gradients and optimizer
def bucketed_all_reduce(tensors: list[torch.Tensor], group: Any, bucket_bytes: int = 32 << 20) -> None:
    """Sum tensors over `group` in a few large flat buffers instead of one call per tensor."""
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()

    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()


class OverlappedGradReduce:
    """Sums gradients over `group` in buckets while the backward pass is still running, then scales.

    Buckets hold parameters in reverse order (the order backward finishes them). `arm()` is
    called before the last micro-batch's backward (earlier ones only accumulate); from then on
    each parameter's post-accumulate hook counts it ready, and a full bucket's all-reduce starts
    at once (async), overlapping the backward of the layers below. `finish()` starts what is
    left, waits, and copies the sums back. The result is the same as reducing after backward."""

    def __init__(self, params: list[torch.nn.Parameter], group: Any, size: int, scale: float,
                 bucket_bytes: int = 32 << 20):
        self.group, self.size, self.scale = group, size, scale
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        filled = 0
        for p in reversed(params):
            if filled >= bucket_bytes:
                self.buckets.append([])
                filled = 0
            self.buckets[-1].append(p)
            filled += p.numel() * p.element_size()
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.armed = False
        self.ready: list[int] = []
        self.work: dict[int, tuple[torch.Tensor, Any]] = {}
        for p in params:
            p.register_post_accumulate_grad_hook(self.on_grad_ready)

    def arm(self) -> None:
        self.armed, self.ready, self.work = True, [0] * len(self.buckets), {}

    def on_grad_ready(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        b = self.bucket_of[p]
        self.ready[b] += 1
        if self.ready[b] == len(self.buckets[b]):
            self.launch(b)

    def launch(self, b: int) -> None:
        grads = [p.grad for p in self.buckets[b] if p.grad is not None]
        if self.size == 1 or not grads:
            self.work[b] = (None, None)
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.work[b] = (flat, dist.all_reduce(flat, group=self.group, async_op=True))  # sum over replicas

    def finish(self) -> None:
        for b in range(len(self.buckets)):
            if b not in self.work:  # a bucket whose parameters got no gradient this step
                self.launch(b)
        for b, (flat, work) in self.work.items():
            grads = [p.grad for p in self.buckets[b] if p.grad is not None]
            if work is not None:
                work.wait()
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
            if self.scale != 1.0:  # 1 / DP: nothing to scale in one process
                torch._foreach_mul_(grads, self.scale)
        self.armed = False


# The flat collectives of the distributed optimizer: torch 2.13 renamed them (the old names warn);
# requirements.txt allows torch 2.6, which has only the old names. Same arguments in both.
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ShardedGradReduce(OverlappedGradReduce):
    """OverlappedGradReduce for --use-distributed-optimizer: each bucket is a FlatBucket and is
    reduce-scattered instead of all-reduced, started at the same moments during the last backward,
    so each rank receives the summed gradients of its own shard only (half an all-reduce's traffic).
    `finish()` waits, scales, hands the shard to the bucket's fp32 masters as their gradients and
    frees the full local gradients, which the step no longer needs."""

    def __init__(self, params: list[torch.nn.Parameter], group: Any, size: int, rank: int, scale: float,
                 bucket_bytes: int = 32 << 20):
        super().__init__(params, group, size, scale, bucket_bytes)
        self.flat = [FlatBucket(bucket, group, size, rank) for bucket in self.buckets]

    def launch(self, b: int) -> None:
        fb = self.flat[b]
        flat = fb.flatten([p.grad for p in fb.params])  # (numel,) zeros where a weight has no gradient, and the padding
        if self.size == 1:
            self.work[b] = (flat, None, flat)
            return
        shard = flat.new_empty(fb.shard_numel)
        # the sum over replicas of this rank's shard only; `flat` stays alive until the wait
        self.work[b] = (shard, reduce_scatter_flat(shard, flat, group=self.group, async_op=True), flat)

    def finish(self) -> None:
        for b in range(len(self.buckets)):
            if b not in self.work:  # a bucket whose parameters got no gradient this step
                self.launch(b)
        for b, (shard, work, _) in self.work.items():
            if work is not None:
                work.wait()
            self.flat[b].set_master_grads(shard.mul_(self.scale))
            for p in self.flat[b].params:
                p.grad = None
        self.work, self.armed = {}, False


def build_grad_reducers(model: torch.nn.Module, pg: ParallelGroups,
                        distributed_optimizer: bool = False) -> list[OverlappedGradReduce]:
    """Dense weights averaged over DP; expert weights summed over the ranks holding the same
    experts (their tokens came from every rank of the EP group already), then divided by DP.

    With the distributed optimizer (and DP > 1; at DP 1 no replica shares the state and the
    flag changes nothing) the same groups reduce-scatter flat buckets instead. An embedding copy
    (MTP under PP) gets a bucket of its own: laid out alike on the first and last stage, so the
    two stages' shards of it hold the same elements and can be summed over the embedding group."""
    params = list(model.parameters())
    dense = [p for p in params if not placement(p).expert]
    experts = [p for p in params if placement(p).expert]
    if distributed_optimizer and pg.dp > 1:
        copies = [p for p in dense if placement(p).pipeline_copy]
        dense = [p for p in dense if not placement(p).pipeline_copy]
        reducers = [ShardedGradReduce(ps, pg.dp_group, pg.dp, pg.dp_rank, 1.0 / pg.dp) for ps in (dense, copies) if ps]
        if experts:
            reducers.append(ShardedGradReduce(experts, pg.expert_dp_group, pg.expert_dp_size, pg.expert_dp_rank,
                                              1.0 / pg.dp))
        return reducers
    reducers = [OverlappedGradReduce(dense, pg.dp_group, pg.dp, 1.0 / pg.dp)]
    if experts:
        reducers.append(OverlappedGradReduce(experts, pg.expert_dp_group, pg.expert_dp_size, 1.0 / pg.dp))
    return reducers


def flat_buckets(reducers: list[OverlappedGradReduce]) -> list[FlatBucket]:
    """The distributed optimizer's buckets (none without it)."""
    return [fb for r in reducers if isinstance(r, ShardedGradReduce) for fb in r.flat]


def gradient_pieces(model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The gradients this rank steps with, each beside its weight: the whole gradients, or with the
    distributed optimizer the fp32 gradients of the pieces in this rank's shards."""
    if isinstance(optimizer, DistributedAdamW):
        return [(piece.param, m.grad) for fb in optimizer.buckets for piece, m in zip(fb.pieces, fb.masters)
                if m.grad is not None]
    return [(p, p.grad) for p in model.parameters() if p.grad is not None]


def sync_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pg: ParallelGroups,
                   reducers: list[OverlappedGradReduce]) -> None:
    """Turn each rank's local gradients into the gradient of the global-batch mean loss.

    - dense and expert weights: the reducers' all-reduces (reduce-scatters with the distributed
      optimizer), started during the last backward;
    - router and q/k-norm weights (and under sequence parallelism every RMSNorm weight and the MTP
      modules' eh_proj): also summed over TP (each TP rank saw part of the tokens / heads / positions;
      sums over TP and DP commute, so the order does not matter);
    - MTP under PP: the embedding's two copies, summed over the embedding group. With the distributed
      optimizer, TP peers (same DP rank) own the same shard of identically laid-out buckets, so
      their pieces of these weights line up; so do the two stages' pieces of the embedding, which
      sits alone in its bucket on both (build_grad_reducers)."""
    for reducer in reducers:
        reducer.finish()
    if pg.tp > 1:
        partial = [g for p, g in gradient_pieces(model, optimizer) if placement(p).tp_partial_grad]
        bucketed_all_reduce(partial, pg.tp_group)  # sum partial router / norm grads over TP
    if pg.embedding_group is not None:
        # MTP under PP: the first stage's embedding and the last stage's copy (read by the MTP modules) are one
        # weight; each copy has its own part of the gradient, and both step with the sum, so they stay equal.
        copies = [g for p, g in gradient_pieces(model, optimizer) if placement(p).pipeline_copy]
        bucketed_all_reduce(copies, pg.embedding_group)  # sum the two copies' embedding gradients


def global_grad_norm(grads: list[tuple[torch.nn.Parameter, torch.Tensor]], pg: ParallelGroups, sharded: bool,
                     device: torch.device) -> torch.Tensor:
    """L2 norm of the full model's gradient, each distinct element counted once.

    A rank's squared norms are divided by how many ranks hold the same elements (Placement.replicas),
    then summed over all ranks. With the distributed optimizer (`sharded`) each element of a bucket
    sits in one rank's shard of the group that reduces it (DP, or an expert's replicas), so that
    group's size divides out: only weights replicated over TP are held more than once (TP times),
    and the embedding with MTP under PP, on two stages."""
    by_replicas: dict[int, list[torch.Tensor]] = {}
    for p, g in grads:
        where = placement(p)
        replicas = where.replicas(pg)
        if sharded:
            replicas //= where.reduce_group_size(pg)
        by_replicas.setdefault(replicas, []).append(g)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for replicas, tensors in by_replicas.items():
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).double()  # fused, fp32 even for bf16
        sq += norms.pow(2).sum() / replicas
    if pg.world_size > 1:
        dist.all_reduce(sq, group=None)  # sum over every rank of every stage
    return sq.sqrt()


@torch.no_grad()
def gather_updated_weights(optimizer: DistributedAdamW) -> None:
    """After a step of the distributed optimizer: every rank's updated shard into every rank's weights."""
    for fb in optimizer.buckets:
        shard = optimizer.weight_shard(fb)  # (S,) this rank's updated masters, in the bucket's dtype
        flat = shard
        if fb.size > 1:
            flat = shard.new_empty(fb.numel)
            all_gather_flat(flat, shard, group=fb.group)  # (numel,) every rank's shard of the updated weights
        for p, w in zip(fb.params, fb.views(flat)):
            p.copy_(w)  # rounds to bf16 for bf16 weights


@torch.no_grad()
def gather_for_save(optimizer: DistributedAdamW, pg: ParallelGroups, with_optimizer: bool = True) -> dict:
    """{weight: (its fp32 value, its AdamW state)}, whole, for the weights this rank writes in a checkpoint
    (without `with_optimizer`, for --sample-interval: the weights alone, and an empty state).

    One bucket at a time (the extra memory is a bucket's, not the model's), its group all-gathers
    the shards of the masters and of both moments. A weight is written by the rank of its group
    whose shard holds its first element (of a weight replicated over TP, TP rank 0's copy): each
    is written once, the writing is spread over the group, and the entries are checkpoint.py's
    whole-slice ones, readable with or without the flag, on any layout."""
    gathered = {}
    for fb in optimizer.buckets:
        full = {}
        for key in ("master", "exp_avg", "exp_avg_sq") if with_optimizer else ("master",):
            shard = fb.shard_of(fb.masters, torch.float32) if key == "master" else optimizer.state_shard(fb, key)
            flat = shard
            if fb.size > 1:
                flat = shard.new_empty(fb.numel)
                all_gather_flat(flat, shard, group=fb.group)  # (numel,) every rank's shard of `key`
            full[key] = fb.views(flat)
        for i, p in enumerate(fb.params):
            replicated = placement(p).shard is None
            if fb.owner(p) != fb.rank or (replicated and pg.tp_rank != 0):
                continue
            step = optimizer.step_count(p)
            state = {} if step is None or not with_optimizer else {
                "step": step, "exp_avg": full["exp_avg"][i].cpu().clone(),
                "exp_avg_sq": full["exp_avg_sq"][i].cpu().clone()}
            gathered[p] = (full["master"][i].cpu().clone(), state)
    return gathered


# =================================================================== evaluation
def evaluate(model: MoETransformer, corpus: Corpus, pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig,
             device: torch.device, autocast_dtype: torch.dtype | None) -> float:
    """Mean LM loss (nats per token) over --eval-iters fixed global batches of the val split."""
    model.eval()
    total = 0.0
    global_batch = pg.global_batch
    for i in range(tc.eval_iters):
        x, y = get_batch(corpus.val, tc.seed, 1, i, global_batch, mc.seq_length, corpus.vocab_size)
        stats = run_microbatches(model, local_microbatches(x, y, pg, device), pg, mc, tc, device,
                                 autocast_dtype, train=False)
        total += reduce_step_stats(stats, pg, mc, tc)["lm_loss"]
    model.train()
    return total / tc.eval_iters


def bits_per_byte(corpus: Corpus, loss: float) -> float | None:
    """A loss in nats per token as bits per byte of text, which compares across tokenizers:
    nats / ln 2 x the val split's tokens per byte (byte data: one token per byte). None when the
    data does not say how many bytes its tokens stand for (token files whose meta.json has no "bytes")."""
    if not corpus.val_bytes:
        return None
    return loss / math.log(2) * len(corpus.val) / corpus.val_bytes


# ==================================================================== the step
def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, reducers: list[OverlappedGradReduce],
               micro: list[tuple[torch.Tensor, torch.Tensor]], pg: ParallelGroups, mc: ModelConfig,
               tc: TrainConfig, device: torch.device, autocast_dtype: torch.dtype | None,
               step: int, runner: Callable[..., MicroBatches] = MicroBatches) -> tuple[StepStats, torch.Tensor, bool]:
    """One optimizer step on this rank's micro-batches: what the trainer runs and the benchmarks time.

    Set the learning rate -> (global-batch balancing: route every micro-batch first) ->
    forward and backward of every micro-batch (1F1B) -> gradient all-reduces (reduce-scatters
    with the distributed optimizer) -> global norm -> clip and the optimizer step (AdamW or Muon;
    with the distributed optimizer, then the all-gather of the updated weights), or skip the
    update when the norm is not finite -> expert-bias update.
    Returns this rank's step statistics, the global gradient norm and whether the update was applied.
    `runner`: scripts/bench_pipeline.py passes a MicroBatches that times the pipeline and its p2p waits."""
    for group in optimizer.param_groups:
        group["lr"] = tc.schedule().at(step)
    optimizer.zero_grad(set_to_none=True)
    if mc.router_aux_loss_type == "global-batch" and mc.all_moe_layers:
        # f_i of the whole global batch must be known before any backward: a forward-only pass
        # over every micro-batch routes the tokens first (one extra forward per step).
        pre = run_microbatches(model, micro, pg, mc, tc, device, autocast_dtype, train=False, step=step)
        set_global_batch_counts(model, mc, global_expert_counts(pre, pg, routed=True))
    stats = run_microbatches(model, micro, pg, mc, tc, device, autocast_dtype, train=True, step=step,
                             reducers=reducers, runner=runner)
    sync_gradients(model, optimizer, pg, reducers)
    sharded = isinstance(optimizer, DistributedAdamW)
    grads = gradient_pieces(model, optimizer)
    grad_norm = global_grad_norm(grads, pg, sharded, device)
    # The clip factor's small kernels are queued before the host waits for the norm, so that the
    # GPU does not idle after the wait while the host launches them.
    scale = (tc.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0).float() if tc.grad_clip > 0 else None
    # The norm is summed over all ranks, so every rank takes the same decision.
    applied = bool(torch.isfinite(grad_norm))  # one host sync per step
    if applied:
        clipped_step(optimizer, [g for _, g in grads], scale)
        if sharded:
            gather_updated_weights(optimizer)
        if tc.router_bias_update_rate > 0 and mc.all_moe_layers:
            update_expert_bias(model, mc, global_expert_counts(stats, pg, routed=False), tc.router_bias_update_rate)
    return stats, grad_norm, applied


# ======================================================================== the run
def report_eval_only(model: MoETransformer, corpus: Corpus, pg: ParallelGroups, mc: ModelConfig,
                     tc: TrainConfig, device: torch.device, autocast_dtype: torch.dtype | None, step: int) -> None:
    """--eval-only: validation loss of a checkpoint, as perplexity and bits per byte (any tokenizer:
    nats per token / ln 2 x the val split's tokens per byte of text; byte data has one token per byte)."""
    val_loss = evaluate(model, corpus, pg, mc, tc, device, autocast_dtype)
    if pg.is_main:
        line = f"eval-only: step {step} | val loss {val_loss:.4f} nats/token | perplexity {math.exp(val_loss):.3f}"
        bpb = bits_per_byte(corpus, val_loss)
        if bpb is not None:
            line += f" | {bpb:.4f} bits per byte"
        print(line)
        if tc.metrics_file:
            with open(tc.metrics_file, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": val_loss, **({"val_bpb": bpb} if bpb else {})}) + "\n")


def save(target: ckpt_io.SaveTarget, mc: ModelConfig, tc: TrainConfig, pg: ParallelGroups, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, step: int, skipped: int) -> str:
    """Write a checkpoint of the state after `step` updates into `target` (all ranks call this)."""
    payload = checkpoint_entries(model, optimizer, pg)
    tokenizer = dict(target.tokenizer or {})
    extra = {"tokenizer.json": tokenizer.pop("path")} if "path" in tokenizer else {}  # carried, not pointed to
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": step, "run_id": target.run_id,
            "skipped_steps": skipped, "model": dataclasses.asdict(mc), "train": dataclasses.asdict(tc),
            "layout": {"world_size": pg.world_size, "tp": pg.tp, "pp": pg.pp, "dp": pg.dp, "ep": pg.ep},
            "tokenizer": tokenizer or None,
            "software": software()}  # for the reader: a resume on other threads or torch is allowed
    try:
        return ckpt_io.save_checkpoint(target.root, step, payload, meta, pg.rank, pg.world_size, target.keep_last,
                                       target.owned, extra)
    except ckpt_io.SaveFailed as e:  # every rank alike; the save is atomic, so nothing older is harmed
        fail(e.strerror, pg.is_main)


def checkpoint_entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pg: ParallelGroups,
                       with_optimizer: bool = True) -> dict:
    """This rank's entries of a checkpoint (rank_payload); all ranks call it: the distributed optimizer all-gathers."""
    gathered = gather_for_save(optimizer, pg, with_optimizer) if isinstance(optimizer, DistributedAdamW) else None
    return ckpt_io.rank_payload(model, optimizer, pg, gathered, with_optimizer)


def stop_diverged(model: MoETransformer, optimizer: torch.optim.Optimizer, pg: ParallelGroups, mc: ModelConfig,
                  tc: TrainConfig, target: ckpt_io.SaveTarget | None, step: int, skipped_total: int,
                  bad_in_a_row: int) -> None:
    """Too many non-finite steps in a row: save the last good state (the skipped updates left it
    untouched) and end with exit 2."""
    if target:
        save(target, mc, tc, pg, model, optimizer, step, skipped_total)
    fail(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient norm (last: step {step + 1}); "
         f"lower --lr or raise --router-z-loss-coef, then resume" + (f" from {tc.save}" if tc.save else ""), pg.is_main)


# Dense bf16 peak FLOP/s by a substring of the CUDA device name; the first match wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_model(mc: ModelConfig, tc: TrainConfig, pg: ParallelGroups, device: torch.device,
                autocast_dtype: torch.dtype | None) -> MoETransformer:
    """This rank's slice of the model, with the expert kernel, recomputation and compilation chosen."""
    model = MoETransformer(mc, model_parallel_for(pg, mc), seed=tc.seed).to(device)
    dtype = resolve_param_dtype(tc, device)
    for name, p in model.named_parameters():
        # Routers stay fp32: small score differences decide the expert choice (they compute in fp32).
        if not name.endswith("router.weight"):
            p.data = p.data.to(dtype)  # weights only: buffers (expert_bias, rotary tables) stay fp32
    grouped = can_use_grouped_mm(device, mc, autocast_dtype or torch.float32)
    for module in model.modules():
        if hasattr(module, "use_grouped_mm"):
            module.use_grouped_mm = grouped
    model.recompute = tc.recompute
    if tc.compile:
        for block in [*model.layers.values(), *(module.block for module in model.mtp)]:
            block.compile()  # each block on its own: pipeline stages and checkpointing stay eager
    return model


def resume_from(resume: ckpt_io.Checkpoint, model: MoETransformer, optimizer: torch.optim.Optimizer,
                pg: ParallelGroups, tc: TrainConfig) -> tuple[int, int]:
    """Load this rank's slices of a checkpoint; return (step, skipped steps) and say what resumed."""
    ckpt_io.load_into(resume, model, optimizer)
    step, skipped = resume.meta["step"], resume.meta.get("skipped_steps", 0)
    saved = resume.meta["layout"]
    if saved["world_size"] == pg.world_size and saved["tp"] == pg.tp and saved["pp"] == pg.pp:
        torch.set_rng_state(resume.rng[pg.rank]["torch"])
    if pg.is_main:
        print(f"{'evaluating' if tc.eval_only else 'resumed from'} {resume.path} at step {step} (saved on world "
              f"{saved['world_size']} = PP {saved['pp']} x DP {saved['dp']} x TP {saved['tp']}, EP {saved['ep']})")
        later = [d for d in ckpt_io.list_checkpoints(tc.save) if d > ckpt_io.step_dir_name(step)] if tc.save else []
        if later:
            print(f"note: {tc.save} also holds later checkpoints {later[:3]}{'...' if len(later) > 3 else ''} "
                  f"from before this rewind; they are kept, and `latest` will name this run's saves")
    return step, skipped


@dataclass
class Interval:
    """The steps since the last log line: their summed statistics, gradient norms and timing."""

    stats: StepStats | None = None
    steps: int = 0
    grad_norm: torch.Tensor | float = 0.0  # summed on the device: no host sync per step
    seconds: float = 0.0  # wall time of the timed steps (evaluation and saving left out)
    timed_steps: int = 0

    def add(self, stats: StepStats, grad_norm: torch.Tensor, seconds: float | None) -> None:
        if self.stats is None:
            self.stats = stats
        else:
            self.stats.add(stats)
        self.steps += 1
        self.grad_norm = self.grad_norm + grad_norm
        if seconds is not None:
            self.seconds += seconds
            self.timed_steps += 1


def train_loop(model: MoETransformer, optimizer: torch.optim.Optimizer, reducers: list[OverlappedGradReduce],
               corpus: Corpus, pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig, device: torch.device,
               autocast_dtype: torch.dtype | None, start_step: int, skipped_total: int,
               target: ckpt_io.SaveTarget | None) -> None:
    """Steps start_step .. --max-steps: batches, train_step, logging, evaluation, checkpoints (into `target`),
    summary."""
    is_main = pg.is_main
    global_batch = pg.global_batch
    peak_flops = peak_bf16_flops(device)
    bar = None
    if is_main and tc.progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
    say = (bar.write if bar else print) if is_main else (lambda line: None)
    log = None
    if is_main:  # model FLOPs of the whole step over the peak of all GPUs
        log = RunLog(tc.metrics_file, tc.tensorboard, start_step, say, lambda tokens_per_sec: (
            tokens_per_sec * mc.flops_per_token() / (peak_flops * pg.world_size) if peak_flops else None))
    sampler = TrainingSampler(mc, tc.data, tc.sample_prompt, tc.sample_tokens, pg.rank, pg.world_size) \
        if tc.sample_interval else None
    stop = StopRequest(tc.dist_timeout)
    stop.install()
    start_time = time.time()
    val_loss, last, bad_in_a_row, done, interval = None, {}, 0, start_step, Interval()
    try:
        for step in range(start_step, tc.max_steps):
            t0 = time.time()
            x, y = get_batch(corpus.train, tc.seed, 0, step, global_batch, mc.seq_length, corpus.vocab_size)
            micro = local_microbatches(x, y, pg, device)
            stats, grad_norm, applied = train_step(model, optimizer, reducers, micro, pg, mc, tc, device,
                                                   autocast_dtype, step)
            done = step + 1
            bad_in_a_row = 0 if applied else bad_in_a_row + 1
            skipped_total += 0 if applied else 1
            if not applied:
                say(f"Step {done} | non-finite gradient norm: update skipped "
                    f"({bad_in_a_row} in a row, {skipped_total} in all)")
                if bad_in_a_row >= tc.max_skipped_steps:
                    stop_diverged(model, optimizer, pg, mc, tc, target, step, skipped_total, bad_in_a_row)
            logging = done % tc.log_interval == 0 or done == tc.max_steps
            if logging and device.type == "cuda":
                torch.cuda.synchronize()  # the step's kernels finish inside its timing
            # The first step after a start carries allocation and compilation: untimed unless alone.
            first_of_many = step == start_step and not logging
            interval.add(stats, grad_norm, None if first_of_many else time.time() - t0)
            if logging:
                last = reduce_step_stats(interval.stats, pg, mc, tc, steps=interval.steps)
                grad_norm_mean = float(interval.grad_norm) / interval.steps
                samples_per_sec = interval.timed_steps * global_batch / max(interval.seconds, 1e-9)
                if log:
                    log.train(done, last, tc.schedule().at(step), grad_norm_mean, samples_per_sec,
                              samples_per_sec * mc.seq_length, skipped_total)
                interval = Interval()
            if tc.eval_interval > 0 and (done % tc.eval_interval == 0 or done == tc.max_steps):
                val_loss = evaluate(model, corpus, pg, mc, tc, device, autocast_dtype)
                if log:
                    log.eval(done, val_loss, bits_per_byte(corpus, val_loss))
            if sampler and (done % tc.sample_interval == 0 or done == tc.max_steps):  # every rank: rank 0 decodes
                say(sampler.sample(checkpoint_entries(model, optimizer, pg, with_optimizer=False)["params"], done))
            stopping = stop.agreed(pg.world_size)
            if target and ((tc.save_interval > 0 and done % tc.save_interval == 0) or done == tc.max_steps
                           or stopping):
                say(f"Step {done} | saved {save(target, mc, tc, pg, model, optimizer, done, skipped_total)}")
            if bar:
                bar.update(1)
            if stopping:
                say(f"stopped by {signal.Signals(stop.signum or signal.SIGTERM).name} after step {done}"
                    + (f"; resume with the same command (it continues from {tc.save})" if tc.save
                       else " (no --save: nothing kept)"))
                break
    finally:
        stop.restore()
        if bar:
            bar.close()
        if log:
            log.close()

    summarise_run(pg, mc, tc, corpus, device, done - start_step, time.time() - start_time, last, val_loss)


def summarise_run(pg: ParallelGroups, mc: ModelConfig, tc: TrainConfig, corpus: Corpus, device: torch.device,
                  steps: int, seconds: float, last: dict, val_loss: float | None) -> None:
    """The end of a run on rank 0: tokens and time, final losses against the unigram entropy, expert
    load, every rank's peak memory, where the checkpoints and metrics are."""
    peak = torch.tensor([peak_memory_mib(device)], device=device)
    if pg.world_size > 1:
        peaks = [torch.zeros_like(peak) for _ in range(pg.world_size)]
        dist.all_gather(peaks, peak, group=None)  # every rank's peak memory, for the summary
        peak = torch.cat(peaks)
    if pg.is_main:
        print_run_summary(steps, steps * pg.global_batch * mc.seq_length, seconds, last, val_loss,
                          unigram_entropy(corpus.val, mc.vocab_size), peak.tolist(),
                          "CUDA allocated" if device.type == "cuda" else "resident")
        if tc.save:
            print(f"checkpoints: {tc.save} (latest: {ckpt_io.read_latest(tc.save)})")
        if tc.metrics_file:
            print(f"metrics: {tc.metrics_file}")


def main(argv: list[str] | None = None) -> None:
    """One run: start-up (launch.py) -> distributed setup -> model and optimizer -> training -> teardown."""
    # ------------------------------------------- start-up: nothing collective yet
    mc, tc, given = parse_config(argv)
    try:  # set by torchrun (or by hand for a multi-node launch without it)
        rank, world_size, local_rank = launch_ranks()
    except ConfigError as e:
        fail(str(e), True)
    if tc.dry_run:  # the plan of a launch, printed by one process: nothing runs
        dry_run(mc, tc, tc.world_size or world_size)
        return
    inputs, error = None, None
    try:
        inputs = prepare_inputs(mc, tc, given, rank, world_size, local_rank)
    except ConfigError as e:
        if not e.local:
            fail(str(e), rank == 0)  # flags and layout fail alike on every rank: no peer needed
        error = str(e)  # this rank's files or machine: settled with the others below

    # ---------------------------------------------------- distributed setup
    if world_size > 1:
        init_distributed(tc, rank, world_size, error)
    try:
        fail_together(error, rank, world_size, run_fingerprint(inputs))  # all ranks passed and agree, or all exit 2
        pg = build_process_groups(inputs.layout, embedding_groups=inputs.mc.mtp_num_layers > 0,
                                  timeout=timedelta(seconds=tc.dist_timeout))

        # ------------------------------------------ model, optimizer, training
        run(inputs, pg, local_rank)
    except (dist.DistError, RuntimeError) as e:
        if world_size == 1 or not is_peer_failure(e):
            raise
        lost_peer(f"a collective or pipeline exchange waited more than --dist-timeout {tc.dist_timeout:g} s or "
                  f"lost its peer", e, rank)
    finally:
        if inputs is not None and inputs.save_lock:
            inputs.save_lock.close()
    if world_size > 1:
        dist.destroy_process_group()


def init_distributed(tc: TrainConfig, rank: int, world_size: int, error: str | None) -> None:
    """The default process group: gloo for CPU tensors (the start-up agreement, stop flags), NCCL for
    CUDA tensors; a rendezvous that fails or times out ends this rank with one line naming it."""
    backend = "cpu:gloo,cuda:nccl" if uses_cuda(tc) and torch.cuda.is_available() else "gloo"
    timeout = tc.dist_timeout if error is None else 300.0  # the flag itself may be what is wrong
    try:
        check_master_env(world_size)
    except ConfigError as e:
        fail(str(e), True)
    try:
        init_process_group(backend, rank, world_size, timedelta(seconds=timeout))
    except (dist.DistError, RuntimeError, ValueError) as e:  # the store's timeout, a refused connection
        lost_peer(f"not every rank joined the rendezvous at {os.environ.get('MASTER_ADDR')}:"
                  f"{os.environ.get('MASTER_PORT')} within {timeout:g} s", e, rank)


def is_peer_failure(e: Exception) -> bool:
    """A collective that timed out or whose peer vanished (gloo's and NCCL's words), not a bug of ours."""
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ("timed out", "timeout", "connection closed",
                                                                      "connection reset", "broken pipe"))


def lost_peer(what: str, e: Exception, rank: int) -> None:
    """Another rank is stuck or gone: this rank says so on one line and ends at once, without the
    process group's teardown (which would wait on that rank again). Nothing half-written is left
    as a checkpoint: a save is renamed into place only after every rank has written."""
    print(f"error: rank {rank}: {what}: another rank is stuck or missing ({str(e).splitlines()[0][:200]}); "
          f"see the other ranks' output", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def run(inputs: RunInputs, pg: ParallelGroups, local_rank: int) -> None:
    """Model, optimizer and checkpoint, then training (or evaluation) to the end."""
    mc, tc, corpus, resume = inputs.mc, inputs.tc, inputs.corpus, inputs.resume
    device = resolve_device(tc, local_rank)
    autocast_dtype = resolve_autocast(tc, device)
    if pg.is_main:
        print_banner(inputs, device, autocast_dtype)
    model = build_model(mc, tc, pg, device, autocast_dtype)
    reducers = build_grad_reducers(model, pg, tc.use_distributed_optimizer)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, kind=tc.optimizer, buckets=flat_buckets(reducers))
    start_step, skipped, error = 0, 0, None
    if resume:
        try:  # tensors of another model fail here, on every rank alike
            start_step, skipped = resume_from(resume, model, optimizer, pg, tc)
        except ckpt_io.CheckpointError as e:
            error = str(e)
        fail_together(error, pg.rank, pg.world_size)
        inputs.resume = resume = None  # free the whole checkpoint's tensors
    try:
        if tc.eval_only:
            report_eval_only(model, corpus, pg, mc, tc, device, autocast_dtype, start_step)
        elif start_step >= tc.max_steps:
            if pg.is_main:
                print(f"nothing to do: the checkpoint is at step {start_step} and --max-steps is {tc.max_steps}; "
                      f"raise --max-steps to train on")
        else:
            train_loop(model, optimizer, reducers, corpus, pg, mc, tc, device, autocast_dtype, start_step, skipped,
                       inputs.target)
    except DataError as e:  # a token file with ids past the vocabulary, found by a batch: every rank alike
        fail(str(e), pg.is_main)


if __name__ == "__main__":
    main()
