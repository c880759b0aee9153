"""LayerNorm with a hand-written backward pass on JAX.

Same weights and config as `keras.layers.LayerNormalization` (it is a
subclass) and the same forward result to float32 rounding (the variance is
taken of the centred input, where Keras uses E[x^2] - E[x]^2); what differs
is how the gradient is computed.

Why: differentiated as ordinary ops, a pre-LN encoder's residual-stream
gradient is a long chain of cheap elementwise adds (each block's LayerNorm
backward adds `g - mean(g) - x_hat * mean(g * x_hat)` terms to it). XLA-CPU's
fusion pass duplicates cheap producers into every consumer, so each block's
gradient fusion recomputed the whole chain from the top of the network:
fusions whose operand count and memory traffic grow with depth (O(depth^2))
in the training step on JAX. With a custom gradient the input gradient is
one expression over the saved x_hat and 1/sigma, which XLA materialises once
per block. On TensorFlow the same custom gradient made the Keras training
step slower, so there Keras' op is kept. Figures: benchmarks/RESULTS.md,
"JAX formulations A/B" (LayerNorm gradient).
"""

import keras
from keras import ops


def layer_norm(x, gamma, beta, epsilon):
    """(x - mean) / sqrt(var + epsilon) * gamma + beta over the last axis.

    Args:
        x: float tensor (at least float32 for stability).
        gamma, beta: (width,) scale and bias, in x's dtype.
        epsilon: added to the variance.

    Returns:
        The normalised tensor, with a hand-written gradient
        (`keras.ops.custom_gradient`, which JAX and TensorFlow support).
    """

    @ops.custom_gradient
    def normalise(x, gamma, beta):
        centred = x - ops.mean(x, axis=-1, keepdims=True)
        inv_std = ops.rsqrt(ops.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
        x_hat = centred * inv_std

        def backward(*args, upstream=None):
            grad = args[0] if upstream is None else upstream
            grad_x_hat = grad * gamma
            grad_x = inv_std * (
                grad_x_hat
                - ops.mean(grad_x_hat, axis=-1, keepdims=True)
                - x_hat * ops.mean(grad_x_hat * x_hat, axis=-1, keepdims=True))
            batch_axes = tuple(range(len(grad.shape) - 1))
            return grad_x, ops.sum(grad * x_hat, axis=batch_axes), ops.sum(grad, axis=batch_axes)

        return x_hat * gamma + beta, backward

    return normalise(x, gamma, beta)


@keras.saving.register_keras_serializable(package="keras_vitscale")
class LayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` with a hand-written gradient on JAX.

    On JAX it normalises over the last axis in at least float32 (like Keras)
    and returns the compute dtype. Other backends, other axes and
    `rms_scaling` use Keras' implementation unchanged.

    Args:
        epsilon: added to the variance.
        center: learn a bias (`beta`).
        scale: learn a scale (`gamma`).
        **kwargs: the other `keras.layers.LayerNormalization` arguments.

    Example:
        >>> norm = LayerNorm(epsilon=1e-6)
        >>> norm(keras.ops.ones((2, 5, 8))).shape
        (2, 5, 8)
    """

    def call(self, inputs):
        last_axis_only = list(self.axis) in ([-1], [len(inputs.shape) - 1])
        if keras.backend.backend() != "jax" or self.rms_scaling or not last_axis_only:
            return super().call(inputs)
        compute = keras.backend.result_type(inputs.dtype, "float32")
        width = inputs.shape[-1]
        gamma = ops.cast(self.gamma, compute) if self.scale else ops.ones((width,), compute)
        beta = ops.cast(self.beta, compute) if self.center else ops.zeros((width,), compute)
        outputs = layer_norm(ops.cast(inputs, compute), gamma, beta, self.epsilon)
        return ops.cast(outputs, self.compute_dtype)
