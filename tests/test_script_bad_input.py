"""Every script of scripts/ given hostile input: exit status 2, exactly one line starting with
`error:` that names what to change, no traceback, no hang, and nothing that existed before changed."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import checkpoint as ckpt_io
from moe_layers import ModelConfig, MoETransformer
import export_hf
from helpers import fifo, folder, HERE, run_script, snapshot, text_folder, write


# --------------------------------------------------------------- scripts: bad input (issue 16, cause 6)
# Every script of scripts/ given hostile input: exit status 2, exactly one line starting with
# `error:` that names what to change, no traceback, no hang, and nothing that existed before changed.
SCRIPT_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=2, num_kv_heads=2, ffn_hidden_size=64,
            moe_ffn_hidden_size=32, num_experts=4, seq_length=32)


SCRIPT_FLAGS = [a for k, v in SCRIPT_MODEL.items() for a in (f"--{k.replace('_', '-')}", str(v))] + \
             ["--micro-batch-size", "2", "--max-steps", "2", "--eval-interval", "0", "--log-interval", "1",
              "--no-progress"]


SCRIPT_STEP = "step_00000002"  # the step folder of the tiny run


def save_model(model: MoETransformer, root: Path) -> Path:
    """A one-rank checkpoint of a dense model (its parameter names are the checkpoint's keys)."""
    assert model.cfg.num_experts == 0
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt_io.save_full_state(str(root), tensors, dataclasses.asdict(model.cfg), {})
    return root


@dataclass
class World:
    """Good inputs shared by every case, read-only: each case copies what it spoils into its own folder."""
    root: Path
    moe: Path  # a run's --save folder (latest + step folder) written by minimal_pretrain.py
    metrics: Path  # that run's --metrics-file
    dense: Path  # a dense checkpoint root
    tokens: Path  # a dense checkpoint of a 64-token vocabulary


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    r = subprocess.run([sys.executable, os.path.join(HERE, "minimal_pretrain.py")] + SCRIPT_FLAGS +
                       ["--save", str(root / "moe"), "--metrics-file", str(root / "m.jsonl")],
                       capture_output=True, text=True, timeout=300, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    dense = save_model(MoETransformer(ModelConfig(**{**SCRIPT_MODEL, "num_experts": 0}), seed=1), root / "dense")
    tokens = save_model(MoETransformer(ModelConfig(**{**SCRIPT_MODEL, "num_experts": 0, "vocab_size": 64}), seed=2),
                        root / "tokens")
    return World(root, root / "moe", root / "m.jsonl", dense, tokens)


# ------------------------------------------------------------------ spoiled inputs, built per case
def copy_run(tmp: Path, w: World, edit_meta: Callable[[dict], None] | None = None) -> Path:
    """A copy of the MoE run, its meta.json edited by `edit_meta`."""
    ck = Path(shutil.copytree(w.moe, tmp / "ck"))
    if edit_meta:
        meta_path = ck / SCRIPT_STEP / "meta.json"
        meta = json.loads(meta_path.read_text())
        edit_meta(meta)
        meta_path.write_text(json.dumps(meta))
    return ck


def nan_weights(tmp: Path) -> Path:
    model = MoETransformer(ModelConfig(**{**SCRIPT_MODEL, "num_experts": 0}), seed=1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    return save_model(model, tmp / "nan")


def hf_folder(tmp: Path, w: World, edit_config: Callable[[dict], None] | None = None) -> Path:
    """The MoE run exported to transformers' format (in-process), its config.json edited by `edit_config`."""
    hf = tmp / "hf"
    export_hf.export(str(w.moe), str(hf))
    if edit_config:
        config = json.loads((hf / "config.json").read_text())
        edit_config(config)
        (hf / "config.json").write_text(json.dumps(config))
    return hf


def metrics_with_expert_counts(path: Path, counts: list[int]) -> Path:
    """Train records, one per step, whose layer 0 has these numbers of experts."""
    record = dict(loss=3.0, lm_loss=3.0, aux_loss=1.0, z_loss=0.1, lr=1e-3, grad_norm=1.0, tokens_per_sec=1e3)
    return write(path, "".join(json.dumps({"step": step, **record, "expert_load": {"0": [1 / n] * n}}) + "\n"
                               for step, n in enumerate(counts, 1)))


def fifo_and_self_link(tmp: Path) -> Path:
    """A folder holding nothing but a FIFO and a link to itself."""
    d = folder(tmp / "t")
    fifo(d / "pipe")
    os.symlink(d, d / "self")
    return d


def foreign_rank_file(tmp: Path, w: World) -> Path:
    """A copy of the MoE run whose rank file is some other torch.save file."""
    ck = copy_run(tmp, w)
    torch.save([1, 2, 3], ck / SCRIPT_STEP / "rank_00000.pt")
    return ck


def latest_is_a_folder(tmp: Path, w: World) -> Path:
    ck = copy_run(tmp, w)
    (ck / "latest").unlink()
    return folder(ck / "latest").parent


def hf_config_only(tmp: Path, w: World) -> Path:
    """A folder holding an exported config.json and no weights."""
    h = folder(tmp / "h")
    shutil.copy(hf_folder(tmp, w) / "config.json", h)
    return h


@dataclass
class Case:
    id: str
    script: str
    setup: Callable[[Path, World], list]  # (its folder, the shared inputs) -> the script's arguments
    words: str  # the error line holds these
    needs: str = ""  # an optional extra (requirements-extras.txt)


def gen(*args: object) -> Callable[[Path, World], list]:
    """generate.py on the MoE run with these flags."""
    return lambda tmp, w: ["--checkpoint", w.moe, *args]


def upc(*args: object, ck: Callable[[Path, World], Path] = lambda tmp, w: w.dense,
        out: Callable[[Path, World], Path] = lambda tmp, w: tmp / "out") -> Callable[[Path, World], list]:
    """upcycle.py of the dense checkpoint into a new folder, E 4, K 2, unless told otherwise."""
    return lambda tmp, w: ["--checkpoint", ck(tmp, w), "--out", out(tmp, w),
                           *(args or ("--num-experts", 4, "--num-experts-per-token", 2))]


def imp(hf: Callable[[Path, World], Path], *args: object) -> Callable[[Path, World], list]:
    """import_hf.py of the folder `hf` builds into a new folder."""
    return lambda tmp, w: ["--hf", hf(tmp, w), "--out", tmp / "out", *args]


CASES = [
    # ------------------------------------------------------------ inspect_checkpoint.py
    Case("inspect_missing", "inspect_checkpoint.py", lambda tmp, w: [tmp / "nothing"], "no such folder"),
    Case("inspect_latest_is_a_folder", "inspect_checkpoint.py",
         lambda tmp, w: [latest_is_a_folder(tmp, w)], "latest"),
    # ----------------------------------------------------------------------- generate.py
    Case("gen_missing_checkpoint", "generate.py", lambda tmp, w: ["--checkpoint", tmp / "no", "--prompt", "a"],
         "--checkpoint"),
    Case("gen_temperature_text", "generate.py", gen("--prompt", "a", "--temperature", "hot"), "--temperature"),
    # ------------------------------------------------------------------ plot_metrics.py
    Case("plot_missing_file", "plot_metrics.py", lambda tmp, w: [tmp / "m.jsonl", "--out", tmp / "p"],
         "no such file", "matplotlib"),
    Case("plot_empty_file", "plot_metrics.py", lambda tmp, w: [write(tmp / "m.jsonl", ""), "--out", tmp / "p"],
         "no train records", "matplotlib"),
    Case("plot_folder", "plot_metrics.py", lambda tmp, w: [folder(tmp / "m"), "--out", tmp / "p"],
         "not a regular file", "matplotlib"),
    Case("plot_fifo", "plot_metrics.py", lambda tmp, w: [fifo(tmp / "m"), "--out", tmp / "p"],
         "not a regular file", "matplotlib"),
    Case("plot_not_json", "plot_metrics.py",
         lambda tmp, w: [write(tmp / "m.jsonl", "step 1 loss 3\n\x00\xff\n"), "--out", tmp / "p"],
         "no train records", "matplotlib"),
    Case("plot_records_missing_fields", "plot_metrics.py",
         lambda tmp, w: [write(tmp / "m.jsonl", '{"step": 1, "loss": 3.0}\n[1, 2]\n{"loss": 2}\n'),
                         "--out", tmp / "p"], "no train records", "matplotlib"),
    Case("plot_out_is_a_file", "plot_metrics.py", lambda tmp, w: [w.metrics, "--out", write(tmp / "p", "x")],
         "--out", "matplotlib"),
    # ------------------------------------------------------------------ prepare_data.py
    Case("prep_fifo_input", "prepare_data.py", lambda tmp, w: [fifo(tmp / "p"), "--out", tmp / "d"],
         "not a regular file"),
    Case("prep_only_fifo_and_self_link", "prepare_data.py",
         lambda tmp, w: [fifo_and_self_link(tmp), "--out", tmp / "d"], "no text files"),
    Case("prep_val_fraction_text", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "tenth"], "--val-fraction"),
    Case("prep_out_holds_data", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", write(tmp / "d" / "train.bin", b"\1\0").parent], "already holds"),
    # ---------------------------------------------------------------------- export_hf.py
    Case("export_out_not_empty", "export_hf.py",
         lambda tmp, w: ["--checkpoint", w.moe, "--out", write(tmp / "hf" / "keep.txt", "mine").parent],
         "not an empty folder", "safetensors"),
    Case("export_out_inside_checkpoint", "export_hf.py",
         lambda tmp, w: ["--checkpoint", w.moe, "--out", w.moe / "hf"], "inside the checkpoint", "safetensors"),
    # ---------------------------------------------------------------------- import_hf.py
    Case("import_out_is_a_run", "import_hf.py", lambda tmp, w: ["--hf", hf_folder(tmp, w), "--out", w.moe],
         "already holds a checkpoint", "safetensors"),
    Case("import_out_is_a_step_folder", "import_hf.py",
         lambda tmp, w: ["--hf", hf_folder(tmp, w), "--out", w.moe / SCRIPT_STEP], "already holds", "safetensors"),
    Case("import_config_is_a_fifo", "import_hf.py",
         imp(lambda tmp, w: fifo(tmp / "h" / "config.json").parent), "not a regular file", "safetensors"),
    Case("import_weights_fifo", "import_hf.py",
         imp(lambda tmp, w: fifo(hf_config_only(tmp, w) / "model.safetensors").parent), "not a regular file",
         "safetensors"),
    # ----------------------------------------------------------------------- upcycle.py
    Case("upcycle_out_is_a_run", "upcycle.py", upc(out=lambda tmp, w: w.moe), "already holds a checkpoint"),
    Case("upcycle_out_is_the_dense_run", "upcycle.py", upc(out=lambda tmp, w: w.dense), "lies inside the dense checkpoint"),
    Case("upcycle_out_inside_the_dense_run", "upcycle.py", upc(out=lambda tmp, w: w.dense / "sub"),
         "inside the dense checkpoint"),
    # ----------------------------------------------------------------- compare_routing.py
    Case("routing_zero_jobs", "compare_routing.py", lambda tmp, w: ["--jobs", 0, "--out", tmp / "r"], "--jobs"),
]


# The same contract checked in-process through the script's main(), because one torch import per
# process costs seconds: every case that cannot hang. Above, as processes: what could hang (FIFOs),
# the --out refusals issue 16 names, and for each script at least one case that shows the process
# itself exits 2 with no traceback.
IN_PROCESS_CASES = [
    Case("inspect_file", "inspect_checkpoint.py", lambda tmp, w: [w.metrics], "no such folder"),
    Case("inspect_empty_folder", "inspect_checkpoint.py", lambda tmp, w: [folder(tmp / "e")], "latest"),
    Case("inspect_meta_not_json", "inspect_checkpoint.py",
         lambda tmp, w: [write(copy_run(tmp, w) / SCRIPT_STEP / "meta.json", "{").parent], "meta.json"),
    Case("inspect_meta_without_layout", "inspect_checkpoint.py",
         lambda tmp, w: [copy_run(tmp, w, lambda m: m.pop("layout"))], "layout"),
    Case("inspect_foreign_torch_file", "inspect_checkpoint.py",
         lambda tmp, w: [foreign_rank_file(tmp, w)], "rank_00000.pt"),
    Case("gen_checkpoint_is_a_file", "generate.py", lambda tmp, w: ["--checkpoint", w.metrics, "--prompt", "a"],
         "no such folder"),
    Case("gen_empty_prompt", "generate.py", gen("--prompt", ""), "empty"),
    Case("gen_prompt_longer_than_seq_length", "generate.py", gen("--prompt", "x" * 33), "seq_length 32"),
    Case("gen_ids_over_vocab", "generate.py", gen("--prompt-ids", "1,256"), "[0, 256)"),
    Case("gen_text_for_token_vocab", "generate.py",
         lambda tmp, w: ["--checkpoint", w.tokens, "--prompt", "hi"], "--prompt-ids"),
    Case("gen_model_config_of_another_kind", "generate.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(hidden_size="wide")),
                         "--prompt", "a"], "--checkpoint"),
    Case("gen_invalid_model_config", "generate.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(num_attention_heads=3)),
                         "--prompt", "a"], "model config is invalid"),
    Case("gen_nan_weights", "generate.py", lambda tmp, w: ["--checkpoint", nan_weights(tmp), "--prompt", "a"],
         "NaN"),
    Case("gen_ids_not_numbers", "generate.py", gen("--prompt-ids", "1,two"), "--prompt-ids"),
    Case("gen_ids_empty_item", "generate.py", gen("--prompt-ids", "1,,2"), "--prompt-ids"),
    Case("gen_ids_negative", "generate.py", gen("--prompt-ids", "-1"), "[0, 256)"),
    Case("gen_prompt_and_ids", "generate.py", gen("--prompt", "a", "--prompt-ids", "1"), "exactly one"),
    Case("gen_no_prompt", "generate.py", gen(), "exactly one"),
    Case("gen_temperature_nan", "generate.py", gen("--prompt", "a", "--temperature", "nan"), "--temperature"),
    Case("gen_temperature_inf", "generate.py", gen("--prompt", "a", "--temperature", "inf"), "--temperature"),
    Case("gen_temperature_negative", "generate.py", gen("--prompt", "a", "--temperature", "-1"), "--temperature"),
    Case("gen_top_p_zero", "generate.py", gen("--prompt", "a", "--top-p", "0"), "--top-p"),
    Case("gen_top_p_over_one", "generate.py", gen("--prompt", "a", "--top-p", "1.5"), "--top-p"),
    Case("gen_top_p_nan", "generate.py", gen("--prompt", "a", "--top-p", "nan"), "--top-p"),
    Case("gen_top_k_negative", "generate.py", gen("--prompt", "a", "--top-k", "-1"), "--top-k"),
    Case("gen_max_new_tokens_negative", "generate.py", gen("--prompt", "a", "--max-new-tokens", "-3"),
         "--max-new-tokens"),
    Case("gen_seed_negative", "generate.py", gen("--prompt", "a", "--seed", "-1"), "--seed"),
    Case("gen_cuda_without_gpu", "generate.py", gen("--prompt", "a", "--device", "cuda"), "--device"),
    Case("plot_expert_count_changes", "plot_metrics.py",
         lambda tmp, w: [metrics_with_expert_counts(tmp / "m.jsonl", [2, 4]), "--out", tmp / "p"],
         "number of experts", "matplotlib"),
    Case("prep_missing_input", "prepare_data.py", lambda tmp, w: [tmp / "no", "--out", tmp / "d"], "no such"),
    Case("prep_empty_folder", "prepare_data.py", lambda tmp, w: [folder(tmp / "t"), "--out", tmp / "d"],
         "no text files"),
    Case("prep_empty_file", "prepare_data.py", lambda tmp, w: [write(tmp / "a.txt", ""), "--out", tmp / "d"],
         "split is empty"),
    Case("prep_binary_only", "prepare_data.py",
         lambda tmp, w: [write(tmp / "t" / "a.bin", b"\0\1\2" * 10).parent, "--out", tmp / "d"], "no text files"),
    Case("prep_val_fraction_zero", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "0"], "--val-fraction"),
    Case("prep_val_fraction_one", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "1"], "--val-fraction"),
    Case("prep_val_fraction_nan", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", tmp / "d", "--val-fraction", "nan"], "--val-fraction"),
    Case("prep_out_is_a_file", "prepare_data.py",
         lambda tmp, w: [text_folder(tmp), "--out", write(tmp / "d", "x")], "--out"),
    Case("export_missing_checkpoint", "export_hf.py", lambda tmp, w: ["--checkpoint", tmp / "no", "--out", tmp / "hf"],
         "no such folder", "safetensors"),
    Case("export_out_is_a_file", "export_hf.py", lambda tmp, w: ["--checkpoint", w.moe, "--out", w.metrics],
         "not an empty folder", "safetensors"),
    Case("export_shapes_do_not_fit_config", "export_hf.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(moe_ffn_hidden_size=16)),
                         "--out", tmp / "hf"], "shape", "safetensors"),
    Case("export_config_claims_a_billion_layers", "export_hf.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(num_layers=10**9)),
                         "--out", tmp / "hf"], "more layers or experts", "safetensors"),
    Case("export_model_config_of_another_kind", "export_hf.py",
         lambda tmp, w: ["--checkpoint", copy_run(tmp, w, lambda m: m["model"].update(num_layers=None)),
                         "--out", tmp / "hf"], "--checkpoint", "safetensors"),
    Case("export_bad_dtype", "export_hf.py", lambda tmp, w: ["--checkpoint", w.moe, "--out", tmp / "hf",
                                                             "--dtype", "float8"], "--dtype", "safetensors"),
    Case("import_config_is_a_folder", "import_hf.py",
         imp(lambda tmp, w: folder(tmp / "h" / "config.json").parent), "not a regular file", "safetensors"),
    Case("import_weights_garbage", "import_hf.py",
         imp(lambda tmp, w: write(hf_folder(tmp, w) / "model.safetensors", b"\xff" * 100).parent), "safetensors",
         "safetensors"),
    Case("import_index_names_missing_shard", "import_hf.py",
         imp(lambda tmp, w: write(hf_config_only(tmp, w) / "model.safetensors.index.json",
                                  '{"weight_map": {"lm_head.weight": "s1.safetensors"}}').parent), "s1.safetensors",
         "safetensors"),
    Case("import_out_is_a_file", "import_hf.py", lambda tmp, w: ["--hf", hf_folder(tmp, w), "--out", w.metrics],
         "--out", "safetensors"),
    Case("import_hf_missing", "import_hf.py", imp(lambda tmp, w: tmp / "no"), "no such folder", "safetensors"),
    Case("import_hf_is_a_file", "import_hf.py", imp(lambda tmp, w: w.metrics), "--hf", "safetensors"),
    Case("import_config_not_json", "import_hf.py",
         imp(lambda tmp, w: write(tmp / "h" / "config.json", "{'model_type':").parent), "config.json", "safetensors"),
    Case("import_config_is_a_list", "import_hf.py",
         imp(lambda tmp, w: write(tmp / "h" / "config.json", "[1]").parent), "JSON object", "safetensors"),
    Case("import_config_size_is_text", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(hidden_size="32"))), "hidden_size", "safetensors"),
    Case("import_config_lacks_vocab_size", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.pop("vocab_size"))), "vocab_size", "safetensors"),
    Case("import_config_claims_a_billion_layers", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(num_hidden_layers=10**9))), "more than the",
         "safetensors"),
    Case("import_config_zero_heads", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(num_attention_heads=0))), "num_attention_heads",
         "safetensors"),
    Case("import_config_rope_not_an_object", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(rope_scaling=[1]))), "rope", "safetensors"),
    Case("import_weights_do_not_fit_config", "import_hf.py",
         imp(lambda tmp, w: hf_folder(tmp, w, lambda c: c.update(moe_intermediate_size=16))), "shape",
         "safetensors"),
    Case("import_seq_length_zero", "import_hf.py", imp(lambda tmp, w: hf_folder(tmp, w), "--seq-length", 0),
         "--seq-length", "safetensors"),
    Case("upcycle_out_is_a_file", "upcycle.py", upc(out=lambda tmp, w: w.metrics), "--out"),
    Case("upcycle_not_dense", "upcycle.py", upc(ck=lambda tmp, w: w.moe), "already an MoE model"),
    Case("upcycle_missing_checkpoint", "upcycle.py", upc(ck=lambda tmp, w: tmp / "no"), "no such folder"),
    Case("upcycle_zero_experts", "upcycle.py", upc("--num-experts", 0, "--num-experts-per-token", 1),
         "--num-experts"),
    Case("upcycle_top_k_over_experts", "upcycle.py", upc("--num-experts", 2, "--num-experts-per-token", 3),
         "--num-experts-per-token"),
    Case("upcycle_experts_beyond_memory", "upcycle.py",
         upc("--num-experts", 10**12, "--num-experts-per-token", 2), "GiB"),
    Case("upcycle_no_moe_layer", "upcycle.py",
         upc("--num-experts", 4, "--num-experts-per-token", 2, "--moe-layer-interval", 3), "--moe-layer-interval"),
    Case("upcycle_noise_nan", "upcycle.py", upc("--num-experts", 4, "--num-experts-per-token", 2, "--noise", "nan"),
         "--noise"),
    Case("upcycle_noise_negative", "upcycle.py",
         upc("--num-experts", 4, "--num-experts-per-token", 2, "--noise", "-0.1"), "--noise"),
    Case("upcycle_router_std_inf", "upcycle.py",
         upc("--num-experts", 4, "--num-experts-per-token", 2, "--router-init-std", "inf"), "--router-init-std"),
    Case("upcycle_experts_not_a_number", "upcycle.py", upc("--num-experts", "four", "--num-experts-per-token", 2),
         "--num-experts"),
    Case("routing_negative_steps", "compare_routing.py", lambda tmp, w: ["--steps", -1, "--out", tmp / "r"],
         "--steps"),
    Case("routing_out_is_a_file", "compare_routing.py", lambda tmp, w: ["--quick", "--out", w.metrics], "--out"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_error_line_and_changes_nothing(case, world, tmp_path):
    if case.needs:
        pytest.importorskip(case.needs)
    args = case.setup(tmp_path, world)
    before = snapshot(world.root, tmp_path)
    r = run_script(case.script, args, timeout=60)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    assert len(errors) == 1 and case.words in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert snapshot(world.root, tmp_path) == before  # nothing written, moved or removed


@pytest.mark.parametrize("case", IN_PROCESS_CASES, ids=[c.id for c in IN_PROCESS_CASES])
def test_bad_input_in_process_exits_2_with_one_error_line_and_changes_nothing(case, world, tmp_path, capsys,
                                                                             monkeypatch):
    if case.needs:
        pytest.importorskip(case.needs)
    if case.id == "gen_cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    args = case.setup(tmp_path, world)
    before = snapshot(world.root, tmp_path)
    monkeypatch.setattr(sys, "argv", [case.script] + [str(a) for a in args])
    with pytest.raises(SystemExit) as stop:  # any other exception is a traceback: the test fails
        importlib.import_module(case.script.removesuffix(".py")).main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2, err
    assert len(errors) == 1 and case.words in errors[0], err
    assert snapshot(world.root, tmp_path) == before


# ------------------------------------------------------------- what bad input must not break
def test_prepare_data_reads_each_real_file_once_and_never_opens_a_fifo(tmp_path):
    d = text_folder(tmp_path)
    r = run_script("prepare_data.py", [d, d / "a.txt", "--out", tmp_path / "data", "--val-fraction", "0.5"],
                   timeout=60)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert "2 files (0 binary and 1 special files skipped)" in r.stdout  # a.txt once; the FIFO skipped
    ids = np.concatenate([np.fromfile(tmp_path / "data" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    text = ids[ids != 0]  # the eos (NUL) ids out: the bytes of both files, each once
    assert sorted(text.tobytes()[::2]) == sorted(("alpha " * 50 + "beta " * 50).encode())
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == len(text)
    assert sorted(os.listdir(tmp_path / "data")) == ["meta.json", "train.bin", "val.bin"]  # no .part left


def test_plot_metrics_skips_malformed_lines_with_one_warning(world, tmp_path):
    pytest.importorskip("matplotlib")
    lines = world.metrics.read_text().splitlines()
    spoiled = [lines[0][:20], "not json", '{"step": 9, "loss": "high"}'] + lines  # a line cut by a crash, ...
    r = run_script("plot_metrics.py", [write(tmp_path / "m.jsonl", "\n".join(spoiled) + "\n"), "--out", tmp_path / "p"])
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 3 line(s)" in warnings[0] and "line 1" in warnings[0]
    assert "loss.png" in os.listdir(tmp_path / "p")


def test_export_writes_a_new_or_empty_folder_and_leaves_no_temporary_folder(world, tmp_path):
    pytest.importorskip("safetensors")
    out = folder(tmp_path / "empty")
    r = run_script("export_hf.py", ["--checkpoint", world.moe, "--out", out])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]  # a byte-level run: its byte tokenizer
    assert sorted(os.listdir(tmp_path)) == ["empty"]
