"""timm's VisionTransformer state-dict layout: its names, shapes and our config.

What a timm checkpoint's keys and shapes say, with no timm or torch needed:
`config_from_state_dict` infers a `ViTConfig` from the shapes alone (timm's
defaults for what shapes cannot tell), `timm_key` / `timm_source` name the
timm tensor(s) behind each of our variables, and `convert_state_dict` checks
a whole state dict against a config and converts it.

The copy is driven by `ViTConfig.parameter_shapes()`: every variable of the
built model is filled from its timm tensor(s) and every timm tensor is used.
A tensor left over means the source has a feature our config cannot
express, so it is an error rather than something to drop quietly.

Blocks are timm's pre-norm `Block` (our block="sequential") or its
`ParallelScalingBlock` (ViT-22B style, our block="parallel"). The latter's
fused `in_proj` is laid out [mlp | q | k | v], ours [q | k | v | mlp]; its
MLP bias is either part of `in_proj.bias` (qkv_bias=True) or the separate
`mlp_bias`; its output projection is one `out_proj` over [attn | mlp] or
`attn_out_proj` + `mlp_out_proj` (fuse_out_proj=False), whose kernels stack
into our fused one and whose biases add up.

This module imports neither the model nor torch: a caller that only reads a
checkpoint's shapes (the pretrained-weights loader) uses it before anything
is downloaded.

Example:
```python
config = config_from_state_dict(shapes_or_state_dict, num_heads=6)
timm_key("encoder_block_0/attention/qkv/kernel", config)   # 'blocks.0.attn.qkv.weight'
```
"""

import logging
import re

import numpy as np

from keras_vitscale.config import VARIANTS, ViTConfig
from keras_vitscale.convert.common import Source, gather_weights, shapes_of
from keras_vitscale.convert.shape_inference import infer_grid

logger = logging.getLogger("keras_vitscale")

# Our layer path (a regex on `variable.path` minus the parameter) -> timm's
# module path. "encoder_norm" is timm's `norm` or `fc_norm`, see `timm_key`.
LAYER_NAMES = (
    (r"patch_embedding", "patch_embed.proj"),
    (r"pre_norm", "norm_pre"),
    (r"encoder_block_(\d+)/norm_(\d)", r"blocks.\1.norm\2"),
    (r"encoder_block_(\d+)/attention/qkv", r"blocks.\1.attn.qkv"),
    (r"encoder_block_(\d+)/attention/out", r"blocks.\1.attn.proj"),
    (r"encoder_block_(\d+)/attention/query_norm", r"blocks.\1.attn.q_norm"),
    (r"encoder_block_(\d+)/attention/key_norm", r"blocks.\1.attn.k_norm"),
    (r"encoder_block_(\d+)/mlp/dense_(\d)", r"blocks.\1.mlp.fc\2"),
    # ParallelScalingBlock; its fused projections are in `timm_source`.
    (r"encoder_block_(\d+)/norm", r"blocks.\1.in_norm"),
    (r"encoder_block_(\d+)/query_norm", r"blocks.\1.q_norm"),
    (r"encoder_block_(\d+)/key_norm", r"blocks.\1.k_norm"),
    (r"map_head/query", "attn_pool.q"),
    (r"map_head/key_value", "attn_pool.kv"),
    (r"map_head/out", "attn_pool.proj"),
    (r"map_head/norm", "attn_pool.norm"),
    (r"map_head/mlp/dense_(\d)", r"attn_pool.mlp.fc\1"),
    (r"head", "head"),
)
PARAM_NAMES = {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias"}
WHOLE_NAMES = {"class_token/token": "cls_token",
               "register_tokens/tokens": "reg_token",
               "position_embedding/embedding": "pos_embed",
               "map_head/probe": "attn_pool.latent"}

# timm state-dict keys of features ViTConfig cannot express -> the option.
UNSUPPORTED_KEYS = (
    (r"blocks\.\d+\.ls\.gamma", "LayerScale in a ParallelScalingBlock (blocks.N.ls; "
                               "ViTConfig has it for sequential blocks only)"),
    (r"dist_token", "a distillation token (DeiT distilled models)"),
    (r"patch_embed\.norm\..+", "a norm in the patch embedding (timm embed_norm_layer)"),
    (r"blocks\.\d+\.attn\.norm\..+", "a norm before the attention projection "
                                     "(timm scale_attn_norm=True)"),
    (r"blocks\.\d+\.mlp\.norm\..+", "a norm inside the MLP (timm scale_mlp_norm=True)"),
    (r"blocks\.\d+\.mlp\.fc1_[gx]\..+", "an unpacked SwiGLU MLP (timm SwiGLU, fc1_g/fc1_x; "
                                       "ViTConfig has the packed one, SwiGLUPacked)"),
    (r"blocks\.\d+\.attn\.gate\..+", "gated attention (timm Attention gated=True)"),
    (r"attn_pool\.pos_embed", "a position embedding in the attention pool "
                              "(AttentionPoolLatent pos_embed='abs')"),
    (r"attn_pool\.[qk]_norm\..+", "qk-norm in the attention pool "
                                  "(AttentionPoolLatent qk_norm=True)"),
    (r"head\..+\..+", "a classifier head other than one nn.Linear"),
)

# The LayerScale init value a state dict is read with: it records the
# trained scales, not their init, and loading overwrites the init anyway.
STATE_DICT_LAYER_SCALE = 1e-5


def unsupported_message(problems):
    listed = "\n  - ".join(problems)
    return (f"The timm model uses option(s) that ViTConfig cannot express:\n  - {listed}\n"
            "Convert a plain timm VisionTransformer (pre-norm Block or "
            "ParallelScalingBlock, LayerNorm, GELU, token/avg/map/'' pooling) or extend "
            "ViTConfig first.")


# ---- settings from a state dict ------------------------------------------------
def config_from_state_dict(state_dict, **overrides):
    """Infers a `ViTConfig` from the key names and shapes of a timm state dict.

    Shapes tell the sizes, biases (patch embedding, head, blocks), qk-norm,
    the pre-encoder norm (`norm_pre`), register tokens (`reg_token`),
    LayerScale (`ls1.gamma`; its init value is set to 1e-5, which loading
    overwrites), the packed SwiGLU MLP (fc1 twice fc2's input), pooling and
    whether the position embedding covers the prefix tokens. They cannot
    tell the GELU flavour or LayerNorm epsilon (timm's defaults, exact and
    1e-6, unless overridden) nor, without qk-norm or a `VARIANTS` shape, the
    head count.

    Args:
        state_dict: `{timm name: tensor or array}`, a lazy reader with
            `.shapes`, or `{timm name: shape}`; no tensor data is read.
        **overrides: `ViTConfig` fields that win over the inference;
            `num_heads` and `image_size` also guide it.

    Raises:
        ValueError: for keys of unsupported features, or when `num_heads` or
            the image size cannot be inferred (the message says what to pass).
    """
    shapes = shapes_of(state_dict)
    if "patch_embed.proj.weight" not in shapes:
        raise ValueError(
            "This is not a timm VisionTransformer state dict: it has no "
            f"'patch_embed.proj.weight' (first keys: {sorted(shapes)[:5]}). Strip any "
            "prefix such as 'module.' or 'model.' from the keys first.")
    problems = sorted({option for key in shapes for pattern, option in UNSUPPORTED_KEYS
                       if re.fullmatch(pattern, key)})
    has_cls, has_map = "cls_token" in shapes, "attn_pool.latent" in shapes
    registers = shapes["reg_token"][1] if "reg_token" in shapes else 0
    if has_map and shapes["attn_pool.latent"][1] != 1:
        problems.append(f"an attention pool with latent_len={shapes['attn_pool.latent'][1]}")
    if has_map and (has_cls or registers):
        problems.append("global_pool='map' with a class or register token (timm's pool "
                        "skips the prefix tokens; the MAP head attends over every token)")
    if "norm.weight" not in shapes and "fc_norm.weight" not in shapes:
        problems.append("final_norm=False (no norm.weight nor fc_norm.weight)")
    if problems:
        raise ValueError(unsupported_message(problems))

    width, in_channels, ph, pw = shapes["patch_embed.proj.weight"]
    depth = 1 + max((int(k.split(".")[1]) for k in shapes if re.match(r"blocks\.\d+\.", k)),
                    default=-1)
    if depth == 0:
        raise ValueError("The state dict has no 'blocks.N.*' keys; nothing to convert.")
    fields = dict(_block_fields(shapes, width), width=width, depth=depth, patch_size=(ph, pw),
                  in_channels=in_channels, class_token=has_cls, num_register_tokens=registers,
                  pre_norm="norm_pre.weight" in shapes,
                  patch_bias="patch_embed.proj.bias" in shapes,
                  num_classes=shapes["head.weight"][0] if "head.weight" in shapes else 0,
                  # Without a head there is no bias to have; the default stays.
                  head_bias="head.bias" in shapes or "head.weight" not in shapes,
                  # timm's avg pooling is the one that moves the final norm to fc_norm.
                  pooling="map" if has_map else "tok" if has_cls
                  and "fc_norm.weight" not in shapes else "gap",
                  norm_position="after_pool" if "fc_norm.weight" in shapes else "before_pool",
                  # A state dict does not record these; timm's defaults.
                  gelu="exact", layer_norm_epsilon=1e-6)
    fields["num_heads"] = overrides.get("num_heads") or _infer_heads(
        shapes, width, depth, fields["mlp_dim"])
    image_size = overrides.get("image_size")
    if "pos_embed" in shapes:
        fields["posemb"] = "learn"
        fields["image_size"], fields["posemb_covers_class_token"] = infer_grid(
            shapes["pos_embed"][1], int(has_cls) + registers, (ph, pw), image_size,
            key="pos_embed")
    else:
        if image_size is None:
            raise ValueError("The state dict has no pos_embed, so it does not record the "
                             "image size; pass image_size=(height, width).")
        fields["posemb"] = "none"
    fields.update(overrides)
    return ViTConfig(**fields)


def _block_fields(shapes, width):
    """The block settings of blocks.0 (kind, MLP, biases, qk-norm, LayerScale)."""
    b = "blocks.0."
    if b + "in_proj.weight" in shapes:  # ParallelScalingBlock
        return dict(
            block="parallel", mlp_dim=shapes[b + "in_proj.weight"][0] - 3 * width,
            qk_norm=b + "q_norm.weight" in shapes, qkv_bias=b + "in_proj.bias" in shapes,
            attn_out_bias=b + "out_proj.bias" in shapes or b + "attn_out_proj.bias" in shapes,
            mlp_bias=True, norm_bias=b + "in_norm.bias" in shapes)
    fc1, fc2 = shapes.get(b + "mlp.fc1.weight"), shapes.get(b + "mlp.fc2.weight")
    if fc1 is None or fc2 is None:
        raise ValueError(f"blocks.0 has no mlp.fc1.weight and mlp.fc2.weight (keys: "
                         f"{sorted(k for k in shapes if k.startswith(b))[:8]}); not a timm "
                         "Block or ParallelScalingBlock.")
    # A packed SwiGLU's fc1 holds the gate and the value: twice fc2's input.
    swiglu = fc1[0] == 2 * fc2[1]
    return dict(
        block="sequential", mlp_type="swiglu" if swiglu else "gelu", mlp_dim=fc2[1],
        qk_norm=b + "attn.q_norm.weight" in shapes, qkv_bias=b + "attn.qkv.bias" in shapes,
        attn_out_bias=b + "attn.proj.bias" in shapes, mlp_bias=b + "mlp.fc1.bias" in shapes,
        norm_bias=b + "norm1.bias" in shapes,
        layer_scale=STATE_DICT_LAYER_SCALE if b + "ls1.gamma" in shapes else None)


def _infer_heads(shapes, width, depth, mlp_dim):
    for key in ("blocks.0.attn.q_norm.weight", "blocks.0.q_norm.weight"):
        if key in shapes:  # qk-norm is per head: (head_dim,)
            return width // shapes[key][0]
    for name, (w, d, m, heads) in VARIANTS.items():
        if (w, d, m) == (width, depth, mlp_dim):
            logger.info("from_timm: num_heads=%d from variant %s's shape", heads, name)
            return heads
    divisors = [h for h in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if width % h == 0]
    raise ValueError(
        f"Cannot infer num_heads from a state dict of width {width}, depth {depth}, "
        f"mlp_dim {mlp_dim}: no qk-norm weights and no VARIANTS entry of that shape. "
        f"Pass num_heads= (width {width} allows e.g. {divisors}), or convert the timm "
        "module instead of its state dict.")


# ---- weights ---------------------------------------------------------------
def timm_key(path, config):
    """The timm state-dict key that holds our variable `path`.

    Example:
    ```python
    timm_key("encoder_block_3/layer_scale_2/gamma", config)   # 'blocks.3.ls2.gamma'
    ```
    """
    if path in WHOLE_NAMES:
        return WHOLE_NAMES[path]
    if re.fullmatch(r"encoder_block_\d+/layer_scale_\d/gamma", path):
        layer, _ = path.rsplit("/", 1)  # timm's LayerScale names its vector gamma too
        return re.sub(r"encoder_block_(\d+)/layer_scale_(\d)", r"blocks.\1.ls\2", layer) + ".gamma"
    layer, param = path.rsplit("/", 1)
    if layer == "encoder_norm":
        module = "fc_norm" if config.norm_position == "after_pool" else "norm"
    else:
        for pattern, replacement in LAYER_NAMES:
            match = re.fullmatch(pattern, layer)
            if match:
                module = match.expand(replacement)
                break
        else:
            raise ValueError(f"No timm equivalent for variable {path!r} (config block "
                             f"{config.block!r}, representation_size "
                             f"{config.representation_size}); timm's ViT has none.")
    return f"{module}.{PARAM_NAMES[param]}"


def to_keras_layout(path, array):
    """A timm tensor (as numpy) in the layout of our variable `path`."""
    if path == "patch_embedding/kernel":
        return array.transpose(2, 3, 1, 0)  # conv (D, C, ph, pw) -> (ph, pw, C, D)
    if path.endswith("/kernel"):
        return array.T  # torch Linear stores (out, in)
    return array


def timm_source(path, shape, config, state_dict):
    """The `Source` (timm keys, their shapes, combine) of our variable `path`.

    Most variables are one timm tensor, transposed; the parallel block's
    fused projections gather and reorder several (see the module docstring).
    """
    match = re.fullmatch(r"encoder_block_(\d+)/(qkv_mlp_in|attn_mlp_out)/(\w+)", path)
    if config.block == "parallel" and match:
        return _parallel_source(f"blocks.{match.group(1)}", match.group(2), match.group(3),
                                config, state_dict)
    key = timm_key(path, config)
    if path == "patch_embedding/kernel":
        want = (shape[3], shape[2], shape[0], shape[1])
    else:
        want = shape[::-1] if path.endswith("/kernel") else shape
    return Source((key,), (want,), lambda array: to_keras_layout(path, array))


def _parallel_source(block, layer, param, config, state_dict):
    d, m = config.width, config.mlp_dim
    if layer == "qkv_mlp_in":
        if param == "kernel":  # timm (M + 3D, D) rows [mlp | q | k | v] -> (D, 3D + M)
            return Source((f"{block}.in_proj.weight",), ((m + 3 * d, d),),
                          lambda w: np.concatenate([w[m:], w[:m]]).T)
        if param == "qkv_bias":
            return Source((f"{block}.in_proj.bias",), ((m + 3 * d,),), lambda b: b[m:])
        if config.qkv_bias:  # timm keeps the MLP bias inside in_proj.bias
            return Source((f"{block}.in_proj.bias",), ((m + 3 * d,),), lambda b: b[:m])
        return Source((f"{block}.mlp_bias",), ((m,),), lambda b: b)
    # attn_mlp_out: one out_proj over [attn | mlp], or timm's fuse_out_proj=False
    # pair, whose kernels stack along the input axis and whose biases add.
    fused = f"{block}.attn_out_proj.weight" not in state_dict
    names = ("out_proj",) if fused else ("attn_out_proj", "mlp_out_proj")
    if param == "kernel":
        shapes = ((d, d + m),) if fused else ((d, d), (d, m))
        return Source(tuple(f"{block}.{n}.weight" for n in names), shapes,
                      lambda *ws: np.concatenate(ws, axis=1).T)
    if not config.attn_out_bias:  # timm proj_bias=False; ours exists for the MLP bias
        return Source((), (), lambda: np.zeros((d,), "float32"))
    return Source(tuple(f"{block}.{n}.bias" for n in names), ((d,),) * len(names),
                  lambda *bs: np.sum(bs, axis=0))


def timm_recipe(config, state_dict):
    """`recipe(path, shape)` -> `Source` for `common.gather_weights` / `stream_weights`.

    Args:
        config: the target `ViTConfig`.
        state_dict: the timm state dict, a lazy reader, or `{name: shape}`
            (only key membership is read).

    Example:
    ```python
    for path, array in stream_weights(config, reader, timm_recipe(config, reader),
                                      source_name="timm"):
        variables[path].assign(array)
    ```
    """
    return lambda path, shape: timm_source(path, shape, config, state_dict)


def check_state_dict(state_dict, config, drop_head=False):
    """Checks that a timm state dict maps one-to-one onto `config`'s variables.

    Reads shapes only (a `{name: shape}` dict is enough): every variable has
    its timm tensor(s) of the right shape and no tensor is left over.

    Args:
        state_dict: `{timm name: shape}`, a lazy reader or a state dict.
        config: the target `ViTConfig`.
        drop_head: the source head is not used (a fresh or no head).

    Returns:
        `{variable path: shape}` of the variables the tensors fill.

    Raises:
        ValueError: as `convert_state_dict`, naming each tensor that does not fit.

    Example:
    ```python
    check_state_dict({k: t.shape for k, t in header.items()}, config)
    ```
    """
    return dict(convert_state_dict(state_dict, config, drop_head).shapes)


def convert_state_dict(state_dict, config, drop_head=False):
    """{variable path: float32 array} for every variable `config` builds, read lazily.

    Checked from the shapes first; the returned `common.ConvertedWeights`
    reads and converts one tensor per lookup.

    Args:
        state_dict: a timm VisionTransformer state dict.
        config: the target `ViTConfig`.
        drop_head: the source head is not copied (a head of another size, or
            none); the model keeps its initial head.

    Raises:
        ValueError: listing unused timm keys, missing ones and shape
            mismatches (each names the timm key, its shape and the shape
            our variable needs it to have).
    """
    return gather_weights(
        config, state_dict, timm_recipe(config, state_dict),
        source_name="timm", skip=("head/",) if drop_head else (),
        # With num_classes=0 the config has no head for these keys to fill.
        ignored={k: "the source's head, replaced" for k in ("head.weight", "head.bias")}
        if drop_head else None,
        hint="Check the overrides (num_heads, image_size, pooling, qk_norm) or convert the "
             "timm module, whose settings are read directly.")
