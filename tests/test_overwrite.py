"""--overwrite of the scripts that write an output whole (export_hf.py, export_gguf.py, import_hf.py,
upcycle.py): refused without it, an earlier output of the same script replaced with it, anything else
(another kind of output, a run, a folder of notes, a path inside an input) refused even with it, and a
failure midway leaves the earlier output whole."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ckpt_io
import export_gguf
import export_hf
import import_hf
import outputs
import upcycle
from helpers import snapshot, write
from moe_layers import ModelConfig, MoETransformer
from parallel_layers import Layout

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

# A dense byte model (vocab 256: the run's tokenizer is bytes), so that every script takes it.
TINY = dict(vocab_size=256, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
            num_experts=0, seq_length=32)


def save_run(root: Path, seed: int) -> Path:
    """A one-rank checkpoint as the trainer writes it (a run's: no script's mark), on the built-in corpus."""
    model = MoETransformer(ModelConfig(**TINY), seed=seed)
    payload = ckpt_io.rank_payload(model, torch.optim.AdamW(model.parameters()), Layout())
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 0, "skipped_steps": 0,
            "model": dataclasses.asdict(model.cfg), "train": {"data": ""}, "run_id": f"run-{seed}",
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    ckpt_io.save_checkpoint(str(root), 0, payload, meta, 0, 1)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Two runs (a, b), their transformers exports (import_hf's inputs), an import and an upcycled model of
    run a (outputs of the other scripts), an unmarked GGUF and a folder of notes. Read-only."""
    w = tmp_path_factory.mktemp("world")
    paths = {"a": save_run(w / "a", 0), "b": save_run(w / "b", 1), "notes": write(w / "notes" / "n.txt", "mine").parent}
    for run in ("a", "b"):
        export_hf.export(str(paths[run]), str(w / f"hf_{run}"))
        paths[f"hf_{run}"] = w / f"hf_{run}"
    import_hf.import_hf(str(paths["hf_a"]), str(w / "imported"))
    upcycle.upcycle(str(paths["a"]), str(w / "upcycled"), 2, 1)
    writer = gguf.GGUFWriter(str(w / "other.gguf"), "llama")  # a GGUF from elsewhere: no mark of ours
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths.update(imported=w / "imported", upcycled=w / "upcycled", other_gguf=w / "other.gguf")
    return paths


def gguf_weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(folder)))


# Per script: its module, its arguments from run "a" or "b" into `out`, how to read back what it wrote, and
# paths it must not replace even with --overwrite: outputs of other kinds (a run's checkpoints, another
# script's output, a GGUF from elsewhere, a folder or file of notes) and a path inside its own input.
SCRIPTS = {
    "export_hf": (export_hf, lambda w, run, out: ["--checkpoint", w[run], "--out", out], hf_weights,
                  lambda w: [w["b"], w["imported"], w["upcycled"], w["notes"], w["a"] / "out"]),
    "export_gguf": (export_gguf, lambda w, run, out: [w[run], out], gguf_weights,
                    lambda w: [w["other_gguf"], w["notes"] / "n.txt", w["a"] / "m.gguf"]),
    "import_hf": (import_hf, lambda w, run, out: ["--hf", w[f"hf_{run}"], "--out", out], checkpoint_weights,
                  lambda w: [w["a"], w["upcycled"], w["hf_b"], w["notes"], w["hf_a"] / "out"]),
    "upcycle": (upcycle, lambda w, run, out: ["--checkpoint", w[run], "--out", out, "--num-experts", 2,
                                              "--num-experts-per-token", 1], checkpoint_weights,
                lambda w: [w["b"], w["imported"], w["hf_a"], w["notes"], w["a"] / "out"]),
}


def run_main(module, args: list, monkeypatch, capsys) -> tuple[int, str]:
    """The script's main() as the command line calls it: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py"] + [str(a) for a in args])
    capsys.readouterr()
    try:
        module.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, words: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and words in errors[0] and "Traceback" not in err, err


def out_name(script: str) -> str:
    return "m.gguf" if script == "export_gguf" else "out"


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_an_earlier_output_is_refused_without_overwrite_and_replaced_with_it(script, world, tmp_path, monkeypatch,
                                                                              capsys):
    module, argv, read, _ = SCRIPTS[script]
    out, fresh = tmp_path / out_name(script), tmp_path / "fresh" / out_name(script)
    fresh.parent.mkdir()
    assert run_main(module, argv(world, "a", out), monkeypatch, capsys)[0] == 0
    assert run_main(module, argv(world, "b", fresh), monkeypatch, capsys)[0] == 0
    first, before = read(out), snapshot(out)
    assert_one_error(*run_main(module, argv(world, "b", out), monkeypatch, capsys), "pass --overwrite to replace it")
    assert snapshot(out) == before
    code, err = run_main(module, argv(world, "b", out) + ["--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    replaced = read(out)
    assert_same(replaced, read(fresh))  # the new output whole ...
    assert any(not np.array_equal(np.asarray(first[k]), np.asarray(replaced[k])) for k in first)  # ... the old gone
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, "fresh"])  # no temporary or `.old` folder left beside
    if script in ("import_hf", "upcycle"):  # the folder holds the new checkpoint alone
        assert sorted(os.listdir(out)) == ["latest", "step_00000000"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_overwrite_replaces_no_other_kind_of_output_and_nothing_inside_an_input(script, world, monkeypatch, capsys):
    module, argv, _, refused = SCRIPTS[script]
    before = snapshot(world["a"].parent)
    targets = refused(world)
    for target in targets:  # the last one lies inside the script's input
        code, err = run_main(module, argv(world, "a", target) + ["--overwrite"], monkeypatch, capsys)
        assert_one_error(code, err, "inside" if target is targets[-1] else "not even with --overwrite")
    assert snapshot(world["a"].parent) == before


def test_a_failed_overwrite_leaves_the_earlier_export_whole(world, tmp_path, monkeypatch, capsys):
    """export_hf's files, then import_hf's checkpoint (written beside the old step folder): a failure while
    writing the new output leaves the old one as it was, and nothing beside it."""
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    out = tmp_path / "hf"
    export_hf.export(str(world["a"]), str(out))
    before = snapshot(out)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert_one_error(*run_main(export_hf, ["--checkpoint", world["b"], "--out", out, "--overwrite"], monkeypatch,
                               capsys), "No space left")
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["hf"]
    imported = tmp_path / "imported"
    import_hf.import_hf(str(world["hf_a"]), str(imported))
    before = snapshot(imported)
    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)  # the rank file of the new step folder
    assert_one_error(*run_main(import_hf, ["--hf", world["hf_b"], "--out", imported, "--overwrite"], monkeypatch,
                               capsys), "No space left")
    assert snapshot(imported) == before


def test_swap_in_keeps_the_earlier_folder_when_the_second_rename_fails(tmp_path, monkeypatch):
    """The one moment both exist: the old folder renamed aside, the new not yet in place."""
    out, work = write(tmp_path / "out" / "old.txt", "old").parent, write(tmp_path / ".work" / "new.txt", "new").parent
    renames = []

    def replace(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise OSError(5, "Input/output error")
        os.rename(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OSError):
        outputs.swap_in(str(work), str(out))
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(aside) == 1 and (aside[0] / "out" / "old.txt").read_text() == "old"
    assert (work / "new.txt").read_text() == "new"
