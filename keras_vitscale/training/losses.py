"""Classification losses on (possibly smoothed or mixed) one-hot targets."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_vitscale")
class SigmoidCrossEntropy(keras.losses.Loss):
    """big_vision's `sigmoid_xent`: per-class binary cross-entropy on logits,
    summed over classes, averaged over the batch.

    Keras' `BinaryCrossentropy` averages over classes instead, which shrinks
    the loss (and its gradient) by the number of classes.

    Example:
    ```python
    loss = SigmoidCrossEntropy()
    loss(keras.ops.one_hot([1], 3), keras.ops.zeros((1, 3)))  # 3 * log(2)
    ```
    """

    def __init__(self, name="sigmoid_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, y_pred.dtype)
        # log(1 + exp(-|x|)) form: stable for large |logits|.
        per_class = (ops.relu(y_pred) - y_pred * y_true
                     + ops.log1p(ops.exp(-ops.abs(y_pred))))
        return ops.sum(per_class, axis=-1)


def get(name):
    """"softmax" or "sigmoid" -> a Keras loss on logits and one-hot targets."""
    if name == "softmax":
        return keras.losses.CategoricalCrossentropy(from_logits=True)
    if name == "sigmoid":
        return SigmoidCrossEntropy()
    raise ValueError(f"Unknown loss {name!r}; use softmax or sigmoid.")
