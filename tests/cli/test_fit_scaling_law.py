"""kvs-fit-scaling-law (cli/fit_scaling_law.py): a PNG and the fitted
parameters, a named bad column, a quick and useful --help."""

import numpy as np
import pytest

from keras_vitscale.cli import fit_scaling_law

pytestmark = pytest.mark.integration  # a tool: run once, on JAX

TRUE = dict(a=2.0, b=0.4, c=0.05, d=0.5)  # as in tests/test_scaling.py


def test_tool_writes_png_and_prints_parameters(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    compute = np.logspace(-1, 5, 12)
    error = TRUE["a"] * (compute + TRUE["d"]) ** -TRUE["b"] + TRUE["c"]
    csv = tmp_path / "runs.csv"
    rows = [f"{float(c)!r},{float(e)!r},x" for c, e in zip(compute, error)]
    csv.write_text("flops,err,note\n" + "\n".join(rows) + "\n")
    out = tmp_path / "fit.png"
    assert fit_scaling_law.main([str(csv), "--out", str(out), "--compute-column", "flops",
                                 "--error-column", "err"]) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "b = 0.4 +-" in printed and "c = 0.05 +-" in printed and "d = 0.5 +-" in printed
    assert "plain power law" in printed
    assert fit_scaling_law.main([str(csv), "--out", str(out),
                                 "--compute-column", "flops"]) == 2
    err = capsys.readouterr().err
    assert "no column 'error'" in err and "--error-column" in err


def test_tool_help_is_fast_and_useful(run_script):
    result = run_script("fit_scaling_law", "--help", timeout=60)
    assert result.returncode == 0
    assert "--compute-column" in result.stdout and "(C + d)^-b + c" in result.stdout
