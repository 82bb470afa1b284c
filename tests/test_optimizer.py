"""Optimizers and schedules: warm-up and cosine, WSD, AdamW state round trips, Newton-Schulz and
Muon by hand and under every layout, Muon resume and resharding."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt_io
import launch
import minimal_pretrain as mp
import optim
from moe_layers import MoETransformer
from parallel_layers import Layout, ModelParallel
from helpers import (_assert_continues_like, assert_same_training, interrupted_at_3, parity_run, run_cli,
                     run_for_resume, smoke, tiny_config, TINY_FLAGS, tokens, without_timing)


@smoke
def test_lr_warmup_then_cosine():
    tc = launch.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert math.isclose(tc.schedule().at(0), 0.1)
    assert math.isclose(tc.schedule().at(9), 1.0)
    assert math.isclose(tc.schedule().at(60), 0.55)  # half way down the cosine
    assert math.isclose(tc.schedule().at(110), 0.1)
    assert math.isclose(tc.schedule().at(500), 0.1)  # constant after the decay


@pytest.mark.parametrize("max_steps,decay,want_warmup", [(3, 0, 0), (50, 0, 5), (400, 0, 40), (999, 0, 99),
                                                         (100_000, 0, 2000), (50, 300, 30)])
def test_default_warmup_is_a_tenth_of_the_decay_steps_at_most_2000(max_steps, decay, want_warmup):
    schedule = launch.TrainConfig(lr=1.0, min_lr=0.0, max_steps=max_steps, lr_decay_steps=decay).schedule()
    assert schedule.warmup_steps == want_warmup and schedule.decay_steps == (decay or max_steps)
    if want_warmup:  # the formula by hand: linear to the peak at the last warm-up step
        assert math.isclose(schedule.at(want_warmup - 1), 1.0) and math.isclose(schedule.at(0), 1 / want_warmup)
    else:
        assert schedule.at(0) == 1.0
    explicit = launch.TrainConfig(max_steps=max_steps, warmup_steps=7).schedule()
    assert explicit.warmup_steps == 7  # an explicit value is kept


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_state_round_trips_through_a_checkpoint_fused_or_not(fused):
    """The fused AdamW the trainer uses on CUDA (runnable on the CPU too) resumes exactly like the reference."""
    tc = launch.TrainConfig()

    def fresh() -> tuple[MoETransformer, torch.optim.Optimizer]:
        model = MoETransformer(tiny_config(), seed=0)
        return model, optim.build_optimizer(model, tc.lr, tc.weight_decay, fused=fused)

    def step(model: MoETransformer, opt: torch.optim.Optimizer, seed: int) -> None:
        x = tokens(64, seed=seed)
        out = model(x)
        F.cross_entropy(out.output.flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()

    model, opt = fresh()
    assert bool(opt.defaults.get("fused")) == fused
    for seed in range(2):
        step(model, opt, seed)
    payload = ckpt_io.rank_payload(model, opt, Layout())
    saved = ckpt_io.Checkpoint(path="memory", meta={}, params={k: [v] for k, v in payload["params"].items()},
                               optim={k: [v] for k, v in payload["optim"].items()}, rng={0: payload["rng"]})
    resumed, resumed_opt = fresh()
    ckpt_io.load_into(saved, resumed, resumed_opt)
    step(model, opt, 2)
    step(resumed, resumed_opt, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# ---- Muon and WSD (issue 13) ----
def polar_reference(g: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U V^T, U p(S) V^T) of g = U S V^T in float64, where p applies the quintic
    x -> a x + b x^3 + c x^5 `steps` times to each singular value over ||g||_F: what the
    Newton-Schulz iteration computes on the singular values, written independently of it."""
    a, b, c = optim.NS_COEFFICIENTS
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    x = s / g.double().norm()
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return u @ vh, u @ torch.diag(x) @ vh


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (64, 64)])
def test_newton_schulz_keeps_the_singular_vectors_and_maps_each_singular_value_by_the_quintic(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    polar, by_hand = polar_reference(g, optim.NS_STEPS)
    out = optim.newton_schulz(g)
    assert out.dtype == torch.float32 and out.shape == g.shape
    assert (out.double() - by_hand).abs().max() < 1e-5  # fp32 rounding of 5 steps
    s = torch.linalg.svdvals(out.double())
    if shape[0] != shape[1]:  # well conditioned: every singular value lands in NS5's band, near U V^T
        assert 0.68 < s.min() and s.max() < 1.2, s
        assert (out.double() - polar).norm() / polar.norm() < 0.25  # singular values off by at most 0.32
        assert torch.equal(optim.newton_schulz(g.T), out.T)  # iterates on the wide side either way
    else:  # a square Gaussian has singular values near 0 that 5 steps lift only part of the way
        assert s.max() < 1.21


def test_newton_schulz_converges_to_u_vt_with_more_steps_of_the_cubic():
    """Not what Muon runs, but a check that the iteration is the polar factor's: with the
    classic cubic's fixed point at 1 the same loop reaches U V^T to fp32 rounding."""
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    polar, _ = polar_reference(g, 0)
    x = g / g.norm()
    for _ in range(40):  # x <- 1.5 x - 0.5 x x^T x (Newton-Schulz for the polar factor)
        x = 1.5 * x - 0.5 * x @ x.T @ x
    assert (x.double() - polar).abs().max() < 1e-5


def muon_toy_model() -> torch.nn.Module:
    """One plain 2-D weight for Muon and a 1-D gain for AdamW (an optimizer needs both groups)."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(48, 32, generator=torch.Generator().manual_seed(0)) * 0.1)
    model.gain = torch.nn.Parameter(torch.ones(32))
    model.par = ModelParallel()
    return model


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_muon_equals_torch_optim_muon_on_a_plain_matrix():
    """torch.optim.Muon(adjust_lr_fn="match_rms_adamw") runs Newton-Schulz in bf16: with ours in
    bf16 too, the weights agree bit for bit over 5 steps of changing gradients."""
    ours = muon_toy_model()
    opt = optim.build_optimizer(ours, lr=0.02, weight_decay=0.1, kind="muon")
    assert list(opt.muon_params.values()) == [ours.w]
    opt.ns_dtype = torch.bfloat16
    theirs = torch.nn.Parameter(ours.w.detach().clone())
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                 adjust_lr_fn="match_rms_adamw")
    for step in range(5):
        grad = torch.randn(48, 32, generator=torch.Generator().manual_seed(10 + step))
        ours.w.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
        assert torch.equal(ours.w, theirs), step


def test_muon_update_by_hand_in_fp32():
    """One step from zero momentum: buf = 0.05 g, look-ahead u = 0.05 g + 0.95 buf, then
    w <- w (1 - lr wd) - lr 0.2 sqrt(48) NS(u); NS from the SVD reference."""
    model = muon_toy_model()
    w0, g = model.w.detach().clone(), torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    opt = optim.build_optimizer(model, lr=0.02, weight_decay=0.1, kind="muon")
    model.w.grad = g.clone()
    opt.step()
    u = 0.05 * g.double() + 0.95 * (0.05 * g.double())
    _, ns = polar_reference(u, optim.NS_STEPS)
    want = w0.double() * (1 - 0.02 * 0.1) - 0.02 * 0.2 * math.sqrt(48) * ns
    assert (model.w.double() - want).abs().max() < 1e-6
    assert torch.allclose(opt.state[model.w]["momentum_buffer"], 0.05 * g)


def test_muon_takes_hidden_matrices_and_experts_adamw_the_rest():
    model = MoETransformer(tiny_config(), seed=0)
    opt = optim.build_optimizer(model, 1e-2, 0.1, kind="muon")
    muon = {name for name, p in model.named_parameters() if p in opt.muon_params}
    assert muon == {f"layers.{i}.{m}" for i in range(2) for m in
                    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.experts.w_gate_up", "mlp.experts.w_down")}
    adamw = {id(p) for group in opt.inner.param_groups for p in group["params"]}
    assert {name for name, p in model.named_parameters() if id(p) in adamw} == \
        {name for name, _ in model.named_parameters()} - muon  # embedding, LM head, norms, routers


def test_muon_orthogonalises_each_expert_of_a_stack_on_its_own():
    model = MoETransformer(tiny_config(), seed=0)
    opt = optim.build_optimizer(model, 1e-2, 0.1, kind="muon")
    w = model.layers["0"].mlp.experts.w_gate_up  # (E, D, 2F): each expert's gate and up, two matrices
    update = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    out = opt.orthogonalise(update, w)
    f = w.shape[2] // 2
    for e in range(w.shape[0]):
        for half in (slice(0, f), slice(f, 2 * f)):
            _, by_hand = polar_reference(update[e][:, half], optim.NS_STEPS)
            assert (out[e][:, half].double() - by_hand).abs().max() < 1e-5, (e, half)


@smoke
def test_wsd_learning_rates_at_the_phase_boundaries_by_hand():
    """lr 1, min 0.1, warm-up 10, 110 decay steps, the last half decays: stable from step 10 to
    55, decay over steps 55..110. At step 66 the decay is 11/55 = 0.2 done."""
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, lr_schedule="wsd", lr_decay_fraction=0.5)
    at_66 = {"linear": 0.1 + 0.9 * 0.8, "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi)),
             "sqrt": 0.1 + 0.9 * (1 - math.sqrt(0.2))}
    assert math.isclose(at_66["cosine"], 0.9140576, rel_tol=1e-7) and math.isclose(at_66["sqrt"], 0.5975078,
                                                                                   rel_tol=1e-7)
    for style, want in at_66.items():
        s = launch.TrainConfig(lr_decay_style=style, **base).schedule()
        assert (s.warmup_steps, s.decay_start, s.decay_steps) == (10, 55, 110)
        assert math.isclose(s.at(0), 0.1) and math.isclose(s.at(9), 1.0)  # warm-up
        assert s.at(10) == s.at(54) == s.at(55) == 1.0  # stable; the decay starts from the peak
        assert math.isclose(s.at(66), want), style
        assert math.isclose(s.at(110), 0.1) and math.isclose(s.at(500), 0.1)  # floor after the decay
        assert "stable to step 55" in s.describe() and f"{style} decay" in s.describe()
    whole = launch.TrainConfig(**dict(base, lr_decay_fraction=1.0)).schedule()
    assert whole.decay_start == 10  # a decay longer than what follows the warm-up starts where it ends


def test_wsd_flags_are_validated():
    with pytest.raises(launch.ConfigError, match="--lr-decay-fraction must be in"):
        launch.TrainConfig(lr_schedule="wsd", lr_decay_fraction=0.0).validate()
    with pytest.raises(launch.ConfigError, match="add --lr-schedule wsd"):
        launch.TrainConfig(lr_decay_style="linear").validate()
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--lr-decay-fraction", "0.5"], timeout=60)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "--lr-schedule wsd" in errors[0], r.stderr


# 5 steps, warm-up 1, decay over the last 40% (steps 3..5), 1 - sqrt; layer 0 dense, layer 1 MoE, so
# Muon meets column- and row-parallel MLP shards, attention shards and expert stacks.
MUON_FLAGS = ["--optimizer", "muon", "--lr-schedule", "wsd", "--lr-decay-fraction", "0.4", "--lr-decay-style",
              "sqrt", "--moe-layer-interval", "2"]


@pytest.fixture(scope="module")
def muon_one_process(tmp_path_factory):
    return parity_run(tmp_path_factory.mktemp("muon_one"), "one", 1, [], 4, MUON_FLAGS)


def test_muon_wsd_run_logs_the_formulas_lr(muon_one_process):
    records, _ = muon_one_process
    peak, floor = 1e-2, 2e-4  # TINY_FLAGS' --lr, the default --min-lr
    want = [peak, peak, peak, peak, floor + (peak - floor) * (1 - math.sqrt(0.5))]  # steps 0-3, then half-way
    assert [r["lr"] for r in records] == pytest.approx(want, rel=1e-12)


MUON_LAYOUTS = {
    "dp2": (2, [], 2),
    "tp2": (2, ["--tensor-parallel-size", "2"], 4),
    "dp2_ep2": (2, ["--expert-parallel-size", "2"], 2),
    "pp2": (2, ["--pipeline-parallel-size", "2"], 4),
    "tp2_pp2_dp2": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], 2),
}


@pytest.mark.parametrize("name", list(MUON_LAYOUTS))
def test_muon_layout_matches_one_process(name, muon_one_process, tmp_path):
    nproc, layout, micro = MUON_LAYOUTS[name]
    worst = assert_same_training(muon_one_process, parity_run(tmp_path, name, nproc, layout, micro, MUON_FLAGS))
    print(f"muon {name}: max relative loss difference {worst:.2e}")


@pytest.fixture(scope="module")
def muon_full_run(tmp_path_factory):
    """An uninterrupted 6-step Muon + WSD run on one process, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("muon_full")
    return tmp, run_for_resume(tmp, "one", 1, MUON_FLAGS, 4)


def test_muon_resume_is_exact_and_keeps_the_checkpoints_optimizer(muon_full_run, tmp_path):
    tmp, full = muon_full_run
    saved = ckpt_io.read_checkpoint(str(tmp / "one" / ckpt_io.step_dir_name(3)))
    assert set(saved.optim["layers.0.mlp.gate_proj.weight"][0]) == {"momentum_buffer"}
    assert set(saved.optim["layers.1.mlp.experts.2.down_proj.weight"][0]) == {"momentum_buffer"}
    assert set(saved.optim["lm_head.weight"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    shutil.copytree(tmp / "one", tmp_path / "ck")
    # no Muon or WSD flags: --optimizer and the schedule default to the checkpoint's
    resumed = run_for_resume(tmp_path, "resumed", 1, [], 4, load=interrupted_at_3(tmp_path / "ck"))
    assert without_timing(resumed) == without_timing(full[3:])  # bitwise


def test_muon_state_reshards_from_one_process_onto_tp2_pp2(muon_full_run, tmp_path):
    tmp, full = muon_full_run
    shutil.copytree(tmp / "one", tmp_path / "ck")
    resumed = run_for_resume(tmp_path, "resumed", 4, ["--tensor-parallel-size", "2", "--pipeline-parallel-size",
                                                      "2"], 4, load=interrupted_at_3(tmp_path / "ck"))
    worst = _assert_continues_like(full, resumed)
    print(f"muon 1 rank -> TP2 x PP2: max relative loss difference {worst:.2e}")


def test_adamw_checkpoint_loaded_by_muon_keeps_the_adamw_moments_and_starts_muons_fresh():
    model = MoETransformer(tiny_config(), seed=0)
    adamw = optim.build_optimizer(model, 1e-2, 0.1)
    x = tokens(64, seed=0)
    F.cross_entropy(model(x).output.flatten(0, 1), x.flatten()).backward()
    adamw.step()
    payload = ckpt_io.rank_payload(model, adamw, Layout())
    saved = ckpt_io.Checkpoint(path="memory", meta={}, params={k: [v] for k, v in payload["params"].items()},
                               optim={k: [v] for k, v in payload["optim"].items()}, rng={0: payload["rng"]})
    resumed = MoETransformer(tiny_config(), seed=1)
    muon = optim.build_optimizer(resumed, 1e-2, 0.1, kind="muon")
    ckpt_io.load_into(saved, resumed, muon)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        if q in muon.muon_params:
            assert q not in muon.state, name  # fresh momentum
        else:
            assert torch.equal(muon.state[q]["exp_avg"], adamw.state[p]["exp_avg"]), name


def test_resumed_run_takes_the_checkpoints_optimizer_and_wsd_flags_and_notes_a_switch():
    saved_train = dataclasses.asdict(launch.TrainConfig(optimizer="muon", lr_schedule="wsd", lr_decay_fraction=0.3,
                                                    lr_decay_style="linear", max_steps=10))
    resume = ckpt_io.Checkpoint(path="ck", meta={"step": 3, "train": saved_train, "layout": {"dp": 1}},
                                params={}, optim={"w": [{}]}, rng={})
    given = launch.TrainConfig(max_steps=10)
    tc, notes = launch.continue_saved_run(given, resume, set(), 1)
    assert notes == [] and given == launch.TrainConfig(max_steps=10)  # the given config is not changed
    assert (tc.optimizer, tc.lr_schedule, tc.lr_decay_fraction, tc.lr_decay_style) == ("muon", "wsd", 0.3, "linear")
    switched = launch.TrainConfig(max_steps=10, optimizer="adamw")
    switched, notes = launch.continue_saved_run(switched, resume, {"optimizer"}, 1)
    assert switched.optimizer == "adamw" and len(notes) == 1 and "starts fresh" in notes[0]
    old = dict(saved_train)
    for name in ("optimizer", "lr_schedule", "lr_decay_fraction", "lr_decay_style"):
        del old[name]  # a checkpoint from before issue 13
    before = launch.TrainConfig(max_steps=10)
    before, _ = launch.continue_saved_run(before, dataclasses.replace(resume, meta=dict(resume.meta, train=old)),
                                          set(), 1)
    assert (before.optimizer, before.lr_schedule) == ("adamw", "cosine")


def test_muon_on_a_bf16_model_steps_fp32_masters_with_fp32_momentum():
    mc, tc = tiny_config(), launch.TrainConfig(dtype="bfloat16", optimizer="muon")
    pg = mp.build_process_groups(launch.resolve_layout(mc, tc, 1))
    model = mp.build_model(mc, tc, pg, torch.device("cpu"), torch.bfloat16)
    opt = optim.build_optimizer(model, tc.lr, tc.weight_decay, kind=tc.optimizer)
    x = tokens(64, (4, 16))
    for step in range(2):
        mp.train_step(model, opt, [], [(x, x)], pg, mc, tc, torch.device("cpu"), torch.bfloat16, step)
    q = model.layers["0"].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16 and opt.state[opt.master[q]]["momentum_buffer"].dtype == torch.float32
    for name, p in model.named_parameters():
        assert torch.equal(p, opt.master[p].to(p.dtype)), name  # the model is its masters, rounded


@pytest.mark.parametrize("bf16", [False, True])
def test_clip_inside_fused_adamw_equals_clipping_the_gradients_then_the_reference_adamw(bf16):
    """clipped_step hands the clip factor to the fused kernel as its grad_scale; the reference is
    torch's for-loop AdamW on fp32 copies of the weights with the gradients multiplied by hand."""
    model = MoETransformer(tiny_config(), seed=0)
    if bf16:
        model = model.to(torch.bfloat16)
    opt = optim.build_optimizer(model, 1e-2, 0.1, fused=True)
    assert isinstance(opt, optim.MasterWeightAdamW if bf16 else torch.optim.AdamW)
    stepped = [opt.master[p] if bf16 else p for p in model.parameters()]  # what the optimizer updates
    ref_weights = [w.detach().float().clone().requires_grad_() for w in stepped]
    groups = [dict(g, params=[r for w, r in zip(stepped, ref_weights) if any(w is q for q in g["params"])])
              for g in opt.param_groups]
    assert sum(len(g["params"]) for g in groups) == len(ref_weights)  # every weight in its group (decay or not)
    ref = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in model.parameters()]
        scale = torch.tensor(0.25 + 0.25 * step)  # clipping active: every gradient multiplied
        for p, w, g in zip(model.parameters(), ref_weights, grads):
            p.grad = g.clone()
            w.grad = g.float() * scale
        optim.clipped_step(opt, [p.grad for p in model.parameters()], scale)
        ref.step()
        assert not hasattr(getattr(opt, "inner", opt), "grad_scale")  # nothing left behind for the next step
        for w, r in zip(stepped, ref_weights):
            assert torch.allclose(w, r, rtol=0, atol=1e-6), (step, (w - r).abs().max())
