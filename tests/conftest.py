"""Fixtures shared by several test files, each built once per session."""

from __future__ import annotations

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
