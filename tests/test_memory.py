"""Counting: the memory planner and --dry-run against built models, the activation estimate against
what autograd keeps, scalable checkpoint loading, the FLOPs formula."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time

import pytest
import torch

import checkpoint as ckpt_io
import launch
import memory
import minimal_pretrain as mp
import parallel_layers
from moe_layers import ModelConfig, MoETransformer
from parallel_layers import Layout, ModelParallel, placement, stage_layers
from helpers import tiny_config


def test_flops_formula_counts_the_active_parameters_of_a_built_model():
    cfg = tiny_config(num_layers=3, moe_layer_interval=2, num_experts=4, num_experts_per_token=2)
    model = MoETransformer(cfg)
    by_hand = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        by_hand += p.numel() * (2 / 4 if "experts" in name else 1.0)
    assert cfg.active_params_per_token() == by_hand
    assert cfg.flops_per_token() == 6 * by_hand + 12 * 3 * 32 * 16


# ---- memory planner and scalable loading (issue 11) ----

PLAN_LAYOUTS = {  # name -> (world size, flags)
    "one": (1, []),
    "tp2": (2, ["--tensor-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-parallel-size", "2", "--num-microbatches", "2"]),
    "ep2_over_dp2": (2, ["--expert-parallel-size", "2"]),
    "tp2_pp2_ep4_shared": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                               "--expert-parallel-size", "4", "--num-microbatches", "2", "--num-shared-experts", "1"]),
}


PLAN_MODEL = ["--hidden-size", "32", "--num-layers", "3", "--num-attention-heads", "4", "--num-kv-heads", "2",
              "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "24", "--num-experts", "4",
              "--moe-layer-interval", "2", "--vocab-size", "64", "--seq-length", "16", "--micro-batch-size", "2"]


@pytest.mark.parametrize("name", list(PLAN_LAYOUTS))
def test_dry_run_counts_the_parameters_of_every_rank_built_on_the_cpu(name):
    world, flags = PLAN_LAYOUTS[name]
    mc, tc, _ = launch.parse_config(PLAN_MODEL + flags)
    tp, pp = tc.tensor_parallel_size, tc.pipeline_parallel_size
    ep = tc.expert_parallel_size or tp
    plans = memory.plan_stages(mc, launch.resolve_layout(mc, tc, world), bf16=False, grouped=False)
    formula = memory.params_per_stage(mc, tp, pp, ep)
    for rank in range(world):  # every rank, not only the one the plan builds for its stage
        stage, in_stage = divmod(rank, world // pp)
        start, end = stage_layers(mc.num_layers, pp, stage)
        par = ModelParallel(tp_rank=in_stage % tp, tp_size=tp, ep_rank=in_stage % ep, ep_size=ep, layer_start=start,
                            layer_end=end, first_stage=stage == 0, last_stage=stage == pp - 1)
        model = MoETransformer(mc, par)
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts.w_" in n)
        assert plans[stage].expert_params == experts, (name, rank)
        assert plans[stage].dense_params + experts == sum(p.numel() for p in model.parameters()) == formula[stage]


def test_dry_run_prints_the_plan_and_bad_layouts_exit_2_as_a_launch(capsys):
    mp.main(PLAN_MODEL + PLAN_LAYOUTS["tp2_pp2_ep4_shared"][1] + ["--dry-run", "--world-size", "8"])
    out = capsys.readouterr().out
    assert "world 8 = PP 2 x DP 2 x TP 2, EP 4" in out and out.count("distributed optimizer") >= 2
    assert "stage 0 (ranks 0-3)" in out and "stage 1 (ranks 4-7)" in out
    for flags, words in ((["--dry-run", "--world-size", "6", "--tensor-parallel-size", "4"], "world size 6"),
                         (["--dry-run", "--world-size", "4", "--expert-parallel-size", "3"], "--expert-parallel-size"),
                         (["--world-size", "4"], "--dry-run")):
        with pytest.raises(SystemExit) as stop:
            mp.main(PLAN_MODEL + flags)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert stop.value.code == 2 and len(errors) == 1 and words in errors[0], err


def test_dry_run_plans_a_100b_model_in_seconds(capsys):
    flags = ["--hidden-size", "7168", "--num-layers", "32", "--num-attention-heads", "56", "--num-kv-heads", "8",
             "--ffn-hidden-size", "18432", "--moe-ffn-hidden-size", "2048", "--num-experts", "80",
             "--num-experts-per-token", "8", "--vocab-size", "129280", "--seq-length", "4096",
             "--micro-batch-size", "1", "--num-microbatches", "16", "--tensor-parallel-size", "2",
             "--pipeline-parallel-size", "8", "--expert-parallel-size", "16", "--dry-run", "--world-size", "128"]
    start = time.time()
    mp.main(flags)
    assert time.time() - start < 60  # about 3 s alone on 2 cores; the suite shares them
    out = capsys.readouterr().out
    mc, tc, _ = launch.parse_config(flags)
    total = sum(memory.params_per_stage(mc, 1, 1, 1))
    assert total > 100e9 and f"model: {total:,} parameters" in out


def saved_activation_bytes(mc: ModelConfig, batch: int, recompute: bool, grouped: bool = False) -> int:
    """Bytes autograd keeps for backward after one micro-batch's forward and loss, weights left out:
    every tensor the saved-tensor hook sees, each storage once (an independent measurement)."""
    model = MoETransformer(mc, seed=0)
    model.recompute = recompute
    for layer in model.moe_layers().values():
        layer.experts.use_grouped_mm = grouped  # torch._grouped_mm runs fp32 on the CPU too
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, mc.vocab_size, (batch, mc.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, mtp_targets=x if mc.mtp_num_layers else None, head=False)  # as the trainer runs it
        loss = parallel_layers.lm_head_cross_entropy(out.output, model.lm_head, x, model.par)
        loss = loss + mp.mtp_loss(out.mtp_logits, x, model.par)
        (loss + out.aux_loss + out.z_loss).backward()
    return sum(kept.values())


@pytest.mark.parametrize("kw", [dict(num_experts=0), dict(num_experts=4), dict(num_experts=8, num_experts_per_token=1),
                                dict(num_experts=4, num_shared_experts=1, moe_layer_interval=2, num_layers=3),
                                dict(num_experts=4, mtp_num_layers=2), dict(num_experts=0, mtp_num_layers=1)])
def test_activation_estimate_is_within_3_percent_of_what_autograd_keeps_on_the_cpu(kw):
    mc = tiny_config(hidden_size=64, ffn_hidden_size=128, moe_ffn_hidden_size=48, seq_length=64, vocab_size=256, **kw)
    tc = launch.TrainConfig(micro_batch_size=4)
    plan = memory.activation_bytes(mc, launch.resolve_layout(mc, tc, 1), stage=0, el=4, grouped=False)
    for recompute, estimate in ((False, plan.per_microbatch), (True, plan.per_microbatch_recompute)):
        measured = saved_activation_bytes(mc, 4, recompute)
        assert abs(estimate - measured) <= 0.03 * measured, (kw, recompute, estimate, measured)


@pytest.mark.parametrize("width", [48, 80])  # F < D: the routing weights scale h; F > D: they scale y
def test_grouped_experts_activation_estimate_is_within_1_percent_of_what_autograd_keeps(width):
    mc = tiny_config(hidden_size=64, ffn_hidden_size=128, moe_ffn_hidden_size=width, seq_length=64, vocab_size=256)
    plan = memory.activation_bytes(mc, launch.resolve_layout(mc, launch.TrainConfig(micro_batch_size=4), 1),
                                   stage=0, el=4, grouped=True)
    measured = saved_activation_bytes(mc, 4, recompute=False, grouped=True)
    assert abs(plan.per_microbatch - measured) <= 0.01 * measured, (plan.per_microbatch, measured)


def mapped_bytes(folder: str) -> int:
    """Resident bytes of this process's memory maps of files under `folder` (/proc/self/smaps): the
    pages of checkpoint files actually read, as the kernel counts them."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and len(parts[1]) == 4:  # a mapping's header
                inside = len(parts) > 5 and parts[5].startswith(folder)
            elif inside and line.startswith("Rss:"):
                total += int(parts[1]) * 1024
    return total


def stage_parallel(mc: ModelConfig, rank: int, tp: int, pp: int, ep: int, world: int) -> tuple[ModelParallel, int, int]:
    """(ModelParallel, dp rank, rank within the stage) of global `rank`, as build_process_groups numbers them."""
    stage, in_stage = divmod(rank, world // pp)
    start, end = stage_layers(mc.num_layers, pp, stage)
    return (ModelParallel(tp_rank=in_stage % tp, tp_size=tp, ep_rank=in_stage % ep, ep_size=ep, layer_start=start,
                          layer_end=end, first_stage=stage == 0, last_stage=stage == pp - 1), in_stage // tp, in_stage)


def write_sharded_checkpoint(root, mc: ModelConfig, tp: int, pp: int, ep: int) -> str:
    """A checkpoint as `world = TP x PP` ranks (DP 1) write it, made in one process: each rank's slice
    (seed 0) with AdamW moments 2 w and 3 w, its file, and meta.json (the documented format)."""
    world = tp * pp
    step = root / "step_00000001"
    step.mkdir(parents=True)
    for rank in range(world):
        par, dp_rank, in_stage = stage_parallel(mc, rank, tp, pp, ep, world)
        model = MoETransformer(mc, par, seed=0)
        opt = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": 2 * p.detach(), "exp_avg_sq": 3 * p.detach()}
        torch.save(ckpt_io.rank_payload(model, opt, Layout(world_size=world, tp=tp, pp=pp, ep=ep, rank=rank)),
                   step / f"rank_{rank:05d}.pt")
    files = [f"rank_{r:05d}.pt" for r in range(world)]
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 1, "model": dataclasses.asdict(mc),
            "train": {}, "layout": {"world_size": world, "tp": tp, "pp": pp, "dp": 1, "ep": ep}, "files": files,
            "sizes": [(step / f).stat().st_size for f in files]}
    (step / "meta.json").write_text(json.dumps(meta))
    return str(step)


def load_as_rank(path: str, mc: ModelConfig, rank: int, tp: int, pp: int, ep: int) -> tuple[int, MoETransformer, dict]:
    """(checkpoint bytes paged in, model, optimizer state) after loading `path` into rank `rank`'s slice."""
    par, _, _ = stage_parallel(mc, rank, tp, pp, ep, tp * pp)
    model = MoETransformer(mc, par, seed=1)  # other weights than the saved ones
    opt = torch.optim.AdamW(model.parameters())
    ckpt = ckpt_io.read_checkpoint(path)
    assert mapped_bytes(path) == 0  # opening reads the files' headers, no tensor
    ckpt_io.load_into(ckpt, model, opt)
    paged = mapped_bytes(path)
    del ckpt
    gc.collect()
    return paged, model, opt.state


def test_each_of_4_ranks_reads_about_a_quarter_of_a_4_rank_checkpoint(tmp_path):
    """TP2 x PP2 with EP2: each rank holds a quarter of the weights and moments, and reads about a
    quarter of the checkpoint (what the kernel paged in of its files); one process reads all of it."""
    mc = tiny_config(hidden_size=128, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=256,
                     moe_ffn_hidden_size=512, num_experts=8, vocab_size=256)
    path = write_sharded_checkpoint(tmp_path, mc, tp=2, pp=2, ep=2)
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".pt"))
    shares = []
    for rank in range(4):
        paged, model, state = load_as_rank(path, mc, rank, 2, 2, 2)
        shares.append(paged / total)
        saved = MoETransformer(mc, stage_parallel(mc, rank, 2, 2, 2, 4)[0], seed=0)  # the weights that were saved
        for (name, p), q in zip(model.named_parameters(), saved.parameters()):
            assert torch.equal(p, q) and torch.equal(state[p]["exp_avg_sq"], 3 * q), name
    one, _, _ = load_as_rank(path, mc, 0, 1, 1, 1)
    print(f"share of the checkpoint paged in per rank: {[f'{s:.3f}' for s in shares]}, one process: {one / total:.3f}")
    assert all(0.2 <= s <= 0.3 for s in shares), shares  # a quarter, give or take page fault-around
    assert one >= 0.97 * total


def test_rank_file_of_another_size_than_meta_json_recorded_is_refused(tmp_path):
    mc = tiny_config()
    path = write_sharded_checkpoint(tmp_path, mc, tp=1, pp=1, ep=1)
    with open(os.path.join(path, "rank_00000.pt"), "ab") as f:
        f.write(b"\0" * 10)  # still a readable zip: only the recorded size tells
    with pytest.raises(ckpt_io.CheckpointError, match="meta.json recorded"):
        ckpt_io.read_checkpoint(path)


def test_head_dim_flops_and_planner_count_the_built_model():
    cfg = tiny_config(num_layers=3, moe_layer_interval=2, head_dim=16)
    model = MoETransformer(cfg)
    by_hand = sum(p.numel() * (2 / 4 if "experts" in name else 1.0) for name, p in model.named_parameters()
                  if not name.startswith("embed_tokens"))
    assert cfg.active_params_per_token() == by_hand
    assert cfg.flops_per_token() == 6 * by_hand + 12 * 3 * (4 * 16) * 16  # 12 x layers x H x Dh x T
    assert memory.params_per_stage(cfg, 1, 1, 1) == [sum(p.numel() for p in model.parameters())]


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 2, 2), (1, 3, 1)])
def test_mtp_planner_and_flops_count_the_built_model(tp, pp, ep):
    """The last stage holds the MTP modules (and, under PP, an embedding copy): the planner's counts per stage
    against the built slices; FLOPs add 6 x the modules' active parameters and their attention."""
    mc = tiny_config(num_layers=3, moe_layer_interval=2, num_shared_experts=1, mtp_num_layers=2)
    counted, experts = memory.params_per_stage(mc, tp, pp, ep), memory.expert_params_per_stage(mc, pp, ep)
    for stage in range(pp):
        start, end = stage_layers(mc.num_layers, pp, stage)
        model = MoETransformer(mc, ModelParallel(tp_size=tp, ep_size=ep, layer_start=start, layer_end=end,
                                                 first_stage=stage == 0, last_stage=stage == pp - 1))
        assert counted[stage] == sum(p.numel() for p in model.parameters()), stage
        assert experts[stage] == sum(p.numel() for p in model.parameters() if placement(p).expert)
    if (tp, pp) == (1, 1):
        mtp = sum(p.numel() * (2 / 4 if ".experts." in n else 1.0) for n, p in model.named_parameters()
                  if n.startswith("mtp.")) + model.lm_head.weight.numel() * 2  # the shared head, once per module
        assert mc.flops_per_token() == 6 * (mc.active_params_per_token() + mtp) + 12 * (3 + 2) * 4 * 8 * 16


@pytest.mark.parametrize("pattern", [dict(first_k_dense_layers=2), dict(moe_layer_list="0,3")])
def test_memory_planner_counts_the_parameters_each_stage_builds_for_a_layer_pattern(pattern):
    cfg = tiny_config(num_layers=4, num_shared_experts=1, **pattern)
    built = []
    for stage in range(2):
        start, end = stage_layers(4, 2, stage)
        with torch.device("meta"):
            model = MoETransformer(cfg, ModelParallel(layer_start=start, layer_end=end, first_stage=stage == 0,
                                                      last_stage=stage == 1))
        built.append(sum(p.numel() for p in model.parameters()))
    assert memory.params_per_stage(cfg, 1, 2, 1) == built
    if "first_k_dense_layers" in pattern:  # stage 0 is dense: attention, norms, embedding, 2 dense MLPs
        d, dh = cfg.hidden_size, cfg.attn_head_dim
        attn = d * dh * (2 * 4 + 2 * 2) + 2 * dh + 2 * d
        assert built[0] == 2 * (attn + 3 * d * cfg.ffn_hidden_size) + cfg.vocab_size * d


@pytest.mark.parametrize("pattern", [dict(first_k_dense_layers=1), dict(moe_layer_list="0,2")])
def test_active_parameters_of_the_flops_formula_follow_the_layer_pattern(pattern):
    """Counted off the built model: everything but the embedding, with K of E experts of each MoE layer."""
    cfg = tiny_config(num_layers=3, num_shared_experts=1, **pattern)
    model = MoETransformer(cfg)
    counted = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        counted += p.numel() * (cfg.num_experts_per_token / cfg.num_experts if ".experts." in name else 1)
    assert cfg.active_params_per_token() == counted
    # two stacked weights per MoE layer: the fused gate-up (E, D, 2F) and the down projection
    assert sum(".experts." in n for n, _ in model.named_parameters()) == 2 * len(cfg.moe_layers) == 4
