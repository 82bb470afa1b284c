"""Checkpoints that any layout writes and any layout reads back.

Kept beside minimal_pretrain.py (not in it) because scripts/inspect_checkpoint.py and the
export script read the same format without the trainer.

Format of `DIR/step_00000100/` (a plain, documented format rather than
torch.distributed.checkpoint, so that one process can read a folder written by 8 ranks with
nothing but torch.load, and each file says in its own entries where its slices belong):
    meta.json        format version, step, model and train configs, layout, file list and
                     each file's size in bytes,
    rank_00003.pt    {"params": {name: entry}, "optim": {name: state}, "rng": {...}} where a
                     state is AdamW's {"step", "exp_avg": entry, "exp_avg_sq": entry} or
                     Muon's {"momentum_buffer": entry}, and an entry is
                     {"tensor", "dim", "rank", "size"}: slice `rank` of `size` along `dim`
                     (dim None: the whole tensor). Each slice is written by exactly one rank.
                     Experts are stored one key per expert in transformers' naming and
                     orientation (`layers.0.mlp.experts.5.gate_proj.weight`, shape (F, D)), so
                     any EP size can read them and export is a renaming. The model's fused
                     gate-up weight (E, D, 2F) is saved as its gate_proj and up_proj
                     (stacked_parts), as before it was fused, so old checkpoints load. With
                     --use-distributed-optimizer the same entries, whole per slice: the trainer
                     all-gathers each bucket's shards at save time and the rank owning a
                     weight's first element writes it (see rank_payload), so the files of
                     either setting are read by the other and by any layout.
`DIR/latest` names the newest complete step folder. A save writes into `DIR/.tmp-step_...`,
flushes every file to disk, renames the folder and only then replaces `latest` (itself by
rename), so a crash at any moment leaves the previous checkpoint whole and `latest` valid.
Saving a step whose folder exists (a rewound run) first renames the old folder to
`.old-step_...` and deletes it only after the new one is in place; if a crash falls between
the two renames, `latest` is followed to that `.old-` folder. `DIR/.lock` is held (flock) by
the run that saves into DIR, so a second run on the same folder is refused, not interleaved.

Ownership: every meta.json carries its run's `run_id` (a resumed run keeps it). A run writes into,
and prunes, only a folder that holds no checkpoints, or holds its own run's (the run it resumes),
or is handed over with --overwrite; it prunes only checkpoints of its own run (claim_save_folder).
Checkpoints from before run ids (none in meta.json) resume into their own folder as before.
The run's tokenizer.json (when its data has one) is copied into every step folder and named in
meta.json with its sha256, so an export never depends on the --data folder still being there.

Loading scales with the ranks: read_checkpoint memory-maps every file and reads only its
entries' headers (names, shapes, places), checking structure, sizes and that the slices fit;
load_into then copies out of the overlapping slices only what this rank holds, so the
tensors it does not need are never paged in (an N-rank checkpoint on N model-parallel ranks:
each reads about 1/N). assemble / full_state_dict read whole tensors, for the scripts.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

import data
import outputs
from optim import DistributedAdamW
from parallel_layers import Layout, placement

FORMAT = "moe-minimal-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class SaveFailed(OSError):
    """A save that could not be completed (a full disk, a vanished folder) on some rank; its temporary
    files are removed and `latest` and every earlier checkpoint are as they were."""


@dataclass
class SaveTarget:
    """Where and as whom a run saves: decided once at start (claim_save_folder), used by every save."""

    root: str  # the --save folder
    run_id: str  # written into each meta.json
    owned: frozenset  # run ids whose checkpoints in `root` this run may prune (None: ones from before run ids)
    keep_last: int  # --keep-last
    tokenizer: dict | None  # {"name", "eos_id", "bos_id", and "path" + "sha256" for a tokenizer.json}; None: unknown


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


EXPERT_PROJ = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


def expert_key(stacked_name: str, expert: int) -> str:
    """`layers.0.mlp.experts.w_gate`, 5 -> `layers.0.mlp.experts.5.gate_proj.weight`."""
    prefix, leaf = stacked_name.rsplit(".", 1)
    return f"{prefix}.{expert}.{EXPERT_PROJ[leaf]}.weight"


def stacked_parts(name: str, t: torch.Tensor, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """The stacked weights a tensor shaped like expert weight `p` (named `name`) holds, by their own
    names: w_gate_up (E, D, 2F) -> {...w_gate: (E, D, F), ...w_up: (E, D, F)}. The one place where
    the fused gate-up weight of the model meets the separate gate and up of the checkpoint format."""
    prefix = name.rsplit(".", 1)[0]
    return {f"{prefix}.{part}" if part else name: view for part, view in placement(p).split_parts(t).items()}


def per_expert(name: str, t: torch.Tensor, p: torch.nn.Parameter) -> dict[str, dict]:
    """Split a stacked (E_local, in, out) expert tensor into per-expert (out, in) entries."""
    first = placement(p).rank * t.shape[0]
    return {expert_key(stacked, first + i): {"tensor": w[i].detach().T.cpu().clone(), "dim": None, "rank": 0, "size": 1}
            for stacked, w in stacked_parts(name, t, p).items() for i in range(t.shape[0])}


def _entry(t: torch.Tensor, p: torch.nn.Parameter) -> dict:
    where = placement(p)
    if where.size > 1:
        return {"tensor": t.detach().cpu().clone(), "dim": where.dim, "rank": where.rank, "size": where.size}
    return {"tensor": t.detach().cpu().clone(), "dim": None, "rank": 0, "size": 1}


def _fsync_write(path: str, write: Any) -> None:
    """Write through `write(file)`, flush it to disk, then atomically move it into place."""
    part = path + ".part"
    with open(part, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are part of the model's state (the routers' expert_bias), not derived tables."""
    params = dict(model.named_parameters())
    return {k: v for k, v in model.state_dict().items() if k not in params}


def buffer_entries(model: torch.nn.Module, tp_rank: int, dp_rank: int) -> dict[str, dict]:
    """Buffers are the same on every TP and DP rank of a stage: DP rank 0, TP rank 0 writes them."""
    if tp_rank or dp_rank:
        return {}
    return {k: {"tensor": v.detach().cpu().clone(), "dim": None, "rank": 0, "size": 1}
            for k, v in persistent_buffers(model).items()}


# The optimizer's per-weight tensors: AdamW's two moments, Muon's momentum. Each is shaped like
# its weight, so it is sliced, saved and resharded exactly as the weight is.
MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def rank_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: Layout,
                 gathered: dict | None = None, with_optimizer: bool = True) -> dict:
    """This rank's slices of the weights and of the optimizer's moments (none without `with_optimizer`:
    what --sample-interval gathers), plus its RNG states.

    With bf16 weights the fp32 masters of the optimizer are saved (see MasterWeightAdamW).
    With the distributed optimizer no rank holds a whole state: `gathered` maps each weight this
    rank writes to its (fp32 weight, AdamW state) made whole from every rank's shard
    (minimal_pretrain.gather_for_save), and replaces Placement.written_by's choice (one copy of
    every slice over the whole world, written by `layout`'s rank where it is the first replica)."""
    params, optim = {}, {}
    master = getattr(optimizer, "master", {})
    for name, p in model.named_parameters():
        if gathered is not None:
            if p not in gathered:
                continue
            weight, state = gathered[p]
        elif not placement(p).written_by(layout):
            continue
        else:
            weight = master.get(p, p)
            state = optimizer.state.get(weight, {})
        moments = [k for k in MOMENTS if k in state] if with_optimizer else []
        step = {"step": float(state["step"])} if "step" in state else {}  # AdamW counts steps, Muon does not
        if placement(p).expert:
            params.update(per_expert(name, weight, p))
            split = {k: per_expert(name, state[k], p) for k in moments}  # moment -> expert key -> entry
            for key in (split[moments[0]] if moments else {}):
                optim[key] = dict(step, **{k: split[k][key] for k in moments})
            continue
        params[name] = _entry(weight, p)
        if moments:
            optim[name] = dict(step, **{k: _entry(state[k], p) for k in moments})
    params.update(buffer_entries(model, layout.tp_rank, layout.dp_rank))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"params": params, "optim": optim, "rng": rng}


def agree_on_errors(error: str | None, rank: int, world_size: int) -> str | None:
    """Every rank's error of one phase of a save, or None: the first failing rank's, with its rank.

    Also the save's barrier: nobody starts the next phase before every rank has ended this one."""
    if world_size == 1:
        return error
    errors: list[str | None] = [None] * world_size
    dist.all_gather_object(errors, error)  # each rank's error message or None (over the CPU backend)
    failing = [(r, e) for r, e in enumerate(errors) if e]
    return f"rank {failing[0][0]}: {failing[0][1]}" if failing else None


def write_step_folder(root: str, tmp: str, final: str, step: int, meta: dict, world_size: int,
                      extra_files: dict[str, str]) -> None:
    """Rank 0's part of a save, after every rank file is on disk: copied files, meta.json, the
    renames, `latest`. A crash at any point leaves `latest` naming a whole checkpoint."""
    for name, src in extra_files.items():  # the tokenizer: the checkpoint carries what export needs
        _fsync_write(os.path.join(tmp, name), lambda f, src=src: f.write(open(src, "rb").read()))
    files = [f"rank_{r:05d}.pt" for r in range(world_size)]
    # The sizes let a reader refuse a replaced or cut file without reading its tensors.
    meta = dict(meta, files=files, sizes=[os.path.getsize(os.path.join(tmp, f)) for f in files])
    _fsync_write(os.path.join(tmp, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    _fsync_dir(tmp)
    old = os.path.join(root, ".old-" + step_dir_name(step))
    if os.path.lexists(final):  # re-saving a step: move the old copy aside, never delete it first
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_write(os.path.join(root, "latest"), lambda f: f.write(step_dir_name(step).encode()))
    _fsync_dir(root)


def remove_partial(root: str, tmp: str) -> None:
    """After a failed save: its temporary folder and a half-written `latest.part` go; `latest` stays."""
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.lexists(os.path.join(root, "latest.part")):
        os.remove(os.path.join(root, "latest.part"))


def save_checkpoint(root: str, step: int, payload: dict, meta: dict, rank: int, world_size: int,
                    keep_last: int = 0, owned: frozenset | None = None,
                    extra_files: dict[str, str] | None = None) -> str:
    """Write every rank's payload into `root/step_N` atomically; return that folder.

    All ranks call it; rank 0 alone creates, renames, points `latest` and prunes (only checkpoints
    whose run id is in `owned`, by default this meta's run). An OSError on any rank (a full disk)
    raises SaveFailed on every rank, after the temporary files are removed."""
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    error = None
    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
            os.makedirs(tmp)
    except OSError as e:
        error = f"{tmp}: {e.strerror or e}"
    error = agree_on_errors(error, rank, world_size)  # the temporary folder exists before anyone writes
    if error is None:
        try:
            _fsync_write(os.path.join(tmp, f"rank_{rank:05d}.pt"), lambda f: torch.save(payload, f))
        except OSError as e:
            error = f"{e.filename or tmp}: {e.strerror or e}"
        error = agree_on_errors(error, rank, world_size)  # every rank's file is on disk
    if error is None and rank == 0:
        try:
            write_step_folder(root, tmp, final, step, meta, world_size, extra_files or {})
            for d in os.listdir(root):  # old copies whose replacement is now in place
                if d.startswith(".old-step_"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            if keep_last > 0:
                prune(root, keep_last, step, owned if owned is not None else frozenset({meta.get("run_id")}))
        except OSError as e:
            error = f"{e.filename or root}: {e.strerror or e}"
    error = agree_on_errors(error, rank, world_size)  # nobody moves on before `latest` names the new folder
    if error is not None:
        if rank == 0:
            remove_partial(root, tmp)
        raise SaveFailed(errno.EIO, f"saving step {step} to {root} failed ({error}); its temporary files are "
                                    f"removed, `latest` and the earlier checkpoints are intact")
    return final


def save_full_state(root: str, tensors: dict[str, torch.Tensor], model: dict, train: dict,
                    extra_meta: dict | None = None) -> str:
    """Write whole tensors as a one-rank checkpoint at step 0 with no optimizer state (AdamW starts
    fresh): how scripts/import_hf.py and scripts/upcycle.py make a checkpoint that --load trains on."""
    payload = {"params": {name: {"tensor": t, "dim": None, "rank": 0, "size": 1} for name, t in tensors.items()},
               "optim": {}, "rng": {"torch": torch.Generator().manual_seed(train.get("seed", 0)).get_state()}}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": 0, "skipped_steps": 0, "model": model,
            "train": train, "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1},
            "run_id": new_run_id(), **(extra_meta or {})}
    return save_checkpoint(root, 0, payload, meta, rank=0, world_size=1)


def written_whole_by(mark: str) -> Callable[[str], bool]:
    """Whether a folder is a checkpoint root as save_full_state leaves it (`latest` and step 0, nothing else)
    whose meta.json holds `mark`: import_hf.py's "imported_from" or upcycle.py's "upcycled_from". What their
    --overwrite may replace; a run's checkpoints (more steps, a lock) never are."""
    def check(root: str) -> bool:
        if set(os.listdir(root)) != {"latest", step_dir_name(0)}:
            return False
        try:
            _, meta = read_meta(root)
        except (CheckpointError, OSError):
            return False
        return meta.get("step") == 0 and mark in meta
    return check


def new_run_id() -> str:
    """A fresh run's id: random, so two runs started anywhere never share one."""
    return uuid.uuid4().hex[:16]


def list_checkpoints(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if is_step_dir_name(d) and os.path.isdir(os.path.join(root, d)))


def is_step_dir_name(name: str) -> bool:
    return name.startswith("step_") and name[5:].isdigit()


def acquire_save_lock(root: str) -> Any:
    """Hold an exclusive lock on `root/.lock` for the life of the run (rank 0 only).

    Two runs saving into one folder would interleave their checkpoints and `latest`; the
    second is refused. flock is released by the kernel when the process dies, so a killed
    run (or torchrun's restart of it) never leaves a stale lock behind. A `.lock` that is a
    folder or a FIFO is refused here, at start (opened without blocking, then checked)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened as a lock file ({e.strerror}); remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file (a FIFO or device); remove it")
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = f.read(256).strip() or "another process"
        f.close()
        raise CheckpointError(f"--save {root} is in use by another run ({holder}); wait for it to end "
                              f"or choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f


def is_checkpoint_root(root: str) -> bool:
    """A folder that holds checkpoints (a `latest` or step folders) or only what a start leaves
    (the lock, a write probe, a temporary folder): which run owns it is claim_save_folder's question."""
    entries = os.listdir(root)
    return ("latest" in entries or any(is_step_dir_name(e) for e in entries)
            or all(e in (".lock", "latest.part") or e.startswith((".write-test-", ".tmp-step_", ".old-step_"))
                   for e in entries))


CHECKPOINT_ROOT = outputs.Kind("a checkpoint folder", True, is_checkpoint_root)


def claim_save_folder(root: str, run_id: str, resumed: Checkpoint | None, overwrite: bool,
                      inputs: dict[str, str]) -> frozenset:
    """Whether this run may write into (and prune) `root`; return the run ids it may prune there.

    Allowed: a new or empty folder, one whose checkpoints are this run's (its id, or the folder the
    run resumes from, which covers checkpoints from before run ids), or one handed over with
    --overwrite (whose other checkpoints are then kept, never pruned). Raises OutputError."""
    outputs.claim(root, "--save", CHECKPOINT_ROOT, overwrite, inputs)
    owned = {run_id}
    if resumed is not None and outputs.inside(resumed.path, root) and "run_id" not in resumed.meta:
        owned.add(None)  # resuming a checkpoint from before run ids in its own folder: that run is this one
    if not os.path.isdir(root) or overwrite:
        return frozenset(owned)
    others = sorted({str(run_id_of(os.path.join(root, d))) for d in list_checkpoints(root)} - {str(i) for i in owned})
    if others and not (resumed is not None and outputs.inside(resumed.path, root)):
        raise outputs.OutputError(
            f"--save {root} holds checkpoints of another run (run id {', '.join(others[:3])}), not of the run this "
            f"one continues; resume that run with --load {root}, choose an empty folder, or pass --overwrite to "
            f"write into it (its checkpoints are kept, never pruned)")
    return frozenset(owned)


def run_id_of(step_dir: str) -> str | None:
    """The run id in a step folder's meta.json; None for checkpoints from before run ids, and
    UNREADABLE for a meta.json that cannot be read (never anyone's, so never pruned)."""
    try:
        with open_regular(os.path.join(step_dir, "meta.json")) as f:
            meta = json.load(f)
        return meta.get("run_id") if isinstance(meta, dict) else UNREADABLE
    except (OSError, ValueError):
        return UNREADABLE


UNREADABLE = "(unreadable meta.json)"


def prune(root: str, keep_last: int, current: int, owned: frozenset) -> None:
    """Keep the checkpoint of step `current` (the one `latest` names) and the `keep_last - 1`
    newest before it; delete older ones. Only this run's checkpoints (run id in `owned`) count:
    another run's, in a folder handed over with --overwrite, are never deleted. Folders of later
    steps (left by a run that was rewound with --load DIR/step_N) are another timeline: kept."""
    older = [d for d in list_checkpoints(root)
             if d < step_dir_name(current) and run_id_of(os.path.join(root, d)) in owned]
    for d in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def open_regular(path: str, mode: str = "r") -> Any:
    """open() for a file that must be a regular one: a FIFO or device would block or never end."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, "a folder" if os.path.isdir(path) else "not a regular file")
    return open(path, mode)


def read_latest(root: str) -> str:
    """The step folder that `root/latest` names; CheckpointError if it is unreadable or odd."""
    latest = os.path.join(root, "latest")
    try:
        with open_regular(latest) as f:
            name = f.read(256).strip()
    except (OSError, UnicodeDecodeError) as e:  # a folder, a link loop, unreadable bytes...
        raise CheckpointError(f"{latest}: unreadable ({getattr(e, 'strerror', None) or e}); load one of "
                              f"{list_checkpoints(root)} directly (its step folder)") from None
    if not is_step_dir_name(name):
        raise CheckpointError(f"{latest}: names {name!r}, not a step folder; load one of "
                              f"{list_checkpoints(root)} directly (its step folder)")
    return name


def resolve(path: str) -> str:
    """A checkpoint root (follow `latest`) or a step folder -> the step folder."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder")
    if os.path.lexists(os.path.join(path, "meta.json")):
        return path
    if not os.path.lexists(os.path.join(path, "latest")):
        raise CheckpointError(f"{path}: neither a checkpoint folder (meta.json) nor a root with a "
                              f"`latest` file; point it at the folder given to --save")
    name = read_latest(path)
    step_dir = os.path.join(path, name)
    if not os.path.lexists(os.path.join(step_dir, "meta.json")):
        moved = os.path.join(path, ".old-" + name)  # a re-save of this step crashed between its renames
        if os.path.isfile(os.path.join(moved, "meta.json")):
            return moved
        raise CheckpointError(f"{os.path.join(path, 'latest')} points to {step_dir}, which has no meta.json; "
                              f"load one of {list_checkpoints(path)} directly")
    return step_dir


@dataclass
class Checkpoint:
    path: str
    meta: dict
    params: dict[str, list[dict]]  # name -> its slices, from every file
    optim: dict[str, list[dict]]  # name -> slices of {"step", "exp_avg", "exp_avg_sq"} or {"momentum_buffer"}
    rng: dict[int, dict]  # writing rank -> its RNG states


def read_meta(path: str) -> tuple[str, dict]:
    step_dir = resolve(path)
    meta_path = os.path.join(step_dir, "meta.json")
    try:
        with open_regular(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e}); load an earlier checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a checkpoint of this trainer (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('version')}, this code reads {FORMAT_VERSION}")
    check_meta(meta, meta_path)
    return step_dir, meta


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_meta(meta: dict, meta_path: str) -> None:
    """Every field the loaders use, with its type: a hand-edited or foreign meta.json fails here,
    with its name, rather than as a KeyError deep inside loading."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{meta_path}: {what}; the file is damaged, load an earlier checkpoint")

    for key in ("step", "skipped_steps"):
        if not _is_int(meta.get(key, 0 if key == "skipped_steps" else None)) or meta.get(key, 0) < 0:
            raise bad(f"\"{key}\" must be a non-negative integer, got {meta.get(key)!r}")
    for key in ("model", "train", "layout"):
        if not isinstance(meta.get(key), dict):
            raise bad(f"\"{key}\" must be an object, got {type(meta.get(key)).__name__}")
    layout = meta["layout"]
    for key in ("world_size", "tp", "pp", "dp", "ep"):
        if not _is_int(layout.get(key)) or layout[key] <= 0:
            raise bad(f"\"layout\" needs a positive integer \"{key}\", got {layout.get(key)!r}")
    files = meta.get("files")
    if (not isinstance(files, list) or len(files) != layout["world_size"]
            or not all(isinstance(f, str) and f.startswith("rank_") and os.sep not in f for f in files)):
        raise bad(f"\"files\" must list {layout['world_size']} rank files, got {files!r}")
    sizes = meta.get("sizes", [0] * len(files))  # checkpoints from before sizes were recorded have none
    if not isinstance(sizes, list) or len(sizes) != len(files) or not all(_is_int(n) and n >= 0 for n in sizes):
        raise bad(f"\"sizes\" must list {len(files)} file sizes in bytes, got {sizes!r}")


def open_rank_file(fpath: str, recorded_size: int | None) -> dict:
    """One rank file, memory-mapped: its structure is checked, its tensors are not read yet.

    A truncated file has lost its zip directory (at the end) and fails to open; a file of
    another size than meta.json recorded was replaced or damaged after the save."""
    if not os.path.isfile(fpath):
        raise CheckpointError(f"{fpath}: missing; the checkpoint is incomplete, load an earlier one")
    try:
        payload = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or foreign files raise many different errors
        raise CheckpointError(f"{fpath}: unreadable ({type(e).__name__}); load an earlier checkpoint") from None
    check_payload(payload, fpath)
    size = os.path.getsize(fpath)
    if recorded_size is not None and size != recorded_size:
        raise CheckpointError(f"{fpath}: {size} bytes, but meta.json recorded {recorded_size}; the file was replaced "
                              f"or damaged after saving, load an earlier checkpoint")
    return payload


def read_checkpoint(path: str) -> Checkpoint:
    """Open every file of a checkpoint (memory-mapped), checking that each is whole and that all
    slices are there and fit together, from their shapes alone: no tensor is read here."""
    step_dir, meta = read_meta(path)
    params: dict[str, list[dict]] = {}
    optim: dict[str, list[dict]] = {}
    rng = {}
    sizes = meta.get("sizes", [None] * len(meta["files"]))
    for r, fname in enumerate(meta["files"]):
        payload = open_rank_file(os.path.join(step_dir, fname), sizes[r])
        for name, entry in payload["params"].items():
            params.setdefault(name, []).append(entry)
        for name, entry in payload["optim"].items():
            optim.setdefault(name, []).append(entry)
        rng[r] = payload["rng"]
    for table, is_optim in ((params, False), (optim, True)):
        for name, entries in table.items():
            for key in [k for k in MOMENTS if k in entries[0]] if is_optim else [None]:
                try:
                    full_shape(entries, key)
                except CheckpointError as e:
                    raise CheckpointError(f"{step_dir}: slices of {name} do not fit together ({e})") from None
    return Checkpoint(step_dir, meta, params, optim, rng)


def _check_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("tensor"), torch.Tensor)
            and (entry.get("dim") is None or (_is_int(entry["dim"]) and 0 <= entry["dim"] < entry["tensor"].dim()))
            and _is_int(entry.get("rank")) and _is_int(entry.get("size")) and 0 <= entry["rank"] < entry["size"])


def check_payload(payload: Any, fpath: str) -> None:
    """A rank file's structure (see the module docstring); a foreign torch.save file fails here."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{fpath}: not a rank file of this trainer ({what}); load an earlier checkpoint")

    if not isinstance(payload, dict) or not all(isinstance(payload.get(k), dict) for k in ("params", "optim", "rng")):
        raise bad("expected a dict with params, optim and rng")
    for name, entry in payload["params"].items():
        if not _check_entry(entry):
            raise bad(f"entry {name!r} is malformed")
    for name, state in payload["optim"].items():
        adamw = (isinstance(state, dict) and isinstance(state.get("step"), (int, float))
                 and _check_entry(state.get("exp_avg")) and _check_entry(state.get("exp_avg_sq")))
        muon = isinstance(state, dict) and set(state) == {"momentum_buffer"} and _check_entry(state["momentum_buffer"])
        if not (adamw or muon):
            raise bad(f"optimizer entry {name!r} is malformed")
    if not isinstance(payload["rng"].get("torch"), torch.Tensor) or payload["rng"]["torch"].dtype != torch.uint8:
        raise bad("no torch RNG state")


def _ordered(entries: list[dict], key: str | None) -> list[dict]:
    """The slices of one tensor (or of its AdamW moment `key`), sorted by rank."""
    if key is not None:
        entries = [e[key] for e in entries]
    return sorted(entries, key=lambda e: e["rank"]) if entries[0]["dim"] is not None else entries[:1]


def full_shape(entries: list[dict], key: str | None = None) -> tuple[int, ...]:
    """The whole tensor's shape from its slices' shapes (no data read); CheckpointError if the
    slices are not every rank of one split, or differ in shape outside the split dimension."""
    ordered = _ordered(entries, key)
    first = ordered[0]
    shape = list(first["tensor"].shape)
    if first["dim"] is None:
        return tuple(shape)
    dim, size = first["dim"], first["size"]
    if [e["rank"] for e in ordered] != list(range(size)) or any(e["dim"] != dim or e["size"] != size
                                                                 for e in ordered):
        raise CheckpointError(f"slices {[e['rank'] for e in ordered]} of {size} found")
    for e in ordered[1:]:
        other = list(e["tensor"].shape)
        if len(other) != len(shape) or other[:dim] + other[dim + 1:] != shape[:dim] + shape[dim + 1:]:
            raise CheckpointError(f"slice shapes {tuple(first['tensor'].shape)} and {tuple(other)} differ")
        shape[dim] += other[dim]
    return tuple(shape)


def assemble(entries: list[dict], key: str | None = None) -> torch.Tensor:
    """Concatenate the slices of one tensor (sorted by rank) into the full tensor: reads them all."""
    ordered = _ordered(entries, key)
    if ordered[0]["dim"] is None:
        return ordered[0]["tensor"]
    return torch.cat([e["tensor"] for e in ordered], dim=ordered[0]["dim"])


def read_part(entries: list[dict], dim: int, index: int, parts: int, key: str | None = None) -> torch.Tensor:
    """Chunk `index` of `parts` along `dim` of the full tensor (as Tensor.chunk cuts it), read from
    the saved slices that overlap it and no others: with mapped files the rest stays on disk."""
    ordered = _ordered(entries, key)
    saved_dim = ordered[0]["dim"]
    if saved_dim is None:
        return ordered[0]["tensor"].chunk(parts, dim)[index]
    if saved_dim != dim:  # split along another dimension: every slice overlaps
        return assemble(ordered).chunk(parts, dim)[index]
    total = sum(e["tensor"].shape[dim] for e in ordered)
    step = -(-total // parts)
    start, end = index * step, min(total, (index + 1) * step)
    pieces, offset = [], 0
    for e in ordered:
        n = e["tensor"].shape[dim]
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            pieces.append(e["tensor"].narrow(dim, lo - offset, hi - lo))
        offset += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def full_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The whole model's weights, whatever layout wrote them."""
    return {name: assemble(entries) for name, entries in ckpt.params.items()}


def _slices(ckpt: Checkpoint, table: dict[str, list[dict]], name: str, want: tuple[int, ...],
            key: str | None = None) -> list[dict]:
    """The saved slices of `name`, after checking that they make a tensor of the shape the model needs."""
    if name not in table:
        raise CheckpointError(f"{ckpt.path}: has no tensor {name}; it was written by another model")
    shape = full_shape(table[name], key)
    if shape != tuple(want):
        raise CheckpointError(f"{ckpt.path}: {name} has shape {shape}, the model needs {tuple(want)}")
    return table[name]


def local_tensor(ckpt: Checkpoint, table: dict[str, list[dict]], name: str, p: torch.nn.Parameter,
                 key: str | None = None) -> torch.Tensor:
    """This rank's part of parameter `name` (or of its optimizer moment `key`) from any layout's files,
    reading only the saved slices that overlap it."""
    where = placement(p)
    if where.expert:  # re-stack this rank's experts from per-expert keys (and join gate and up)
        first = where.rank * p.shape[0]
        return torch.cat([torch.stack([assemble(_slices(ckpt, table, expert_key(stacked, first + i),
                                                        view.shape[1:][::-1], key), key).T
                                       for i in range(p.shape[0])])
                          for stacked, view in stacked_parts(name, p.detach(), p).items()], dim=-1)
    entries = _slices(ckpt, table, name, where.full_shape, key)
    if where.shard:
        return read_part(entries, where.dim, where.rank, where.size, key)
    return assemble(entries, key)


def load_into(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Copy this rank's slices of weights (and optimizer moments) out of a checkpoint of any layout.

    A weight whose saved state belongs to the other optimizer (AdamW's moments for a weight
    that Muon now updates, or the reverse) keeps a fresh state; the trainer says so at start."""
    for name, buf in persistent_buffers(model).items():
        if name in ckpt.params:  # checkpoints from before expert_bias existed keep its initial zero
            with torch.no_grad():
                buf.copy_(assemble(_slices(ckpt, ckpt.params, name, buf.shape)))
    master = getattr(optimizer, "master", {})  # bf16 weights: their fp32 masters take the saved values
    sharded = isinstance(optimizer, DistributedAdamW)  # this rank's pieces take their part of each tensor
    for name, p in model.named_parameters():
        full = local_tensor(ckpt, ckpt.params, name, p)
        with torch.no_grad():
            p.copy_(full)
            if master.get(p, p) is not p:
                master[p].copy_(full)
        if sharded:
            optimizer.load_weight(p, full)
        first_key = expert_key(next(iter(stacked_parts(name, p, p))), placement(p).rank * p.shape[0]) \
            if placement(p).expert else name
        if optimizer is None or first_key not in ckpt.optim:
            continue
        weight, saved = master.get(p, p), ckpt.optim[first_key][0]
        if weight in getattr(optimizer, "muon_params", {}):
            if "momentum_buffer" in saved:
                optimizer.state[weight] = {
                    "momentum_buffer": local_tensor(ckpt, ckpt.optim, name, p, "momentum_buffer").to(p.device).clone()}
        elif "exp_avg" in saved:
            fused = optimizer.defaults.get("fused")  # the fused kernel wants its step counts beside the weights
            state = {
                "step": torch.tensor(saved["step"], dtype=torch.float32, device=p.device if fused else "cpu"),
                "exp_avg": local_tensor(ckpt, ckpt.optim, name, p, "exp_avg").to(p.device).clone(),
                "exp_avg_sq": local_tensor(ckpt, ckpt.optim, name, p, "exp_avg_sq").to(p.device).clone(),
            }
            if sharded:
                optimizer.load_state(p, state)
            else:
                optimizer.state[weight] = state


def carried_tokenizer(path: str, meta: dict) -> data.ByteTokenizer | data.TextTokenizer | None:
    """The tokenizer the run trained with: the copy its checkpoint (step folder `path`, its `meta`) carries,
    checked against the sha256 in meta.json; else, for checkpoints from before that copy, the one of the
    --data folder it names. What export_hf.py, export_gguf.py and generate.py take.

    None when the run had none (token files without one). A tokenizer that cannot be found or does
    not match is an error: a byte tokenizer in its place would export a model that decodes garbage."""
    record = meta.get("tokenizer", "absent")
    if record is None:
        return None
    if isinstance(record, dict) and record.get("name") == "bytes":
        return data.ByteTokenizer(record.get("eos_id"), record.get("bos_id"))
    if isinstance(record, dict):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing; meta.json says the run's tokenizer is carried there, "
                                          f"copy the whole step folder")
        with open(file, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != record.get("sha256"):
                raise CheckpointError(f"{file}: its sha256 is not the one meta.json recorded; it was "
                                              f"replaced, copy the step folder again")
        return data.TextTokenizer(file, record.get("eos_id"), record.get("bos_id"))
    folder = meta.get("train", {}).get("data", "")
    if folder and not os.path.exists(folder) and meta["model"].get("vocab_size") != 256:
        raise CheckpointError(f"{path}: trained on --data {folder}, which is gone, and the checkpoint "
                                      f"(saved before checkpoints carried their tokenizer) holds no tokenizer; put the "
                                      f"data folder back at that path to export")
    try:
        return data.load_tokenizer(folder)
    except data.DataError:  # token files whose meta.json names no tokenizer
        return None
