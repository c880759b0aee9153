"""timm VisionTransformer -> kvs.ViT with the same logits.

A timm module tells us its settings (LayerNorm epsilon, GELU flavour, pooling,
position-embedding order); a bare state dict only has shapes, so the rest
falls back to timm's defaults (exact GELU, epsilon 1e-6) unless overridden.

The names and layouts are in `timm_layout.py` (no torch needed), reading a
live module's settings and building a timm module for a config in
`timm_module.py`, reading checkpoint files and timm's cache in `files.py`.

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

from keras_vitscale.convert.common import build_model
from keras_vitscale.convert.timm_layout import config_from_state_dict, convert_state_dict
from keras_vitscale.convert.timm_module import config_from_module

logger = logging.getLogger("keras_vitscale")

# Overrides that change training behaviour only, not what the model computes
# at inference: no warning when they differ from the timm module.
_INFERENCE_NEUTRAL = {"dropout_rate", "remat", "head_zero_init", "head_bias_init", "variant"}


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
            "keras_vitscale.convert.files.load_state_dict(path) first.")
    from keras_vitscale.model import ViT

    return build_model(ViT, config, num_classes,
                       lambda config, drop_head: convert_state_dict(state_dict, config, drop_head),
                       source_name="from_timm", name=name, dtype=dtype, verbose=verbose)


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
