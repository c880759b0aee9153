"""Hugging Face transformers ViT -> kvs.ViT with the same outputs.

Reads `ViTForImageClassification` and `ViTModel`, either as a model object or
as a saved directory (config.json plus model.safetensors, or sharded
model-0000N-of-0000M.safetensors with its index). A directory is read
without importing transformers or torch.

The mapping: patch_embeddings.projection (a conv, OIHW) -> patch_embedding;
cls_token; position_embeddings (which cover the class token, so
`posemb_covers_class_token=True`); each layer's separate query/key/value
Linears -> our fused qkv, attention.output.dense -> attention/out,
layernorm_before/after -> norm_1/norm_2, intermediate.dense and output.dense
-> the MLP; the final `layernorm` -> encoder_norm; `classifier` -> head.
GELU flavour and LayerNorm epsilon come from the config (transformers'
default epsilon is 1e-12, not 1e-6).

`ViTForImageClassification` classifies the class token after the final
LayerNorm, which is our pooling="tok". `ViTModel` also has a pooler (tanh
dense on that token), which that classifier never uses. By default it is
left out (and logged), so the model's features are `last_hidden_state[:, 0]`;
`use_pooler=True` keeps it as our `pre_logits` (`representation_size`), so
the features are `pooler_output`.

Files written by transformers 4 and 5 use the names
"vit.encoder.layer.{i}.attention.attention.query.weight", ...; a live
transformers 5 model renames them ("vit.layers.{i}.attention.q_proj.weight");
both are read.

Example:
```python
from keras_vitscale import convert
model = convert.from_transformers("path/to/vit-base-patch16-224")   # a directory
model = convert.from_transformers(hf_model)                         # a model object
features = convert.from_transformers(vit_model, num_classes=0)      # class token
```
"""

import re

import numpy as np

from keras_vitscale.config import ViTConfig
from keras_vitscale.convert.common import (RenamedSource, Source, build_model, gather_weights,
                                           shapes_of)
from keras_vitscale.convert.shape_inference import variant_fields
from keras_vitscale.convert.files import read_transformers_directory

# transformers 5's in-memory names -> the names its files use (and v4's).
_V5_TO_FILE = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.([qkv])_proj\.", lambda m: ".attention.attention."
     + {"q": "query", "k": "key", "v": "value"}[m.group(1)] + "."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)
_ACTIVATIONS = {"gelu": "exact", "gelu_python": "exact", "gelu_new": "tanh",
                "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")
_PARAM = {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias"}


def from_transformers(source, variant=None, *, use_pooler=False, name="vit", dtype=None,
                      verbose=False, **overrides):
    """Builds the `kvs.ViT` of a transformers ViT and copies its weights.

    Args:
        source: a `ViTForImageClassification` or `ViTModel` object, or the
            directory `save_pretrained` wrote (safetensors; a .safetensors
            file inside it also works).
        variant: e.g. "B/16"; then width, depth, MLP, heads and patch come
            from the variant and a checkpoint of another shape is an error
            listing the mismatches. None reads them from the config.
        use_pooler: keep `ViTModel`'s tanh pooler as `pre_logits`, so that
            features equal `pooler_output`; False leaves it out and the
            features are `last_hidden_state[:, 0]`.
        name: the Keras model name.
        dtype: dtype or dtype policy of the Keras model.
        verbose: show a progress bar over the weight copy.
        **overrides: `ViTConfig` fields. `num_classes=0` drops the
            classifier; another class count gets a fresh head.

    Returns:
        A `kvs.ViT` whose logits (or features) match the source's in float32.

    Example:
    ```python
    model = from_transformers("vit-tiny-dir", num_classes=10)   # fresh 10-class head
    ```
    """
    hf_config, state = load_checkpoint(source)
    num_classes = overrides.pop("num_classes", None)
    config = config_from_hf(hf_config, state, variant, use_pooler=use_pooler, **overrides)
    from keras_vitscale.model import ViT

    return build_model(
        ViT, config, num_classes,
        lambda config, drop_head: convert_state(state, config, drop_head, use_pooler),
        source_name="from_transformers", name=name, dtype=dtype, verbose=verbose)


# ---- reading ---------------------------------------------------------------
def load_checkpoint(source):
    """(config dict, {file-format name: array}) of a model object or directory.

    Args:
        source: a `ViTForImageClassification` / `ViTModel` object, or the
            directory `save_pretrained` wrote (or a file inside it).

    Raises:
        ValueError: a truncated or corrupt safetensors file, a missing
            config.json, or only pickled (.bin) weights.
    """
    if hasattr(source, "state_dict"):  # a model object, not a path
        kind = type(source).__name__
        if kind not in _ARCHITECTURES or not hasattr(source, "config"):
            raise TypeError(f"from_transformers converts {' and '.join(_ARCHITECTURES)}; got "
                            f"{kind}. Other ViT-like models (DeiT, BEiT, Dinov2) have "
                            "extra tokens or layers that ViTConfig does not express.")
        return source.config.to_dict(), _file_names(source.state_dict())
    hf_config, state = read_transformers_directory(source)
    return hf_config, _file_names(state)


def _file_names(state):
    """Renames keys to the file format and drops the "vit." prefix."""
    def rename(key):
        key = key[len("vit."):] if key.startswith("vit.") else key
        for pattern, replacement in _V5_TO_FILE:
            key = re.sub(pattern, replacement, key)
        return key

    return RenamedSource(state, rename)  # still read one tensor per lookup


# ---- settings ----------------------------------------------------------------
def config_from_hf(hf_config, state, variant=None, use_pooler=False, **overrides):
    """The `ViTConfig` of a transformers ViT config dict and its weights.

    Args:
        hf_config: `config.to_dict()` or the parsed config.json.
        state: `{name: array}` from `load_checkpoint` (whether a classifier
            and a pooler exist is read from the weights).
        variant: fixes width, depth, mlp_dim, heads (and patch, if given).
        use_pooler: keep the pooler as `pre_logits`.
        **overrides: `ViTConfig` fields that win.
    """
    c = hf_config
    if c.get("model_type") != "vit":
        raise ValueError(f"config.json has model_type {c.get('model_type')!r}; "
                         "from_transformers reads model_type 'vit' only.")
    act = c.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not a GELU ViTConfig can express; "
                         f"supported: {sorted(_ACTIVATIONS)}.")
    heads, width = c["num_attention_heads"], c["hidden_size"]
    if c.get("head_dim") not in (None, width // heads):
        raise ValueError(f"head_dim {c['head_dim']} * {heads} heads != hidden_size {width}; "
                         "ViTConfig needs width = heads * head_dim.")
    shapes = shapes_of(state)  # from the file headers: nothing is read
    representation = None
    if use_pooler:
        if "pooler.dense.weight" not in state:
            raise ValueError("use_pooler=True, but the checkpoint has no pooler (only "
                             "ViTModel with add_pooling_layer=True has one).")
        if c.get("pooler_act", "tanh") != "tanh":
            raise ValueError(f"pooler_act {c['pooler_act']!r}: our pre_logits is a tanh "
                             "dense; use use_pooler=False.")
        representation = shapes["pooler.dense.weight"][0]
    fields = dict(
        width=width, depth=c["num_hidden_layers"], mlp_dim=c["intermediate_size"],
        num_heads=heads, patch_size=c["patch_size"], image_size=c["image_size"],
        in_channels=c.get("num_channels", 3), pooling="tok", class_token=True,
        posemb="learn", posemb_covers_class_token=True, qkv_bias=c.get("qkv_bias", True),
        layer_norm_epsilon=c.get("layer_norm_eps", 1e-12), gelu=_ACTIVATIONS[act],
        norm_position="before_pool", representation_size=representation,
        num_classes=(shapes["classifier.weight"][0]
                     if "classifier.weight" in state else 0))
    if variant is not None:
        fields.update(variant_fields(variant))
    fields.update(overrides)
    return ViTConfig(**fields)


# ---- weights ---------------------------------------------------------------
def convert_state(state, config, drop_head=False, use_pooler=False):
    """{variable path: float32 array} for every variable `config` builds.

    Raises:
        ValueError: listing unused keys, missing ones and the first shape
            mismatches.
    """
    d = config.width

    def linear(module, param, shape):  # Linear weights are (out, in); norms as is
        key = f"{module}.{_PARAM[param]}"
        if param == "kernel":
            return Source((key,), (shape[::-1],), lambda w: w.T)
        return Source((key,), (shape,), lambda b: b)

    def recipe(path, shape):
        layer, param = path.rsplit("/", 1)
        if path == "patch_embedding/kernel":
            ph, pw, ch, _ = shape
            return Source(("embeddings.patch_embeddings.projection.weight",), ((d, ch, ph, pw),),
                          lambda w: w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        if path == "class_token/token":
            return Source(("embeddings.cls_token",), (shape,), lambda a: a)
        if path == "position_embedding/embedding":
            return Source(("embeddings.position_embeddings",), (shape,), lambda a: a)
        match = re.fullmatch(r"encoder_block_(\d+)/(.+)", layer)
        part = match.group(2) if match else layer
        block = f"encoder.layer.{match.group(1)}" if match else ""
        if part == "attention/qkv":
            keys = tuple(f"{block}.attention.attention.{n}.{_PARAM[param]}"
                         for n in ("query", "key", "value"))
            if param == "kernel":
                return Source(keys, ((d, d),) * 3, lambda *ws: np.concatenate(
                    [w.T for w in ws], axis=1))
            return Source(keys, ((d,),) * 3, lambda *bs: np.concatenate(bs))
        modules = {"patch_embedding": "embeddings.patch_embeddings.projection",
                   "attention/out": "attention.output.dense", "norm_1": "layernorm_before",
                   "norm_2": "layernorm_after", "mlp/dense_1": "intermediate.dense",
                   "mlp/dense_2": "output.dense", "encoder_norm": "layernorm",
                   "pre_logits": "pooler.dense", "head": "classifier"}
        if part not in modules:
            raise ValueError(f"Variable {path!r} has no transformers ViT equivalent "
                             f"(pooling {config.pooling!r}, block {config.block!r}, qk_norm "
                             f"{config.qk_norm}); drop the override that adds it.")
        return linear(f"{block}.{modules[part]}" if block else modules[part], param, shape)

    ignored = {"embeddings.mask_token": "used only for masked-image-modeling inputs"}
    if not use_pooler:
        ignored.update({f"pooler.dense.{p}": "ViTModel's pooler; use_pooler=True keeps it"
                        for p in ("weight", "bias")})
    if drop_head:  # with num_classes=0 the config has no head for these keys to fill
        ignored.update({f"classifier.{p}": "the source's head, replaced"
                        for p in ("weight", "bias")})
    return gather_weights(
        config, state, recipe, source_name="transformers",
        skip=("head/",) if drop_head else (), ignored=ignored,
        hint="Check variant= and the overrides, or leave out variant= to read the shapes "
             "from config.json.")

