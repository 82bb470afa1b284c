"""Shared by the test files: tiny configs, slow references, the trainer and script runners, parity,
resume and refusal checks, spoiled-input builders. Every test compares against something independent
of the code under test."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ckpt_io
import minimal_pretrain as mp
from forkserver import ForkServer
from moe_layers import ModelConfig, MoETransformer, SparseMoELayer, layout_free_init_
from parallel_layers import Layout, ModelParallel


# The project's modules and scripts/ import by their bare names (pytest.ini puts both on the path).
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root


smoke = pytest.mark.smoke


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=4, num_experts_per_token=2,
                seq_length=16)
    base.update(kw)
    return ModelConfig(**base)


def moe_layer(cfg: ModelConfig, seed: int = 0) -> SparseMoELayer:
    layer = SparseMoELayer(cfg, ModelParallel())
    layout_free_init_(layer, seed)
    return layer


# ------------------------------------------------------------- slow references
def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for one expert, weights as stored (D, F), (D, F), (F, D)."""
    gate = x @ w_gate
    return ((gate / (1 + torch.exp(-gate))) * (x @ w_up)) @ w_down


def expert_weights(experts, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert e's w_gate (D, F), w_up (D, F) and w_down (F, D): gate and up are the halves of w_gate_up."""
    gate, up = experts.w_gate_up[e].chunk(2, dim=-1)
    return gate, up, experts.w_down[e]


def reference_moe(layer: SparseMoELayer, x: torch.Tensor) -> torch.Tensor:
    """Per token: the router-weighted sum of its K experts applied to that token alone."""
    e = layer.experts
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        logits = token.float() @ layer.router.weight.float().T  # (E,)
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
        order = sorted(range(len(probs)), key=lambda i: -probs[i].item())[:layer.top_k]
        weights = torch.stack([probs[i] for i in order])
        if layer.router.normalize:
            weights = weights / weights.sum()
        acc = torch.zeros_like(token)
        for w, i in zip(weights, order):
            acc = acc + w * swiglu(token, *expert_weights(e, i))
        out.append(acc)
    return torch.stack(out).view_as(x)


# ---------------------------------------------------------------- CLI runs
TINY_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-kv-heads", "2",
              "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--num-experts", "4",
              "--num-experts-per-token", "2", "--seq-length", "16", "--micro-batch-size", "2",
              "--router-aux-loss-coef", "0.1", "--router-z-loss-coef", "0.01", "--lr", "1e-2",
              "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--no-progress"]


def run_cli(args: list[str], nproc: int = 1, timeout: float = 240, env: dict | None = None,
            extra_torchrun: list[str] | None = None, torchrun: bool = False) -> subprocess.CompletedProcess:
    """minimal_pretrain.py with these flags on `nproc` ranks: forked from the session's ForkServer
    (tests/forkserver.py: the ranks get torchrun's environment, not its ~2.5 s of CPU per process
    for importing torch); with `torchrun` (or `extra_torchrun` flags) as a user starts it, plain
    python for one rank and torchrun for more."""
    script = os.path.join(HERE, "minimal_pretrain.py")
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    if torchrun or extra_torchrun:
        launcher = [sys.executable]
        if nproc > 1 or extra_torchrun:
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                         "--master_port", str(free_port())] + (extra_torchrun or [])
        return subprocess.run(launcher + [script] + args, capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=HERE)
    envs = [full_env]
    if nproc > 1:
        world = dict(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()))
        envs = [dict(full_env, **world, RANK=str(r), LOCAL_RANK=str(r)) for r in range(nproc)]
    with tempfile.TemporaryDirectory() as outdir:
        rc, out, err = ForkServer.for_this_thread(HERE).run([script] + args, envs, HERE, outdir, timeout)
    return subprocess.CompletedProcess([sys.executable, script] + args, rc, out, err)


def unwrapped(out: str) -> str:
    """Console text with the banner's wrapped lines joined again (launch.wrapped continues a line
    with four spaces), so that a note can be looked for whole."""
    return out.replace("\n    ", " ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def train_records(path: str) -> list[dict]:
    return [r for r in read_metrics(path) if "loss" in r]


# ------------------------------------------------ parallel layouts vs one process
PARITY_STEPS = 5


def parity_run(tmp_path, name: str, nproc: int, layout: list[str], micro: int, extra: list[str] = ()):
    """Train PARITY_STEPS steps; return (train records, full weights gathered from the checkpoint)."""
    out = tmp_path / name
    args = TINY_FLAGS + list(extra) + layout + ["--max-steps", str(PARITY_STEPS), "--num-microbatches",
                                                str(micro), "--metrics-file", str(out) + ".jsonl",
                                                "--save", str(out), "--dist-timeout", "60"]
    r = run_cli(args, nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return train_records(str(out) + ".jsonl"), ckpt_io.full_state_dict(ckpt_io.read_checkpoint(str(out)))


_SHARED_RUNS: dict = {}


def shared_parity_run(tmp_path_factory, nproc: int, layout: list[str], micro: int, extra: list[str] = ()):
    """parity_run of these flags once per session, for every test that compares against the same run
    (a run is deterministic: the same flags give the same records and weights, whoever asks).
    Returns (its save folder, (train records, full weights))."""
    key = (nproc, tuple(layout), micro, tuple(extra))
    if key not in _SHARED_RUNS:
        tmp = tmp_path_factory.mktemp("shared_run")
        _SHARED_RUNS[key] = (tmp / "run", parity_run(tmp, "run", nproc, layout, micro, extra))
    return _SHARED_RUNS[key]


def assert_same_training(reference, candidate, rel: float = 1e-4, weight_atol: float = 1e-4) -> float:
    """Every step's loss and lm_loss within `rel`; the trained weights equal to float rounding.

    weight_atol is 1% of one AdamW step at lr 1e-2: Adam divides by sqrt(v), so a weight whose
    gradient is nearly zero moves by rounding-sized differences scaled up towards the step size."""
    (ref_records, ref_weights), (records, weights) = reference, candidate
    assert [r["step"] for r in records] == list(range(1, PARITY_STEPS + 1))
    worst = 0.0
    for a, b in zip(ref_records, records):
        for key in ("loss", "lm_loss"):
            diff = abs(a[key] - b[key]) / abs(a[key])
            worst = max(worst, diff)
            assert diff < rel, (a["step"], key, a[key], b[key])
    assert a["aux_loss"] > 0 and a["z_loss"] > 0
    assert set(weights) == set(ref_weights)
    for name, w in ref_weights.items():
        assert torch.allclose(weights[name], w, atol=weight_atol, rtol=0), name
    return worst


# -------------------------------------------------------------------- checkpoints
RESUME_STEPS = 6  # runs of 6 steps saving at 3; a resumed run continues from the step-3 checkpoint


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in records]


def interrupted_at_3(root) -> str:
    """Make `root` look like a run that stopped after saving step 3 (later checkpoints gone)."""
    for d in ckpt_io.list_checkpoints(str(root)):
        if d != ckpt_io.step_dir_name(3):
            shutil.rmtree(os.path.join(str(root), d))
    (root / "latest").write_text(ckpt_io.step_dir_name(3))
    return str(root)


def run_for_resume(tmp_path, name: str, nproc: int, layout: list[str], micro: int,
                   load: str | None = None) -> list[dict]:
    """RESUME_STEPS steps (from scratch, or resumed from `load`), saving every 3; return train records."""
    save = tmp_path / name
    metrics = str(save) + ".jsonl"
    args = TINY_FLAGS + layout + ["--max-steps", str(RESUME_STEPS), "--num-microbatches", str(micro),
                                  "--save", str(save), "--save-interval", "3", "--metrics-file", metrics,
                                  "--dist-timeout", "60"]
    if load:
        args += ["--load", load]
    r = run_cli(args, nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    if load:
        assert "resumed from" in r.stdout and "at step 3" in r.stdout
    return train_records(metrics)


def _assert_continues_like(reference: list[dict], resumed: list[dict]) -> float:
    assert [r["step"] for r in resumed] == [4, 5, 6]
    worst = 0.0
    for a, b in zip(reference[3:], resumed):
        for key in ("loss", "lm_loss"):
            worst = max(worst, abs(a[key] - b[key]) / a[key])
    assert worst < 1e-4
    return worst


# ------------------------------------------------------ hardening: bad input, lost checkpoints, preemption
def assert_clean_refusal(r: subprocess.CompletedProcess, words: str) -> None:
    """Exit status 2, exactly one `error:` line holding `words`, no traceback."""
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def refusal_in_process(argv: list[str], capsys, monkeypatch, world: int | None = None) -> str:
    """minimal_pretrain.main(argv) in this process, as the CLI calls it (rank 0 of a would-be world of
    `world` ranks, no peer): exit status 2 with exactly one `error:` line and no traceback, as
    assert_clean_refusal checks of a process; returns that line. No MASTER_ADDR is set, so a run that
    reached the process group would raise instead of exiting 2 (and fail the test)."""
    if world is not None:
        for key, value in (("WORLD_SIZE", str(world)), ("RANK", "0"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        mp.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in err
    return errors[0]


def tree_bytes(root) -> dict:
    """Every file below `root` (links not followed) -> its bytes: to prove nothing was touched."""
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            if os.path.isfile(p) and not os.path.islink(p) and n != ".lock":
                out[p] = open(p, "rb").read()
    return out


def _token_folder(d, train, val, meta: dict | None, dtype=np.uint16):
    d.mkdir()
    np.asarray(train).astype(dtype).tofile(d / "train.bin")
    np.asarray(val).astype(dtype).tofile(d / "val.bin")
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta))
    return str(d)


# ---------------------------------------------------------------- CUDA (GPU machines)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_script(name: str, args: list, timeout: float = 240) -> subprocess.CompletedProcess:
    """A script of scripts/ in a subprocess (arguments may be paths or numbers)."""
    return subprocess.run([sys.executable, os.path.join(HERE, "scripts", name)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=HERE)


def save_in_process(model: MoETransformer, root) -> str:
    """A one-rank checkpoint of `model` as the trainer writes it (no optimizer state)."""
    payload = ckpt_io.rank_payload(model, torch.optim.AdamW(model.parameters()), Layout())
    meta = {"format": ckpt_io.FORMAT, "version": ckpt_io.FORMAT_VERSION, "step": 0, "skipped_steps": 0,
            "model": dataclasses.asdict(model.cfg), "train": {"router_aux_loss_coef": 0.01},
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1}}
    return ckpt_io.save_checkpoint(str(root), 0, payload, meta, 0, 1)


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


def snapshot(*roots: Path) -> dict[str, object]:
    """Every path under `roots` -> a hash of its bytes (regular files), its target (links) or its kind.
    FIFOs are never opened and linked folders never entered, so this cannot block or loop."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    state[path] = ("link", os.readlink(path))
                elif stat.S_ISREG(mode):
                    state[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                else:
                    state[path] = stat.S_IFMT(mode)
    return state


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def text_folder(tmp: Path) -> Path:
    """Two text files, a link to one of them, a link to the folder itself and a FIFO."""
    d = folder(tmp / "txt")
    write(d / "a.txt", "alpha " * 50)
    write(d / "b.txt", "beta " * 50)
    os.symlink(d / "a.txt", d / "a_again.txt")
    os.symlink(d, d / "self")
    fifo(d / "pipe")
    return d


# ---- sequence parallelism (issue 15) ----
SP = ["--tensor-parallel-size", "2", "--sequence-parallel"]
