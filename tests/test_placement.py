"""The Layout and the placement record of every weight, against the ranks that really hold it.

Each rank's slice of the model is built as the trainer builds it (no process group is needed to
build one) and initialised layout-free, so equal weights on two ranks are equal tensors. Counting
the ranks that hold equal values of a weight is the reference that Placement.replicas (the
gradient norm's rule), Placement.written_by (the checkpoint's rule) and Layout's coordinates
(the process groups' rule) must agree with."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from moe_layers import ModelConfig, MoETransformer
from parallel_layers import Layout, ModelParallel, placement

LAYOUTS = {  # name: (Layout, model overrides)
    "tp2_dp2_pp2_ep2": (Layout(world_size=8, tp=2, pp=2, ep=2), {}),
    "tp2_dp2_ep4": (Layout(world_size=4, tp=2, ep=4), {}),
    "dp4_ep2_pp2_mtp": (Layout(world_size=8, pp=2, ep=2), dict(mtp_num_layers=1)),
    "tp2_pp2_interleaved_sp": (Layout(world_size=4, tp=2, pp=2, ep=1, sequence_parallel=True, layers_per_chunk=1),
                               dict(num_shared_experts=1)),
}


def config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                                 ffn_hidden_size=64, moe_ffn_hidden_size=16, num_experts=4, num_experts_per_token=2,
                                 seq_length=16, moe_layer_interval=2), **kw})


def rank_model(mc: ModelConfig, layout: Layout) -> MoETransformer:
    """This rank's slice of the model, as minimal_pretrain.model_parallel_for builds it."""
    par = ModelParallel(tp_rank=layout.tp_rank, tp_size=layout.tp, ep_rank=layout.ep_rank, ep_size=layout.ep,
                        first_stage=layout.first_stage, last_stage=layout.last_stage,
                        chunks=tuple(layout.chunks(mc.num_layers)), sequence_parallel=layout.sequence_parallel)
    return MoETransformer(mc, par, seed=3)


def holdings(mc: ModelConfig, layout: Layout) -> dict[tuple[str, str], list[tuple[int, torch.nn.Parameter]]]:
    """(weight name, hash of its values) -> [(rank, parameter)] of every rank holding those values."""
    held: dict[tuple[str, str], list[tuple[int, torch.nn.Parameter]]] = {}
    for rank in range(layout.world_size):
        for name, p in rank_model(mc, dataclasses.replace(layout, rank=rank)).named_parameters():
            # the embedding's copy on the last stage (MTP under PP) has the first stage's name and values
            key = (name, hashlib.sha1(p.detach().numpy().tobytes()).hexdigest())
            held.setdefault(key, []).append((rank, p))
    return held


@pytest.mark.parametrize("name", LAYOUTS)
def test_replicas_and_writers_match_the_ranks_that_hold_each_slice(name):
    """Equal values under one name are one slice of one weight (names are global, initial values
    random or all ones per norm): the ranks holding it are its replicas, and exactly one writes it."""
    layout, kw = LAYOUTS[name]
    held = holdings(config(**kw), layout)
    for (weight, _), holders in held.items():
        ranks = [r for r, _ in holders]
        for rank, p in holders:
            assert placement(p).replicas(dataclasses.replace(layout, rank=rank)) == len(ranks), (weight, ranks)
        writers = [r for r, p in holders if placement(p).written_by(dataclasses.replace(layout, rank=r))]
        assert len(writers) == 1, (weight, ranks, writers)
    # every weight of the full model is held somewhere
    assert {w for w, _ in held} == {n for n, _ in MoETransformer(config(**kw)).named_parameters()}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_coordinates_follow_the_rank_order(name):
    """Global rank = (pp_rank * DP + dp_rank) * TP + tp_rank; EP groups are consecutive ranks of a stage."""
    layout, _ = LAYOUTS[name]
    seen = set()
    for rank in range(layout.world_size):
        at = dataclasses.replace(layout, rank=rank)
        assert (at.pp_rank * layout.dp + at.dp_rank) * layout.tp + at.tp_rank == rank
        in_stage = rank - at.pp_rank * layout.dp * layout.tp
        assert (at.ep_rank, at.expert_dp_rank) == (in_stage % layout.ep, in_stage // layout.ep)
        seen.add((at.pp_rank, at.dp_rank, at.tp_rank))
    assert len(seen) == layout.world_size
    assert layout.global_batch == layout.micro_batch_size * layout.num_microbatches * layout.dp


def test_every_weight_of_one_process_is_written_once():
    """One process: every weight whole, written, held once."""
    mc = config(mtp_num_layers=1, num_shared_experts=1)
    model = rank_model(mc, Layout())
    for name, p in model.named_parameters():
        where = placement(p)
        assert where.full_shape == tuple(p.shape), name
        assert where.replicas(Layout()) == 1 and where.written_by(Layout()), name
