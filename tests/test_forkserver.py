"""tests/forkserver.py against real processes: a forked run ends as `python script` does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from forkserver import ForkServer
from helpers import HERE

SCRIPTS = {
    # a thread pool that stays referenced, as Inductor's compile workers do: python stops it at exit
    "thread_pool": "import concurrent.futures as f, sys\nsys.kept_pool = f.ThreadPoolExecutor(2)\n"
                   "print(sys.kept_pool.submit(sum, [1, 2]).result())\nsys.exit(3)\n",
    "exception": "print('before')\nraise ValueError('boom')\n",
    "atexit": "import atexit\natexit.register(lambda: print('at exit'))\nprint('main')\n",
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_forked_run_ends_as_python_does(name, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(SCRIPTS[name])
    real = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    rc, out, err = ForkServer.for_this_thread(HERE).run([str(script)], [{}], str(tmp_path), str(tmp_path), timeout=60)
    assert (rc, out) == (real.returncode, real.stdout)
    assert err.splitlines()[-1:] == real.stderr.splitlines()[-1:]  # the traceback's last line, if any
