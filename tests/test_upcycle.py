"""scripts/upcycle.py: a dense checkpoint made MoE gives the dense model's logits and trains on."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import checkpoint as ckpt_io
from moe_layers import ModelConfig, MoETransformer, SparseMoELayer
import upcycle
from helpers import run_cli, run_script, TINY_FLAGS, train_records


# ------------------------------------------- upcycling and the routing comparison
def build(path) -> MoETransformer:
    """The model a checkpoint describes, with its weights."""
    ckpt = ckpt_io.read_checkpoint(str(path))
    model = MoETransformer(ModelConfig(**ckpt.meta["model"]))
    ckpt_io.load_into(ckpt, model, None)
    return model.eval()


# ---------------------------------------------------------------- upcycling
@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """A dense tiny model trained 3 steps (norms and weights off their init), then upcycled by the CLI."""
    root = tmp_path_factory.mktemp("upcycle")
    r = run_cli(TINY_FLAGS + ["--num-experts", "0", "--max-steps", "3", "--save", str(root / "dense")])
    assert r.returncode == 0, r.stderr
    r = run_script("upcycle.py", ["--checkpoint", root / "dense", "--out", root / "moe", "--num-experts", 4,
                                  "--num-experts-per-token", 2, "--seed", 5])
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "--load" in r.stdout
    return root


@pytest.mark.parametrize("interval", [1, 2])
def test_upcycled_model_gives_the_dense_models_logits(dense_ckpt, tmp_path, interval):
    upcycle.upcycle(str(dense_ckpt / "dense"), str(tmp_path / "moe"), 4, 2, interval, seed=1)
    dense, moe = build(dense_ckpt / "dense"), build(tmp_path / "moe")
    assert sorted(moe.moe_layers()) == ([0, 1] if interval == 1 else [1])
    assert all(isinstance(moe.layers[str(i)].mlp, SparseMoELayer) for i in moe.moe_layers())
    x = torch.randint(0, dense.cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(x).output, moe(x).output  # (B, T, V)
        r = moe.layers[str(max(moe.moe_layers()))].mlp.router(torch.randn(64, moe.cfg.hidden_size))
    assert (got - want).abs().max().item() < 1e-5
    assert len(set(r.indices[:, 0].tolist())) > 1  # the fresh router really spreads tokens over experts


def test_upcycled_experts_are_the_dense_mlp_and_the_router_is_fresh(dense_ckpt):
    dense = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(dense_ckpt / "dense")))
    ckpt = ckpt_io.read_checkpoint(str(dense_ckpt / "moe"))
    moe = ckpt_io.full_state_dict(ckpt)
    cfg = ckpt.meta["model"]
    assert (cfg["num_experts"], cfg["num_experts_per_token"], cfg["moe_layer_interval"]) == (4, 2, 1)
    assert cfg["moe_ffn_hidden_size"] == 64 and cfg["norm_topk_prob"]  # the dense --ffn-hidden-size
    assert ckpt.meta["step"] == 0 and ckpt.optim == {} and ckpt.meta["layout"]["world_size"] == 1
    gen = torch.Generator().manual_seed(5)  # --seed 5, no noise: the routers are the only draws, layer order
    for layer in (0, 1):
        prefix = f"layers.{layer}.mlp"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{prefix}.{proj}.weight" not in moe
            for e in range(4):
                assert torch.equal(moe[f"{prefix}.experts.{e}.{proj}.weight"], dense[f"{prefix}.{proj}.weight"])
        assert torch.equal(moe[f"{prefix}.router.weight"], torch.randn(4, 32, generator=gen) * 0.02)
        assert torch.equal(moe[f"{prefix}.router.expert_bias"], torch.zeros(4))
    others = [k for k in dense if ".mlp." not in k]
    assert len(others) == len(dense) - 6 and all(torch.equal(moe[k], dense[k]) for k in others)


def test_noise_scales_each_expert_copy_by_its_own_factors(dense_ckpt, tmp_path):
    upcycle.upcycle(str(dense_ckpt / "dense"), str(tmp_path / "moe"), 4, 2, noise=0.01, seed=2)
    dense = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(dense_ckpt / "dense")))
    moe = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / "moe")))
    w = dense["layers.0.mlp.up_proj.weight"]  # (F, D) = (64, 32): 2048 factors per expert
    factors = [moe[f"layers.0.mlp.experts.{e}.up_proj.weight"] / w for e in range(4)]
    for f in factors:
        assert abs(f.mean().item() - 1) < 1e-3 and 0.009 < f.std().item() < 0.011
    assert not torch.allclose(factors[0], factors[1])


def test_upcycled_checkpoint_trains_on_with_load(dense_ckpt, tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(dense_ckpt / "moe"), "--max-steps", "10", "--micro-batch-size", "8", "--lr", "1e-2",
                 "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--no-progress",
                 "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at step 0" in r.stdout
    losses = [x["lm_loss"] for x in train_records(metrics)]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert set(train_records(metrics)[-1]["expert_load"]) == {"0", "1"}


@pytest.mark.parametrize("case", ["missing_folder", "not_dense", "out_taken"])
def test_upcycle_bad_input_exits_2_with_one_error_line(dense_ckpt, tmp_path, case, capsys, monkeypatch):
    """In-process through upcycle.main() as the script calls it (any exception but SystemExit fails
    the test, as a traceback would); the first case also as a real process."""
    src, out, words = {"missing_folder": (tmp_path / "nothing", tmp_path / "o", "no such folder"),
                       "not_dense": (dense_ckpt / "moe", tmp_path / "o", "already an MoE model"),
                       "out_taken": (dense_ckpt / "dense", dense_ckpt / "moe", "already holds an earlier output of "
                                                                             "scripts/upcycle.py; pass --overwrite")}[case]
    args = ["--checkpoint", src, "--out", out, "--num-experts", 4, "--num-experts-per-token", 2]
    monkeypatch.setattr(sys, "argv", ["upcycle.py"] + [str(a) for a in args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        upcycle.main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1 and words in errors[0], err
    if case == "missing_folder":
        r = run_script("upcycle.py", args)
        assert r.returncode == 2
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], r.stderr
        assert "Traceback" not in r.stderr
