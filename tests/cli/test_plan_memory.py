"""kvs-plan-memory (cli/plan_memory.py): the fit table, and clear errors for bad settings."""

import re

import pytest

from keras_vitscale.cli import plan_memory
from keras_vitscale.planning import memory_estimate

pytestmark = pytest.mark.integration



def test_plan_memory_tool_prints_a_fit_table(capsys):
    assert plan_memory.main(["--device-memory", "16GiB", "--variants", "Ti/16,G/14,22B/14"]) == 0
    out = capsys.readouterr().out
    cells = {line.split()[0]: line.split()[1:5] for line in out.splitlines()[1:]}
    assert cells["variant"] == list(memory_estimate.OPTIMIZERS)
    # 22B parameters alone (81 GiB in float32) cannot fit on one 16 GiB device.
    assert cells["22B/14"] == ["-"] * 4
    # ViT-G/14: float32 params + grads are 13.7 GiB, so any optimizer state
    # (Adafactor's is the smallest, 3.4 GiB) overflows; SGD fits batch 1.
    assert cells["G/14"] == ["-", "-", "-", "1"]
    assert int(cells["Ti/16"][0]) >= 64


@pytest.mark.parametrize("argv, message", [
    (["--device-memory", "16"], r"--device-memory: Cannot read '16'.*no unit.*'16GiB'"),
    (["--variants", "Z/9"], r"--variants 'Z/9': Unknown variant 'Z/9'; use one of .*Ti.*22B"),
    (["--simulate", "--variants", "Z/9"], r"--variants 'Z/9': .*Known variants.*22B"),
])
def test_plan_memory_tool_refuses_bad_settings_without_a_traceback(argv, message, capsys):
    assert plan_memory.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvs-plan-memory: error: ")
    assert "Traceback" not in err
    assert re.search(message, err), err
