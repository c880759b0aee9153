"""The layers behind the checkpoint options: LayerScale, RegisterTokens, the
packed SwiGLU MLP and the bias-free patch embedding, each against numpy."""

import keras
import numpy as np
from keras import ops

from keras_vitscale.layers import LayerScale, PatchEmbedding, RegisterTokens, SwiGLUMLP


def test_layer_scale_starts_at_its_value_and_scales_channels(rng):
    scale = LayerScale(0.25, name="layer_scale_1")
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(scale(x)), 0.25 * x, rtol=1e-6)
    gamma = rng.normal(size=(8,)).astype("float32")
    scale.gamma.assign(gamma)
    np.testing.assert_allclose(ops.convert_to_numpy(scale(x)), x * gamma, rtol=1e-6)
    assert scale.gamma.path == "layer_scale_1/gamma"


def test_register_tokens_go_in_front(rng):
    registers = RegisterTokens(3, name="register_tokens")
    x = rng.normal(size=(2, 4, 8)).astype("float32")
    out = ops.convert_to_numpy(registers(x))
    assert out.shape == (2, 7, 8) and registers.tokens.path == "register_tokens/tokens"
    tokens = ops.convert_to_numpy(registers.tokens)
    np.testing.assert_array_equal(out[:, :3], np.repeat(tokens, 2, 0))
    np.testing.assert_array_equal(out[:, 3:], x)
    assert registers.compute_output_shape((None, 4, 8)) == (None, 7, 8)


def test_swiglu_is_silu_of_the_first_half_times_the_second(rng):
    mlp = SwiGLUMLP(hidden_dim=6)
    x = rng.normal(size=(2, 5, 4)).astype("float32")
    out = ops.convert_to_numpy(mlp(x))
    w1, b1 = (ops.convert_to_numpy(v).astype("float64") for v in (mlp.dense_1.kernel,
                                                                     mlp.dense_1.bias))
    w2, b2 = (ops.convert_to_numpy(v).astype("float64") for v in (mlp.dense_2.kernel,
                                                                     mlp.dense_2.bias))
    assert w1.shape == (4, 12) and w2.shape == (6, 4)
    h = x.astype("float64") @ w1 + b1
    gate, value = h[..., :6], h[..., 6:]
    want = (gate / (1 + np.exp(-gate)) * value) @ w2 + b2
    np.testing.assert_allclose(out, want, atol=1e-5)
    no_bias = SwiGLUMLP(hidden_dim=6, use_bias=False)
    no_bias.build((None, 5, 4))
    assert [v.path.split("/", 1)[1] for v in no_bias.weights] == ["dense_1/kernel",
                                                                   "dense_2/kernel"]


def test_patch_embedding_without_bias(rng):
    embed = PatchEmbedding(8, (2, 2), use_bias=False)
    images = rng.normal(size=(1, 4, 4, 3)).astype("float32")
    out = ops.convert_to_numpy(embed(images))
    assert [v.name for v in embed.weights] == ["kernel"]
    kernel = ops.convert_to_numpy(embed.kernel)
    # The top-left patch through the convolution's kernel, no bias added.
    np.testing.assert_allclose(out[0, 0], np.einsum("hwc,hwcd->d", images[0, :2, :2], kernel),
                               atol=1e-5)


def test_mixed_precision_layers_compute_in_bfloat16(rng):
    x = keras.ops.cast(rng.normal(size=(2, 4, 8)).astype("float32"), "bfloat16")
    for layer in (LayerScale(1e-5, dtype="mixed_bfloat16"),
                  RegisterTokens(2, dtype="mixed_bfloat16"),
                  SwiGLUMLP(16, dtype="mixed_bfloat16")):
        out = layer(x)
        assert keras.backend.standardize_dtype(out.dtype) == "bfloat16", layer
        assert all(v.dtype == "float32" for v in layer.weights)
