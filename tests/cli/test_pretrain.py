"""kvs-pretrain (cli/pretrain.py): Ctrl-C names the step and exits 130, and
the same command resumes from the last checkpoint."""

import json

import pytest

from keras_vitscale.cli import pretrain
from keras_vitscale.training import callbacks

pytestmark = pytest.mark.integration  # training runs: once, on JAX


def _args(workdir):
    return ["--workdir", str(workdir), "--variant", "mu", "--patch-size", "4",
            "--image-size", "16", "--batch-size", "8", "--steps", "6", "--log-every", "1",
            "--checkpoint-every", "2", "--eval-every", "6", "--fewshot", "none",
            "--dataset", "synthetic", "--num-classes", "4", "--no-progress"]


def test_ctrl_c_names_the_step_and_exit_130_then_the_rerun_resumes(tmp_path, capsys,
                                                                   monkeypatch):
    end_of_step = callbacks.RunMonitor.on_train_batch_end

    def interrupt_after_step_3(self, batch, logs=None):
        end_of_step(self, batch, logs)
        if self.step == 3:
            raise KeyboardInterrupt  # as Ctrl-C raises it in the main thread

    monkeypatch.setattr(callbacks.RunMonitor, "on_train_batch_end", interrupt_after_step_3)
    assert pretrain.main(_args(tmp_path)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "interrupted at step 3 (the last checkpoint is " in err
    assert "ckpt_00000002" in err and err.rstrip().endswith(
        "rerun the same command to resume"), err

    monkeypatch.undo()
    assert pretrain.main(_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "step 6: held-out accuracy" in out
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 2; the interrupted step 3 was redone


def test_ctrl_c_before_training_says_so(tmp_path, capsys, monkeypatch):
    from keras_vitscale.training import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert pretrain.main(_args(tmp_path)) == 130
    err = capsys.readouterr().err
    assert "interrupted before training started; rerun the same command" in err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "synthetic"], "--workdir is required for datasets other than digits"),
    (["--branch-from", "runs/x"], "--workdir is required with --branch-from"),
    (["--lr", "nan", "--workdir", "{tmp}"], "--lr nan"),
    # downstream digits splits: overlapping, empty, outside 0-9
    (["--fewshot-dataset", "digits:3-7", "--workdir", "{tmp}"],
     "shares the classes [3, 4, 5] with --dataset 'digits:0-5'"),
    (["--fewshot-dataset", "digits:", "--workdir", "{tmp}"], "'' is not a digit"),
    (["--fewshot-dataset", "digits:6-10", "--workdir", "{tmp}"],
     "'6-10' is not within the digits 0-9"),
    (["--dataset", "digits:0-5,x", "--workdir", "{tmp}"], "'x' is not a digit"),
])
def test_bad_settings_exit_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path / "run")) for a in argv]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written on a refusal
