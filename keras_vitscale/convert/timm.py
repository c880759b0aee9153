"""timm VisionTransformer -> kvs.ViT with the same logits.

A timm module tells us its settings (LayerNorm epsilon, GELU flavour, pooling,
position-embedding order); a bare state dict only has shapes, so the rest
falls back to timm's defaults (exact GELU, epsilon 1e-6) unless overridden.

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

OpenCLIP-style towers (timm's `vit_giant_patch14_clip_224`, `..._clip_*`)
use pre_norm=True: a LayerNorm on the embedded tokens before the first
block and a bias-free patch convolution. ViTConfig has no such LayerNorm,
so they are refused with an error naming pre_norm rather than converted
approximately.

Example:
```python
import timm
from keras_vitscale import convert
timm_model = timm.create_model("vit_small_patch16_224", pretrained=False)
model = convert.from_timm(timm_model)                    # same logits
model = convert.from_timm(timm_model.state_dict())       # heads from VARIANTS
model = convert.from_timm(state_dict, num_heads=4, image_size=(64, 96))
```
"""

import collections.abc
import logging
import os
import re

import numpy as np

from keras_vitscale.config import VARIANTS, ViTConfig
from keras_vitscale.convert.common import Source, as_float32, infer_grid

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

# Overrides that change training behaviour only, not what the model computes
# at inference: no warning when they differ from the timm module.
_INFERENCE_NEUTRAL = {"dropout_rate", "remat", "head_zero_init", "head_bias_init", "variant"}

_POOLINGS = {"token": "tok", "avg": "gap", "map": "map", "": "none"}


def from_timm(source, *, verbose=False, name="vit", dtype=None, **overrides):
    """Builds the `kvs.ViT` matching a timm VisionTransformer and copies its weights.

    Args:
        source: a `timm.models.VisionTransformer` with `Block` or
            `ParallelScalingBlock` blocks (settings read from the module) or
            its state dict (`{name: tensor or array}`; settings
            inferred from the shapes, timm defaults for the rest).
        verbose: show a progress bar over the weight copy.
        name: the Keras model name.
        dtype: dtype or dtype policy of the Keras model.
        **overrides: `ViTConfig` fields. With a state dict they fill what
            shapes cannot tell: `num_heads` (needed unless the model has
            qk-norm or matches a `VARIANTS` shape), `image_size` (needed for a
            non-square grid), `pooling` ("none" for timm's global_pool=''),
            `gelu`, `layer_norm_epsilon`. `num_classes=0` drops the head;
            another class count gets a fresh head.

    Returns:
        A `kvs.ViT` whose logits match the source's in float32.

    Example:
    ```python
    model = from_timm(timm.create_model("vit_tiny_patch16_224"))
    features = from_timm(timm_model, num_classes=0)   # pre-logits features
    ```
    """
    from keras_vitscale.model import ViT

    num_classes = overrides.pop("num_classes", None)
    if _is_torch_module(source):
        config = config_from_module(source)
        _warn_on_conflicts(config, overrides)
        config = config.replace(**overrides) if overrides else config
        state_dict = source.state_dict()
    elif isinstance(source, collections.abc.Mapping):
        config = config_from_state_dict(source, **overrides)
        state_dict = source
    else:
        raise TypeError(
            f"from_timm takes a timm VisionTransformer or its state dict; got "
            f"{type(source).__name__}. Load a checkpoint file with "
            "keras_vitscale.convert.timm.load_state_dict(path) first.")
    source_classes = config.num_classes
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    new_head = config.num_classes != source_classes
    weights = convert_state_dict(state_dict, config, drop_head=new_head)
    model = ViT(config=config, name=name, dtype=dtype)
    assign_weights(model, weights, verbose=verbose)
    if new_head:
        logger.info("from_timm: dropped timm's %d-class head; %s", source_classes,
                    "no head (features out)" if not config.num_classes
                    else f"a fresh {config.num_classes}-class head")
    return model


def _is_torch_module(obj):
    try:
        import torch
    except ImportError:
        return False
    return isinstance(obj, torch.nn.Module)


def _warn_on_conflicts(config, overrides):
    read = config.to_dict()
    for key, value in overrides.items():
        if key in read and key not in _INFERENCE_NEUTRAL:
            new = config.replace(**{key: value}).to_dict()[key]
            if new != read[key]:
                logger.warning("from_timm: %s=%r overrides the module's %r; the "
                               "converted model will not reproduce its outputs.",
                               key, value, read[key])


# ---- settings ------------------------------------------------------------
def config_from_module(module):
    """Reads a `ViTConfig` from a timm VisionTransformer module.

    Raises:
        ValueError: listing every option the module uses that `ViTConfig`
            cannot express (LayerScale, register tokens, pre-norm, ...).
    """
    import torch.nn as nn
    from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    m = module
    if not isinstance(m, VisionTransformer):
        raise TypeError(
            f"from_timm converts timm.models.VisionTransformer; got "
            f"{type(m).__module__}.{type(m).__name__}.")
    problems = []

    def need(ok, option):
        if not ok:
            problems.append(option)

    has_cls = m.cls_token is not None
    need(m.reg_token is None, f"register tokens (reg_tokens={m.num_reg_tokens})")
    need(m.num_prefix_tokens == int(has_cls) + m.num_reg_tokens,
         "extra prefix tokens (e.g. DeiT's distillation token)")
    need(not m.dynamic_img_size, "dynamic_img_size=True")
    need(isinstance(m.norm_pre, nn.Identity),
         "pre_norm=True (norm_pre: a LayerNorm on the embedded tokens before the first "
         "block, as in OpenCLIP towers such as vit_giant_patch14_clip_224; ViTConfig has "
         "no such norm)")
    pe = m.patch_embed
    need(type(pe) is PatchEmbed and isinstance(pe.norm, nn.Identity)
         and pe.proj.bias is not None and not pe.dynamic_img_pad
         and pe.img_size is not None,
         "a patch embedding other than timm's PatchEmbed with a biased convolution "
         "(embed_layer, embed_norm_layer, pre_norm, dynamic_img_pad or img_size=None)")
    need(m.global_pool in _POOLINGS, f"global_pool={m.global_pool!r} (use one of "
         f"{sorted(_POOLINGS)})")
    need(not (m.pool_include_prefix and m.num_prefix_tokens),
         "pool_include_prefix=True with a class token")
    need(not (has_cls and m.global_pool == "map"),
         "class_token=True with global_pool='map' (timm's pool skips the class "
         "token; the MAP head attends over every token)")
    need(not (isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity)),
         "final_norm=False (ViTConfig always has a final LayerNorm)")
    need(isinstance(m.head, nn.Identity)
         or (isinstance(m.head, nn.Linear) and m.head.bias is not None),
         f"head {type(m.head).__name__} (only nn.Linear with bias, or none)")

    blocks = list(m.blocks)
    read = _parallel_blocks if _is_parallel(blocks[0]) else _sequential_blocks
    fields, norms, acts = read(blocks, m.embed_dim, need)
    block_bias = {n.bias is not None for n in norms}
    norms.append(m.fc_norm if isinstance(m.norm, nn.Identity) else m.norm)

    pool = m.attn_pool
    if m.global_pool == "map":
        need(type(pool) is AttentionPoolLatent and pool.latent_len == 1
             and pool.pos_embed is None and isinstance(pool.q, nn.Linear)
             and isinstance(pool.q_norm, nn.Identity) and pool.pool == "token"
             and pool.mlp is not None and type(pool.mlp) is Mlp
             and pool.latent_dim == m.embed_dim and pool.num_heads == fields["num_heads"]
             and pool.q.bias is not None and pool.kv.bias is not None
             and pool.mlp.fc1.out_features == fields["mlp_dim"],
             "an attention pool other than AttentionPoolLatent(latent_len=1, q_proj, "
             "qkv_bias, no qk_norm or pos_embed, the blocks' heads and MLP width)")
        if type(pool) is AttentionPoolLatent and pool.mlp is not None:
            norms.append(pool.norm)
            acts.append(pool.mlp.act)
    if problems:
        raise ValueError(_unsupported_message(problems))

    flavours = {_gelu_flavour(a) for a in acts}
    eps = {getattr(n, "eps", None) for n in norms}
    layer_norms = all(isinstance(n, nn.LayerNorm) and n.elementwise_affine for n in norms)
    need(len(flavours) == 1 and None not in flavours,
         f"activation {sorted({type(a).__name__ for a in acts})} (only exact or tanh GELU)")
    need(layer_norms, "a norm other than an affine nn.LayerNorm (e.g. RmsNorm)")
    need(len(eps) == 1, f"LayerNorms with different epsilons {sorted(eps)}")
    need(len(block_bias) == 1, "LayerNorms with and without bias in one model")
    need(block_bias != {False} or m.global_pool != "map",
         "bias-free LayerNorms with global_pool='map' (the MAP head's norm has a bias)")
    if problems:
        raise ValueError(_unsupported_message(problems))

    pooling = _POOLINGS[m.global_pool]
    posemb = "learn" if m.pos_embed is not None else "none"
    return ViTConfig(
        **fields, width=m.embed_dim, depth=len(blocks), patch_size=tuple(pe.patch_size),
        image_size=tuple(pe.img_size),
        num_classes=m.head.out_features if isinstance(m.head, nn.Linear) else 0,
        in_channels=pe.proj.in_channels, pooling=pooling, class_token=has_cls,
        posemb=posemb,
        posemb_covers_class_token=has_cls and posemb == "learn" and not m.no_embed_class,
        norm_bias=block_bias.pop(),
        layer_norm_epsilon=float(eps.pop()), gelu=flavours.pop(),
        norm_position="before_pool" if not isinstance(m.norm, nn.Identity) else "after_pool")


def _is_parallel(block):
    from timm.models.vision_transformer import ParallelScalingBlock

    return isinstance(block, ParallelScalingBlock)


def _sequential_blocks(blocks, width, need):
    """(config fields, norms, activations) of timm pre-norm `Block`s."""
    import torch.nn as nn
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    attn0, mlp0 = blocks[0].attn, blocks[0].mlp
    norms, acts = [], []
    for i, blk in enumerate(blocks):
        where = f"blocks.{i}"
        if type(blk) is not Block:
            need(False, f"{where} is {type(blk).__name__}, not timm's pre-norm Block like "
                        "blocks.0")
            continue
        need(isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity),
             f"LayerScale (init_values=..., {where}.ls1/ls2)")
        attn, mlp = blk.attn, blk.mlp
        need(type(attn) is Attention and isinstance(attn.norm, nn.Identity)
             and getattr(attn, "gate", None) is None
             and attn.head_dim * attn.num_heads == width
             and attn.num_heads == attn0.num_heads,
             f"{where}.attn is not plain timm Attention (scale_attn_norm, gated, "
             "attn_head_dim or attn_layer)")
        need(type(mlp) is Mlp and isinstance(mlp.norm, nn.Identity)
             and mlp.fc1.out_features == mlp0.fc1.out_features
             and (mlp.fc1.bias is None) == (mlp.fc2.bias is None),
             f"{where}.mlp is not timm's plain Mlp (mlp_layer or scale_mlp_norm)")
        norms += [blk.norm1, blk.norm2]
        if not isinstance(getattr(attn, "q_norm", None), nn.Identity):
            norms += [attn.q_norm, attn.k_norm]
        acts.append(getattr(mlp, "act", None))
    fields = dict(
        block="sequential", mlp_dim=mlp0.fc1.out_features, num_heads=attn0.num_heads,
        qk_norm=not isinstance(attn0.q_norm, nn.Identity),
        qkv_bias=attn0.qkv.bias is not None, attn_out_bias=attn0.proj.bias is not None,
        mlp_bias=mlp0.fc1.bias is not None)
    return fields, norms, acts


def _parallel_blocks(blocks, width, need):
    """(config fields, norms, activations) of timm `ParallelScalingBlock`s.

    timm's block always has an MLP bias (in `in_proj.bias` or `mlp_bias`),
    so ours has one too; timm's qkv_bias and proj_bias map to ours.
    """
    import torch.nn as nn
    from timm.models.vision_transformer import ParallelScalingBlock

    def layout(blk):  # what must agree across blocks for one config to hold them
        fused = getattr(blk, "out_proj", None) is not None
        out = blk.out_proj if fused else blk.attn_out_proj
        return (blk.num_heads, blk.in_proj.out_features, blk.in_proj.bias is not None,
                out.bias is not None, fused, isinstance(blk.q_norm, nn.Identity))

    b0 = blocks[0]
    norms, acts = [], []
    for i, blk in enumerate(blocks):
        where = f"blocks.{i}"
        if type(blk) is not ParallelScalingBlock:
            need(False, f"{where} is {type(blk).__name__}, not timm's ParallelScalingBlock "
                        "like blocks.0")
            continue
        need(isinstance(blk.ls, nn.Identity), f"LayerScale (init_values=..., {where}.ls)")
        need(blk.num_heads * blk.head_dim == width and layout(blk) == layout(b0),
             f"{where} differs from blocks.0 in heads, MLP width, biases, qk_norm or "
             "fuse_out_proj")
        norms.append(blk.in_norm)
        if not isinstance(blk.q_norm, nn.Identity):
            norms += [blk.q_norm, blk.k_norm]
        acts.append(blk.mlp_act)
    _, in_features, qkv_bias, out_bias, _, no_qk_norm = layout(b0)
    fields = dict(
        block="parallel", mlp_dim=in_features - 3 * width, num_heads=b0.num_heads,
        qk_norm=not no_qk_norm, qkv_bias=qkv_bias, attn_out_bias=out_bias, mlp_bias=True)
    return fields, norms, acts


def _gelu_flavour(act):
    import torch.nn as nn

    if isinstance(act, nn.GELU):
        return "tanh" if act.approximate == "tanh" else "exact"
    # timm's own activation classes (timm.layers.activations).
    if type(act).__module__.startswith("timm."):
        return {"GELU": "exact", "GELUTanh": "tanh"}.get(type(act).__name__)
    return None


def _unsupported_message(problems):
    listed = "\n  - ".join(problems)
    return (f"The timm model uses option(s) that ViTConfig cannot express:\n  - {listed}\n"
            "Convert a plain timm VisionTransformer (pre-norm Block or "
            "ParallelScalingBlock, LayerNorm, GELU, token/avg/map/'' pooling) or extend "
            "ViTConfig first.")


def config_from_state_dict(state_dict, **overrides):
    """Infers a `ViTConfig` from the key names and shapes of a timm state dict.

    Args:
        state_dict: `{timm name: tensor or array}`.
        **overrides: `ViTConfig` fields that win over the inference;
            `num_heads` and `image_size` also guide it.

    Raises:
        ValueError: for keys of unsupported features, or when `num_heads` or
            the image size cannot be inferred (the message says what to pass).
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
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
        raise ValueError(_unsupported_message(problems))

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
    """{variable path: numpy array} for every variable `config` builds.

    Args:
        state_dict: a timm VisionTransformer state dict.
        config: the target `ViTConfig`.
        drop_head: the source head is not copied (a head of another size, or
            none); the model keeps its initial head.

    Raises:
        ValueError: listing unused timm keys, missing ones and shape mismatches.

    Its own loop rather than `common.gather_weights`: timm users look up the
    timm key, so each mismatch leads with it ("blocks.1.mlp.fc1.weight
    (100, 64) -> encoder_block_1/mlp/dense_1/kernel needs (64, 256)").
    """
    consumed, weights, missing, mismatched = set(), {}, [], []
    for path, shape in config.parameter_shapes().items():
        if drop_head and path.startswith("head/"):
            continue
        spec = timm_source(path, tuple(shape), config, state_dict)
        consumed.update(k for k in spec.keys if k in state_dict)
        absent = [k for k in spec.keys if k not in state_dict]
        if absent:
            missing.append(f"{path} (timm {', '.join(absent)})")
            continue
        bad = [f"{k} {tuple(state_dict[k].shape)} -> {path} needs {tuple(shape)} "
               f"({k} must be {tuple(want)})"
               for k, want in zip(spec.keys, spec.shapes)
               if tuple(state_dict[k].shape) != tuple(want)]
        if bad:
            mismatched += bad
            continue
        weights[path] = spec.combine(*(as_float32(state_dict[k]) for k in spec.keys))
    if drop_head:
        consumed |= {"head.weight", "head.bias"} & set(state_dict)
    unused = sorted(set(state_dict) - consumed)
    errors = []
    if unused:
        errors.append(f"{len(unused)} timm key(s) the model has no variable for: "
                      f"{unused[:12]}{' ...' if len(unused) > 12 else ''}")
    if missing:
        errors.append(f"{len(missing)} variable(s) with no timm key: {missing[:12]}"
                      f"{' ...' if len(missing) > 12 else ''}")
    if mismatched:
        errors.append(f"{len(mismatched)} shape mismatch(es), first: {mismatched[:5]}")
    if errors:
        raise ValueError(
            "The timm weights do not fit the config "
            f"(width {config.width}, depth {config.depth}, heads {config.num_heads}, "
            f"block {config.block!r}, image {config.image_size}, pooling "
            f"{config.pooling!r}, class_token {config.class_token}):\n  "
            + "\n  ".join(errors) +
            "\nCheck the overrides (num_heads, image_size, pooling, qk_norm) or convert "
            "the timm module, whose settings are read directly.")
    return weights


def assign_weights(model, weights, verbose=False):
    """Assigns `{path: array}` to `model`; the head may be absent (kept fresh).

    Every other variable named by `model.config.parameter_shapes()` must be
    in `weights`, so nothing keeps its random initial value by accident.
    """
    import keras

    variables = {v.path: v for v in model.weights}
    expected = model.config.parameter_shapes()
    if set(variables) != set(expected):
        raise RuntimeError(
            "kvs.ViT's variables differ from ViTConfig.parameter_shapes(): only in the "
            f"model {sorted(set(variables) - set(expected))[:5]}, only in the config "
            f"{sorted(set(expected) - set(variables))[:5]}; fix config.py or model.py.")
    unfilled = [p for p in expected if p not in weights and not p.startswith("head/")]
    if unfilled:
        raise RuntimeError(f"No weights for {unfilled[:5]}; the converter skipped them.")
    bar = keras.utils.Progbar(len(weights), unit_name="weight") if verbose else None
    for i, (path, array) in enumerate(weights.items()):
        variables[path].assign(array)
        if bar is not None:
            bar.update(i + 1)


# ---- files and verification -----------------------------------------------
def load_state_dict(path):
    """Reads a timm state dict from .safetensors or .pth/.pt/.bin.

    .pth files are read with `torch.load(weights_only=True)`, which refuses
    pickled code; a {"model": ...} or {"state_dict": ...} wrapper is unwrapped.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints nest the weights one or two levels down.
    while isinstance(data, dict) and "patch_embed.proj.weight" not in data:
        inner = [data[k] for k in ("state_dict", "model", "module")
                 if isinstance(data.get(k), dict)]
        if not inner:
            break
        data = inner[0]
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} holds a {type(data).__name__}, not a state dict.")
    return data


def load_source(source, pretrained=False):
    """A timm model name or a checkpoint path -> a timm module or a state dict.

    Args:
        source: a timm model name ("vit_small_patch16_224", with an optional
            ".tag") or a path to a .pth/.pt/.bin/.safetensors state dict.
        pretrained: load timm's pretrained weights for a model name, from the
            local cache only; this never downloads.

    With KERAS_BACKEND=tensorflow, import timm before Keras: timm loads
    triton (through torchvision), which crashes after TensorFlow is loaded.

    Example:
    ```python
    model = from_timm(load_source("vit_tiny_patch16_224"))   # random weights
    model = from_timm(load_source("ckpt.safetensors"), num_heads=4)
    ```
    """
    source = str(source)
    if os.path.exists(source):
        return load_state_dict(source)
    if re.search(r"\.(pth|pt|bin|safetensors)$", source):
        raise FileNotFoundError(f"No checkpoint file at {source!r}.")
    import timm

    if not timm.is_model(source.split(".")[0]):
        raise ValueError(f"{source!r} is neither a file nor a timm model name; list the "
                         "names with timm.list_models('vit_*').")
    if not pretrained:
        return timm.create_model(source, pretrained=False)
    cached = _cached_weights(source)
    if cached is None:
        raise FileNotFoundError(
            f"timm's pretrained weights for {source!r} are not in the local cache, and "
            "this converter never downloads. Fetch them once with timm.create_model("
            f"{source!r}, pretrained=True) where there is network, or pass a state-dict "
            "file instead.")
    # Point timm at the cached file so that its loader cannot reach the network.
    return timm.create_model(source, pretrained=True, pretrained_cfg_overlay={"file": cached})


def _cached_weights(name):
    """Path of timm's cached pretrained weights for `name`, or None."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo = cfg["hf_hub_id"].split("@")[0]
        names = [cfg.get("hf_hub_filename")] if cfg.get("hf_hub_filename") else [
            "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]
        for filename in names:
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return path
    if cfg.get("url"):
        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg["url"]))
        if os.path.exists(path):
            return path
    return None


def source_num_classes(source):
    """Classes of a timm module's or state dict's head (0 without one)."""
    if _is_torch_module(source):
        return getattr(source, "num_classes", 0)
    return int(source["head.weight"].shape[0]) if "head.weight" in source else 0


def verify(model, source, batch_size=2, seed=0):
    """max |output difference| between a converted model and its timm source.

    Args:
        model: the `kvs.ViT` from `from_timm(source)`; with `num_classes=0`
            its features are compared with timm's pre-logits.
        source: the timm module, or the state dict, which is then loaded
            into a timm VisionTransformer of the model's config (`to_timm`).
        batch_size, seed: the random images compared.
    """
    classes = source_num_classes(source)
    if model.config.num_classes not in (0, classes):
        raise ValueError(f"The model has a fresh {model.config.num_classes}-class head "
                         f"and the source a {classes}-class one; nothing to compare.")
    if not _is_torch_module(source):
        import torch

        module = to_timm(model.config.replace(num_classes=classes),
                         fuse_out_proj="blocks.0.attn_out_proj.weight" not in source)
        module.load_state_dict({k: torch.from_numpy(as_float32(v)) for k, v in source.items()},
                               strict=True)
        source = module
    return max_logit_difference(model, source, batch_size=batch_size, seed=seed)


def to_timm(config, fuse_out_proj=True):
    """A timm VisionTransformer with the layout of `config` (random weights).

    Used to check a converted state dict against timm itself; only configs
    that timm's ViT can express are accepted.

    Args:
        config: a `ViTConfig`.
        fuse_out_proj: for block="parallel", one `out_proj` (True) or timm's
            separate `attn_out_proj` and `mlp_out_proj` (False).
    """
    import functools

    import timm.layers
    from timm.models.vision_transformer import Block, ParallelScalingBlock, VisionTransformer

    c = config
    pools = {v: k for k, v in _POOLINGS.items()}
    # timm's Block has one bias switch for attention-out and MLP; its
    # ParallelScalingBlock always has an MLP bias.
    biases_ok = (c.attn_out_bias == c.mlp_bias if c.block == "sequential" else c.mlp_bias)
    if c.block not in ("sequential", "parallel") or c.representation_size or not biases_ok \
            or c.posemb == "sincos2d" or not c.norm_bias:
        raise ValueError("timm's VisionTransformer cannot express this config (block "
                         f"{c.block!r}, representation_size {c.representation_size}, "
                         f"posemb {c.posemb!r}, attn_out_bias {c.attn_out_bias} and "
                         f"mlp_bias {c.mlp_bias}, norm_bias {c.norm_bias}).")
    block_fn = Block if c.block == "sequential" else functools.partial(
        ParallelScalingBlock, fuse_out_proj=fuse_out_proj)
    return VisionTransformer(block_fn=block_fn,
        img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_channels,
        num_classes=c.num_classes, global_pool=pools[c.pooling], embed_dim=c.width,
        depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.width,
        qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, proj_bias=c.attn_out_bias,
        class_token=c.class_token, no_embed_class=not c.posemb_covers_class_token,
        pos_embed="learn" if c.posemb == "learn" else "none",
        fc_norm=c.norm_position == "after_pool",
        act_layer="gelu" if c.gelu == "exact" else "gelu_tanh",
        norm_layer=functools.partial(timm.layers.LayerNorm, eps=c.layer_norm_epsilon),
        weight_init="skip")


def max_logit_difference(model, timm_model, batch_size=2, seed=0):
    """max |model(x) - timm_model(x)| over random normal images, in float32.

    A model converted with `num_classes=0` is compared with timm's pre-logits.

    Args:
        model: a converted `kvs.ViT`.
        timm_model: the timm source (put in eval mode here).
        batch_size: images compared.
        seed: numpy seed of the images.
    """
    import keras
    import torch

    c = model.config
    images = np.random.default_rng(seed).standard_normal(
        (batch_size, *c.image_size, c.in_channels)).astype("float32")
    timm_model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2))
        if c.num_classes == 0 and getattr(timm_model, "num_classes", 0):  # head dropped
            expected = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        else:
            expected = timm_model(x)
        expected = expected.float().numpy()
    got = keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(images), training=False))
    return float(np.max(np.abs(got.astype("float32") - expected)))
