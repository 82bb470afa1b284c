"""Tests of scripts/export_hf.py, import_hf.py, generate.py and plot_metrics.py (to merge into test_moe.py).

Export and import are checked against transformers' own forward pass (Qwen3MoeForCausalLM,
Qwen3ForCausalLM; fp32 logits within 1e-4), KV-cached generation against the same model
recomputing the whole sequence, plots against the metrics of a real training run. Tests that
need the extras (requirements-extras.txt) skip when they are missing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt_io
from moe_layers import ModelConfig, MoETransformer
from test_moe import HERE, TINY_FLAGS, run_cli, tiny_config, train_records

sys.path.insert(0, os.path.join(HERE, "scripts"))
import export_hf  # noqa: E402
import generate  # noqa: E402
import import_hf  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(HERE, "scripts", name)] + args, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=HERE)


def save_in_process(model: MoETransformer, root) -> str:
    """A one-rank checkpoint of `model` as the trainer writes it (no optimizer state)."""
    payload = ckpt_io.rank_payload(model, torch.optim.AdamW(model.parameters()), 0, 0, 0, 1)
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 0, "skipped_steps": 0,
            "model": dataclasses.asdict(model.cfg), "train": {"router_aux_loss_coef": 0.01},
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    return ckpt_io.save_checkpoint(str(root), 0, payload, meta, 0, 1)


def briefly_train(model: MoETransformer, steps: int = 3) -> None:
    """A few AdamW steps on random tokens, so that norms and router weights move off their init."""
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, model.cfg.vocab_size, (4, model.cfg.seq_length + 1), generator=gen)
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.output.flatten(0, 1), x[:, 1:].flatten()) + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def our_logits(path: str, x: torch.Tensor) -> torch.Tensor:
    ckpt = ckpt_io.read_checkpoint(path)
    model = MoETransformer(ModelConfig(**ckpt.meta["model"]))
    ckpt_io.load_into(ckpt, model, None)
    with torch.no_grad():
        return model(x).output


def hf_logits(folder: str, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        return model(x).logits, type(model).__name__


def tokens(vocab: int, shape: tuple[int, int] = (2, 16), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 6-step run (eval every 3) with checkpoint and metrics: exported, imported, sampled, plotted."""
    d = tmp_path_factory.mktemp("trained")
    r = run_cli(TINY_FLAGS + ["--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2",
                              "--metrics-file", str(d / "m.jsonl"), "--save", str(d / "ck")])
    assert r.returncode == 0, r.stderr
    return d


# --------------------------------------------------------------------------- export
EXPORT_CONFIGS = {
    "dense": dict(num_experts=0),
    "every_layer_top2_normalised_gqa": dict(),
    "interval2_top1": dict(num_layers=3, moe_layer_interval=2, num_experts_per_token=1),
    "top2_unnormalised": dict(norm_topk_prob=False),
    "mha_top1_unnormalised": dict(num_kv_heads=4, num_experts_per_token=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("trained_steps", [0, 3])
@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_export_gives_transformers_the_same_logits(name, trained_steps, tmp_path):
    pytest.importorskip("safetensors")
    cfg = tiny_config(**EXPORT_CONFIGS[name])
    model = MoETransformer(cfg, seed=3)
    if trained_steps:
        briefly_train(model, trained_steps)
    ck = save_in_process(model, tmp_path / "ck")
    export_hf.export(ck, str(tmp_path / "hf"))
    x = tokens(cfg.vocab_size)
    theirs, arch = hf_logits(tmp_path / "hf", x)
    assert arch == ("Qwen3MoeForCausalLM" if cfg.num_experts else "Qwen3ForCausalLM")
    assert (our_logits(ck, x) - theirs).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp2") / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "3", "--tensor-parallel-size", "2", "--save", str(d)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.parametrize("run", ["one_process", "tp2"])
def test_checkpoint_of_a_training_run_exports_to_the_same_logits(run, trained, tp2_run, tmp_path):
    pytest.importorskip("safetensors")
    ck = str(trained / "ck") if run == "one_process" else str(tp2_run)
    meta = ckpt_io.read_checkpoint(ck).meta
    assert meta["layout"]["tp"] == (2 if run == "tp2" else 1) and len(meta["files"]) == meta["layout"]["world_size"]
    export_hf.export(ck, str(tmp_path / "hf"))
    x = tokens(256)
    theirs, _ = hf_logits(tmp_path / "hf", x)
    assert (our_logits(ck, x) - theirs).abs().max() < 1e-4


def test_export_cli_writes_config_and_bf16_weights(trained, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    r = run_script("export_hf.py", ["--checkpoint", str(trained / "ck"), "--out", str(tmp_path / "hf"),
                                    "--dtype", "bfloat16"])
    assert r.returncode == 0, r.stderr
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["model_type"] == "qwen3_moe" and config["torch_dtype"] == "bfloat16"
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 2, 32)
    weights = safetensors.load_file(str(tmp_path / "hf" / "model.safetensors"))
    ours = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(trained / "ck")))
    assert len(weights) == sum(not k.endswith(".expert_bias") for k in ours)  # zero biases are left out
    assert torch.equal(weights["model.layers.1.mlp.gate.weight"], ours["layers.1.mlp.router.weight"].bfloat16())
    assert torch.equal(weights["model.layers.0.mlp.experts.3.down_proj.weight"],
                       ours["layers.0.mlp.experts.3.down_proj.weight"].bfloat16())


def test_export_refuses_options_qwen3_cannot_express(trained, tmp_path):
    pytest.importorskip("safetensors")
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(trained / "ck", ck)
    meta_path = ck / "step_00000006" / "meta.json"
    meta = json.load(open(meta_path))
    meta["model"]["num_shared_experts"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(export_hf.UnsupportedModel, match="num_shared_experts"):
        export_hf.export(str(ck), str(tmp_path / "hf"))
    model = MoETransformer(tiny_config(), seed=3)
    model.layers["1"].mlp.router.expert_bias[2] = 0.5  # aux-loss-free balancing moved it
    with pytest.raises(export_hf.UnsupportedModel, match="layers.1.mlp.router.expert_bias is non-zero"):
        export_hf.export(save_in_process(model, tmp_path / "biased"), str(tmp_path / "hf"))


# --------------------------------------------------------------------------- import
def test_export_then_import_gives_identical_weights_and_training_continues(trained, tmp_path):
    pytest.importorskip("safetensors")
    export_hf.export(str(trained / "ck"), str(tmp_path / "hf"))
    r = run_script("import_hf.py", ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
    assert r.returncode == 0, r.stderr
    before, after = ckpt_io.read_checkpoint(str(trained / "ck")), ckpt_io.read_checkpoint(str(tmp_path / "imported"))
    a, b = ckpt_io.full_state_dict(before), ckpt_io.full_state_dict(after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert after.meta["model"] == before.meta["model"]
    assert (after.meta["step"], after.optim, after.meta["layout"]["world_size"]) == (0, {}, 1)
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(tmp_path / "imported"), "--max-steps", "2", "--micro-batch-size", "2",
                 "--log-interval", "1", "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    records = train_records(str(metrics))
    assert [x["step"] for x in records] == [1, 2] and all(math.isfinite(x["loss"]) for x in records)


def hf_model(kind: str):
    """A tiny transformers model built from a config (no download), every weight perturbed off its init."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=16, rope_theta=5000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        moe = dict(moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
        if kind == "qwen3_moe_interval2_top1":
            common["num_hidden_layers"] = 3
            moe.update(decoder_sparse_step=2, num_experts_per_tok=1, norm_topk_prob=False)
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**common, **moe))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_moe_interval2_top1", "qwen3"])
def test_import_of_a_transformers_model_gives_its_logits(kind, tmp_path):
    pytest.importorskip("safetensors")
    model = hf_model(kind)
    model.save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    x = tokens(256)
    with torch.no_grad():
        theirs = model(x).logits
    assert (our_logits(str(tmp_path / "ck"), x) - theirs).abs().max() < 1e-4


def test_pretraining_continues_from_an_imported_transformers_model(tmp_path):
    pytest.importorskip("safetensors")
    hf_model("qwen3_moe").save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(tmp_path / "ck"), "--max-steps", "3", "--micro-batch-size", "2", "--log-interval", "1",
                 "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics),
                 "--save", str(tmp_path / "ck")])
    assert r.returncode == 0, r.stderr
    records = train_records(str(metrics))
    assert [x["step"] for x in records] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in records)
    assert ckpt_io.read_checkpoint(str(tmp_path / "ck")).meta["step"] == 3


def test_import_reads_sharded_files_and_fused_experts(tmp_path):
    """transformers 5.x holds experts fused (gate_up_proj (E, 2F, D), down_proj (E, D, F)); big models shard."""
    st = pytest.importorskip("safetensors.torch")
    model = hf_model("qwen3_moe")
    model.save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "plain"))
    weights = st.load_file(str(tmp_path / "hf" / "model.safetensors"))
    fused = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([weights.pop(f"{p}.{e}.gate_proj.weight"), weights.pop(f"{p}.{e}.up_proj.weight")])
                   for e in range(4)]  # (2F, D) each
        fused[f"{p}.gate_up_proj"] = torch.stack(gate_up)  # (E, 2F, D)
        fused[f"{p}.down_proj"] = torch.stack([weights.pop(f"{p}.{e}.down_proj.weight") for e in range(4)])
    rest = weights  # everything but the experts
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    st.save_file(rest, str(out / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    st.save_file(fused, str(out / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in rest},
                  **{k: "model-00002-of-00002.safetensors" for k in fused}}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    import_hf.import_hf(str(out), str(tmp_path / "from_sharded"))
    a = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / "plain")))
    b = ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(tmp_path / "from_sharded")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


VALID_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=32, intermediate_size=64,
                       moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                       norm_topk_prob=True, max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, hidden_act="silu")


@pytest.mark.parametrize("change,words", [
    (dict(mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(head_dim=16), "head_dim 16"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(model_type="mixtral"), "model_type 'mixtral'"),
])
def test_import_refuses_configs_we_cannot_represent(change, words):
    assert import_hf.model_config_from_hf(VALID_QWEN3_MOE).num_experts == 4
    with pytest.raises(import_hf.UnsupportedModel, match=words):
        import_hf.model_config_from_hf({**VALID_QWEN3_MOE, **change})


def test_import_cli_refusal_exits_2_with_one_error_line_and_writes_nothing(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**VALID_QWEN3_MOE, "attention_bias": True}))
    r = run_script("import_hf.py", ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")])
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "attention_bias" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def sampler(trained):
    return generate.load_model(str(trained / "ck"))


def test_kv_cache_logits_equal_full_recompute(sampler):
    """Prompt of 5, a chunk of 4 (bottom-right causal mask), then one token at a time up to seq_length."""
    x = tokens(256, (1, 16), seed=5)
    with torch.no_grad():
        full = sampler(x).output[0]  # (T, V)
        caches = [{} for _ in sampler.layers]
        got = [sampler(x[:, :5], positions=torch.arange(5), kv_caches=caches).output[0],
               sampler(x[:, 5:9], positions=torch.arange(5, 9), kv_caches=caches).output[0]]
        for t in range(9, 16):
            got.append(sampler(x[:, t:t + 1], positions=torch.tensor([t]), kv_caches=caches).output[0])
    assert caches[0]["k"].shape[2] == 16
    assert (torch.cat(got) - full).abs().max() < 1e-5


def test_greedy_with_cache_equals_greedy_recomputed_and_stops_at_seq_length(sampler):
    prompt = list(b"def ")
    cached, stopped = generate.generate(sampler, prompt, 12, temperature=0)
    plain, _ = generate.generate(sampler, prompt, 12, temperature=0, use_cache=False)
    assert cached == plain and len(cached) == 12 and not stopped
    # by hand: argmax of the full forward pass, one token at a time
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(sampler(torch.tensor([ids])).output[0, -1].argmax()))
    assert ids[4:] == cached
    # past the rotary table: the cache stops after the token fed at position 15 predicts one more
    long_cached, stopped = generate.generate(sampler, prompt, 20, temperature=0)
    long_plain, _ = generate.generate(sampler, prompt, 20, temperature=0, use_cache=False)
    assert stopped and len(long_cached) == 16 - len(prompt) + 1 and len(long_plain) == 20
    assert long_plain[:len(long_cached)] == long_cached


def test_seeded_sampling_is_reproducible_and_the_same_with_and_without_cache(sampler):
    draw = dict(temperature=1.5, top_k=0, top_p=1.0)
    a, _ = generate.generate(sampler, [10], 15, seed=1, **draw)
    assert a == generate.generate(sampler, [10], 15, seed=1, **draw)[0]
    assert a == generate.generate(sampler, [10], 15, seed=1, use_cache=False, **draw)[0]
    long_a, _ = generate.generate(sampler, [10], 40, seed=1, use_cache=False, **draw)
    long_b, _ = generate.generate(sampler, [10], 40, seed=2, use_cache=False, **draw)
    assert long_a[:15] == a and long_a != long_b  # 40 draws at temperature 1.5: a repeat is hopeless


def test_top_k_1_and_tiny_top_p_equal_greedy(sampler):
    greedy, _ = generate.generate(sampler, list(b"import"), 10, temperature=0)
    assert generate.generate(sampler, list(b"import"), 10, temperature=1.0, top_k=1, seed=3)[0] == greedy
    assert generate.generate(sampler, list(b"import"), 10, temperature=1.0, top_p=1e-6, seed=4)[0] == greedy


def test_sampling_probs_by_hand():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    assert torch.allclose(generate.sampling_probs(logits, 1.0), p)
    assert torch.allclose(generate.sampling_probs(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(generate.sampling_probs(logits, 1.0, top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert torch.allclose(generate.sampling_probs(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    root = p.sqrt()  # temperature 2: p^(1/2), renormalised
    assert torch.allclose(generate.sampling_probs(logits, 2.0), root / root.sum())


def test_generate_cli_prints_the_greedy_text_and_refuses_long_prompts(trained, sampler):
    r = run_script("generate.py", ["--checkpoint", str(trained / "ck"), "--prompt", "def ", "--max-new-tokens", "8",
                                   "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    expected = bytes(list(b"def ") + generate.generate(sampler, list(b"def "), 8, temperature=0)[0])
    assert r.stdout.rstrip("\n") == expected.decode("utf-8", errors="replace")
    assert "tokens/s" in r.stderr
    r = run_script("generate.py", ["--checkpoint", str(trained / "ck"), "--prompt", "x" * 17])
    assert r.returncode == 2 and "more than the model's seq_length 16" in r.stderr and "Traceback" not in r.stderr


def test_generate_cli_takes_and_prints_ids_for_token_vocabularies(tmp_path):
    model = MoETransformer(tiny_config(vocab_size=64), seed=5).eval()
    ck = save_in_process(model, tmp_path / "ck")
    r = run_script("generate.py", ["--checkpoint", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                                   "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).output[0, -1].argmax()))
    assert r.stdout.strip() == ",".join(map(str, ids))


# ---------------------------------------------------------------------------- plots
def test_plot_metrics_writes_every_figure_as_small_pngs(trained, tmp_path):
    pytest.importorskip("matplotlib")
    records = [json.loads(line) for line in open(trained / "m.jsonl")]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    r = run_script("plot_metrics.py", [str(trained / "m.jsonl"), "--out", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    expected = {"loss.png", "router_losses.png", "lr.png", "grad_norm.png", "throughput.png",
                "expert_load_layer0.png", "expert_load_layer1.png"}
    assert set(os.listdir(tmp_path / "plots")) == expected
    for name in expected:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 1000 < len(data) < 60_000, (name, len(data))
