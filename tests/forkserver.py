"""Trainer processes for the tests, forked from a process that has imported torch once.

Every `python minimal_pretrain.py` spends ~2.5 s of CPU before its first step importing torch and
torch._dynamo (which torch.optim and backward() import on first use), whatever it trains; the
suite starts ~400 such processes (a parity run of 4 ranks is 4). `ForkServer` is a process that
has imported them and forks one child per rank: each child sets its environment, working folder
and output files, and runs the script as `python script args` would (`runpy`, as `__main__`),
so a rank costs only its own work. Ranks get the environment torchrun gives them (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); as torchrun does, when one
rank fails the others get SIGTERM (SIGKILL 10 s later) and the run's exit status is 1.

The launch path itself stays tested: tests/helpers.run_cli(..., torchrun=True) and the tests
that start processes with subprocess (SIGTERM, a killed worker, exit status 2 as a process)
use real processes. Protocol: one JSON line per request on the server's stdin, one per finished
child on its stdout; the children never write to either."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "minimal_pretrain")
GRACE_S = 10.0  # SIGTERM -> SIGKILL, as torchrun's default


# ------------------------------------------------------------------ the client (in pytest)
class ForkServer:
    """One server per thread that uses it (a run waits for its own children only)."""

    _local = threading.local()

    @classmethod
    def for_this_thread(cls, root: str) -> "ForkServer":
        server = getattr(cls._local, "server", None)
        if server is None or server.proc.poll() is not None:
            server = cls._local.server = cls(root)
        return server

    def __init__(self, root: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.pending, self.inbox = b"", []  # bytes of an unfinished line; messages not yet taken

    def run(self, argv: list[str], envs: list[dict], cwd: str, outdir: str, timeout: float) -> tuple[int, str, str]:
        """Run `python argv` once per environment in `envs` (one rank each) -> (exit status, stdout,
        stderr), the outputs of all ranks in rank order. Raises subprocess.TimeoutExpired."""
        paths = [(os.path.join(outdir, f"rank{i}.out"), os.path.join(outdir, f"rank{i}.err")) for i in range(len(envs))]
        for i, (env, (out, err)) in enumerate(zip(envs, paths)):
            self._send(dict(op="run", id=i, argv=argv, env=env, cwd=cwd, out=out, err=err))
        codes: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(codes) < len(envs):
            msg = self._receive(deadline)
            if msg is None:  # timed out: stop every rank, then report as subprocess.run does
                self._send(dict(op="kill"))
                while len(codes) < len(envs):
                    done = self._receive(time.monotonic() + 30)
                    if done is None:  # the server itself is stuck: start a new one next time
                        self.proc.kill()
                        break
                    codes[done["id"]] = done["rc"]
                raise subprocess.TimeoutExpired(argv, timeout, *self._outputs(paths))
            codes[msg["id"]] = msg["rc"]
            if msg["rc"] != 0 and len(codes) < len(envs):
                self._send(dict(op="terminate"))  # torchrun stops the other ranks when one fails
        rc = codes[0] if len(envs) == 1 else int(any(codes.values()))  # torchrun: 1 when a rank failed
        return (rc, *self._outputs(paths))

    @staticmethod
    def _outputs(paths) -> tuple[str, str]:
        read = lambda p: Path(p).read_text(errors="replace") if os.path.exists(p) else ""
        return "".join(read(o) for o, _ in paths), "".join(read(e) for _, e in paths)

    def _send(self, msg: dict) -> None:
        self.proc.stdin.write(encode(msg))

    def _receive(self, deadline: float) -> dict | None:
        while not self.inbox:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the fork server exited ({self.proc.wait()})")
            messages, self.pending = decode(self.pending + chunk)
            self.inbox += messages
        return self.inbox.pop(0)


def encode(msg: dict) -> bytes:
    return (json.dumps(msg) + "\n").encode()


def decode(pending: bytes) -> tuple[list[dict], bytes]:
    """Bytes read so far -> (the whole lines' messages, the unfinished rest)."""
    *lines, rest = pending.split(b"\n")
    return [json.loads(line) for line in lines], rest


# ------------------------------------------------------------------ the server
def serve() -> None:
    requests, replies = os.dup(0), os.dup(1)  # the protocol's pipes; 0 and 1 go to /dev/null
    sys.path[0] = os.getcwd()  # the project root (the client starts the server there), not tests/
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    for name in PRELOAD:
        __import__(name)
    children: dict[int, int] = {}  # pid -> request id
    pending, kill_at = b"", None
    while True:
        if select.select([requests], [], [], 0.02)[0]:
            chunk = os.read(requests, 65536)
            if not chunk:  # pytest is gone: so are the children
                signal_all(children, signal.SIGKILL)
                return
            messages, pending = decode(pending + chunk)
            for msg in messages:
                if msg["op"] == "run":
                    children[fork_child(msg, requests, replies)] = msg["id"]
                else:  # "terminate" (a rank failed) or "kill" (timed out)
                    signal_all(children, signal.SIGTERM if msg["op"] == "terminate" else signal.SIGKILL)
                    kill_at = time.monotonic() + GRACE_S
        if kill_at is not None and time.monotonic() > kill_at:
            signal_all(children, signal.SIGKILL)
            kill_at = None
        reap(children, replies)
        if not children:
            kill_at = None


def signal_all(children: dict[int, int], sig: int) -> None:
    for pid in children:
        os.kill(pid, sig)


def reap(children: dict[int, int], replies: int) -> None:
    """Report each child that has exited: its request id and exit status (-N: killed by signal N)."""
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        os.write(replies, encode(dict(id=children.pop(pid), rc=os.waitstatus_to_exitcode(status))))


def fork_child(msg: dict, requests: int, replies: int) -> int:
    pid = os.fork()
    if pid == 0:
        os.close(requests)
        os.close(replies)
        run_child(msg)  # never returns
    return pid


def run_child(msg: dict) -> None:
    """In the forked child: become `python argv` with this environment, folder and output files."""
    import atexit
    import io
    import runpy
    atexit._clear()  # only what this run registers runs at its exit
    code = 1
    try:
        os.chdir(msg["cwd"])
        os.environ.clear()
        os.environ.update(msg["env"])
        for fd, path in ((1, msg["out"]), (2, msg["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        sys.argv = list(msg["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(msg["argv"][0]))
        try:
            runpy.run_path(msg["argv"][0], run_name="__main__")
            code = 0
        except SystemExit as stop:  # as the interpreter maps sys.exit's argument
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())
        # What the interpreter runs at exit, in its order: threading's exit hooks (which stop
        # concurrent.futures' workers, as Inductor's compile pool), then a join of the non-daemon
        # threads (joining them by hand would wait for those workers forever), then atexit.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
