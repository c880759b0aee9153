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
from keras_vitscale.convert.common import Source, gather_weights, infer_grid, shapes_of

logger = logging.getLogger("keras_vitscale")

logger = logging.getLogger("keras_vitscale")

# Our layer path (a regex on `variable.path` minus the parameter) -> timm's
# module path. "encoder_norm" is timm's `norm` or `fc_norm`, see `timm_key`.
LAYER_NAMES = (
    (r"patch_embedding", "patch_embed.proj"),
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
               "position_embedding/embedding": "pos_embed",
               "map_head/probe": "attn_pool.latent"}

# timm state-dict keys of features ViTConfig cannot express -> the option.
UNSUPPORTED_KEYS = (
    (r"blocks\.\d+\.ls[12]?\.gamma", "LayerScale (timm init_values=..., blocks.N.ls1/ls2/ls)"),
    (r"reg_token", "register tokens (timm reg_tokens=N)"),
    (r"dist_token", "a distillation token (DeiT distilled models)"),
    (r"norm_pre\..+", "a LayerNorm before the encoder (timm pre_norm=True, norm_pre, as "
                      "in OpenCLIP towers)"),
    (r"patch_embed\.norm\..+", "a norm in the patch embedding (timm embed_norm_layer)"),
    (r"blocks\.\d+\.attn\.norm\..+", "a norm before the attention projection "
                                     "(timm scale_attn_norm=True)"),
    (r"blocks\.\d+\.mlp\.norm\..+", "a norm inside the MLP (timm scale_mlp_norm=True)"),
    (r"blocks\.\d+\.attn\.gate\..+", "gated attention (timm Attention gated=True)"),
    (r"attn_pool\.pos_embed", "a position embedding in the attention pool "
                              "(AttentionPoolLatent pos_embed='abs')"),
    (r"attn_pool\.[qk]_norm\..+", "qk-norm in the attention pool "
                                  "(AttentionPoolLatent qk_norm=True)"),
    (r"head\..+\..+", "a classifier head other than one nn.Linear"),
)


def unsupported_message(problems):
    listed = "\n  - ".join(problems)
    return (f"The timm model uses option(s) that ViTConfig cannot express:\n  - {listed}\n"
            "Convert a plain timm VisionTransformer (pre-norm Block or "
            "ParallelScalingBlock, LayerNorm, GELU, token/avg/map/'' pooling) or extend "
            "ViTConfig first.")


# ---- settings from a state dict ------------------------------------------------
def config_from_state_dict(state_dict, **overrides):
    """Infers a `ViTConfig` from the key names and shapes of a timm state dict.

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
    problems = sorted({option for key in shapes for pattern, option in UNSUPPORTED_KEYS
                       if re.fullmatch(pattern, key)})
    if "attn_pool.latent" in shapes and shapes["attn_pool.latent"][1] != 1:
        problems.append(f"an attention pool with latent_len={shapes['attn_pool.latent'][1]}")
    if "attn_pool.latent" in shapes and "cls_token" in shapes:
        problems.append("class_token=True with global_pool='map' (timm's pool skips "
                        "the class token; the MAP head attends over every token)")
    if "norm.weight" not in shapes and "fc_norm.weight" not in shapes:
        problems.append("final_norm=False (no norm.weight nor fc_norm.weight)")
    if "patch_embed.proj.weight" not in shapes:
        raise ValueError(
            "This is not a timm VisionTransformer state dict: it has no "
            f"'patch_embed.proj.weight' (first keys: {sorted(shapes)[:5]}). Strip any "
            "prefix such as 'module.' or 'model.' from the keys first.")
    if problems:
        raise ValueError(unsupported_message(problems))

    width, in_channels, ph, pw = shapes["patch_embed.proj.weight"]
    depth = 1 + max((int(k.split(".")[1]) for k in shapes if re.match(r"blocks\.\d+\.", k)),
                    default=-1)
    if depth == 0:
        raise ValueError("The state dict has no 'blocks.N.*' keys; nothing to convert.")
    has_cls, has_map = "cls_token" in shapes, "attn_pool.latent" in shapes
    if "blocks.0.in_proj.weight" in shapes:  # ParallelScalingBlock
        b = "blocks.0."
        blocks = dict(
            block="parallel", mlp_dim=shapes[b + "in_proj.weight"][0] - 3 * width,
            qk_norm=b + "q_norm.weight" in shapes, qkv_bias=b + "in_proj.bias" in shapes,
            attn_out_bias=b + "out_proj.bias" in shapes or b + "attn_out_proj.bias" in shapes,
            mlp_bias=True, norm_bias=b + "in_norm.bias" in shapes)
    else:
        b = "blocks.0.attn."
        blocks = dict(
            block="sequential", mlp_dim=shapes["blocks.0.mlp.fc1.weight"][0],
            qk_norm=b + "q_norm.weight" in shapes, qkv_bias=b + "qkv.bias" in shapes,
            attn_out_bias=b + "proj.bias" in shapes,
            mlp_bias="blocks.0.mlp.fc1.bias" in shapes,
            norm_bias="blocks.0.norm1.bias" in shapes)
    mlp_dim = blocks["mlp_dim"]
    fields = dict(
        **blocks, width=width, depth=depth, patch_size=(ph, pw),
        in_channels=in_channels, class_token=has_cls,
        num_classes=shapes["head.weight"][0] if "head.weight" in shapes else 0,
        # timm's avg pooling is the one that moves the final norm to fc_norm.
        pooling="map" if has_map else "tok" if has_cls and "fc_norm.weight" not in shapes
        else "gap",
        norm_position="after_pool" if "fc_norm.weight" in shapes else "before_pool",
        # A state dict does not record these; timm's defaults.
        gelu="exact", layer_norm_epsilon=1e-6)
    fields["num_heads"] = overrides.get("num_heads") or _infer_heads(shapes, width, depth, mlp_dim)
    image_size = overrides.get("image_size")
    if "pos_embed" in shapes:
        fields["posemb"] = "learn"
        fields["image_size"], fields["posemb_covers_class_token"] = infer_grid(
            shapes["pos_embed"][1], has_cls, (ph, pw), image_size, key="pos_embed")
    else:
        if image_size is None:
            raise ValueError("The state dict has no pos_embed, so it does not record the "
                             "image size; pass image_size=(height, width).")
        fields["posemb"] = "none"
    fields.update(overrides)
    return ViTConfig(**fields)


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
    """The timm state-dict key that holds our variable `path`."""
    if path in WHOLE_NAMES:
        return WHOLE_NAMES[path]
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


def convert_state_dict(state_dict, config, drop_head=False):
    """{variable path: float32 array} for every variable `config` builds.

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
        config, state_dict, lambda path, shape: timm_source(path, shape, config, state_dict),
        source_name="timm", skip=("head/",) if drop_head else (),
        # With num_classes=0 the config has no head for these keys to fill.
        ignored={k: "the source's head, replaced" for k in ("head.weight", "head.bias")}
        if drop_head else None,
        hint="Check the overrides (num_heads, image_size, pooling, qk_norm) or convert the "
             "timm module, whose settings are read directly.")
