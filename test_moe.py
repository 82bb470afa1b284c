"""The smoke entry point: `python test_moe.py` runs the quick set, every test of tests/ marked `smoke`
(about a minute on 2 cores); `python -m pytest` runs the whole suite. The tests live in tests/ by
concern (tests/README.md is the map); every test compares against something independent of the code
under test: a per-token loop, a formula by hand, or a single-process run of the same flags."""

import os
import sys

import pytest

if __name__ == "__main__":
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")
    sys.exit(pytest.main([tests, "-q", "-m", "smoke"]))
