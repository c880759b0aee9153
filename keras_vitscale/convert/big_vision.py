"""big_vision / original ViT .npz checkpoints -> kvs.ViT with the same logits.

The .npz holds flat "/"-joined parameter names, as big_vision's
`save_checkpoint` writes a flax tree with `np.savez`:
"embedding/kernel" (ph, pw, C, D), "cls", "pos_embedding",
"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/query/kernel"
(D, heads, head_dim), ..., "Transformer/encoder_norm/scale", "MAPHead_0/...",
"pre_logits/...", "head/...". Also read:
- scanned encoders (`scan=True`): one "Transformer/encoderblock/..." tree
  whose arrays carry a leading depth axis;
- the original ViT repository's names (posemb in
  "Transformer/posembed_input", blocks numbered LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) and the pre-2022
  "Transformer/pos_embedding";
- a position embedding that covers the class token (old checkpoints: N + 1
  positions), kept as `posemb_covers_class_token=True` rather than folded in;
- the MAP head inlined at the top level (ViT-G development checkpoints);
- bfloat16 arrays, which np.savez stores as 2-byte "void" (and uint16 bit
  patterns, as timm's `load_bfloat16` reads them: a ViT has no integer
  parameters);
- whole training checkpoints ("params/..." or "opt/target/...") and
  sub-trees by big_vision's "file.npz:sub/tree" syntax, e.g.
  "siglip.npz:params/img" for a two-tower model's image encoder.

Numerics are big_vision's: tanh GELU and LayerNorm epsilon 1e-6 (flax
defaults); pass `gelu="exact"` for a checkpoint trained with exact GELU.

Example:
```python
from keras_vitscale import convert
model = convert.from_big_vision("vit_s16_i1k_300ep.npz")             # shapes inferred
model = convert.from_big_vision("ckpt.npz", variant="B/16")          # shapes checked
tower = convert.from_big_vision("siglip.npz:params/img", num_classes=0)
```
"""

import re

import numpy as np

from keras_vitscale.config import ViTConfig
from keras_vitscale.convert.common import Source, build_model, gather_weights
from keras_vitscale.convert.shape_inference import infer_grid, variant_fields
from keras_vitscale.convert.files import read_npz

_POSEMB_KEYS = ("pos_embedding", "Transformer/pos_embedding",
                "Transformer/posembed_input/pos_embedding")
_SCANNED = "Transformer/encoderblock/"
_PARAM = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias"}


def from_big_vision(path, variant=None, *, name="vit", dtype=None, verbose=False,
                    **overrides):
    """Builds the `kvs.ViT` of a big_vision .npz checkpoint and copies its weights.

    Args:
        path: the .npz file, optionally followed by ":sub/tree" to read one
            part of it ("ckpt.npz:params/img"); training checkpoints are
            unwrapped from "params/" or "opt/target/" automatically.
        variant: e.g. "B/16"; then width, depth, MLP, heads and patch come
            from the variant and a checkpoint of another shape is an error
            listing the mismatches. None infers them from the arrays.
        name: the Keras model name.
        dtype: dtype or dtype policy of the Keras model.
        verbose: show a progress bar over the weight copy.
        **overrides: `ViTConfig` fields. Needed where arrays cannot tell:
            `image_size` for sincos2d (no stored posemb) or a non-square grid,
            `pooling` "none" (or "gap", the default) for a model with neither
            class token nor MAP head, `gelu="exact"`. `num_classes=0` drops
            the head; another class count gets a fresh head.

    Returns:
        A `kvs.ViT` whose outputs match the checkpoint's in float32.

    Example:
    ```python
    model = from_big_vision("vit_b16.npz", variant="B/16", image_size=384)
    ```
    """
    params = load_npz(path)
    num_classes = overrides.pop("num_classes", None)
    config = config_from_params(params, variant, **overrides)
    from keras_vitscale.model import ViT

    return build_model(ViT, config, num_classes,
                       lambda config, drop_head: convert_params(params, config, drop_head),
                       source_name="from_big_vision", name=name, dtype=dtype, verbose=verbose)


# ---- reading ---------------------------------------------------------------
def load_npz(path):
    """{name: array} of a big_vision .npz, narrowed to the model's parameters.

    Args:
        path: "file.npz" or "file.npz:sub/tree" (big_vision's syntax).

    Returns:
        Flat names relative to the model root ("embedding/kernel", ...), in
        the per-layer layout: scanned encoder blocks are split into
        "encoderblock_{i}" views and an inlined MAP head is moved under
        "MAPHead_0/".

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file, or no ViT parameters at
            the chosen root (the message lists the roots that exist).
    """
    return _fix_layout(read_npz(path).arrays)


def _fix_layout(params):
    """Renames the older layouts to the per-layer big_vision one."""
    # ViT-G development checkpoints had the MAP head's modules at the top.
    if "probe" in params:
        head = ("probe", "MlpBlock_0/", "MultiHeadDotProductAttention_0/", "LayerNorm_0/")
        params = {("MAPHead_0/" + k if k.startswith(head) else k): v
                  for k, v in params.items()}
    scanned = {k: v for k, v in params.items() if k.startswith(_SCANNED)}
    if scanned:
        depth = {v.shape[0] for v in scanned.values()}
        if len(depth) != 1:
            raise ValueError(f"The scanned encoder's arrays disagree on the depth axis: "
                             f"{sorted(depth)}; the checkpoint is inconsistent.")
        # Slicing a numpy array is a view: no copy of the weights here.
        params = {k: v for k, v in params.items() if not k.startswith(_SCANNED)}
        for key, value in scanned.items():
            rest = key[len(_SCANNED):]
            for i in range(value.shape[0]):
                params[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    return params


# ---- settings ----------------------------------------------------------------
def _posemb_key(params):
    found = [k for k in _POSEMB_KEYS if k in params]
    return found[0] if found else None


def _block_modules(params):
    """Sub-module names in block 0: (norm_1, attention, norm_2, mlp).

    big_vision numbers them LayerNorm_0, MultiHeadDotProductAttention_0,
    LayerNorm_1, MlpBlock_0; the original ViT code LayerNorm_0,
    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3.
    """
    names = {k.split("/")[2] for k in params if k.startswith("Transformer/encoderblock_0/")}
    norms = sorted((n for n in names if n.startswith("LayerNorm_")), key=lambda n: int(n[10:]))
    attn = [n for n in names if n.startswith("MultiHeadDotProductAttention_")]
    mlp = [n for n in names if n.startswith("MlpBlock_")]
    if len(norms) != 2 or len(attn) != 1 or len(mlp) != 1:
        raise ValueError(
            "Transformer/encoderblock_0 is not a pre-LN ViT block (two LayerNorms, one "
            f"MultiHeadDotProductAttention, one MlpBlock); it has {sorted(names)}.")
    return norms[0], attn[0], norms[1], mlp[0]


def config_from_params(params, variant=None, **overrides):
    """The `ViTConfig` of a big_vision parameter dict (from `load_npz`).

    Args:
        params: `{name: array}` relative to the model root.
        variant: fixes width, depth, mlp_dim, heads (and patch, if given);
            None reads them from the arrays.
        **overrides: `ViTConfig` fields that win over what the arrays say.
    """
    if "Transformer/encoderblock_0/LayerNorm_0/scale" not in params:
        raise ValueError("The checkpoint has no Transformer/encoderblock_0 (nor a scanned "
                         "Transformer/encoderblock); nothing to convert.")
    _, attn, _, mlp = _block_modules(params)
    block = "Transformer/encoderblock_0/"
    ph, pw, channels, width = params["embedding/kernel"].shape
    num_heads = params[f"{block}{attn}/query/kernel"].shape[1]
    has_cls, has_map = "cls" in params, "MAPHead_0/probe" in params
    fields = dict(
        width=width, mlp_dim=params[f"{block}{mlp}/Dense_0/kernel"].shape[1],
        depth=len({k.split("/")[1] for k in params if k.startswith("Transformer/encoderblock_")}),
        num_heads=num_heads, patch_size=(ph, pw), in_channels=channels,
        class_token=has_cls, pooling="map" if has_map else "tok" if has_cls else "gap",
        num_classes=params["head/kernel"].shape[-1] if "head/kernel" in params else 0,
        representation_size=(params["pre_logits/kernel"].shape[-1]
                             if "pre_logits/kernel" in params else None),
        # flax's nn.gelu and nn.LayerNorm defaults, which big_vision uses.
        gelu="tanh", layer_norm_epsilon=1e-6, norm_position="before_pool")
    if variant is not None:
        fields.update(variant_fields(variant))
    key = _posemb_key(params)
    image_size = overrides.get("image_size")
    if key is not None:
        patch = overrides.get("patch_size", fields["patch_size"])
        fields["posemb"] = "learn"
        fields["image_size"], fields["posemb_covers_class_token"] = infer_grid(
            params[key].shape[1], has_cls, (patch, patch) if isinstance(patch, int) else patch,
            image_size, key=key)
    else:
        if image_size is None:
            raise ValueError(
                "The checkpoint stores no position embedding, so it used big_vision's "
                "fixed posemb='sincos2d' and does not record its image size; pass "
                "image_size=(height, width) (e.g. 224).")
        fields["posemb"] = "sincos2d"
    fields.update(overrides)
    return ViTConfig(**fields)


# ---- weights ---------------------------------------------------------------
def convert_params(params, config, drop_head=False):
    """{variable path: float32 array} for every variable `config` builds.

    Args:
        params: `{name: array}` from `load_npz`.
        config: the target `ViTConfig`.
        drop_head: leave the head out (a fresh one of another size, or none).

    Raises:
        ValueError: listing unused checkpoint keys, missing ones and the first
            shape mismatches.
    """
    norm_1, attn, norm_2, mlp = _block_modules(params)
    posemb = _posemb_key(params)
    d, h, dh = config.width, config.num_heads, config.head_dim

    def flat_in(*arrays):  # (D, H, dh) projections -> (D, H*dh), head-major
        return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)

    def flat_bias(*arrays):  # (H, dh) -> (H*dh,)
        return np.concatenate([a.reshape(-1) for a in arrays])

    def copy(a):
        return a

    def attention(prefix, param, parts):
        keys = tuple(f"{prefix}/{part}/{_PARAM[param]}" for part in parts)
        if param == "kernel":
            return Source(keys, ((d, h, dh),) * len(keys), flat_in)
        return Source(keys, ((h, dh),) * len(keys), flat_bias)

    def recipe(path, shape):
        layer, param = path.rsplit("/", 1)
        if path == "class_token/token":
            return Source(("cls",), (shape,), copy)
        if path == "position_embedding/embedding":
            return Source((posemb or "pos_embedding",), (shape,), copy)
        if path == "map_head/probe":
            return Source(("MAPHead_0/probe",), (shape,), copy)
        match = re.fullmatch(r"encoder_block_(\d+)/(.+)", layer)
        if match:
            prefix, part = f"Transformer/encoderblock_{match.group(1)}", match.group(2)
            mha = f"{prefix}/{attn}"
        elif layer.startswith("map_head/"):
            prefix, part = "MAPHead_0", layer[len("map_head/"):]
            mha = f"{prefix}/MultiHeadDotProductAttention_0"
        else:
            prefix, part, mha = "", layer, None
        if part in ("attention/qkv", "query"):
            return attention(mha, param, ("query", "key", "value") if "qkv" in part
                             else ("query",))
        if part == "key_value":
            return attention(mha, param, ("key", "value"))
        if part in ("attention/out", "out"):
            if param == "kernel":
                return Source((f"{mha}/out/kernel",), ((h, dh, d),),
                              lambda a: a.reshape(h * dh, d))
            return Source((f"{mha}/out/bias",), (shape,), copy)
        names = {"patch_embedding": "embedding", "encoder_norm": "Transformer/encoder_norm",
                 "norm_1": norm_1, "norm_2": norm_2, "norm": "LayerNorm_0",
                 "mlp/dense_1": f"{mlp}/Dense_0", "mlp/dense_2": f"{mlp}/Dense_1",
                 "pre_logits": "pre_logits", "head": "head"}
        if layer.startswith("map_head/mlp/"):  # the MAP head's MLP is MlpBlock_0
            names["mlp/dense_1"], names["mlp/dense_2"] = "MlpBlock_0/Dense_0", "MlpBlock_0/Dense_1"
        if part not in names:
            raise ValueError(
                f"Variable {path!r} has no big_vision equivalent (config block "
                f"{config.block!r}, qk_norm {config.qk_norm}); big_vision's ViT has "
                "pre-LN blocks without qk-norm. Drop the override that adds it.")
        key = "/".join(filter(None, (prefix, names[part], _PARAM[param])))
        return Source((key,), (shape,), copy)

    return gather_weights(
        config, params, recipe, source_name="big_vision",
        skip=("head/",) if drop_head else (),
        # With num_classes=0 the config has no head for these keys to fill.
        ignored={k: "the source's head, replaced" for k in ("head/kernel", "head/bias")}
        if drop_head else None,
        hint="Check variant= and the overrides (image_size, pooling), or leave out "
             "variant= to read the shapes from the checkpoint.")

