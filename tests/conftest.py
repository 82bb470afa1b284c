"""Fixtures shared by several test files, each built once per session."""

from __future__ import annotations

import subprocess
import threading

import pytest

from helpers import run_cli, TINY_FLAGS


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "ck"
    r = run_cli(TINY_FLAGS + ["--max-steps", "2", "--save", str(d)])
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A real 6-step run (eval every 3) with checkpoint and metrics: exported, imported, sampled, plotted."""
    d = tmp_path_factory.mktemp("trained")
    r = run_cli(TINY_FLAGS + ["--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2",
                              "--metrics-file", str(d / "m.jsonl"), "--save", str(d / "ck")])
    assert r.returncode == 0, r.stderr
    return d


# ------------------------------------------------------------------ long runs in the background
# The suite's one-rank runs use one thread, so one of the two cores idles through much of it. The
# longest one-process runs, which no other run waits for, start in the background when the session
# begins and use that core; the tests that read them wait for them. Each job: the test that reads
# it, and its trainer flags ({out} is the job's own folder).
_MTP_RUN = TINY_FLAGS + ["--max-steps", "3", "--mtp-num-layers", "1", "--metrics-file", "{out}/m.jsonl"]
BACKGROUND_JOBS = {
    "default_run": ("test_default_run_beats_the_unigram_baseline",
                    ["--no-progress", "--metrics-file", "{out}/m.jsonl"]),
    "compiled_mtp": ("test_compile_gives_the_same_losses_to_rounding", _MTP_RUN + ["--compile"]),
    "eager_mtp": ("test_compile_gives_the_same_losses_to_rounding", _MTP_RUN),
}


class BackgroundRuns:
    """Runs the jobs of BACKGROUND_JOBS one after another on a thread; `result` waits for one (or
    runs it here when the session did not start it: a test run on its own)."""

    def __init__(self, tmp_path_factory, names: list[str]):
        self.out = {n: tmp_path_factory.mktemp(n) for n in BACKGROUND_JOBS}
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.done = {n: threading.Event() for n in names}
        self.thread = threading.Thread(target=self._run_all, args=(names,), daemon=True)
        self.thread.start()

    def _run_all(self, names: list[str]) -> None:
        for name in names:
            self._run(name)

    def _run(self, name: str) -> None:
        try:
            args = [a.format(out=self.out[name]) for a in BACKGROUND_JOBS[name][1]]
            self.results[name] = run_cli(args, timeout=600)
        finally:
            self.done[name].set()

    def result(self, name: str):
        """(the finished process, its output folder)."""
        if name in self.done:
            self.done[name].wait()
        else:
            self._run(name)
        return self.results[name], self.out[name]


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    collected = {item.originalname for item in request.session.items}
    return BackgroundRuns(tmp_path_factory, [n for n, (test, _) in BACKGROUND_JOBS.items() if test in collected])
