"""Encoder blocks: sequential pre-LN (ViT), parallel (ViT-22B) and vanilla
(SimplEsT-ViT: no LayerNorm, no skips; its E-SPA attention is in
`layers/espa.py`, its TAT activation and MLP in `layers/tat.py`).
"""

import keras
from keras import ops

from keras_vitscale.config import ViTConfig
from keras_vitscale.layers.attention import MultiHeadSelfAttention, attend
from keras_vitscale.layers.dense import FusedXavierUniform, TokenDense, project
from keras_vitscale.layers.dropout import seeded_dropout
from keras_vitscale.layers.espa import ESPAAttention
from keras_vitscale.layers.layer_scale import LayerScale
from keras_vitscale.layers.mlp import MLP, SwiGLUMLP, gelu, mlp_bias_initializer
from keras_vitscale.layers.normalization import LayerNorm
from keras_vitscale.layers.tat import TATMLP, tat_slope


class RematBlock(keras.layers.Layer):
    """Base of the encoder blocks: `forward` runs under `keras.remat` when
    `config.remat` is set, so its activations are recomputed in the backward
    pass instead of stored.

    Why not `keras.RematScope`: it passes `training` through the checkpointed
    function, where JAX turns the Python bool into a tracer that Dropout
    cannot branch on; a closure keeps it a Python value.
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def call(self, x, training=None):
        if self.config.remat:
            return keras.remat(lambda y: self.forward(y, training))(x)
        return self.forward(x, training)


def layer_norm(config, name, dtype, center=None):
    return LayerNorm(
        epsilon=config.layer_norm_epsilon,
        center=config.norm_bias if center is None else center, name=name, dtype=dtype)


class SequentialBlock(RematBlock):
    """x + Attn(LN(x)), then x + MLP(LN(x)).

    With `config.layer_scale`, each branch is scaled per channel first:
    x + ls1 * Attn(LN(x)), then x + ls2 * MLP(LN(x)) (CaiT, DINOv2). The MLP
    is GELU's or the packed SwiGLU per `config.mlp_type`.

    Args:
        config: the model's `ViTConfig`.
    """

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        c, dtype = config, self.dtype_policy
        self.norm_1 = layer_norm(c, "norm_1", dtype)
        self.attention = MultiHeadSelfAttention(
            c.width, c.num_heads, qkv_bias=c.qkv_bias, out_bias=c.attn_out_bias,
            qk_norm=c.qk_norm, norm_bias=c.norm_bias,
            layer_norm_epsilon=c.layer_norm_epsilon, dropout_rate=c.dropout_rate,
            name="attention", dtype=dtype)
        self.norm_2 = layer_norm(c, "norm_2", dtype)
        if c.mlp_type == "swiglu":
            self.mlp = SwiGLUMLP(c.mlp_dim, use_bias=c.mlp_bias, dropout_rate=c.dropout_rate,
                                 name="mlp", dtype=dtype)
        else:
            self.mlp = MLP(c.mlp_dim, use_bias=c.mlp_bias, gelu_flavour=c.gelu,
                           dropout_rate=c.dropout_rate, name="mlp", dtype=dtype)
        self.layer_scale_1 = self.layer_scale_2 = None
        if c.layer_scale is not None:
            self.layer_scale_1 = LayerScale(c.layer_scale, name="layer_scale_1", dtype=dtype)
            self.layer_scale_2 = LayerScale(c.layer_scale, name="layer_scale_2", dtype=dtype)

    def build(self, input_shape):
        for layer in (self.norm_1, self.attention, self.layer_scale_1, self.norm_2, self.mlp,
                      self.layer_scale_2):
            if layer is not None:
                layer.build(input_shape)

    def forward(self, x, training=None):
        y = self.attention(self.norm_1(x), training=training)
        x = x + (y if self.layer_scale_1 is None else self.layer_scale_1(y))
        y = self.mlp(self.norm_2(x), training=training)
        return x + (y if self.layer_scale_2 is None else self.layer_scale_2(y))


class FusedInProjection(keras.layers.Layer):
    """One (D, 3D + M) matmul giving q, k, v and the MLP hidden units.

    Separate bias vectors for the QKV and MLP parts, so ViT-22B can drop the
    QKV bias and keep the MLP one.

    Args:
        config: the model's `ViTConfig`.
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def build(self, input_shape):
        c = self.config
        d, m = c.width, c.mlp_dim
        # Xavier with the fan of one (D, D) projection, as if unfused.
        self.kernel = self.add_weight(name="kernel", shape=(d, 3 * d + m),
                                      initializer=FusedXavierUniform(parts=3 + m / d))
        self.qkv_bias = self.mlp_bias = None
        if c.qkv_bias:
            self.qkv_bias = self.add_weight(name="qkv_bias", shape=(3 * d,),
                                            initializer="zeros")
        if c.mlp_bias:
            self.mlp_bias = self.add_weight(name="mlp_bias", shape=(m,),
                                            initializer=mlp_bias_initializer())

    def call(self, x):
        d = self.config.width
        h = project(x, self.kernel)
        qkv, hidden = h[..., : 3 * d], h[..., 3 * d:]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        if self.mlp_bias is not None:
            hidden = hidden + self.mlp_bias
        return qkv, hidden


class ParallelBlock(RematBlock):
    """ViT-22B: y = x + Attn(LN(x)) + MLP(LN(x)) with fused projections.

    One (D, 3D + M) matmul produces q, k, v and the MLP hidden units; one
    (D + M, D) matmul maps the attention output and the activated hidden
    units back, which sums the two branches for free.

    Args:
        config: the model's `ViTConfig`.
    """

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        c = config
        self.norm = layer_norm(c, "norm", self.dtype_policy)
        self.query_norm = self.key_norm = None
        if c.qk_norm:
            self.query_norm = layer_norm(c, "query_norm", self.dtype_policy)
            self.key_norm = layer_norm(c, "key_norm", self.dtype_policy)
        self.qkv_mlp_in = FusedInProjection(c, name="qkv_mlp_in", dtype=self.dtype_policy)
        self.attn_mlp_out = TokenDense(
            c.width, use_bias=c.attn_out_bias or c.mlp_bias, name="attn_mlp_out",
            dtype=self.dtype_policy)
        self.dropout = seeded_dropout(c.dropout_rate, dtype=self.dtype_policy)

    def build(self, input_shape):
        c = self.config
        self.norm.build(input_shape)
        if self.query_norm is not None:
            head_shape = tuple(input_shape[:-1]) + (c.num_heads, c.head_dim)
            self.query_norm.build(head_shape)
            self.key_norm.build(head_shape)
        self.qkv_mlp_in.build(input_shape)
        self.attn_mlp_out.build(tuple(input_shape[:-1]) + (c.width + c.mlp_dim,))

    def forward(self, x, training=None):
        c = self.config
        qkv, hidden = self.qkv_mlp_in(self.norm(x))
        q, k, v = ops.split(qkv, 3, axis=-1)
        attended = attend(q, k, v, c.num_heads, self.query_norm, self.key_norm)
        hidden = self.dropout(gelu(hidden, c.gelu), training=training)
        out = self.attn_mlp_out(ops.concatenate([attended, hidden], axis=-1))
        return x + self.dropout(out, training=training)


class VanillaBlock(keras.layers.Layer):
    """SimplEsT-ViT block (Cepka 2023): [E-SPA attention, no output
    projection], then [Linear, TReLU, Linear, TReLU]; no norm, no skip.

    Signal propagation at initialisation is kept healthy by E-SPA's attention
    (`layers/espa.py`) and TAT's activations (`layers/tat.py`) instead of
    normalisation and residuals.

    The TReLU slope is `tat_slope(config.depth)`: the network's C-map is the
    leaky-ReLU map composed once per TReLU, 2 * depth times (two per block),
    as in the SimplEsT-ViT repository. Patch embedding, attention and linear
    layers are (near-)linear and do not count; the SimplEsT-ViT "effective
    depth" of 3 * depth + 2 counts layers, not nonlinearities.

    Args:
        config: the model's `ViTConfig` (block "vanilla").
        layer_index: 0-based index of this block.

    Example:
    ```python
    cfg = ViTConfig.from_variant("S/4", image_size=32, block="vanilla",
                                 posemb="sincos2d", pooling="gap")
    block = VanillaBlock(cfg, layer_index=0, name="encoder_block_0")
    block(keras.ops.ones((2, 64, 384))).shape  # (2, 64, 384)
    ```
    """

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.layer_index = layer_index
        self.attention = ESPAAttention(config.num_heads, layer_index, config.depth,
                                       qkv_bias=config.qkv_bias, name="attention",
                                       dtype=self.dtype_policy)
        self.mlp = TATMLP(config.mlp_dim, tat_slope(config.depth), use_bias=config.mlp_bias,
                          name="mlp", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.attention.build(input_shape)
        self.mlp.build(input_shape)

    def call(self, x):
        return self.mlp(self.attention(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(),
                "layer_index": self.layer_index}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["config"] = ViTConfig.from_dict(config["config"])
        return cls(**config)
