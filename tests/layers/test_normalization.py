"""LayerNorm: forward and gradients against PyTorch's layer_norm (the outside
reference), on every backend; on JAX, the compiled backward pass no longer
grows with depth."""

import re

import keras
import numpy as np
import pytest
import torch

import keras_vitscale as kvs
from conftest import compiled_gradient_hlo
from keras_vitscale.layers.normalization import LayerNorm

EPSILON = 1e-6


def _keras_value_and_grads(layer, x, upstream):
    """Output, d(sum(out * upstream))/dx and /d(trainable weights), as numpy."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]

        def objective(trainable, x):
            out, _ = layer.stateless_call(trainable, [], x)
            return (out * upstream).sum(), out

        (_, out), (grad_weights, grad_x) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(trainable, x)
        grads = [grad_x, *grad_weights]
    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
            objective = tf.reduce_sum(out * upstream)
        grads = tape.gradient(objective, [x, *layer.trainable_variables])
    else:
        x = torch.tensor(x, requires_grad=True)
        out = layer(x)
        (out * torch.tensor(upstream)).sum().backward()
        grads = [x.grad, *(v.value.grad for v in layer.trainable_variables)]
    return keras.ops.convert_to_numpy(out), [keras.ops.convert_to_numpy(g) for g in grads]


def _torch_value_and_grads(x, gamma, beta, upstream):
    x = torch.tensor(x, requires_grad=True)
    weights = [torch.tensor(w, requires_grad=True) if w is not None else None
               for w in (gamma, beta)]
    out = torch.nn.functional.layer_norm(x, x.shape[-1:], *weights, eps=EPSILON)
    (out * torch.tensor(upstream)).sum().backward()
    grads = [x.grad] + [w.grad for w in weights if w is not None]
    return out.detach().numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_matches_torch_layer_norm_forward_and_gradients(center, scale):
    rng = np.random.default_rng(0)
    # A non-zero mean and spread, so centring and scaling both matter.
    x = (rng.normal(size=(2, 7, 16)) * 3 + 5).astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    layer = LayerNorm(epsilon=EPSILON, center=center, scale=scale)
    layer.build(x.shape)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    gamma = keras.ops.convert_to_numpy(layer.gamma) if scale else None
    beta = keras.ops.convert_to_numpy(layer.beta) if center else None

    out, grads = _keras_value_and_grads(layer, x, upstream)
    ref_out, ref_grads = _torch_value_and_grads(x, gamma, beta, upstream)

    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-5)
    assert len(grads) == len(ref_grads) == 1 + center + scale
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4)


def test_is_a_keras_layer_normalization_with_the_same_weights_and_config():
    layer = LayerNorm(epsilon=1e-5, center=False, name="norm")
    layer.build((None, 8))
    assert isinstance(layer, keras.layers.LayerNormalization)
    assert [w.path for w in layer.weights] == ["norm/gamma"]
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is LayerNorm and again.epsilon == 1e-5 and not again.center


def test_mixed_precision_returns_the_compute_dtype():
    layer = LayerNorm(epsilon=EPSILON, dtype="mixed_bfloat16")
    x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype("float32")
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    ref = torch.nn.functional.layer_norm(torch.tensor(x), (8,), eps=EPSILON).numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")),
                               ref, atol=0.05)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="inspects XLA's compiled HLO")
def test_backward_fusions_do_not_grow_with_depth():
    # Differentiated as plain ops, XLA-CPU fused each block's residual
    # gradient with every later block's (82 operands at depth 4, 156 at
    # depth 8): O(depth^2) work. The hand-written gradient keeps it flat.
    def widest_loop_fusion(depth):
        hlo = compiled_gradient_hlo(kvs.ViT(width=32, depth=depth, mlp_dim=64, num_heads=2,
                                            patch_size=8, image_size=32, num_classes=10))
        fusions = re.findall(r"= \S+ fusion\((.*?)\), kind=kLoop", hlo)
        assert fusions, "no loop fusion found: the check would pass vacuously"
        return max(operands.count("%") for operands in fusions)

    shallow, deep = widest_loop_fusion(4), widest_loop_fusion(8)
    assert deep <= shallow + 4, (shallow, deep)
