"""FusedXavierUniform: seeded at construction, like Keras' own initializers."""

import math

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale.layers.dense import FusedXavierUniform

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=16,
            num_classes=4)


def values(init, shape=(32, 96)):
    return keras.ops.convert_to_numpy(init(shape, dtype="float32"))


def test_one_instance_repeats_and_instances_differ():
    init = FusedXavierUniform(parts=3)
    np.testing.assert_array_equal(values(init), values(init))
    assert not np.array_equal(values(init), values(FusedXavierUniform(parts=3)))
    assert np.abs(values(init)).max() <= math.sqrt(6 / (32 + 32))


def test_global_seed_fixes_the_draw():
    keras.utils.set_random_seed(5)
    a = values(FusedXavierUniform(parts=3))
    keras.utils.set_random_seed(5)
    np.testing.assert_array_equal(a, values(FusedXavierUniform(parts=3)))


def test_config_round_trips():
    for init in (FusedXavierUniform(parts=3), FusedXavierUniform(parts=2, seed=7)):
        again = FusedXavierUniform.from_config(init.get_config())
        assert again.get_config() == init.get_config()
    np.testing.assert_array_equal(values(FusedXavierUniform(seed=7)),
                                  values(FusedXavierUniform.from_config({"seed": 7})))
    with pytest.raises(ValueError, match="int or None"):
        FusedXavierUniform(seed="7")


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="draws inside a JAX trace")
def test_draws_inside_a_jax_trace():
    # An unseeded draw would advance Keras' global seed state, which JAX
    # refuses inside a trace (the planner builds models in one).
    import jax

    init = FusedXavierUniform(parts=3)
    traced = jax.jit(lambda: init((32, 96), dtype="float32"))()
    np.testing.assert_array_equal(np.asarray(traced), values(init))


@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_blocks_differ_and_seed_repeats(block):
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(11)
        model = kvs.ViT(**TINY, block=block)
        weights.append({v.path: keras.ops.convert_to_numpy(v) for v in model.weights})
    name = "attention/qkv/kernel" if block == "sequential" else "qkv_mlp_in/kernel"
    first, second = (weights[0][f"encoder_block_{i}/{name}"] for i in (0, 1))
    assert not np.array_equal(first, second)
    for path, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][path])
