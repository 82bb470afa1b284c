"""Who owns an output path: the one check every output of the trainer and the scripts passes first.

Kept beside minimal_pretrain.py because the trainer (--save, --metrics-file, --tensorboard) and the
scripts (export, import, upcycle, plots, comparisons) follow the same contract (docs/DESIGN.md,
"Outputs"): the tool writes only into a path that is new, or is recognisably its own output of
that kind (a metrics file whose lines are our JSON records, a folder of our TensorBoard events);
handing over anything else is explicit (--overwrite). Outputs are never read as inputs, so an
output inside an input (a checkpoint folder inside the --data text folder) is refused too.

Outputs that a script writes whole (an export, an import, an upcycled checkpoint: Kind.replaced_whole)
are stricter: --overwrite replaces only an earlier output of the same kind, which carries its script's
mark, and hands over nothing else; the new output is written beside the old one and swapped in
(swap_in), so a failure midway leaves the old one whole.

Everything here is decided before the first byte is written, from the path and what is already
there, so a refusal is an `error:` line at start and not a traceback (or a truncated file) later.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import Callable

# Longest name the tool adds under an output it owns: `.tmp-step_00000000/rank_00000.pt.part` under
# a checkpoint folder, `.part` after a file; the whole path must fit the file system with it.
CHILD_MARGIN = {True: len("/.tmp-step_00000000/rank_00000.pt.part"), False: len(".part")}


class OutputError(ValueError):
    """An output path the tool must not (or cannot) write; the message names the flag and the fix."""


@dataclass(frozen=True)
class Kind:
    """One kind of output: a file or a folder, and how to recognise an existing one as ours."""

    name: str  # in messages: "a metrics file"
    folder: bool
    is_ours: Callable[[str], bool]  # called on an existing, non-empty path of the right type
    replaced_whole: bool = False  # written whole by a script: --overwrite replaces only an earlier one of this kind


def is_metrics_file(path: str) -> bool:
    """Every complete line is one of our JSON records (an object with an integer "step", written
    first); a last line without its newline may be such a record cut by a crash (dropped on resume)."""
    try:
        with open(path) as f:
            for line in f:
                if not line.endswith("\n"):
                    return line.startswith('{"step": ')
                record = json.loads(line)
                if not isinstance(record, dict) or type(record.get("step")) is not int:
                    return False
    except (OSError, ValueError):  # undecodable bytes or a line that is not JSON
        return False
    return True


def holds_only(prefixes: tuple[str, ...] = (), suffixes: tuple[str, ...] = ()) -> Callable[[str], bool]:
    """A folder whose every entry is a file named with one of `prefixes` or `suffixes`."""
    def check(folder: str) -> bool:
        return all(e.startswith(prefixes) or e.endswith(suffixes) for e in os.listdir(folder))  # () matches nothing
    return check


METRICS_FILE = Kind("a metrics file of this trainer (JSON lines)", False, is_metrics_file)
TENSORBOARD_DIR = Kind("a TensorBoard folder (events.out.tfevents.* only)", True,
                       holds_only(prefixes=("events.out.tfevents.",)))
PLOT_DIR = Kind("a folder of plots (PNG files only)", True, holds_only(suffixes=(".png",)))


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_fits(path: str, flag: str, folder: bool) -> str:
    """The path's names and length fit the file system (with what the tool adds under it), and
    nothing on the way to it is a file; return the nearest existing folder above or at it."""
    full = os.path.abspath(path)
    existing = full
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) and existing != full:
        raise OutputError(f"{flag} {path}: not writable ({existing} is a file, not a folder); choose a path "
                          f"outside it")
    base = existing if os.path.isdir(existing) else os.path.dirname(existing)
    name_max, path_max = os.pathconf(base, "PC_NAME_MAX"), os.pathconf(base, "PC_PATH_MAX")
    too_long = [n for n in full.split(os.sep) if len(os.fsencode(n)) + (0 if folder else len(".part")) > name_max]
    if too_long:
        raise OutputError(f"{flag} {path}: the name {too_long[0][:40]}... is longer than the file system's "
                          f"{name_max} bytes; choose a shorter name")
    if len(os.fsencode(full)) + CHILD_MARGIN[folder] >= path_max:
        raise OutputError(f"{flag} {path}: {len(os.fsencode(full))} bytes long; with the files written under it "
                          f"it would pass the file system's limit of {path_max}; choose a shorter path")
    return base


def claim(path: str, flag: str, kind: Kind, overwrite: bool = False, inputs: dict[str, str] | None = None) -> None:
    """Refuse `path` as an output of `kind` unless it is new, empty, ours, or handed over (`overwrite`).

    `inputs` names the paths the same command reads ({"--data": ...}): an output inside one of them,
    or one containing it, would be read back as input. Raises OutputError; writes nothing."""
    base = check_fits(path, flag, kind.folder)
    for name, source in (inputs or {}).items():
        if source and os.path.lexists(source) and inside(path, source):
            raise OutputError(f"{flag} {path} lies inside {name} {source}: outputs are never read as inputs; "
                              f"choose a path outside it")
        if source and os.path.lexists(source) and inside(source, path):
            raise OutputError(f"{flag} {path} contains {name} {source}: outputs are never read as inputs; "
                              f"choose a path outside it")
    if not os.access(base, os.W_OK):
        raise OutputError(f"{flag} {path}: {base} is not writable; choose another path")
    if not os.path.lexists(path):
        return
    mode = os.stat(path).st_mode if os.path.exists(path) else 0  # a dangling link has no mode
    if kind.folder and not stat.S_ISDIR(mode):
        wanted = "an empty folder" if kind.replaced_whole else "a folder"
        raise OutputError(f"{flag} {path}: exists and is not a folder, so not {wanted}; give a new folder")
    if not kind.folder and stat.S_ISDIR(mode):
        raise OutputError(f"{flag} {path}: is a folder; give a file name")
    if not kind.folder and not stat.S_ISREG(mode):
        raise OutputError(f"{flag} {path}: not a regular file (a FIFO, a device or a dangling link)")
    if not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path}: not writable; choose another path")
    entries = os.listdir(path) if kind.folder else []
    empty = not entries if kind.folder else os.path.getsize(path) == 0
    if empty:
        return
    ours = kind.is_ours(path)
    if not kind.replaced_whole and (ours or overwrite):
        return
    if not kind.replaced_whole:
        raise OutputError(f"{flag} {path}: exists and is not {kind.name}, so it is not this tool's to write; "
                          f"pass --overwrite to hand it over, or choose a new path")
    if ours and overwrite:
        return
    if ours:
        raise OutputError(f"{flag} {path} already holds {kind.name}; pass --overwrite to replace it, or choose a "
                          f"new path")
    # Not ours: never replaced, --overwrite or not (a checkpoint's `latest` must never move under a run).
    if not kind.folder:
        raise OutputError(f"{flag} {path}: exists and is not {kind.name}, so it is not this tool's to replace "
                          f"(not even with --overwrite); choose a new path")
    held = "a checkpoint" if {"latest", "meta.json"} & set(entries) else "other files"
    raise OutputError(f"{flag} {path} already holds {held} and is not an empty folder or {kind.name}; choose a "
                      f"new or empty folder (nothing else is replaced, not even with --overwrite)")


def swap_in(work: str, out: str) -> None:
    """Put the finished `work` (a temporary sibling of `out`, file or folder) at `out`, replacing an earlier
    output there that claim allowed (--overwrite). A file, or a folder over nothing or an empty folder, is
    one rename; an earlier folder is first renamed aside into `.NAME.*.old` and deleted only once the new
    one is in place, so a crash between the two renames leaves it whole there, never destroyed."""
    if not os.path.isdir(out) or not os.listdir(out):
        os.replace(work, out)  # rename(2): atomic over a file, and over an empty folder
        return
    parent = os.path.dirname(os.path.abspath(out))
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".old", dir=parent)
    os.replace(out, os.path.join(old, "out"))
    os.replace(work, out)
    shutil.rmtree(old)
