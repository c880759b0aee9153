"""Distillation: the loss against numpy, a frozen teacher, bad teachers failing
before training, and kvs-distill (cli/distill.py) end to end on digits.

One small teacher is trained on digits (16x16) once per module. How a
distilled student compares with its teacher and with the same student
trained on labels is measured by benchmarks/distillation.py (too long for
a test).
"""

import json

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale import data
from keras_vitscale.cli import distill as distill_tool
from keras_vitscale.training import distill, losses
from keras_vitscale.training.distill import DistillationLoss, DistillationModel
from keras_vitscale.training.trainer import build_optimizer

SIZE = 16
TEACHER = dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=4, pooling="gap",
               posemb="sincos2d", image_size=SIZE, num_classes=10)
TEACHER_STEPS = 200
# The tool's flags for a small student on digits: half the teacher's
# width, one block (10.5k parameters to its 71k).
STUDENT_ARGS = ["--student", "mu/4", "--width", "32", "--depth", "1", "--mlp-dim", "64",
                "--num-heads", "2", "--pooling", "gap", "--posemb", "sincos2d",
                "--image-size", str(SIZE), "--fewshot", "none", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These models are tiny: torch's second intra-op thread only adds
    synchronisation (this file ran 3x slower with 2 threads on 2 cores)."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tool():
    return distill_tool


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """(workdir, held-out accuracy) of a teacher trained like tools/pretrain.py
    would (the same digits pipeline), saved as WORKDIR/model."""
    keras.utils.set_random_seed(0)
    workdir = tmp_path_factory.mktemp("teacher")
    source = data.load_source("digits", image_size=(SIZE, SIZE))
    model = kvs.ViT(variant="mu", **TEACHER)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=losses.get("softmax"),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    model.fit(data.train_dataset(source, 64, (SIZE, SIZE), seed=0), epochs=1,
              steps_per_epoch=TEACHER_STEPS, verbose=0)
    accuracy = model.evaluate(data.eval_dataset(source, 256, (SIZE, SIZE)), verbose=0,
                              return_dict=True)["accuracy"]
    model.save_to_preset(str(workdir / "model"))
    return workdir, accuracy


def _kl_numpy(teacher, student, temperature, kind):
    t, s = teacher / temperature, student / temperature
    if kind == "softmax":
        log_p = t - np.log(np.exp(t).sum(-1, keepdims=True))
        log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    else:
        p, q = 1 / (1 + np.exp(-t)), 1 / (1 + np.exp(-s))
        kl = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(-1)
    return temperature ** 2 * kl


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_loss_is_temperature_scaled_kl(kind, temperature, rng):
    teacher = rng.normal(0, 3, (6, 5)).astype("float32")
    student = rng.normal(0, 3, (6, 5)).astype("float32")
    weights = rng.uniform(0, 1, 6).astype("float32")
    expected = _kl_numpy(teacher.astype("float64"), student.astype("float64"), temperature, kind)
    loss = DistillationLoss(temperature, kind)
    np.testing.assert_allclose(float(loss(teacher, student)), expected.mean(), rtol=1e-5)
    # Keras' reduction: weighted sum over the batch size.
    np.testing.assert_allclose(float(loss(teacher, student, sample_weight=weights)),
                               (expected * weights).sum() / 6, rtol=1e-5)
    assert float(loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def _tiny_pair():
    """A 16x16 teacher and an 8x8 student with 3 classes and random heads.
    Every unit test uses these same shapes: on JAX each new shape costs
    compilations when a model is built."""
    def vit(name, size, width):
        return kvs.ViT(variant="mu/4", image_size=size, num_classes=3, width=width, depth=1,
                       mlp_dim=2 * width, num_heads=2, name=name, head_zero_init=False)
    return vit("teacher", 16, 16), vit("student", 8, 8)


def test_loss_mixes_kl_and_label_loss_with_a_resized_teacher_batch(rng):
    # The teacher was trained at 16x16, the student runs at 8x8: the teacher
    # sees the batch resized to its own size. `evaluate` runs the compiled
    # test step, which calls compute_loss (as fit's train step does).
    teacher, student = _tiny_pair()
    model = DistillationModel(student, teacher, temperature=2.0, label_weight=0.25)
    model.compile(optimizer="sgd", loss=losses.get("softmax"))
    x = rng.uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 1]]
    got = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)["loss"]
    resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(x, (16, 16), interpolation="bilinear"))
    t = teacher.predict(resized, verbose=0).astype("float64")
    s = model.predict(x, verbose=0).astype("float64")
    log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
    expected = 0.75 * _kl_numpy(t, s, 2.0, "softmax").mean() + 0.25 * -(y * log_q).sum(-1).mean()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_teacher_is_frozen_and_outside_the_optimizer(tmp_path, rng):
    teacher, student = _tiny_pair()
    teacher.save_to_preset(str(tmp_path / "model"))  # a pretraining workdir's layout
    config = {"teacher": str(tmp_path), "distill_temperature": 2.0,
              "distill_label_weight": 0.0, "loss": "softmax", "num_classes": 3,
              "dtype_policy": "float32", "dataset": "synthetic", "weight_decay": 1e-4,
              "head_weight_decay": None, "clipnorm": 1.0, "optimizer": "adam"}
    model = distill.wrap_for_training(student, config)
    optimizer = build_optimizer(config, 1e-2)
    model.compile(optimizer=optimizer, loss=losses.get("softmax"))
    optimizer.build(model.trainable_variables)
    assert [id(v) for v in model.trainable_variables] == [
        id(v) for v in student.trainable_variables]
    assert all(v.path.startswith("teacher/") and not v.trainable
               for v in model.teacher.weights)
    alone = build_optimizer(config, 1e-2)
    alone.build(student.trainable_variables)
    assert len(optimizer.variables) == len(alone.variables)
    before = [keras.ops.convert_to_numpy(v) for v in model.teacher.weights]
    student_before = [keras.ops.convert_to_numpy(v) for v in student.trainable_variables]
    x = rng.uniform(-1, 1, (16, 8, 8, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 16)]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for value, variable in zip(before, model.teacher.weights, strict=True):
        np.testing.assert_array_equal(value, keras.ops.convert_to_numpy(variable))
    changed = [not np.array_equal(a, keras.ops.convert_to_numpy(v))
               for a, v in zip(student_before, student.trainable_variables)]
    assert sum(changed) > len(changed) // 2


@pytest.mark.integration
def test_bad_teachers_fail_before_training(teacher_workdir, tmp_path, capsys):
    workdir, _ = teacher_workdir
    # 10-class teacher, 5-class data: the tool stops with status 2 and no
    # training happens (no checkpoint, no metrics).
    run = tmp_path / "run"
    status = _tool().main(["--teacher", str(workdir), "--dataset", "synthetic",
                           "--num-classes", "5", "--workdir", str(run), "--steps", "4",
                           "--log-every", "2", "--checkpoint-every", "2",
                           "--eval-every", "2", *STUDENT_ARGS])
    assert status == 2
    err = capsys.readouterr().err
    assert "predicts 10 classes but the data (synthetic) has 5" in err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="without published weights"):
        distill.teacher_config("vit_g14")
    # A preset with a checkpoint teaches with its tag's architecture (timm's GELU, its head).
    handle, config = distill.teacher_config("vit_b16.augreg_in21k")
    assert handle == "vit_b16.augreg_in21k" and config.num_classes == 21843
    assert config.gelu == "exact"
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="without a final model"):
        distill.teacher_config(str(tmp_path / "unfinished"))
    with pytest.raises(ValueError, match="Unknown preset"):
        distill.teacher_config(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--temperature 0.0 must be a positive number"):
        DistillationLoss(0.0)
    assert _tool().main(["--teacher", str(workdir), "--variant", "mu", "--student", "mu"]) == 2


@pytest.mark.integration
def test_tool_help_lists_the_distillation_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _tool().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--teacher", "--student", "--temperature", "--label-weight", "--steps",
                 "--mesh", "--workdir", "KL(teacher_T || student_T)", "Exit status"):
        assert flag in out, flag


@pytest.mark.integration
def test_distilled_student_on_digits(teacher_workdir, tmp_path, capsys):
    workdir, teacher_accuracy = teacher_workdir
    assert teacher_accuracy > 0.85  # a teacher worth distilling
    run = tmp_path / "student"
    status = _tool().main(["--teacher", str(workdir), "--workdir", str(run),
                           "--steps", "150", "--lr", "5e-3", "--log-every", "50",
                           "--eval-every", "150", "--checkpoint-every", "150",
                           "--temperature", "1", "--label-weight", "0", *STUDENT_ARGS])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "Distilling from --teacher" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 150
    # With label weight 0 the student never sees a label: all it knows of
    # the digits comes from the teacher (chance is 10%).
    assert rows[-1]["val_accuracy"] > 0.7, (rows[-1], teacher_accuracy)
    # Checkpoints and the final preset hold the student only.
    student = kvs.ViT.from_preset(str(run / "model"))
    assert student.config.width == 32 and student.config.num_classes == 10
    meta = json.loads((run / "checkpoints" / "ckpt_00000150" / "meta.json").read_text())
    assert not any(path.startswith("teacher/") for path in meta["paths"])
    assert meta["paths"][:len(student.weights)] == [v.path for v in student.weights]
    config = json.loads((run / "config.json").read_text())
    assert config["teacher"] == str(workdir) and config["distill_temperature"] == 1.0
