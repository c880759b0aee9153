"""What the command-line tool tests share: running `python tools/<tool>.py`
as a user does, from the repository root."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_script():
    """Runs `python tools/<tool>.py ARGS` from the repository root, importing
    this checkout's keras_vitscale (not an installed one); returns the
    CompletedProcess."""

    def run(tool, *args, timeout=120):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return run
