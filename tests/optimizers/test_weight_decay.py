"""Decoupled weight decay and the regex multipliers shared by optimizers."""

import contextlib
import warnings

import numpy as np
import pytest

import keras
from keras_vitscale import schedules
from keras_vitscale.optimizers import BF16Adam, ScalingAdafactor
from keras_vitscale.optimizers import weight_decay as wd_lib

VIT_PATHS = [
    "vit/encoder_block_0/attention/qkv/kernel",
    "vit/encoder_block_0/attention/qkv/bias",
    "vit/encoder_block_0/layer_norm_1/gamma",
    "vit/encoder_block_0/layer_norm_1/beta",
    "vit/map_head/probe",
    "vit/map_head/mlp/dense_1/kernel",
    "vit/pos_embedding/embedding",
    "vit/cls_token/token",
    "vit/head/kernel",
    "vit/head/bias",
]
PAPER = {r".*head/kernel": 100.0, r".*kernel": 1.0}


def make_variable(path, value):
    *scopes, name = path.split("/")
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(keras.name_scope(scope))
        return keras.Variable(value, name=name)


def test_default_decays_kernels_only():
    mults = wd_lib.resolve_multipliers(VIT_PATHS, wd_lib.DEFAULT_MULTIPLIERS)
    decayed = [p for p, m in zip(VIT_PATHS, mults) if m]
    assert decayed == [
        "vit/encoder_block_0/attention/qkv/kernel",
        "vit/map_head/mlp/dense_1/kernel",
        "vit/head/kernel",
    ]


def test_paper_recipe_first_match_wins():
    mults = dict(zip(VIT_PATHS, wd_lib.resolve_multipliers(VIT_PATHS, PAPER)))
    assert mults["vit/head/kernel"] == 100.0
    # The MAP head's own kernels are body weights, not the classifier.
    assert mults["vit/map_head/mlp/dense_1/kernel"] == 1.0
    assert mults["vit/encoder_block_0/attention/qkv/kernel"] == 1.0
    assert mults["vit/head/bias"] == 0.0
    assert mults["vit/map_head/probe"] == 0.0
    # Order matters: the catch-all first shadows the head pattern.
    swapped = {r".*kernel": 1.0, r".*head/kernel": 100.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shadowed is not "matches nothing"
        values = wd_lib.resolve_multipliers(VIT_PATHS, swapped)
    assert dict(zip(VIT_PATHS, values))["vit/head/kernel"] == 1.0


def test_unmatched_regex_warns_with_candidates():
    with pytest.warns(UserWarning, match="head/kernel") as record:
        wd_lib.resolve_multipliers(VIT_PATHS, {"head/kernel": 3.0})
    message = str(record[0].message)
    assert "'head/kernel'" in message and "vit/head/kernel" in message
    with pytest.warns(UserWarning, match="paths it may have meant"):
        wd_lib.resolve_multipliers(VIT_PATHS, {r"enocder.*": 1.0})


def test_optimizer_build_warns_on_unmatched_regex():
    variables = [make_variable("dense/kernel", np.ones((2, 2), "float32"))]
    opt = BF16Adam(0.1, weight_decay=0.1, weight_decay_multipliers={"kernel": 1.0})
    with pytest.warns(UserWarning, match="dense/kernel"):
        opt.build(variables)


@pytest.mark.parametrize("cls", [ScalingAdafactor, BF16Adam])
def test_decay_is_lr_times_wd_times_mult(cls):
    # With zero gradients both optimizers' directions are exactly 0, so each
    # step multiplies a parameter by (1 - lr(t) * wd * mult), following the
    # schedule (here a linear warmup then constant).
    schedule = schedules.create(
        "constant", base_lr=0.5, total_steps=10, warmup_steps=4
    )
    opt = cls(schedule, weight_decay=0.2, weight_decay_multipliers=PAPER)
    paths = ["vit/head/kernel", "vit/block/dense/kernel", "vit/head/bias"]
    variables = [make_variable(p, np.full((3, 2), 2.0, "float32")) for p in paths]
    zeros = [np.zeros((3, 2), "float32")] * 3
    for _ in range(6):
        opt.apply(zeros, variables)
    lrs = [0.5 * min(1.0, t / 4) for t in range(6)]
    for variable, mult in zip(variables, [100.0, 1.0, 0.0]):
        expected = 2.0 * np.prod([1 - lr * 0.2 * mult for lr in lrs])
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(variable), expected, rtol=1e-5
        )


def test_config_round_trip_keeps_multipliers():
    opt = ScalingAdafactor(1e-3, weight_decay=0.03, weight_decay_multipliers=PAPER)
    config = opt.get_config()
    assert config["weight_decay"] == 0.03
    assert config["weight_decay_multipliers"] == PAPER
    clone = ScalingAdafactor.from_config(config)
    assert clone.weight_decay_multipliers == PAPER
    # The Keras base hook stays off, so decay is never applied twice.
    assert clone.weight_decay is None


def test_big_vision_pairs_are_accepted():
    opt = BF16Adam(1e-3, weight_decay_multipliers=[(".*head/kernel", 100.0), (".*/kernel", 1.0)])
    assert list(opt.weight_decay_multipliers) == [".*head/kernel", ".*/kernel"]
