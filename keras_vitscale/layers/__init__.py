"""Building blocks of the ViT family; `kvs.ViT` assembles them from a config."""

from keras_vitscale.layers.attention import (
    MultiHeadSelfAttention,
    attention,
    attention_implementation,
    set_attention_implementation,
)
from keras_vitscale.layers.blocks import ParallelBlock, SequentialBlock, VanillaBlock
from keras_vitscale.layers.dense import FusedXavierUniform, TokenDense
from keras_vitscale.layers.dropout import seeded_dropout
from keras_vitscale.layers.embedding import (
    ClassToken,
    LearnedPositionEmbedding,
    PatchEmbedding,
    RegisterTokens,
    SinCos2DPositionEmbedding,
    resample_grid,
    sincos2d_table,
    vanilla_patch_initializer,
)
from keras_vitscale.layers.espa import ESPAAttention, espa_gammas, espa_target_attention
from keras_vitscale.layers.flexi import pi_resize_patch_kernel, resize_patch
from keras_vitscale.layers.layer_scale import LayerScale
from keras_vitscale.layers.mlp import MLP, SwiGLUMLP
from keras_vitscale.layers.normalization import LayerNorm
from keras_vitscale.layers.pooling import MAPHead
from keras_vitscale.layers.tat import ScaledUniformOrthogonal, TReLU, tat_slope
