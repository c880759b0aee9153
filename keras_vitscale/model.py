"""kvs.ViT: a Vision Transformer assembled from a ViTConfig."""

import keras
from keras import ops

from keras_vitscale import intermediates
from keras_vitscale import layers as L
from keras_vitscale import presets, pretrained
from keras_vitscale.config import ViTConfig

# Keyword arguments that belong to keras.Model rather than to the config.
_MODEL_KWARGS = ("name", "dtype", "trainable")


def _patch_initializer(config):
    if config.block == "vanilla":
        from keras_vitscale.layers.embedding import vanilla_patch_initializer

        return vanilla_patch_initializer(config)
    return "lecun_normal"  # flax's Conv default, as big_vision


def _make_block(config, index, dtype):
    name = f"encoder_block_{index}"
    if config.block == "sequential":
        return L.SequentialBlock(config, name=name, dtype=dtype)
    if config.block == "parallel":
        return L.ParallelBlock(config, name=name, dtype=dtype)
    from keras_vitscale.layers.blocks import VanillaBlock

    return VanillaBlock(config, layer_index=index, name=name, dtype=dtype)


def _build_graph(config, dtype):
    """The functional graph: images (B, H, W, C) -> logits or features."""
    c = config
    images = keras.Input(shape=(*c.image_size, c.in_channels), name="images")
    x = L.PatchEmbedding(c.width, c.patch_size, kernel_initializer=_patch_initializer(c),
                         use_bias=c.patch_bias, name="patch_embedding", dtype=dtype)(images)

    def add_posemb(x):
        if c.posemb == "learn":
            return L.LearnedPositionEmbedding(name="position_embedding", dtype=dtype)(x)
        if c.posemb == "sincos2d":
            return L.SinCos2DPositionEmbedding(c.grid_size, name="position_embedding",
                                               dtype=dtype)(x)
        return x

    # big_vision (and DINOv2) add the position embedding before prepending
    # the prefix tokens; timm's default adds it after, so they have one too.
    # Registers go first, the class token in front of them: [class, registers,
    # patches], as timm.
    if not c.posemb_covers_class_token:
        x = add_posemb(x)
    if c.num_register_tokens:
        x = L.RegisterTokens(c.num_register_tokens, name="register_tokens", dtype=dtype)(x)
    if c.class_token:
        x = L.ClassToken(name="class_token", dtype=dtype)(x)
    if c.posemb_covers_class_token:
        x = add_posemb(x)
    x = L.seeded_dropout(c.dropout_rate, name="embedding_dropout", dtype=dtype)(x)
    if c.pre_norm:
        x = L.LayerNorm(epsilon=c.layer_norm_epsilon, center=c.norm_bias, name="pre_norm",
                        dtype=dtype)(x)

    for i in range(c.depth):
        x = _make_block(c, i, dtype)(x)

    def encoder_norm(x):
        if c.block == "vanilla":  # SimplEsT-ViT has no normalisation at all
            return x
        return L.LayerNorm(
            epsilon=c.layer_norm_epsilon, center=c.norm_bias, name="encoder_norm",
            dtype=dtype)(x)

    if c.norm_position == "before_pool":
        x = encoder_norm(x)
    if c.pooling == "tok":
        x = x[:, 0]
    elif c.pooling == "gap":
        x = ops.mean(x[:, c.num_prefix_tokens:], axis=1)  # patches only
    elif c.pooling == "map":
        x = L.MAPHead(c.width, c.num_heads, c.mlp_dim, c.layer_norm_epsilon, c.gelu,
                      name="map_head", dtype=dtype)(x)
    if c.norm_position == "after_pool":
        x = encoder_norm(x)
    if c.representation_size:
        x = L.TokenDense(c.representation_size, name="pre_logits", dtype=dtype)(x)
        x = ops.tanh(x)
    if c.num_classes:
        x = L.seeded_dropout(c.dropout_rate, name="head_dropout", dtype=dtype)(x)
        x = L.TokenDense(
            c.num_classes, name="head",
            kernel_initializer="zeros" if c.head_zero_init else "glorot_uniform",
            use_bias=c.head_bias,
            bias_initializer=keras.initializers.Constant(c.head_bias_init),
            dtype=dtype)(x)
        # Logits leave the model in float32 even under mixed precision, so
        # losses and metrics see full-precision values.
        x = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return images, x


def _input_images(x):
    """The images in predict's `x` where they can be seen without reading data:
    an array or tensor, or the spec of a tf.data.Dataset; else None."""
    spec = getattr(x, "element_spec", None)  # a tf.data.Dataset, without importing TF
    if spec is not None:
        while isinstance(spec, (tuple, list)) and spec:
            spec = spec[0]
        return spec
    return x


@keras.saving.register_keras_serializable(package="keras_vitscale")
class ViT(keras.Model):
    """A Vision Transformer: ViT-mu up to ViT-22B, one config for the shape.

    Build it from a variant ("B/16", "g/14", "22B/14"), from explicit sizes,
    or from a `ViTConfig`; every `ViTConfig` field is a keyword argument.

    Args:
        variant: a variant name such as "B/16" (see `config.VARIANTS`).
        config: a `ViTConfig`; exclusive with `variant` and field keywords
            other than overrides.
        name: model name.
        dtype: a dtype or dtype policy (e.g. "mixed_bfloat16"), applied to
            every layer.
        **fields: any `ViTConfig` field: num_classes, image_size, pooling,
            posemb, block, qk_norm, ...

    Example:
    ```python
    import keras_vitscale as kvs
    model = kvs.ViT(variant="Ti/16", num_classes=10, pooling="map",
                    posemb="sincos2d", image_size=64)
    logits = model(keras.random.uniform((2, 64, 64, 3), -1, 1))  # (2, 10)
    model = kvs.ViT.from_preset("vit_b16", num_classes=10)
    ```
    """

    presets = presets.REGISTRY

    def __init__(self, variant=None, config=None, name="vit", dtype=None, **fields):
        model_kwargs = {k: fields.pop(k) for k in _MODEL_KWARGS if k in fields}
        if config is not None:
            if variant is not None:
                raise ValueError("Pass either variant= or config=, not both.")
            config = config.replace(**fields) if fields else config
        elif variant is not None:
            config = ViTConfig.from_variant(variant, **fields)
        else:
            config = ViTConfig(**fields)
        self.config = config
        images, outputs = _build_graph(config, dtype)
        super().__init__(inputs=images, outputs=outputs, name=name, dtype=dtype,
                         **model_kwargs)

    def __call__(self, images, *args, **kwargs):
        self._check_images(images)
        return super().__call__(images, *args, **kwargs)

    # Keras's predict skips __call__ (JAX's even runs it on variables it
    # has taken out of the model, which a failure there never puts back), so
    # the images are checked before it starts.
    def predict(self, x, *args, **kwargs):
        self._check_images(_input_images(x))
        return super().predict(x, *args, **kwargs)

    def predict_on_batch(self, x):
        self._check_images(_input_images(x))
        return super().predict_on_batch(x)

    def _check_images(self, images):
        shape = getattr(images, "shape", None)
        if shape is None:
            return
        c = self.config
        expected = (*c.image_size, c.in_channels)
        if len(shape) != 4:
            raise ValueError(
                f"ViT expects images of shape (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) (channels last); got rank {len(shape)} shape "
                f"{tuple(shape)}. Add a batch axis with images[None] for one image.")
        got = tuple(shape[1:])
        if got != expected and None not in got:
            hint = ""
            if got[-1] != c.in_channels and got[0] == c.in_channels:
                hint = " Images look channels-first: transpose to (B, H, W, C)."
            elif got[:2] != c.image_size:
                hint = (f" Resize the images to {c.image_size}, or rebuild the model "
                        f"with image_size={got[:2]} (from_preset(..., image_size=...) "
                        "resamples the position embedding).")
            raise ValueError(
                f"ViT was built for images of shape {expected}; got {got}.{hint}")

    def forward_intermediates(self, images, indices=None, norm=False, output_fmt="NHWC",
                              stop_early=False, intermediates_only=False,
                              return_prefix_tokens=False, pre_logits=False):
        """Chosen blocks' token features, and the final output (timm's semantics).

        Features come in block order as (B, gh, gw, D) grids ("NHWC", timm's
        NCHW transposed) or (B, L, D) ("NLC"), without the class and register
        tokens. The sub-model behind this call shares the model's weights;
        `keras_vitscale.intermediates.intermediates_model` returns it for
        `predict` or for use inside another model.

        Args:
            images: (B, H, W, C) images at the model's resolution.
            indices: None (every block), an int n (the last n blocks) or a
                list of block indices (negative ones count from the end).
            norm: pass each feature through the final LayerNorm. timm's
                `fc_norm` models (`norm_position="after_pool"`) have no token
                norm, so it leaves theirs as they are; a "vanilla" model has
                no LayerNorm and refuses it.
            output_fmt: "NHWC" or "NLC".
            stop_early: run no block after the last taken one (with the final
                output requested, the head then reads that block's tokens).
            intermediates_only: return only the list of features.
            return_prefix_tokens: each feature becomes (patches, prefix tokens
                (B, P, D)) on a model with a class or register tokens.
            pre_logits: the final output is the features the head reads
                (timm's `forward_head(..., pre_logits=True)`) instead of the
                model's output (logits, a CLIP tower's projection, or pooled
                features without a head).

        Returns:
            `(final, [feature, ...])`, or `[feature, ...]` with
            `intermediates_only=True`.

        Example:
        ```python
        model = kvs.ViT(variant="Ti/16", num_classes=10, image_size=64)
        logits, grids = model.forward_intermediates(images, indices=[-4, -1])
        # logits (2, 10); grids: two (2, 4, 4, 192) arrays
        ```
        """
        self._check_images(images)
        return intermediates.forward_intermediates(
            self, images, indices=indices, norm=norm, output_fmt=output_fmt,
            stop_early=stop_early, intermediates_only=intermediates_only,
            return_prefix_tokens=return_prefix_tokens, pre_logits=pre_logits)

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name,
                "dtype": keras.dtype_policies.serialize(self.dtype_policy),
                "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        vit_config = ViTConfig.from_dict(config.pop("config"))
        dtype = config.pop("dtype", None)
        if isinstance(dtype, dict):
            dtype = keras.dtype_policies.deserialize(dtype)
        return cls(config=vit_config, dtype=dtype, **config)

    # ---- presets --------------------------------------------------------
    @classmethod
    def from_preset(cls, handle, num_classes=None, image_size=None, load_weights=True,
                    dtype=None, resample="linear", **overrides):
        """Builds a ViT from a built-in preset, a directory or a Hugging Face repo.

        A built-in preset with published weights loads its checkpoint: the
        first call downloads it (timm's layout on the Hub), converts it and
        caches the result (`KVS_CACHE`); later calls read the cache.

        Args:
            handle: "PRESET", "PRESET.TAG" or either with "@REVISION" (see
                `ViT.presets`; a bare name is the default tag), a local
                preset directory, or "hf://org/repo[@revision]" (a
                keras_vitscale preset or a timm checkpoint).
            num_classes: a new head size; a different one from the preset's
                gets a fresh (zero) head.
            image_size: a new resolution; the position embedding is
                resampled ("linear" as big_vision or "bicubic" as timm).
            load_weights: False builds the same architecture with fresh weights
                (presets without published weights always do, and say so).
            dtype: dtype or policy, e.g. "mixed_bfloat16".
            resample: "linear" or "bicubic" position-embedding resampling.
            **overrides: other `ViTConfig` fields (dropout_rate, remat, ...).
        """
        return presets.load(cls, handle, num_classes=num_classes, image_size=image_size,
                            load_weights=load_weights, dtype=dtype, resample=resample,
                            resolve=lambda h: pretrained.resolve_directory(h, model_class=cls),
                            **overrides)

    def save_to_preset(self, directory, max_shard_size_gb=None, metadata=None):
        """Writes config.json, model.weights.h5 (sharded when large), metadata.json.

        Args:
            directory: the preset directory (created if needed).
            max_shard_size_gb: shard the weights above this size; default: shard
                only models over 5 GB.
            metadata: extra metadata to record (e.g. training recipe).
        """
        presets.write_directory(self, directory, max_shard_size_gb=max_shard_size_gb,
                     metadata=metadata)

    def load_weights(self, filepath, skip_mismatch=False, resample="linear", **kwargs):
        """Loads weights; a position embedding for another grid is resampled."""
        presets.load_weights_into(self, filepath, resample=resample,
                                  skip_mismatch=skip_mismatch, **kwargs)
