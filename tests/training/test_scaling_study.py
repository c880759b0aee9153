"""The scaling study (training/study.py, tools/scaling_study.py): rows and
compute, resuming after a kill, refusing another study's workdir, the fit and
the picture. A tiny study (mu at depth 1, 4 tokens, 2 branches) runs once per
module, killed before its second branch and resumed."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from keras_vitscale.cli import scaling_study as scaling_study_tool
from keras_vitscale.config import ViTConfig
from keras_vitscale.training import IncompatibleWorkdirError
from keras_vitscale.training import study
from keras_vitscale.training import study_report

# Orchestration (training runs, tools): run once, on JAX.
pytestmark = pytest.mark.integration

# Branch steps 4 and 8 with half of each branch cooling down: branches end at
# steps 8 and 16; no warmup (5% of 8 steps rounds to 0).
TINY = dict(variants="mu", depth=1, image_size=16, patch_size=8, batch_size=16,
            branch_steps=[4, 8], cooldown_fraction=0.5, shots=2, seed=1)


class Killed(Exception):
    """Stands in for a kill: raised from the log inside a run."""


def _digest(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _tool():
    return scaling_study_tool


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny study, killed as its second branch starts training, then rerun."""
    workdir = tmp_path_factory.mktemp("study") / "study"
    settings = {"workdir": str(workdir), **TINY}
    first, second = (workdir / "runs" / "mu" / f"branch_{s:08d}" for s in (4, 8))

    def log(message):
        if message.startswith("Training") and str(second) in message:
            raise Killed(message)

    with pytest.raises(Killed):
        study.run(settings, log=log, progress=False)
    state = {"rows_before": study_report.read_csv(workdir / "study.csv"),
             "first_digest": _digest(first),
             "second_started": (second / "config.json").exists(),
             "second_finished": (second / "fewshot.json").exists()}
    messages = []
    result = study.run(settings, log=messages.append, progress=False)
    return dict(workdir=workdir, settings=settings, result=result, messages=messages,
                first=first, second=second, **state)


def test_rows_hold_the_analytic_training_flops_and_the_runs_errors(tiny):
    rows = study_report.read_csv(tiny["workdir"] / "study.csv")
    assert [(r["branch_step"], r["cooldown_steps"], r["steps"]) for r in rows] == \
        [(4, 4, 8), (8, 8, 16)]
    vit = ViTConfig.from_variant("mu", depth=1, image_size=16, patch_size=8, pooling="gap",
                                 posemb="sincos2d", num_classes=10)
    for row, branch in zip(rows, (tiny["first"], tiny["second"])):
        assert row["variant"] == "mu" and row["params"] == vit.count_params()
        assert row["forward_flops_per_image"] == vit.flops_per_image()
        assert row["images_seen"] == row["steps"] * 16
        assert row["training_flops"] == 3 * vit.flops_per_image() * row["steps"] * 16
        last = json.loads((branch / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == row["steps"]
        assert row["heldout_error"] == pytest.approx(1 - last["val_accuracy"])
        fewshot = json.loads((branch / "fewshot.json").read_text())
        assert row["fewshot2_error"] == pytest.approx(1 - fewshot["2"])
        # the branch cooled down: its last step's learning rate is 1/N of the peak
        assert last["learning_rate"] < 0.2 * 1e-3
    assert tiny["result"]["rows"] == rows


def test_a_killed_study_resumes_without_rerunning_finished_branches(tiny):
    # the kill was real: one row written, the second branch begun, not done
    assert len(tiny["rows_before"]) == 1 and tiny["rows_before"][0]["branch_step"] == 4
    assert tiny["second_started"] and not tiny["second_finished"]
    messages = "\n".join(tiny["messages"])
    assert "mu: parent run finished" in messages
    assert "branch at step 4 finished; read from" in messages
    assert "Training mu" in messages and str(tiny["second"]) in messages
    assert str(tiny["first"]) not in "\n".join(m for m in tiny["messages"]
                                              if m.startswith("Training"))
    assert tiny["result"]["trained"] == 1
    assert _digest(tiny["first"]) == tiny["first_digest"]  # not touched


def test_another_studys_workdir_is_refused_before_any_work(tiny, tmp_path):
    workdir = tiny["workdir"]
    before = _digest(workdir)
    other = {**tiny["settings"], "branch_steps": [4, 12], "lr": 3e-3}
    with pytest.raises(IncompatibleWorkdirError) as err:
        study.run(other, progress=False)
    message = str(err.value)
    assert "holds another scaling study" in message and "new --workdir" in message
    assert "branch_steps: workdir has {'mu': [4, 8]}" in message and "lr: " in message
    assert _digest(workdir) == before
    # a directory that is not a study (here: a training run) is refused too
    with pytest.raises(IncompatibleWorkdirError, match=r"config\.json.*no study\.json"):
        study.run({**tiny["settings"], "workdir": str(tiny["first"])}, progress=False)


def test_fit_json_and_png_are_written(tiny):
    workdir = tiny["workdir"]
    assert (workdir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # strict JSON: an exact fit's undefined standard errors are null, not NaN
    fits = json.loads((workdir / "fit.json").read_text(),
                      parse_constant=lambda name: pytest.fail(f"fit.json holds {name}"))
    assert set(fits) == {"heldout_error", "fewshot2_error"}
    for record in fits.values():
        assert record["frontier"] and record["note"]  # 2 points or fewer: said so
    record = json.loads((workdir / "study.json").read_text())
    assert record["settings"]["branch_steps"] == {"mu": [4, 8]}
    assert record["plan"]["mu"]["cooldown_steps"] == [4, 8]


def test_the_tool_reads_a_finished_study_and_exits_2_on_bad_input(tiny, capsys, tmp_path):
    tool = _tool()
    args = ["--workdir", str(tiny["workdir"]), "--variants", "mu", "--depth", "1",
            "--image-size", "16", "--patch-size", "8", "--batch-size", "16",
            "--branch-steps", "4,8", "--cooldown-fraction", "0.5", "--shots", "2",
            "--seed", "1", "--no-progress"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "| mu | " in out and "0 run(s) trained" in out
    assert tool.main(args[:-3] + ["--seed", "2"]) == 2
    assert "seed: workdir has 1, this study has 2" in capsys.readouterr().err
    help_text = tool.build_parser().format_help()
    for flag in ("--variants", "--branch-steps", "--cooldown-fraction", "study.csv",
                 "study.png", "resuming"):
        assert flag in help_text


def test_frontier_fit_and_plot_of_a_synthetic_study(tmp_path):
    """Three sizes; the points on one law E = a C^-b + c form the frontier,
    the others sit at twice the law, above a cheaper point: the frontier is
    found and its law recovered."""
    def law(compute):
        return 50.0 * compute ** -0.3 + 0.02

    above = {("Ti", 100), ("S", 100), ("S", 200)}
    rows, on_law = [], []
    for variant, flops in (("mu", 1e6), ("Ti", 3e7), ("S", 1e8)):
        for steps in (100, 200, 400, 800):
            compute = 3 * flops * steps * 64
            error = law(compute) * (2.0 if (variant, steps) in above else 1.0)
            if (variant, steps) not in above:
                on_law.append(len(rows))
            rows.append({"variant": variant, "params": int(flops / 30), "steps": steps,
                         "branch_step": steps, "training_flops": compute,
                         "heldout_error": error, "fewshot10_error": 1.5 * error})
    fits = study_report.fit_study(rows, 10)
    result = fits["heldout_error"]
    assert result["frontier"] == on_law and result["note"] == ""
    fit = result["fit"]
    assert fit.form == "a*(C+d)^-b+c"
    np.testing.assert_allclose([fit.b, fit.c], [0.3, 0.02], rtol=1e-2)
    assert fits["fewshot10_error"]["fit"].c == pytest.approx(0.03, rel=1e-2)
    out = tmp_path / "study.png"
    study_report.plot_study(rows, fits, out, 10)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study_report.write_csv(rows, tmp_path / "rows.csv")
    assert study_report.read_csv(tmp_path / "rows.csv") == rows
    with open(tmp_path / "rows.csv") as f:
        assert next(csv.reader(f))[:2] == ["variant", "params"]


def test_pareto_frontier_and_zero_errors():
    assert study_report.pareto_frontier([1, 2, 3, 4], [0.5, 0.6, 0.3, 0.3]) == [0, 2]
    result = study_report.fit_frontier([1, 2, 3], [0.5, 0.0, 0.2])
    assert result["frontier"] == [0, 2] and "zero error left out" in result["note"]
    assert result["fit"].form == "a*C^-b"


@pytest.mark.parametrize("change, match", [
    ({"variants": "mu,Q"}, r"Unknown ViT variant 'Q'"),
    ({"variants": "Ti/16"}, r"one --patch-size for every variant: write 'Ti'"),
    ({"variants": "mu,Ti", "branch_steps": "mu=4,8"}, r"give steps for exactly"),
    ({"variants": "B", "branch_steps": None}, r"No default branch steps for variant\(s\) \['B'\]"),
    ({"branch_steps": "100,333"}, r"greatest common divisor 1.*333 checkpoints"),
    ({"branch_steps": "4,x"}, r"not a comma-separated list of integers"),
    ({"cooldown_fraction": 1.0}, r"--cooldown-fraction 1.0 must be in \(0, 1\)"),
    ({"schedule": "cosine"}, r"must not depend on the run's length; use rsqrt or constant"),
    ({"depth": 0}, r"--depth 0: give a positive integer, or 'variant'"),
    ({"patch_size": 5}, r"image_size height 16 is not divisible by patch_size 5"),
    ({"unknown": 1}, r"Unknown study setting\(s\) \['unknown'\]"),
])
def test_bad_settings_are_named_before_any_work(tmp_path, change, match):
    workdir = tmp_path / "study"
    with pytest.raises(ValueError, match=match):
        study.run({"workdir": str(workdir), **TINY, **change}, progress=False)
    assert not workdir.exists()


def test_parse_branch_steps():
    assert study.parse_branch_steps("100,200") == [100, 200]
    assert study.parse_branch_steps("mu=4,8 Ti=2") == {"mu": [4, 8], "Ti": [2]}
    with pytest.raises(ValueError, match=r"'Ti' is not VARIANT=S1,S2"):
        study.parse_branch_steps("mu=4 Ti")
    settings, plan = study.resolve({"workdir": "x"})
    assert plan["mu"]["cooldown_steps"] == [25, 50, 100, 200, 400, 800]
    assert plan["S"] == {"branch_steps": [20, 40, 80, 160], "cooldown_steps": [5, 10, 20, 40],
                         "steps": 160, "warmup_steps": 8, "log_every": 5,
                         "checkpoint_every": 20, "keep_checkpoints": 8}
