"""The `ViTConfig` of a timm repo on the Hub, from its config.json and tensor shapes.

A timm repo's config.json (written by timm's `push_to_hf_hub`/`save_for_hf`)
names the `architecture` (timm's model name), `num_classes`, `global_pool`
and a `pretrained_cfg` with the `input_size`; newer exports add
`model_args` (the constructor arguments that differ from the
architecture's). The safetensors header gives every tensor's shape. Shapes
tell the sizes and most options (`timm_layout.config_from_state_dict`);
what they cannot tell (the GELU flavour, the LayerNorm epsilon, the head
count, the LayerScale init value) comes from `model_args` when it has them,
else from `FAMILIES`, facts about timm's architecture families, else from
`VARIANTS` by shape.

Architectures that are not a plain timm VisionTransformer (RoPE, relative
positions, hybrid CNN stems, distillation tokens, NaFlex, ...) are refused
by name, with the feature they need, before any weight is downloaded: only
config.json and the header are read. Nothing here imports timm or torch.

Example:
```python
config = config_from_timm_repo(json.load(open("config.json")),
                               SafetensorsReader("model.safetensors").shapes)
```
"""

import re

from keras_vitscale.config import VARIANTS
from keras_vitscale.convert.common import shapes_of
from keras_vitscale.convert.timm_layout import config_from_state_dict

# timm architecture families ViTConfig cannot represent -> what they need.
# The first match wins; names are timm's model names without the tag.
UNSUPPORTED_FAMILIES = (
    (r"deit_\w*distilled\w*", "a distillation token (DeiT distilled models)"),
    (r"eva02_\w+|eva_giant_\w+|vit_\w*rope\w*|vit_pe_\w+|\w*dinov3\w*|\w*sapiens2\w*"
     r"|\w*lingbot\w*", "rotary position embeddings (RoPE) and the blocks of timm's Eva "
     "model"),
    (r"beit\w*", "relative position bias and LayerScale blocks of BEiT"),
    (r"naflexvit_\w+", "NaFlex's variable-resolution patch embedding"),
    (r"vit_s?relpos_\w+", "relative position embeddings"),
    (r"vit_\w*_r\d+_s\d+\w*|vit_\w*resnet\w*|vit_tiny_r_s16\w*|vit_base_mci_\w+",
     "a hybrid CNN stem before the patch embedding"),
    (r"samvit_\w+", "SAM's windowed attention with relative positions"),
    (r"\w*_quickgelu\w*", "the QuickGELU activation (x * sigmoid(1.702 x))"),
    (r"\w*_radio_\w+|vit_intern300m\w*", "no final LayerNorm (final_norm=False)"),
    (r"aimv2_\w+|\w*_xp_\w*", "RMSNorm (and AIMv2's unpacked SwiGLU)"),
    (r"\w*_18x2_\w*", "parallel blocks of several attention and MLP branches"),
    (r"vit_\w*_rpn_\w*", "residual post-norm blocks"),
    (r"vit_dp?(wee|little)_patch\w*", "differential attention"),
    (r"vit_pwee_\w+", "LayerScale in parallel blocks"),
)

# Facts about timm's architecture families: (name pattern, settings). Every
# matching entry contributes, the first to give a setting wins. `heads` is
# the head count where the size word ("base", "so400m", ...; `_HEADS`) does
# not give it, `layer_scale` timm's init_values, `gelu` and `eps` what the
# family's constructor passes (timm's defaults: exact GELU, LayerNorm eps 1e-6).
_HEADS = {"tiny": 3, "small": 6, "wee": 4, "xsmall": 4, "little": 5, "medium": 8,
          "mediumd": 8, "betwixt": 10, "base": 12, "large": 16, "huge": 16, "giant": 16,
          "gigantic": 16, "giantopt": 16, "so150m": 14, "so150m2": 13, "so400m": 16}
FAMILIES = (
    # OpenCLIP image towers: LayerNorm before the encoder (from the shapes), eps 1e-5.
    (r"vit_\w+_clip_\w+", dict(eps=1e-5)),
    # SigLIP 2 additions and a few SigLIP shapes use the tanh GELU in timm.
    (r"vit_(so400m_patch16|giantopt_patch16|base_patch32)_siglip\w*"
     r"|vit_large_patch16_siglip_(gap_)?512", dict(gelu="tanh")),
    (r"vit_\w+_siglip\w*", dict()),
    # DINOv2's giant is 1536 wide with 24 heads (the Scaling ViT g is 1408/16).
    (r"vit_giant_patch14_(reg\d+_)?dinov2", dict(heads=24, layer_scale=1e-5)),
    (r"vit_\w+_dinov2", dict(layer_scale=1e-5)),
    (r"vit_giant_patch14_reg1_tipsv2", dict(heads=24, layer_scale=1.0)),
    (r"vit_\w+_tipsv2", dict(layer_scale=1.0)),
    (r"vit_base_patch(16|32)_plus_\w+", dict(heads=14)),
    (r"vit_base_patch16_gap_224", dict(heads=16)),
    (r"vit_(medium|betwixt)_patch16_gap_\w+", dict(layer_scale=1e-6)),
    (r"deit3_\w+", dict(layer_scale=1e-6)),
    (r"deit_\w+|flexivit_\w+|eva_large_patch14_\w+", dict()),
    # The rest of timm's VisionTransformer family (augreg, orig_in21k, sam, ...).
    (r"vit_\w+", dict(layer_scale=1e-5)),
)

# What loads, in words (for messages, `kvs.ViT.presets` and the README).
LOADABLE_FAMILIES = (
    "timm's VisionTransformer ViTs (vit_*: augreg, orig_in21k, MIIL, SAM-trained, and "
    "the vit_*_reg*_gap_* register/LayerScale models)",
    "DeiT and DeiT III (deit_*, deit3_*; not the distilled ones)",
    "OpenCLIP image towers (vit_*_clip_*; not the QuickGELU ones)",
    "SigLIP and SigLIP 2 towers and classifiers (vit_*_siglip_*)",
    "DINOv2, with or without registers (vit_*_dinov2), and TIPSv2 (vit_*_tipsv2)",
    "FlexiViT at its native patch size (flexivit_*) and EVA's MIM ViT-L (eva_large_patch14_*)",
)

# model_args["act_layer"] -> our gelu; anything else is refused.
_ACT_LAYERS = {"gelu": "exact", "gelu_tanh": "tanh"}
_POOLINGS = {"token": "tok", "avg": "gap", "map": "map", "": "none"}


def config_from_timm_repo(hf_config, shapes):
    """The `ViTConfig` of a timm Hub repo, from config.json and the tensor shapes.

    Args:
        hf_config: the repo's config.json as a dict (timm's: "architecture",
            "num_classes", "global_pool", "pretrained_cfg", optional
            "model_args").
        shapes: `{timm tensor name: shape}` (the safetensors header; any
            mapping `common.shapes_of` reads).

    Returns:
        A `ViTConfig` whose variables map one-to-one onto the tensors
        (`timm_layout.check_state_dict(shapes, config)` confirms it).

    Raises:
        ValueError: an architecture ViTConfig cannot represent (naming the
            feature), a config.json that is not timm's, or settings that
            cannot be known (saying what to pass).

    Example:
    ```python
    config_from_timm_repo({"architecture": "vit_so400m_patch14_siglip_224",
                           "num_classes": 0, "global_pool": "map",
                           "pretrained_cfg": {"input_size": [3, 224, 224]}}, shapes)
    ```
    """
    if not isinstance(hf_config, dict) or "architecture" not in hf_config:
        raise ValueError(f"config.json has no 'architecture' (keys: "
                         f"{sorted(hf_config)[:8] if isinstance(hf_config, dict) else hf_config}); "
                         "it is not a timm repo's config.")
    arch = str(hf_config["architecture"]).split(".")[0]
    args = dict(hf_config.get("model_args") or {})
    pretrained = hf_config.get("pretrained_cfg") or {}
    for pattern, feature in UNSUPPORTED_FAMILIES:
        if re.fullmatch(pattern, arch):
            raise ValueError(_refusal(arch, feature))
    matching = [f for pattern, f in FAMILIES if re.fullmatch(pattern, arch)]
    facts = {k: v for f in reversed(matching) for k, v in f.items()}  # first one wins
    if not matching:
        raise ValueError(
            f"timm architecture {arch!r} is not one of the VisionTransformer families this "
            "library knows the settings of (vit_*, deit_*, deit3_*, flexivit_*); shapes "
            "alone do not tell its GELU, LayerNorm epsilon or head count. If it is a timm "
            "VisionTransformer, convert the module instead, which records them: "
            f"kvs.convert.from_timm(timm.create_model({arch!r}, pretrained=True)).")
    overrides = _from_model_args(arch, args)
    overrides.setdefault("layer_norm_epsilon", facts.get("eps", 1e-6))
    overrides.setdefault("gelu", facts.get("gelu", "exact"))
    size = args.get("img_size") or (pretrained.get("input_size") or [None])[1:]
    if size:
        overrides["image_size"] = tuple(size) if isinstance(size, (list, tuple)) else size
    pool = args.get("global_pool", hf_config.get("global_pool"))
    if pool is not None:
        if pool not in _POOLINGS:
            raise ValueError(_refusal(arch, f"global_pool={pool!r} (ViTConfig pools with "
                                            f"{sorted(_POOLINGS)})"))
        overrides["pooling"] = _POOLINGS[pool]
    shapes = shapes_of(shapes)
    _check_image_size(arch, overrides.get("image_size"), shapes)
    if "num_heads" not in overrides:
        overrides["num_heads"] = _heads(arch, facts, shapes)
    try:
        config = config_from_state_dict(shapes, **overrides)
    except ValueError as err:
        raise ValueError(f"timm architecture {arch!r}: {err}") from None
    if config.layer_scale is not None and "layer_scale" not in overrides:
        config = config.replace(layer_scale=facts.get("layer_scale", config.layer_scale))
    classes = hf_config.get("num_classes", pretrained.get("num_classes"))
    if classes is not None and int(classes) != config.num_classes:
        raise ValueError(
            f"timm architecture {arch!r}: config.json says num_classes={classes}, but the "
            f"weights have a {config.num_classes}-class head"
            f"{' (head.weight)' if config.num_classes else ' (no head.weight)'}; the "
            "download is not this repo's, or the repo is inconsistent.")
    return config


def _refusal(arch, feature):
    return (f"timm architecture {arch!r} needs {feature}, which ViTConfig cannot "
            "express; it cannot be loaded. The timm families that load: "
            + "; ".join(LOADABLE_FAMILIES) + ".")


def _check_image_size(arch, size, shapes):
    """Refuses an input size timm's patch embedding would crop (384 px at patch 14)."""
    patch = shapes.get("patch_embed.proj.weight", (0, 0, 0, 0))[2:]
    if size is None or len(patch) != 2 or not all(patch):
        return
    size = (size, size) if isinstance(size, int) else tuple(size)
    if any(s % p for s, p in zip(size, patch)):
        fits = [tuple(s // p * p for s, p in zip(size, patch)),
                tuple(-(-s // p) * p for s, p in zip(size, patch))]
        raise ValueError(_refusal(
            arch, f"an input size {size} that is not a multiple of its patch {patch} (timm's "
                  f"convolution drops the remainder; ViTConfig needs a multiple, e.g. "
                  f"{fits[0]} or {fits[1]})"))


def _from_model_args(arch, args):
    """`ViTConfig` overrides from a config.json's model_args (what shapes cannot tell)."""
    out = {}
    if args.get("dynamic_img_size") or args.get("dynamic_img_pad"):
        raise ValueError(_refusal(arch, "dynamic image sizes (dynamic_img_size=True)"))
    if args.get("final_norm") is False:
        raise ValueError(_refusal(arch, "no final LayerNorm (final_norm=False)"))
    if args.get("pool_include_prefix"):
        raise ValueError(_refusal(arch, "pooling over the prefix tokens "
                                        "(pool_include_prefix=True)"))
    if "act_layer" in args:
        act = args["act_layer"]
        if act not in _ACT_LAYERS:
            raise ValueError(_refusal(arch, f"the activation act_layer={act!r} (ViTConfig "
                                            f"has {sorted(_ACT_LAYERS)})"))
        out["gelu"] = _ACT_LAYERS[act]
    if isinstance(args.get("norm_layer"), str) and args["norm_layer"] != "layernorm":
        raise ValueError(_refusal(arch, f"norm_layer={args['norm_layer']!r} (ViTConfig has "
                                        "LayerNorm)"))
    if args.get("num_heads"):
        out["num_heads"] = int(args["num_heads"])
    if args.get("init_values") is not None:
        out["layer_scale"] = float(args["init_values"])
    if args.get("in_chans"):
        out["in_channels"] = int(args["in_chans"])
    return out


def _heads(arch, facts, shapes):
    """The head count: the family's facts, else its size word, else VARIANTS by shape."""
    if facts.get("heads"):
        return facts["heads"]
    width = shapes.get("patch_embed.proj.weight", (None,))[0]
    match = re.match(r"(?:vit|deit3?|flexivit|eva)_([a-z0-9]+?)_patch", arch) \
        or re.match(r"flexivit_([a-z]+)$", arch)
    heads = _HEADS.get(match.group(1)) if match else None
    if heads and width and width % heads == 0:
        return heads
    fc1, fc2 = shapes.get("blocks.0.mlp.fc1.weight"), shapes.get("blocks.0.mlp.fc2.weight")
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    mlp_dim = fc2[1] if fc1 and fc2 else None
    for name, (w, d, m, h) in VARIANTS.items():
        if (w, d, m) == (width, depth, mlp_dim):
            return h
    raise ValueError(
        f"timm architecture {arch!r}: its head count is not recorded (no model_args "
        f"num_heads, no family fact, and width {width}, depth {depth}, MLP {mlp_dim} is "
        "no VARIANTS shape). Convert the timm module instead, which records it: "
        f"kvs.convert.from_timm(timm.create_model({arch!r}, pretrained=True)), or add "
        "'num_heads' to the repo's model_args.")
