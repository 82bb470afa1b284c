"""The DeepSeek-V3 / Kimi-K2 recipe at tiny size under every layout against one process, and its
training run's export."""

from __future__ import annotations

import json

import pytest
import torch

import export_hf
from helpers import assert_same_training, hf_logits, our_logits, parity_run, SP, tokens


# The DeepSeek-V3 / Kimi-K2 recipe at tiny size: sigmoid scores with aux-loss-free bias updates, 2 groups of
# 2 experts with 1 kept, routed weights x 2.5, a shared expert, and layer 0 dense (so a PP2 stage 0 has no MoE).
DEEPSEEK_FLAGS = ["--router-score-function", "sigmoid", "--router-bias-update-rate", "0.01",
                  "--router-num-groups", "2", "--router-group-topk", "1", "--router-topk-scaling-factor", "2.5",
                  "--num-shared-experts", "1", "--first-k-dense-layers", "1"]


CAPACITY = ["--moe-capacity-factor", "1.0"]


@pytest.fixture(scope="module")
def deepseek_one_process(tmp_path_factory):
    """The one-process references of the recipe, without and with an expert capacity."""
    tmp = tmp_path_factory.mktemp("deepseek")
    return tmp / "one", {"dropless": parity_run(tmp, "one", 1, [], 4, DEEPSEEK_FLAGS),
                         "capacity": parity_run(tmp, "one_capacity", 1, [], 4, DEEPSEEK_FLAGS + CAPACITY)}


# name: (ranks, layout flags, micro-batches per DP rank, reference and its extra flags)
DEEPSEEK_LAYOUTS = {
    "dp2_ep2": (2, ["--expert-parallel-size", "2"], 2, "dropless"),
    "pp2_stage0_dense": (2, ["--pipeline-parallel-size", "2"], 4, "dropless"),
    "tp2": (2, ["--tensor-parallel-size", "2", "--expert-parallel-size", "1"], 4, "dropless"),
    "tp2_ep2_capacity": (2, ["--tensor-parallel-size", "2"], 4, "capacity"),
}


@pytest.mark.parametrize("name", list(DEEPSEEK_LAYOUTS))
def test_deepseek_style_recipe_matches_one_process(name, deepseek_one_process, tmp_path):
    nproc, layout, micro, ref = DEEPSEEK_LAYOUTS[name]
    reference = deepseek_one_process[1][ref]
    extra = DEEPSEEK_FLAGS + (CAPACITY if ref == "capacity" else [])
    worst = assert_same_training(reference, parity_run(tmp_path, name, nproc, layout, micro, extra))
    assert list(reference[0][0]["expert_load"]) == ["1"]  # layer 0 is dense
    assert reference[1]["layers.1.mlp.router.expert_bias"].abs().sum() > 0  # the bias moved
    if ref == "capacity":
        assert any(r["dropped_fraction"]["1"] > 0 for r in reference[0])  # the capacity did drop
    print(f"{name}: max relative loss difference {worst:.2e}")


def test_recipe_with_mtp_and_head_dim_under_sp_and_interleaved_tp2_pp2_matches_one_process(tmp_path):
    """Issues 14 and 15 at once: the recipe above with --head-dim 16 (attention 64 wide over hidden 32)
    and an MTP module, trained on TP2 x PP2 with sequence parallelism and 2 chunks of 1 layer per rank
    (rank 0's first chunk is the dense layer 0; the MTP module follows rank 1's last chunk)."""
    model = DEEPSEEK_FLAGS + ["--num-layers", "4", "--head-dim", "16", "--mtp-num-layers", "1"]
    reference = parity_run(tmp_path, "one", 1, [], 4, model)
    layout = SP + ["--pipeline-parallel-size", "2", "--num-layers-per-virtual-stage", "1"]
    candidate = parity_run(tmp_path, "tp2_pp2_sp_interleaved", 4, layout, 4, model)
    worst = assert_same_training(reference, candidate)
    for a, b in zip(reference[0], candidate[0]):
        assert abs(a["mtp_loss"] - b["mtp_loss"]) / a["mtp_loss"] < 1e-4
    assert list(reference[0][0]["expert_load"]) == ["1", "2", "3", "4"]  # layer 0 dense; 4 is the MTP block
    print(f"recipe under TP2 x PP2, SP, interleaved: max relative loss difference {worst:.2e}")


def test_deepseek_style_training_run_exports_to_glm4moe_with_its_moved_bias(deepseek_one_process, tmp_path):
    pytest.importorskip("safetensors")
    st = pytest.importorskip("safetensors.torch")
    path, references = deepseek_one_process
    weights = references["dropless"][1]
    export_hf.export(str(path), str(tmp_path / "hf"))
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["model_type"], config["first_k_dense_replace"], config["n_group"], config["topk_group"],
            config["routed_scaling_factor"], config["n_shared_experts"]) == ("glm4_moe", 1, 2, 1, 2.5, 1)
    saved = st.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(saved["model.layers.1.mlp.gate.e_score_correction_bias"],
                       weights["layers.1.mlp.router.expert_bias"])
    x = tokens(256)
    theirs, _ = hf_logits(tmp_path / "hf", x)
    assert (our_logits(str(path), x) - theirs).abs().max() < 1e-4
