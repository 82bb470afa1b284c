"""Interleaved 1F1B (virtual pipeline stages): Megatron's order, every step once after its inputs,
parity with one process, resharding onto plain layouts, refusals."""

from __future__ import annotations

import shutil
import time

import pytest

import launch
import memory
import minimal_pretrain as mp
import parallel_layers
from moe_layers import MoETransformer
from helpers import (_assert_continues_like, assert_clean_refusal, assert_same_training, interrupted_at_3, parity_run,
                     refusal_in_process, run_cli, run_for_resume, tiny_config, TINY_FLAGS)


# ---- interleaved 1F1B: virtual pipeline stages (issue 15)
def schedule_text(pp: int, rank: int, chunks: int, micro: int) -> str:
    """A rank's interleaved order as `F0.1` (forward of chunk 0 on micro-batch 1), ticks split by ` | `."""
    return " | ".join(" ".join(f"{s.kind}{s.chunk}.{s.micro}" for s in tick)
                      for tick in mp.interleaved_ticks(pp, rank, chunks, micro))


def test_interleaved_schedule_is_megatrons_order_on_pp2_and_pp4():
    # Written out by hand from Megatron-LM's rules: groups of PP micro-batches go through chunk 0,
    # then chunk 1; backwards take the chunks in reverse; warm-up (PP - rank - 1) * 2 + (V - 1) * PP.
    assert schedule_text(2, 0, 2, 4) == ("F0.0 | F0.1 | F1.0 | F1.1 | F0.2 B1.0 | F0.3 B1.1 | F1.2 B0.0 | "
                                         "F1.3 B0.1 | B1.2 | B1.3 | B0.2 | B0.3")
    assert schedule_text(2, 1, 2, 4) == ("F0.0 | F0.1 | F1.0 B1.0 | F1.1 B1.1 | F0.2 B0.0 | F0.3 B0.1 | "
                                         "F1.2 B1.2 | F1.3 B1.3 | B0.2 | B0.3")
    # Narayanan et al. 2021, fig. 4: 4 devices, 8 micro-batches, 2 chunks per device.
    assert schedule_text(4, 0, 2, 8) == ("F0.0 | F0.1 | F0.2 | F0.3 | F1.0 | F1.1 | F1.2 | F1.3 | F0.4 | F0.5 | "
                                         "F0.6 B1.0 | F0.7 B1.1 | F1.4 B1.2 | F1.5 B1.3 | F1.6 B0.0 | F1.7 B0.1 | "
                                         "B0.2 | B0.3 | B1.4 | B1.5 | B1.6 | B1.7 | B0.4 | B0.5 | B0.6 | B0.7")
    assert schedule_text(4, 3, 2, 8) == ("F0.0 | F0.1 | F0.2 | F0.3 | F1.0 B1.0 | F1.1 B1.1 | F1.2 B1.2 | "
                                         "F1.3 B1.3 | F0.4 B0.0 | F0.5 B0.1 | F0.6 B0.2 | F0.7 B0.3 | F1.4 B1.4 | "
                                         "F1.5 B1.5 | F1.6 B1.6 | F1.7 B1.7 | B0.4 | B0.5 | B0.6 | B0.7")
    # M == PP: every forward first (Megatron's all-warm-up case)
    assert schedule_text(2, 1, 2, 2) == "F0.0 | F0.1 | F1.0 | F1.1 | B1.0 | B1.1 | B0.0 | B0.1"
    # Megatron's layer assignment: rank p holds virtual stages p, p + PP, ...
    assert parallel_layers.chunk_layers(8, 2, 0, 2) == [(0, 2), (4, 6)] and parallel_layers.chunk_layers(8, 4, 3, 1) == [(3, 4), (7, 8)]
    assert parallel_layers.chunk_layers(6, 2, 1) == [(3, 6)]  # no interleaving: the stage's one chunk


@pytest.mark.parametrize("pp,chunks,micro", [(2, 2, 2), (2, 2, 4), (2, 3, 6), (3, 2, 6), (4, 2, 4), (4, 2, 8),
                                             (4, 3, 12)])
def test_interleaved_schedule_runs_every_step_once_after_its_inputs(pp, chunks, micro):
    for train in (True, False):
        slots = mp.interleaved_slots(pp, chunks, micro, train)
        when = {}  # (rank, kind, chunk, micro) -> (slot, place in its tick)
        for rank in range(pp):
            ticks = mp.interleaved_ticks(pp, rank, chunks, micro, train)
            assert len(slots[rank]) == len(ticks) and slots[rank] == sorted(set(slots[rank]))
            for slot, tick in zip(slots[rank], ticks):
                for place, s in enumerate(tick):
                    assert (rank, *s) not in when
                    when[rank, *s] = (slot, place)
            kinds = ("F", "B") if train else ("F",)
            assert {k[1:] for k in when if k[0] == rank} == {(k, c, m) for k in kinds for c in range(chunks)
                                                             for m in range(micro)}
        # Virtual stage j = chunk * PP + rank feeds j + 1 forward and j - 1 backward in a later slot
        # (what a slot produces is exchanged at its end); each rank backwards what it forwarded.
        stage = {(c * pp + r): (r, c) for r in range(pp) for c in range(chunks)}
        for m in range(micro):
            for j in range(1, pp * chunks):
                (r0, c0), (r1, c1) = stage[j - 1], stage[j]
                assert when[r0, "F", c0, m][0] < when[r1, "F", c1, m][0]
                if train:
                    assert when[r1, "B", c1, m][0] < when[r0, "B", c0, m][0]
            for j in range(pp * chunks if train else 0):
                assert when[stage[j][0], "F", stage[j][1], m] < when[stage[j][0], "B", stage[j][1], m]


@pytest.fixture(scope="module")
def interleaved_references(tmp_path_factory):
    """One-process references with the interleaved runs' model flags (8 layers; 8 or 16 sequences a step)."""
    tmp = tmp_path_factory.mktemp("interleaved_one_process")
    return {"layers8": parity_run(tmp, "layers8", 1, [], 4, ["--num-layers", "8"]),
            "layers8_interval3": parity_run(tmp, "layers8_interval3", 1, [], 8,
                                            ["--num-layers", "8", "--moe-layer-interval", "3"])}


# name: (ranks, layout flags, micro-batches, reference, extra model flags)
INTERLEAVED_LAYOUTS = {
    "pp2_2chunks_of_2": (2, ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "2"], 4,
                         "layers8", ["--num-layers", "8"]),
    "pp4_2chunks_all_warmup": (4, ["--pipeline-parallel-size", "4", "--num-layers-per-virtual-stage", "1"], 4,
                               "layers8", ["--num-layers", "8"]),
    # DP2: the ring's neighbours are a stage apart (2 ranks); 2 micro-batches per DP rank = PP
    "dp2_pp2_2chunks": (4, ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "2"], 2,
                        "layers8", ["--num-layers", "8"]),
    # MoE layers 2 and 5: chunks 1, 6 | 2, 7 hold one each; ranks 0 and 3 none at all
    "pp4_2chunks_moe_interval3": (4, ["--pipeline-parallel-size", "4", "--num-layers-per-virtual-stage", "1"], 8,
                                  "layers8_interval3", ["--num-layers", "8", "--moe-layer-interval", "3"]),
}


@pytest.mark.parametrize("name", list(INTERLEAVED_LAYOUTS))
def test_interleaved_pipeline_matches_one_process(name, interleaved_references, tmp_path):
    nproc, layout, micro, ref, extra = INTERLEAVED_LAYOUTS[name]
    worst = assert_same_training(interleaved_references[ref], parity_run(tmp_path, name, nproc, layout, micro, extra))
    print(f"{name}: max relative loss difference {worst:.2e}")


INTERLEAVED_PP2 = ["--num-layers", "8", "--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "2"]


@pytest.fixture(scope="module")
def interleaved_full_run(tmp_path_factory):
    """A 6-step PP2 interleaved run (2 chunks of 2 layers per rank), checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("interleaved_full_run")
    return tmp, run_for_resume(tmp, "interleaved", 2, INTERLEAVED_PP2, 4)


@pytest.mark.parametrize("target", ["one_process", "pp2_plain"])
def test_interleaved_checkpoint_reshards_onto_plain_layouts(interleaved_full_run, tmp_path, target):
    tmp, full = interleaved_full_run
    shutil.copytree(tmp / "interleaved", tmp_path / "ck")
    nproc, layout = {"one_process": (1, ["--num-layers", "8"]),
                     "pp2_plain": (2, ["--num-layers", "8", "--pipeline-parallel-size", "2"])}[target]
    resumed = run_for_resume(tmp_path, "resumed", nproc, layout, 4, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(full, resumed)
    print(f"interleaved -> {target}: max relative loss difference {worst:.2e}")


# name: (world size, flags, words the error line must hold)
BAD_INTERLEAVED = {
    "no_pipeline": (2, ["--num-layers-per-virtual-stage", "1"], "--pipeline-parallel-size > 1"),
    "layers_vs_chunks": (2, ["--pipeline-parallel-size", "2", "--num-layers", "6",
                             "--num-layers-per-virtual-stage", "2"], "must divide --num-layers (6)"),
    "microbatches_vs_pp": (4, ["--pipeline-parallel-size", "4", "--num-layers", "8", "--num-microbatches", "6",
                               "--num-layers-per-virtual-stage", "1"], "multiple of 4"),
    "negative": (2, ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "-1"], ">= 0"),
}


@pytest.mark.parametrize("name", list(BAD_INTERLEAVED))
def test_invalid_interleaving_exits_2_before_any_collective(name, capsys, monkeypatch):
    """Rank 0 of a would-be world fails alone, at once: validation needs no peer (in-process; the first
    case also as a real process)."""
    world, flags, words = BAD_INTERLEAVED[name]
    argv = TINY_FLAGS + ["--max-steps", "2", "--num-microbatches", "4"] + flags
    start = time.time()
    assert words in refusal_in_process(argv, capsys, monkeypatch, world)
    assert time.time() - start < 30
    if name == "no_pipeline":
        r = run_cli(argv, timeout=60, env={"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"})
        assert_clean_refusal(r, words)


def test_interleaved_layout_and_dry_run_show_each_ranks_chunks():
    r = run_cli(["--dry-run", "--world-size", "4", "--num-layers", "8", "--pipeline-parallel-size", "2",
                 "--num-layers-per-virtual-stage", "2", "--num-microbatches", "4", "--hidden-size", "32",
                 "--num-attention-heads", "4", "--num-kv-heads", "2", "--num-experts", "4"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "stage 0 (ranks 0-1): chunks 0-1, 4-5 + embedding" in r.stdout
    assert "stage 1 (ranks 2-3): chunks 2-3, 6-7 + LM head" in r.stdout
    # Parameters each rank builds: the sum over its chunks, counted by hand from the layer formula.
    mc = tiny_config(num_layers=8, hidden_size=32, num_experts=4)
    tc = launch.TrainConfig(pipeline_parallel_size=2, num_layers_per_virtual_stage=2, num_microbatches=4)
    whole = {name: p.numel() for name, p in MoETransformer(mc).named_parameters()}
    for stage, layers in ((0, (0, 1, 4, 5)), (1, (2, 3, 6, 7))):
        dense, experts = memory.built_params(mc, launch.resolve_layout(mc, tc, 4), stage)
        want = sum(n for name, n in whole.items() if name.startswith(tuple(f"layers.{i}." for i in layers))
                   or name.startswith("embed_tokens." if stage == 0 else ("norm.", "lm_head.")))
        assert dense + experts == want == memory.params_per_stage(mc, 1, 2, 1, layers_per_chunk=2)[stage]
    lines = launch.describe_layout(launch.resolve_layout(mc, tc, 4), mc).split("\n")
    assert lines[1] == "  rank 0: stage 0 chunks 0-1, 4-5 | dp 0 | tp 0/1 | experts 0-3"
    assert lines[4] == "  rank 3: stage 1 chunks 2-3, 6-7 | dp 1 | tp 0/1 | experts 0-3"
