"""Clear errors for bad optimizer arguments."""

import math

import pytest

from keras_vitscale.optimizers import BF16Adam, ScalingAdafactor


@pytest.mark.parametrize("cls", [ScalingAdafactor, BF16Adam])
def test_integer_learning_rate(cls):
    with pytest.raises(ValueError, match=r"learning_rate=1 is an integer.*1\.0"):
        cls(1)


@pytest.mark.parametrize("cls", [ScalingAdafactor, BF16Adam])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -0.1}, "learning_rate=-0.1 is out of range"),
        ({"learning_rate": math.nan}, "learning_rate must be finite"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0 is out of range"),
        ({"weight_decay": math.inf}, "weight_decay must be finite"),
        ({"weight_decay_multipliers": {".*kernel": -2.0}}, "multipliers.*-2.0"),
        ({"weight_decay_multipliers": {".*kernel": math.nan}}, "must be finite"),
        ({"weight_decay_multipliers": {"(kernel": 1.0}}, "not a valid regular"),
        ({"weight_decay_multipliers": {3: 1.0}}, "not a string"),
    ],
)
def test_shared_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor=0 must be an integer >= 1"),
        ({"min_dim_size_to_factor": 2.5}, "min_dim_size_to_factor=2.5"),
        ({"decay_rate": -0.8}, "decay_rate=-0.8"),
        ({"beta2_cap": 1.5}, "beta2_cap=1.5"),
        ({"epsilon": math.inf}, "epsilon must be finite"),
        ({"momentum": 1.0}, "momentum=1.0 is out of range"),
        ({"momentum": 0.999}, "rounds to 1.0 in bfloat16"),
        ({"clipping_threshold": 0.0}, "clipping_threshold=0"),
        ({"clipping_threshold": -1.0}, "clipping_threshold=-1.0"),
    ],
)
def test_adafactor_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScalingAdafactor(**kwargs)


def test_momentum_can_be_disabled_or_float32():
    assert not ScalingAdafactor(momentum=None).state_specs((64, 64))[-1][0] == "momentum"
    assert ScalingAdafactor(momentum=0.999, momentum_dtype="float32").momentum == 0.999


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta_1": 1.0}, "beta_1=1.0 is out of range"),
        ({"beta_2": -0.5}, "beta_2=-0.5"),
        ({"epsilon": -1e-8}, "epsilon=-1e-08"),
    ],
)
def test_adam_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BF16Adam(**kwargs)
