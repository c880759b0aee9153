"""LayerScale (Touvron et al. 2021, CaiT): a learned per-channel scale on each
residual branch, as DINOv2 and timm's `init_values` use it."""

import keras
from keras import ops


class LayerScale(keras.layers.Layer):
    """y = x * gamma, gamma of shape (width,) initialised to `init_value`.

    A small init value (1e-5 for DINOv2) starts every block near the
    identity, which is what lets very deep ViTs train.

    Args:
        init_value: the constant every entry of gamma starts at.

    Example:
    ```python
    scale = LayerScale(1e-5, name="layer_scale_1")
    scale(keras.ops.ones((2, 17, 32))).shape  # (2, 17, 32), all 1e-5
    ```
    """

    def __init__(self, init_value, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma", shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value))

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}
