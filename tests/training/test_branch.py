"""Cooldown branches (--branch-from) and run logging (--tensorboard, --wandb)."""

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from keras_vitscale.training import CheckpointManager, train
from keras_vitscale.training.trainer import build_schedule

# Orchestration (training runs, tools): run once, on JAX.
pytestmark = pytest.mark.integration

# A constant-schedule parent with checkpoints every 8 steps; branches cool
# down over 8 steps.
TINY = dict(variant="mu", patch_size=4, image_size=16, batch_size=16, log_every=4,
            eval_every=8, fewshot="none", lr=3e-3, seed=3)
PARENT = dict(TINY, steps=24, schedule="constant", warmup_steps=4, cooldown_steps=0,
              checkpoint_every=8, keep_checkpoints=3)
QUIET = dict(progress=False, log=lambda m: None)


def _digest(directory):
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def _weights(workdir, step):
    with np.load(Path(workdir) / "checkpoints" / f"ckpt_{step:08d}" / "state.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k[1:]))]


def _rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("branch") / "parent"
    train({"workdir": str(workdir), **PARENT}, **QUIET)
    return workdir


def test_branch_equals_uninterrupted_run_and_cools_down_to_zero(parent, tmp_path):
    before = _digest(parent)
    branches = {}
    for step in (8, 16):
        workdir = tmp_path / f"branch{step}"
        summary = train({"workdir": str(workdir), "branch_from": str(parent),
                         "branch_step": step, "cooldown_steps": 8}, **QUIET)
        assert summary["step"] == step + 8
        branches[step] = workdir
    assert _digest(parent) == before  # the parent is only read

    config = json.loads((branches[16] / "config.json").read_text())
    assert config["branch"] == {"parent": str(parent.resolve()), "step": 16}
    assert (config["steps"], config["cooldown_steps"], config["warmup_steps"]) == (24, 8, 4)
    schedule = build_schedule(config)
    lr = [float(schedule(t)) for t in range(24 + 1)]
    assert lr[:16] == pytest.approx([3e-3 * min(1, t / 4) for t in range(16)])
    assert lr[16:] == pytest.approx([3e-3 * (24 - t) / 8 for t in range(16, 25)])
    assert lr[24] == 0.0  # the branch ends at learning rate zero

    # The branch's curves hold the parent's history up to the branch point,
    # then its own cooldown, during which the loss falls.
    rows = _rows(branches[16])
    assert [r["step"] for r in rows] == list(range(4, 25, 4))
    assert rows[:4] == [r for r in _rows(parent) if r["step"] <= 16]
    assert rows[-1]["loss"] < rows[3]["loss"]
    assert rows[-1]["learning_rate"] == pytest.approx(3e-3 / 8)  # last update's lr

    # Same weights as an uninterrupted 24-step run with an 8-step cooldown.
    straight = tmp_path / "straight"
    train({"workdir": str(straight), **dict(PARENT, cooldown_steps=8)}, **QUIET)
    for a, b in zip(_weights(straight, 24), _weights(branches[16], 24), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # ...and different from the parent, which never cooled down.
    assert any(np.abs(a - b).max() > 1e-4 for a, b in
               zip(_weights(parent, 24), _weights(branches[16], 24)) if a.dtype.kind == "f")


def test_branch_from_a_checkpoint_directory_and_resume(parent, tmp_path):
    checkpoint = CheckpointManager(parent).path(16)
    workdir = tmp_path / "b"
    first = train({"workdir": str(workdir), "branch_from": str(checkpoint),
                   "cooldown_steps": 8}, **QUIET)
    messages = []
    again = train({"workdir": str(workdir), "branch_from": str(checkpoint),
                   "cooldown_steps": 8}, progress=False, log=messages.append)
    assert first["step"] == again["step"] == 24
    assert any("Resuming from" in m for m in messages)  # its own checkpoint, not the parent's


@pytest.mark.parametrize("extra, match", [
    ({"branch_step": 32}, r"--branch-step 32 is beyond the parent's last checkpoint "
                          r"\(step 24\); checkpoints present: \[8, 16, 24\]"),
    ({"branch_step": 12}, r"no checkpoint at step 12; checkpoints present: \[8, 16, 24\]"),
    ({"branch_step": 16, "lr": 0.1}, r"lr: parent has 0.003, this branch has 0.1"),
    ({"branch_step": 16, "cooldown_steps": None}, r"needs --cooldown-steps N"),
    ({"branch_step": 16, "cooldown_steps": 6}, r"not a multiple of the parent's --log-every 4"),
    ({"branch_step": 16, "steps": 30}, r"runs 24 steps, not 30"),
])
def test_bad_branches_fail_before_any_work(parent, tmp_path, extra, match):
    settings = {"workdir": str(tmp_path / "b"), "branch_from": str(parent),
                "cooldown_steps": 8, **extra}
    with pytest.raises(ValueError, match=match):
        train(settings, **QUIET)
    assert not (tmp_path / "b").exists()


def test_branch_refuses_its_parent_as_workdir_and_length_dependent_schedules(parent, tmp_path):
    with pytest.raises(ValueError, match="is the parent run itself"):
        train({"workdir": str(parent), "branch_from": str(parent), "cooldown_steps": 8},
              **QUIET)
    cosine = tmp_path / "cosine"
    train({"workdir": str(cosine), **dict(TINY, steps=8, checkpoint_every=8)}, **QUIET)
    with pytest.raises(ValueError, match="uses --schedule cosine, whose value depends"):
        train({"workdir": str(tmp_path / "b"), "branch_from": str(cosine),
               "cooldown_steps": 8}, **QUIET)
    with pytest.raises(ValueError, match="not a run directory"):
        train({"workdir": str(tmp_path / "b"), "branch_from": str(tmp_path),
               "cooldown_steps": 8}, **QUIET)


def _events(directory):
    import tensorflow as tf

    found = {}
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                found.setdefault((path.parent.name, value.tag), []).append(
                    (event.step, tensor))
    return found


def test_tensorboard_logs_scalars_against_steps_and_the_fewshot_table(tmp_path):
    settings = dict(TINY, steps=8, checkpoint_every=8, fewshot="1,2", tensorboard=True)
    train({"workdir": str(tmp_path), **settings}, **QUIET)
    events = _events(tmp_path / "tensorboard")
    rows = _rows(tmp_path)
    loss = events[("train", "epoch_loss")]
    assert [s for s, _ in loss] == [4, 8]
    np.testing.assert_allclose([float(v) for _, v in loss], [r["loss"] for r in rows],
                               rtol=1e-6)
    assert [s for s, _ in events[("train", "epoch_images_per_s")]] == [4, 8]
    assert [s for s, _ in events[("train", "epoch_learning_rate")]] == [4, 8]
    assert [s for s, _ in events[("validation", "epoch_accuracy")]] == [8]
    fewshot = json.loads((tmp_path / "fewshot.json").read_text())
    (step, value), = events[("validation", "fewshot/2shot_accuracy")]
    assert step == 8 and float(value) == pytest.approx(fewshot["2"])
    (_, table), = events[("validation", "fewshot/table")]
    text = table.reshape(-1)[0].decode()
    assert "shots" in text and f"{fewshot['2']:.4f}" in text


class _FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_gets_every_metrics_row_when_installed(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    settings = dict(TINY, steps=8, checkpoint_every=8, fewshot="1", wandb="my-project")
    train({"workdir": str(tmp_path), **settings}, **QUIET)
    (run,) = runs
    assert run.init["project"] == "my-project" and run.init["config"]["steps"] == 8
    rows = _rows(tmp_path)
    assert [s for s, _ in run.logged[:2]] == [r["step"] for r in rows]
    assert run.logged[1][1]["val_accuracy"] == rows[1]["val_accuracy"]
    assert "fewshot/1shot_accuracy" in run.logged[2][1] and run.finished


def test_wandb_missing_is_a_clear_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install wandb"):
        train({"workdir": str(tmp_path / "w"), **TINY, "steps": 8, "wandb": "p"}, **QUIET)
    assert not (tmp_path / "w").exists()
