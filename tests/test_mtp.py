"""Multi-token prediction: its loss against a direct computation, under every layout, its checkpoints,
export and generation."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt_io
import data
import launch
import minimal_pretrain as mp
import optim
from moe_layers import MoETransformer
import export_hf
import generate
from helpers import (_assert_continues_like, assert_same_training, free_port, hf_logits, interrupted_at_3, parity_run,
                     run_cli, run_for_resume, save_in_process, tiny_config, TINY_FLAGS, tokens, train_records)


# ---- multi-token prediction (issue 14, item 4)
MTP = ["--mtp-num-layers", "2", "--mtp-loss-coef", "0.3"]


def direct_mtp_losses(model: MoETransformer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lm loss, mean_k CE_k) by a loop over the model's modules, truncating as the DeepSeek-V3 paper does:
    module k runs on the T - k positions i whose target t_{i+k+1} exists, reading Emb(t_{i+k})."""
    t = x.shape[1]
    pos = torch.arange(t)
    h = model.embed_tokens.weight[x]  # (B, T, D)
    for block in model.layers.values():
        h, _ = block(h, model.rope(pos))
    lm = F.cross_entropy((model.norm(h) @ model.lm_head.weight.T).flatten(0, 1), y.flatten())
    ces = []
    for k, module in enumerate(model.mtp, start=1):
        n = t - k
        emb = model.embed_tokens.weight[y[:, k - 1:k - 1 + n]]  # t_{i+k} = y[:, i + k - 1], i < T - k
        joined = torch.cat([module.enorm(emb), module.hnorm(h[:, :n])], dim=-1) @ module.eh_proj.weight.T
        h, _ = module.block(joined, model.rope(pos[:n]))  # (B, T - k, D)
        logits = module.final_layernorm(h) @ model.lm_head.weight.T  # the shared head
        ces.append(F.cross_entropy(logits.flatten(0, 1), y[:, k:].flatten()))  # t_{i+k+1} = y[:, i + k]
    return lm, torch.stack(ces).mean()


def test_mtp_loss_equals_a_direct_computation():
    cfg = tiny_config(mtp_num_layers=3)
    model = MoETransformer(cfg, seed=3)
    x, y = tokens(cfg.vocab_size), tokens(cfg.vocab_size, seed=1)
    with torch.no_grad():
        out = model(x, mtp_targets=y)
        lm, mtp = direct_mtp_losses(model, x, y)
    assert [tuple(l.shape) for l in out.mtp_logits] == [(2, 15, 64), (2, 14, 64), (2, 13, 64)]
    assert sorted(out.stats) == [0, 1, 2, 3, 4]  # the MTP blocks are MoE layers 2, 3, 4
    assert abs(F.cross_entropy(out.output.flatten(0, 1), y.flatten()) - lm) < 1e-5
    assert abs(mp.mtp_loss(out.mtp_logits, y, model.par) - mtp) < 1e-5


def test_mtp_loss_of_the_trainers_first_step_equals_a_direct_computation(tmp_path):
    """The first record's mtp_loss, and its loss = lm + coef x mtp + router terms, against the loop on the same batch."""
    metrics = tmp_path / "m.jsonl"
    r = run_cli(TINY_FLAGS + MTP + ["--max-steps", "1", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| MTP Loss: " in r.stdout
    rec = train_records(str(metrics))[0]
    mc, tc, _ = launch.parse_config(TINY_FLAGS + MTP)
    mc.vocab_size = 256
    model = MoETransformer(mc, seed=tc.seed)
    x, y = data.get_batch(data.load_corpus("", None).train, tc.seed, 0, 0, 2, 16, 256)
    with torch.no_grad():
        lm, mtp = direct_mtp_losses(model, x, y)
        stats = model(x, mtp_targets=y).stats
    aux = sum(s.aux_loss for s in stats.values()) / 4  # 2 layers + 2 MTP blocks
    z = sum(s.z_loss for s in stats.values()) / 4
    assert rec["mtp_loss"] == pytest.approx(float(mtp), rel=1e-5)
    assert rec["lm_loss"] == pytest.approx(float(lm), rel=1e-5)
    assert rec["loss"] == pytest.approx(float(lm + 0.3 * mtp + 0.1 * aux + 0.01 * z), rel=1e-5)
    assert sorted(rec["expert_load"]) == ["0", "1", "2", "3"]


@pytest.fixture(scope="module")
def mtp_one_process(tmp_path_factory):
    return parity_run(tmp_path_factory.mktemp("mtp_one_process"), "one", 1, [], 4, MTP)


@pytest.mark.parametrize("name,nproc,layout,micro", [
    ("dp2_ep2", 2, ["--expert-parallel-size", "2"], 2),
    ("pp2", 2, ["--pipeline-parallel-size", "2"], 4),
    ("tp2_ep2", 2, ["--tensor-parallel-size", "2"], 4),
    # SP: the modules read the (B, T/TP, D) slices and all-gather before the shared head
    ("tp2_sp", 2, ["--tensor-parallel-size", "2", "--sequence-parallel"], 4),
    # the embedding copy's bucket: sharded alike on both stages, its shards summed over the embedding group
    ("pp2_dp2_distributed_optimizer", 4, ["--pipeline-parallel-size", "2", "--use-distributed-optimizer"], 2),
])
def test_mtp_layout_matches_one_process(name, nproc, layout, micro, mtp_one_process, tmp_path):
    candidate = parity_run(tmp_path, name, nproc, layout, micro, MTP)
    worst = assert_same_training(mtp_one_process, candidate)
    for a, b in zip(mtp_one_process[0], candidate[0]):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    print(f"mtp {name}: max relative loss difference {worst:.2e}")


def test_mtp_under_interleaved_1f1b_matches_one_process(tmp_path):
    """4 layers, PP2 with 2 chunks of 1 layer per rank: the modules run after the last rank's
    last chunk (layer 3), and rank 1's embedding copy is summed with rank 0's first chunk."""
    layers4 = MTP + ["--num-layers", "4"]
    reference = parity_run(tmp_path, "one", 1, [], 4, layers4)
    candidate = parity_run(tmp_path, "pp2_interleaved", 2,
                           ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "1"], 4, layers4)
    worst = assert_same_training(reference, candidate)
    for a, b in zip(reference[0], candidate[0]):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    print(f"mtp pp2 interleaved: max relative loss difference {worst:.2e}")


def _mtp_pp2_worker(rank: int, port: int, result_dir: str) -> None:
    """One rank of a PP2 run of the trainer's own train_step; each rank keeps its embedding copy."""
    import torch.distributed as dist
    torch.set_num_threads(1)  # one thread a rank: the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mc, tc, _ = launch.parse_config(TINY_FLAGS + MTP + ["--pipeline-parallel-size", "2", "--num-microbatches", "2"])
    mc.vocab_size = 256
    pg = mp.build_process_groups(launch.resolve_layout(mc, tc, 2, rank), embedding_groups=True)
    device = torch.device("cpu")
    model = mp.build_model(mc, tc, pg, device, None)
    reducers = mp.build_grad_reducers(model, pg)
    optimizer = optim.build_optimizer(model, tc.lr, tc.weight_decay)
    corpus = data.load_corpus("", None)
    for step in range(3):
        x, y = data.get_batch(corpus.train, tc.seed, 0, step, 4, 16, 256)
        mp.train_step(model, optimizer, reducers, mp.local_microbatches(x, y, pg, device), pg, mc, tc, device,
                      None, step)
    torch.save(model.embed_tokens.weight.detach().clone(), os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_mtp_pipeline_keeps_the_two_embedding_copies_equal(tmp_path):
    import torch.multiprocessing as tmp_mp
    tmp_mp.spawn(_mtp_pp2_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    first, last = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    initial = MoETransformer(tiny_config(vocab_size=256, mtp_num_layers=2), seed=1234).embed_tokens.weight
    assert torch.equal(first, last)  # the same summed gradient, the same AdamW step, on both stages
    assert (first - initial).abs().max() > 1e-3  # and both moved


def test_mtp_modules_change_no_generated_logit(tmp_path):
    """Generation ignores the MTP modules: the same logits with and without them, in memory and through a checkpoint."""
    with_mtp, without = MoETransformer(tiny_config(mtp_num_layers=2), seed=3), MoETransformer(tiny_config(), seed=3)
    x = tokens(64)
    with torch.no_grad():
        assert torch.equal(with_mtp(x).output, without(x).output)
    ck = save_in_process(with_mtp, tmp_path / "ck")
    loaded = generate.load_model(ck)
    assert len(loaded.mtp) == 0
    with torch.no_grad():
        assert torch.equal(loaded(x).output, without(x).output)
    assert generate.generate(loaded, [1, 2, 3], 5, temperature=0.0) == generate.generate(without, [1, 2, 3], 5,
                                                                                         temperature=0.0)


def test_mtp_export_leaves_the_modules_out_and_gives_transformers_the_logits(tmp_path, capsys):
    pytest.importorskip("safetensors")
    model = MoETransformer(tiny_config(mtp_num_layers=2), seed=3)
    ck = save_in_process(model, tmp_path / "ck")
    export_hf.export(ck, str(tmp_path / "hf"))
    assert "2 multi-token prediction modules (mtp.*)" in capsys.readouterr().out
    x = tokens(64)
    theirs, _ = hf_logits(tmp_path / "hf", x)
    with torch.no_grad():
        assert (model(x).output - theirs).abs().max() < 1e-4


def _mtp_resume_run(tmp_path, name: str, nproc: int, layout: list[str], micro: int, load: str = "") -> list[dict]:
    save = tmp_path / name
    r = run_cli(TINY_FLAGS + MTP + layout + ["--max-steps", "6", "--num-microbatches", str(micro), "--save", str(save),
                                             "--save-interval", "3", "--metrics-file", str(save) + ".jsonl",
                                             "--dist-timeout", "60"] + (["--load", load] if load else []), nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return train_records(str(save) + ".jsonl")


def test_mtp_checkpoint_reshards_onto_pp2_which_saves_the_embedding_once(tmp_path):
    """A one-process checkpoint at step 3 continues on PP2 (the last stage's copy loaded from the one saved
    embedding) like the uninterrupted run; PP2's own checkpoint holds the embedding once."""
    reference = _mtp_resume_run(tmp_path, "one", 1, [], 4)
    shutil.copytree(tmp_path / "one", tmp_path / "ck")
    resumed = _mtp_resume_run(tmp_path, "pp2", 2, ["--pipeline-parallel-size", "2"], 4,
                              load=interrupted_at_3(tmp_path / "ck"))
    _assert_continues_like(reference, resumed)
    for a, b in zip(reference[3:], resumed):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    ckpt = ckpt_io.read_checkpoint(str(tmp_path / "pp2"))
    assert ckpt.meta["layout"]["pp"] == 2 and len(ckpt.params["embed_tokens.weight"]) == 1
    assert "mtp.1.block.mlp.experts.3.down_proj.weight" in ckpt.params


def test_mtp_pp2_dp2_distributed_optimizer_checkpoint_resumes_on_one_process(tmp_path):
    """The embedding's state, sharded over DP on both stages, saved once and read back whole."""
    layout = MTP + ["--pipeline-parallel-size", "2", "--use-distributed-optimizer"]
    full = run_for_resume(tmp_path, "zero1", 4, layout, 2)
    shutil.copytree(tmp_path / "zero1", tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 1, MTP, 4, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(full, resumed)
    print(f"mtp pp2 x dp2 distributed optimizer -> one process: max relative loss difference {worst:.2e}")


@pytest.mark.parametrize("flags,words", [
    (["--mtp-num-layers", "-1"], "--mtp-num-layers"),
    (["--mtp-num-layers", "16"], "--mtp-num-layers (16) must be below --seq-length (16)"),
    (["--mtp-loss-coef", "-0.1"], "--mtp-loss-coef"),
    (["--mtp-loss-coef", "nan"], "--mtp-loss-coef"),
])
def test_mtp_bad_flags_exit_2_with_one_error_line(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        mp.main(TINY_FLAGS + flags + ["--max-steps", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and words in errors[0], errors
