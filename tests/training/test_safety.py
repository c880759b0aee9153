"""Run safety: NaN stop naming the step, incompatible workdirs, corrupt
checkpoints, bad inputs failing before training, recipe resolution."""

import json
import math
import re

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale.training import (CheckpointError, CheckpointManager,
                                     IncompatibleWorkdirError,
                                     resolve, train)
from keras_vitscale.training import settings as settings_lib
from keras_vitscale.training.trainer import build_optimizer, build_schedule

TINY = dict(variant="mu", patch_size=4, image_size=16, batch_size=8, steps=4,
            log_every=2, checkpoint_every=2, eval_every=4, fewshot="none")


def _tool():
    from keras_vitscale.cli import pretrain

    return pretrain


@pytest.mark.integration
def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--variant", "mu", "--patch-size", "4",
            "--image-size", "16", "--batch-size", "8", "--steps", "20", "--lr", "1e30",
            "--schedule", "constant", "--warmup-steps", "0", "--clipnorm", "0",
            "--log-every", "1", "--checkpoint-every", "1", "--eval-every", "20",
            "--fewshot", "none", "--no-progress"]
    assert _tool().main(args) == 3  # non-zero exit
    err = capsys.readouterr().err
    step = int(re.search(r"Non-finite (?:loss|parameters) at step (\d+) ", err).group(1))
    assert step >= 2
    kept = CheckpointManager(tmp_path).steps()
    assert kept and max(kept) < step
    assert f"ckpt_{max(kept):08d}" in err
    # the kept checkpoint is finite and restorable
    with np.load(tmp_path / "checkpoints" / f"ckpt_{max(kept):08d}" / "state.npz") as f:
        assert all(np.isfinite(f[k]).all() for k in f.files if f[k].dtype.kind == "f")


@pytest.mark.integration
def test_incompatible_workdir_is_refused_and_same_config_resumes(tmp_path):
    first = train({"workdir": str(tmp_path), **TINY}, progress=False, log=lambda m: None)
    assert first["step"] == 4
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(IncompatibleWorkdirError, match=r"lr: workdir has 0.002, this run has 0.1"):
        train({"workdir": str(tmp_path), **TINY, "lr": 0.1}, progress=False)
    assert (tmp_path / "config.json").read_text() == before  # never overwritten
    messages = []
    again = train({"workdir": str(tmp_path), **TINY, "checkpoint_every": 4},
                  progress=False, log=messages.append)
    assert again["resumed_from"] == 4 and any("Resuming" in m for m in messages)


def _tiny_state():
    model = kvs.ViT(variant="mu/4", image_size=16, num_classes=3)
    optimizer = kvs.optimizers.BF16Adam(1e-3)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def test_corrupt_newest_checkpoint_is_reported_and_skipped(tmp_path):
    model, optimizer = _tiny_state()
    manager = CheckpointManager(tmp_path, keep=2, log=reports.append if (reports := []) == [] else None)
    for step in (1, 2, 3):
        model.get_layer("head").bias.assign(np.full(3, float(step)))
        manager.save(step, model, optimizer, {"data_position": step * 8})
    assert manager.steps() == [2, 3]  # keep=2 prunes the oldest
    (tmp_path / "checkpoints" / ".tmp_ckpt_00000004_1").mkdir()  # a crash leftover
    state = tmp_path / "checkpoints" / "ckpt_00000003" / "state.npz"
    state.write_bytes(state.read_bytes()[:100])  # truncated newest
    meta = manager.restore_latest(model, optimizer)
    assert meta["step"] == 2 and meta["data_position"] == 16
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.get_layer("head").bias), 2.0)
    assert len(reports) == 1 and "ckpt_00000003 is corrupt" in reports[0]
    (tmp_path / "checkpoints" / "ckpt_00000002" / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="Every checkpoint in the workdir is corrupt"):
        manager.restore_latest(model, optimizer)


def test_checkpoint_refuses_non_finite_parameters(tmp_path):
    model, optimizer = _tiny_state()
    model.get_layer("head").bias.assign(np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="head/bias is non-finite at step 5"):
        CheckpointManager(tmp_path).save(5, model, optimizer)
    assert CheckpointManager(tmp_path).steps() == []


@pytest.mark.integration
@pytest.mark.parametrize("change, match", [
    ({"dataset": "mnist"}, "Unknown dataset 'mnist'"),
    ({"recipe": "bert"}, "Unknown recipe 'bert'"),
    ({"preset": "vit_zz99", "variant": None}, "Unknown preset 'vit_zz99'"),
    ({"mesh": "data:64"}, r"data:64"),
    ({"mesh": "pipeline:2"}, "Bad --mesh"),
    ({"augment": "jitter:1"}, "Unknown augmentation 'jitter'"),
    ({"checkpoint_every": 3}, "not a multiple of --log-every 2"),
    ({"optimizer": "lamb"}, "Unknown optimizer 'lamb'"),
    ({"lr": float("nan")}, "--lr nan must be a finite number"),
    ({"weight_decay": -1.0}, "--weight-decay -1.0 must be a finite number and >= 0"),
    ({"warmup_steps": 50}, "warmup"),
    ({"fewshot": "0"}, "--fewshot"),
    ({"fewshot": "1,x"}, "--fewshot"),
    ({"steps": 5}, "--steps 5 is not a multiple of --log-every 2"),
    ({"dataset": "digits:0-11"}, r"'0-11' is not within the digits 0-9"),
    ({"fewshot": "1", "fewshot_dataset": "digits:"}, r"--fewshot-dataset: .*'' is not a digit"),
    ({"fewshot": "1", "fewshot_dataset": "digits:6-10"},
     r"--fewshot-dataset: .*not within the digits 0-9"),
    ({"fewshot": "1", "fewshot_dataset": "digits:5-9"},
     r"--fewshot-dataset 'digits:5-9' shares the classes \[5\] with --dataset 'digits:0-5'"),
])
def test_bad_inputs_fail_before_training(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train({"workdir": str(tmp_path / "run"), **TINY, **change}, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written on a refusal


@pytest.mark.integration
def test_refused_settings_leave_nothing_so_the_corrected_rerun_starts(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--variant", "mu", "--patch-size", "4",
            "--image-size", "16", "--batch-size", "8", "--steps", "20", "--log-every", "10",
            "--fewshot", "none", "--no-progress"]
    assert _tool().main([*args, "--lr", "nan"]) == 2
    assert _tool().main([*args, "--warmup-steps", "50"]) == 2
    assert list(tmp_path.iterdir()) == []
    assert "--lr nan" in capsys.readouterr().err
    assert _tool().main([*args, "--steps", "10"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.002


@pytest.mark.integration
def test_config_json_records_the_model_that_was_built(tmp_path):
    settings = {**TINY, "variant": "mu", "steps": 2, "eval_every": 2}
    train({"workdir": str(tmp_path), **settings}, progress=False, log=lambda m: None)
    config = json.loads((tmp_path / "config.json").read_text())
    model = config["model"]
    for key in settings_lib.MODEL_KEYS:
        built = model[key][0] if key == "patch_size" else model[key]
        assert config[key] == built, key
    assert (config["width"], config["pooling"], config["posemb"]) == (
        model["width"], "tok", "learn")  # the variant's own, not the digits default's
    assert {"width", "depth", "pooling", "posemb"} <= set(settings_lib.MODEL_KEYS)
    assert "gap pooling" in settings_lib.VARIANT_HELP  # the help says what is replaced
    help_text = _tool().build_parser().format_help()
    assert "sincos2d embedding" in " ".join(help_text.split())


def test_mesh_mismatch_message_names_devices_or_backend(tmp_path):
    with pytest.raises(ValueError) as info:
        train({"workdir": str(tmp_path), **TINY, "mesh": "data:64"}, progress=False)
    backend = keras.backend.backend()
    if backend == "jax":
        assert "has 64 devices but JAX sees" in str(info.value)
    elif backend == "tensorflow":  # MirroredStrategy
        assert "asks for 64 replicas but TensorFlow sees 1 CPU" in str(info.value)
    else:
        assert "needs the JAX backend" in str(info.value)


def test_default_run_transfers_from_digits_0_5_to_6_9():
    config, _ = resolve({"workdir": "w"})
    assert (config["dataset"], config["fewshot_dataset"], config["fewshot"]) == (
        "digits:0-5", "digits:6-9", "1,5,10")
    # a digits split's default downstream is the other digits; otherwise the run's own
    assert resolve({"dataset": "digits:0,2,4"})[0]["fewshot_dataset"] == "digits:1,3,5-9"
    assert resolve({"dataset": "digits"})[0]["fewshot_dataset"] == "digits"
    assert resolve({"dataset": "digits:0-9"})[0]["fewshot_dataset"] == "digits:0-9"
    assert resolve({"dataset": "synthetic"})[0]["fewshot_dataset"] == "synthetic"
    # overlapping the upstream split, even exactly, is refused: that is the
    # pretraining task again, not transfer
    with pytest.raises(ValueError, match=r"shares the classes \[0, 1, 2, 3, 4, 5\]"):
        resolve({"fewshot_dataset": "digits:0-5"})
    for bad in ("digits:", "digits:7-12", "digits:3-7", "digits:x", "digits"):
        with pytest.raises(ValueError, match="--fewshot-dataset"):
            resolve({"fewshot_dataset": bad})


def test_recipes_resolve_and_flags_override():
    config, _ = resolve({"recipe": "scaling_vit", "steps": 1000, "workdir": "w"})
    assert (config["optimizer"], config["schedule"], config["pooling"], config["loss"]) == \
        ("adafactor", "rsqrt", "map", "sigmoid")
    assert (config["warmup_steps"], config["cooldown_steps"], config["clipnorm"]) == (10, 50, 1.0)
    assert (config["weight_decay"], config["head_weight_decay"]) == (0.03, 3.0)
    config, _ = resolve({"recipe": "scaling_vit", "lr": 0.5, "warmup_steps": 7})
    assert config["lr"] == 0.5 and config["warmup_steps"] == 7
    simplevit, _ = resolve({"recipe": "simplevit"})
    assert simplevit["augment"] == "randaugment:10,mixup:0.2"
    tat, _ = resolve({"recipe": "tat"})
    assert (tat["label_smoothing"], tat["block"]) == (0.1, "vanilla") and tat["dropout"] > 0
    assert settings_lib.head_bias_init("sigmoid", 10) == pytest.approx(-math.log(10))
    assert settings_lib.head_bias_init("sigmoid", 18_000) == -10.0
    assert settings_lib.head_bias_init("softmax", 10) == 0.0


def test_scaling_vit_optimizer_decays_head_100x_body_kernels_only():
    config, _ = resolve({"recipe": "scaling_vit", "steps": 100})
    optimizer = build_optimizer(config, build_schedule(config))
    assert isinstance(optimizer, kvs.optimizers.ScalingAdafactor)
    assert optimizer.global_clipnorm == 1.0
    assert optimizer.get_config()["weight_decay"] == pytest.approx(0.03)
    mults = dict(optimizer.weight_decay_multipliers)
    assert mults[r"head/kernel"] == pytest.approx(100.0) and mults[r".*kernel"] == 1.0
    assert json.dumps(config)  # plain data
