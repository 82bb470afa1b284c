"""Export to and import from transformers: the same logits both ways, sharded files, refusals of
what the other side cannot express, Qwen3, Qwen3-MoE and GLM-4-MoE."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt_io
from moe_layers import MoETransformer
import export_hf
import import_hf
from helpers import (assert_clean_refusal, hf_logits, our_logits, run_cli, run_script, save_in_process, tiny_config,
                     TINY_FLAGS, tokens, train_records)


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
    (dict(mlp_only_layers=[0, 1]), "mlp_only_layers"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(model_type="mixtral"), "model_type 'mixtral'"),
])
def test_import_refuses_configs_we_cannot_represent(change, words):
    assert import_hf.model_config_from_hf(VALID_QWEN3_MOE).num_experts == 4
    with pytest.raises(import_hf.UnsupportedModel, match=words):
        import_hf.model_config_from_hf({**VALID_QWEN3_MOE, **change})


def test_import_cli_refusal_exits_2_with_one_error_line_and_writes_nothing(tmp_path):
    pytest.importorskip("safetensors")  # without it the script's first error is the missing extra
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**VALID_QWEN3_MOE, "attention_bias": True}))
    r = run_script("import_hf.py", ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")])
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "attention_bias" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "ck").exists()


def test_head_dim_import_and_export_give_transformers_logits(tmp_path):
    """A Qwen3-MoE with head_dim 16 over hidden 32 and 4 heads: import -> equal logits; export -> equal logits."""
    pytest.importorskip("safetensors")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=16, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                         moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.save_pretrained(str(tmp_path / "hf"))
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"))
    assert ckpt_io.read_checkpoint(str(tmp_path / "ck")).meta["model"]["head_dim"] == 16
    x = tokens(256)
    with torch.no_grad():
        theirs = model(x).logits
    assert (our_logits(str(tmp_path / "ck"), x) - theirs).abs().max() < 1e-4
    export_hf.export(str(tmp_path / "ck"), str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["head_dim"] == 16
    exported, _ = hf_logits(tmp_path / "out", x)
    assert (exported - theirs).abs().max() < 1e-4
    metrics = tmp_path / "m.jsonl"  # and it trains on, under TP2 (heads split as before)
    r = run_cli(["--load", str(tmp_path / "ck"), "--max-steps", "2", "--micro-batch-size", "2", "--seq-length", "16",
                 "--log-interval", "1", "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics),
                 "--tensor-parallel-size", "2", "--dist-timeout", "60"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in train_records(str(metrics))] == [1, 2]


DEEPSEEK_EXPORTS = {  # model flags -> transformers class
    "groups_scale_shared_first_k": (dict(num_layers=3, num_experts=8, router_score_function="sigmoid",
                                         router_num_groups=4, router_group_topk=2, router_topk_scaling_factor=2.5,
                                         num_shared_experts=2, first_k_dense_layers=1), "Glm4MoeForCausalLM"),
    "sigmoid_no_shared_experts": (dict(router_score_function="sigmoid"), "Glm4MoeForCausalLM"),
    "softmax_first_k_dense": (dict(num_layers=3, first_k_dense_layers=1), "Qwen3MoeForCausalLM"),
    "softmax_layer_list": (dict(num_layers=4, moe_layer_list="0,2,3"), "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("name", list(DEEPSEEK_EXPORTS))
def test_deepseek_style_export_gives_transformers_the_same_logits(name, tmp_path):
    pytest.importorskip("safetensors")
    kw, arch = DEEPSEEK_EXPORTS[name]
    cfg = tiny_config(**kw)
    model = MoETransformer(cfg, seed=3)
    briefly_train(model, 2)
    if cfg.router_score_function == "sigmoid":
        for moe in model.moe_layers().values():  # as aux-loss-free balancing leaves it
            moe.router.expert_bias.copy_(0.05 * torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(9)))
    ck = save_in_process(model, tmp_path / "ck")
    export_hf.export(ck, str(tmp_path / "hf"))
    x = tokens(cfg.vocab_size)
    theirs, got = hf_logits(tmp_path / "hf", x)
    ours = our_logits(ck, x)
    assert got == arch
    assert (ours - theirs).abs().max() < 1e-4
    if arch == "Glm4MoeForCausalLM":  # transformers 4.x reads only these two (its default: half the head, 10000)
        written = json.load(open(tmp_path / "hf" / "config.json"))
        assert (written["partial_rotary_factor"], written["rope_theta"]) == (1.0, cfg.rope_theta)
    if cfg.router_num_groups > 1:  # the groups change the logits, so the equality above covers them
        ungrouped = MoETransformer(dataclasses.replace(cfg, router_num_groups=1, router_group_topk=1))
        ungrouped.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (ungrouped(x).output - ours).abs().max() > 1e-3
    # and back: the same weights and model config
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    before, after = ckpt_io.read_checkpoint(ck), ckpt_io.read_checkpoint(str(tmp_path / "back"))
    a, b = ckpt_io.full_state_dict(before), ckpt_io.full_state_dict(after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert after.meta["model"] == before.meta["model"]


def glm4_moe_model(**kw):
    """A tiny Glm4MoeForCausalLM built by transformers (no download), every weight and bias perturbed."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=16, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                  norm_topk_prob=True, use_qk_norm=True, num_nextn_predict_layers=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0})
    config.update(kw)
    model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(model.parameters()) + [b for n, b in model.named_buffers() if "correction_bias" in n]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.mul_(20)  # spread the router scores so that the groups decide
    return model.float().eval()


def test_import_of_a_transformers_glm4moe_gives_its_logits_and_trains_on(tmp_path):
    pytest.importorskip("safetensors")
    model = glm4_moe_model()
    model.save_pretrained(str(tmp_path / "hf"))
    r = run_script("import_hf.py", ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")])
    assert r.returncode == 0, r.stderr
    meta = ckpt_io.read_checkpoint(str(tmp_path / "ck")).meta["model"]
    assert (meta["router_score_function"], meta["router_num_groups"], meta["router_group_topk"],
            meta["router_topk_scaling_factor"], meta["num_shared_experts"], meta["first_k_dense_layers"]) == \
        ("sigmoid", 4, 2, 2.5, 1, 1)
    x = tokens(256)
    with torch.no_grad():
        theirs = model(x).logits
    assert (our_logits(str(tmp_path / "ck"), x) - theirs).abs().max() < 1e-4
    metrics = tmp_path / "m.jsonl"
    r = run_cli(["--load", str(tmp_path / "ck"), "--max-steps", "2", "--micro-batch-size", "2", "--log-interval", "1",
                 "--eval-interval", "0", "--no-progress", "--metrics-file", str(metrics)])
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in train_records(str(metrics))] == [1, 2]


# model flags -> words of the refusal (the flag to change)
UNEXPORTABLE = {
    "sigmoid_interval2": (dict(num_layers=4, router_score_function="sigmoid", moe_layer_interval=2),
                          "--moe-layer-interval"),
    "sigmoid_list_not_a_suffix": (dict(num_layers=3, router_score_function="sigmoid", moe_layer_list="0,2"),
                                  "--moe-layer-list"),
    "shared_width": (dict(router_score_function="sigmoid", num_shared_experts=1, shared_expert_ffn_hidden_size=16),
                     "--shared-expert-ffn-hidden-size"),
    "softmax_groups": (dict(router_num_groups=2), "--router-num-groups"),
    "softmax_scale": (dict(router_topk_scaling_factor=2.5), "--router-topk-scaling-factor"),
    "capacity": (dict(router_score_function="sigmoid", moe_capacity_factor=1.25), "--moe-capacity-factor"),
}


@pytest.mark.parametrize("case", list(UNEXPORTABLE))
def test_export_refuses_what_no_transformers_class_expresses(case, tmp_path):
    pytest.importorskip("safetensors")
    kw, words = UNEXPORTABLE[case]
    ck = save_in_process(MoETransformer(tiny_config(**kw)), tmp_path / "ck")
    with pytest.raises(export_hf.UnsupportedModel, match=words):
        export_hf.export(ck, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    if case == "sigmoid_interval2":
        r = run_script("export_hf.py", ["--checkpoint", ck, "--out", tmp_path / "hf"])
        assert_clean_refusal(r, "--moe-layer-interval")


@pytest.mark.parametrize("change,words", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}), "partial_rotary_factor 0.5"),
    (dict(use_qk_norm=False), "use_qk_norm is false"),
    (dict(norm_topk_prob=False), "norm_topk_prob is false"),
])
def test_import_refuses_glm4moe_configs_we_cannot_represent(change, words):
    valid = dict(model_type="glm4_moe", vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4,
                 num_experts_per_tok=2, max_position_embeddings=16, use_qk_norm=True, norm_topk_prob=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0})
    assert import_hf.model_config_from_hf(valid).router_score_function == "sigmoid"
    with pytest.raises(import_hf.UnsupportedModel, match=words):
        import_hf.model_config_from_hf({**valid, **change})
