"""Schedules against their closed forms (warmup, rsqrt, cosine, linear,
cooldown), evaluated at many steps."""

import math

import numpy as np
import pytest

import keras
from keras_vitscale import schedules
from keras_vitscale.optimizers import BF16Adam


def formula(decay_type, base, T, W, C, t, timescale=10_000, shift=0, end=0.0, power=1.0):
    """Section 4 written out in plain Python, one step at a time."""
    p = min(max((t - W) / (T - W), 0.0), 1.0)
    if decay_type in ("linear", "polynomial"):
        lr = end + (base - end) * (1 - p) ** power
    elif decay_type == "cosine":
        lr = base * 0.5 * (1 + math.cos(math.pi * p))
    elif decay_type == "rsqrt":
        if t >= W:
            lr = base / math.sqrt(1 + (t + shift - W) / timescale)
        else:
            lr = base / math.sqrt(1 + shift / timescale)
    else:
        lr = base
    if W:
        lr *= min(1.0, t / W)
    if C:
        lr *= min(1.0, (T - t) / C)
    return lr


def values(schedule, steps):
    """The schedule at each step, called once per step as an optimizer does."""
    return np.array([float(keras.ops.convert_to_numpy(schedule(s))) for s in steps])


def vector_values(schedule, steps):
    """All steps in one call (the ops are elementwise), for speed."""
    return keras.ops.convert_to_numpy(schedule(np.asarray(steps, "int32")))


CASES = [
    ("rsqrt", {"timescale": 7, "shift": 3}),
    ("rsqrt", {}),
    ("cosine", {}),
    ("linear", {}),
    ("linear", {"end": 0.1}),
    ("polynomial", {"end": 0.01, "power": 2.0}),
    ("constant", {}),
]


@pytest.mark.parametrize("decay_type, kw", CASES)
@pytest.mark.parametrize("W, C", [(0, 0), (10, 0), (10, 25), (0, 25)])
def test_matches_formula(decay_type, kw, W, C):
    T, base = 100, 0.3
    schedule = schedules.create(decay_type, base, T, warmup_steps=W, cooldown_steps=C, **kw)
    # Every step, plus the edges named explicitly: start, end of warmup,
    # start of cooldown, last step, and beyond the end.
    steps = sorted(set(range(0, T + 1)) | {0, W, T - C, T - 1, T, T + 5})
    expected = [formula(decay_type, base, T, W, C, t, **kw) for t in steps]
    np.testing.assert_allclose(vector_values(schedule, steps), expected, rtol=2e-6, atol=1e-7)


def test_edges():
    s = schedules.create("cosine", 1.0, 100, warmup_steps=10, cooldown_steps=20)
    got = dict(zip([0, 5, 10, 80, 90, 99, 100], values(s, [0, 5, 10, 80, 90, 99, 100])))
    assert got[0] == 0.0  # warmup starts at zero: the first update has lr 0
    assert got[5] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0 / 90)), rel=1e-6)
    assert got[10] == pytest.approx(1.0)  # end of warmup: the base rate
    p80 = 70 / 90
    assert got[80] == pytest.approx(0.5 * (1 + math.cos(math.pi * p80)), rel=1e-6)
    assert got[90] == pytest.approx(0.5 * (1 + math.cos(math.pi * 80 / 90)) * 0.5, rel=1e-5)
    assert got[100] == 0.0  # cooldown ends at zero


def test_reference_worked_value():
    s = schedules.create("rsqrt", 1.0, 100, warmup_steps=5, timescale=1)
    assert values(s, [13])[0] == pytest.approx(1 / 3, rel=1e-6)


def test_serialisable_and_used_by_optimizer():
    s = schedules.create("rsqrt", 8e-4, 1000, warmup_steps=100, cooldown_steps=200, timescale=50)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    steps = [0, 50, 100, 500, 800, 999]
    np.testing.assert_allclose(values(clone, steps), values(s, steps), rtol=1e-7)
    config = BF16Adam(s).get_config()
    restored = BF16Adam.from_config(config)
    np.testing.assert_allclose(values(restored._learning_rate, steps), values(s, steps))


def test_to_steps():
    assert schedules.to_steps(7) == 7
    assert schedules.to_steps(epochs=2, examples_per_epoch=1000, batch_size=100) == 20
    assert schedules.to_steps(epochs=1.5, steps_per_epoch=10) == 15
    assert schedules.to_steps(examples=1_000_000, batch_size=4096) == 244
    assert schedules.to_steps(fraction=0.05, total_steps=1000) == 50
    assert schedules.to_steps(fraction=1e-6, total_steps=1000) == 1  # never 0
    assert schedules.to_steps(epochs=0, steps_per_epoch=10) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of steps, epochs, examples or fraction"),
        ({"steps": 3, "epochs": 1}, "exactly one"),
        ({"epochs": 1}, "epochs needs steps_per_epoch"),
        ({"examples": 100}, "examples needs batch_size"),
        ({"fraction": 0.1}, "fraction needs total_steps"),
        ({"fraction": 5, "total_steps": 10}, "fraction=5.0 .*fraction=0.05"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"epochs": -1, "steps_per_epoch": 3}, "epochs=-1 must be finite and >= 0"),
    ],
)
def test_to_steps_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.to_steps(**kwargs)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("rsqrt", 1e-3, 100), {"warmup_steps": 60, "cooldown_steps": 50}, r"warmup_steps \(60\) \+ cooldown_steps \(50\) exceed total_steps \(100\)"),
        (("exp", 1e-3, 100), {}, "Unknown decay_type 'exp'; use one of rsqrt"),
        (("cosine", 1e-3, 100), {"timescale": 5}, r"does not take \['timescale'\]"),
        (("rsqrt", 1e-3, 100), {"timescale": 0}, "timescale=0 must be finite and > 0"),
        (("rsqrt", -1e-3, 100), {}, "base_lr=-0.001"),
        (("rsqrt", math.nan, 100), {}, "base_lr=nan"),
        (("rsqrt", 1e-3, 0), {}, "total_steps=0"),
        (("rsqrt", 1e-3, 10.5), {}, "total_steps must be an integer"),
        (("rsqrt", 1e-3, 100), {"warmup_steps": -1}, "warmup_steps=-1"),
    ],
)
def test_create_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.create(*args, **kwargs)
