"""The optimizers inside Keras: fit, .keras files, base-class options."""

import numpy as np
import pytest

import keras
from keras_vitscale import schedules
from keras_vitscale.optimizers import BF16Adam, ScalingAdafactor

OPTIMIZERS = {
    "adafactor": lambda **kw: ScalingAdafactor(min_dim_size_to_factor=8, **kw),
    "bf16_adam": lambda **kw: BF16Adam(**kw),
}


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype("float32")
    w = rng.normal(size=(16, 4)).astype("float32")
    return x, np.argmax(x @ w, axis=-1)


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(4),
        ]
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fit_learns_and_round_trips_through_keras_file(name, tmp_path):
    x, y = _data()
    model = _model()
    schedule = schedules.create("cosine", base_lr=0.01, total_steps=40, warmup_steps=4)
    model.compile(
        optimizer=OPTIMIZERS[name](
            learning_rate=schedule, weight_decay=1e-3, global_clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=16, epochs=10, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    saved = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    restored = [keras.ops.convert_to_numpy(v) for v in loaded.optimizer.variables]
    assert len(saved) == len(restored)
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a.astype("float32"), b.astype("float32"))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fit_under_mixed_bfloat16(name):
    x, y = _data()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _model()
        model.compile(
            optimizer=OPTIMIZERS[name](learning_rate=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert model.layers[0].kernel.dtype == "float32"


def _apply(optimizer, grads_sequence, shape=(12, 10)):
    variable = keras.Variable(np.linspace(-1, 1, 120, dtype="float32").reshape(shape))
    for grads in grads_sequence:
        optimizer.apply([keras.ops.convert_to_tensor(grads)], [variable])
    return keras.ops.convert_to_numpy(variable)


def _grads(n, scale=1.0):
    rng = np.random.default_rng(1)
    return [scale * rng.normal(size=(12, 10)).astype("float32") for _ in range(n)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_global_clipnorm(name):
    grads = _grads(3, scale=10.0)
    clipped = _apply(OPTIMIZERS[name](learning_rate=0.1, global_clipnorm=1.0), grads)
    manual = [g / np.linalg.norm(g) for g in grads]
    expected = _apply(OPTIMIZERS[name](learning_rate=0.1), manual)
    np.testing.assert_allclose(clipped, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gradient_accumulation(name):
    grads = _grads(4)
    optimizer = OPTIMIZERS[name](learning_rate=0.1, gradient_accumulation_steps=2)
    accumulated = _apply(optimizer, grads)
    averaged = [(grads[0] + grads[1]) / 2, (grads[2] + grads[3]) / 2]
    expected = _apply(OPTIMIZERS[name](learning_rate=0.1), averaged)
    np.testing.assert_allclose(accumulated, expected, rtol=1e-5, atol=1e-6)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_loss_scale_factor(name):
    grads = _grads(3)
    scaled = _apply(
        OPTIMIZERS[name](learning_rate=0.1, loss_scale_factor=128.0),
        [128.0 * g for g in grads],
    )
    np.testing.assert_allclose(
        scaled, _apply(OPTIMIZERS[name](learning_rate=0.1), grads), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_ema_of_weights(name):
    optimizer = OPTIMIZERS[name](learning_rate=0.1, use_ema=True, ema_momentum=0.5)
    variable = keras.Variable(np.ones((12, 10), "float32"))
    history = []
    for grads in _grads(3):
        optimizer.apply([keras.ops.convert_to_tensor(grads)], [variable])
        history.append(keras.ops.convert_to_numpy(variable))
    # Keras' EMA: first step copies, then average = 0.5 average + 0.5 value.
    expected = 0.5 * (0.5 * history[0] + 0.5 * history[1]) + 0.5 * history[2]
    (average,) = optimizer._model_variables_moving_average
    np.testing.assert_allclose(keras.ops.convert_to_numpy(average), expected, rtol=1e-6)
    optimizer.finalize_variable_values([variable])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), expected, rtol=1e-6)
