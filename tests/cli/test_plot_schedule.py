"""kvs-plot-schedule (cli/plot_schedule.py): a PNG, and bad schedules exit 2."""

import pytest

from keras_vitscale.cli import plot_schedule

pytestmark = pytest.mark.integration  # a tool: run once, on JAX


def test_plot_tool_writes_png(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert plot_schedule.main(["--total-steps", "1000", "--warmup-steps", "100", "--points",
                               "50", "--schedule", "rsqrt,timescale=100", "--schedule",
                               "cosine", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_schedule.main(["--total-steps", "10", "--warmup-steps", "20", "--schedule",
                               "cosine", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exceed total_steps" in err and err.startswith("kvs-plot-schedule: error: ")
