"""OpenCLIP checkpoints seen in timm's layout: the image tower, renamed and reshaped.

Some timm repos hold only OpenCLIP's file (open_clip_model.safetensors), whose
image tower is `visual.*` in OpenCLIP's names. timm loads it by renaming
(conv1 -> patch_embed.proj, ln_pre -> norm_pre, transformer.resblocks.N ->
blocks.N, in_proj -> attn.qkv, c_fc/c_proj -> mlp.fc1/fc2, ln_post -> norm),
reshaping the class and position embeddings, transposing the projection
`proj` into `head.weight` and giving it a zero `head.bias`. `timm_view` does
the same lazily: a mapping in timm's names whose tensors are read from the
file one lookup at a time, so `timm_layout` converts it like any timm state
dict. The text tower and logit scale are not part of the view.

Example:
```python
state = SafetensorsReader("open_clip_model.safetensors")
if is_open_clip(state):
    state = timm_view(state)          # "cls_token", "blocks.0.attn.qkv.weight", ...
```
"""

import collections.abc
import logging

import numpy as np

from keras_vitscale.convert.common import shapes_of

logger = logging.getLogger("keras_vitscale")

# OpenCLIP's name pieces -> timm's, applied in order (after "visual." is cut).
_SWAPS = (
    ("conv1", "patch_embed.proj"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_post", "norm"),
    ("ln_1", "norm1"),
    ("ln_2", "norm2"),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj", "attn.proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
# OpenCLIP towers built from a timm trunk keep timm's names under this prefix.
_TRUNK = "visual.trunk."


def is_open_clip(source):
    """Whether a state dict (or its shapes) is an OpenCLIP model with an image tower."""
    keys = set(source)
    return "visual.class_embedding" in keys or any(k.startswith(_TRUNK) for k in keys)


class TimmView(collections.abc.Mapping):
    """An OpenCLIP state dict's image tower under timm's names, read on lookup.

    Args:
        source: the OpenCLIP state dict (a lazy reader keeps it lazy).

    Example:
    ```python
    view = TimmView(reader)
    view.shapes["head.weight"]     # (embed_dim, width): visual.proj transposed
    ```
    """

    def __init__(self, source):
        self._source = source
        shapes = shapes_of(source)
        self._entries = {}  # timm name -> (source key or None, transform)
        self.shapes = {}
        trunk = any(k.startswith(_TRUNK) for k in shapes)
        for key, shape in shapes.items():
            new, transform, new_shape = _rename(key, shape, trunk)
            if new is None:
                continue
            self._entries[new] = (key, transform)
            self.shapes[new] = new_shape
        if "head.weight" in self.shapes and "head.bias" not in self.shapes:
            # timm's OpenCLIP loader gives the bias-free projection a zero bias.
            self._entries["head.bias"] = (None, None)
            self.shapes["head.bias"] = (self.shapes["head.weight"][0],)
        left = len(shapes) - len([e for e in self._entries.values() if e[0] is not None])
        logger.info("OpenCLIP checkpoint: %d image-tower tensors in timm's names; %d "
                    "others (text tower, logit scale) left out", len(self.shapes), left)

    def __getitem__(self, name):
        key, transform = self._entries[name]
        if key is None:
            return np.zeros(self.shapes[name], "float32")
        value = self._source[key]
        return transform(value) if transform else value

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


def _rename(key, shape, trunk):
    """(timm name, transform or None, its shape) of an OpenCLIP key, or (None, ...)."""
    if trunk:
        if key == "visual.head.proj.weight":
            return "head.weight", None, shape
        if key.startswith(_TRUNK):
            return key[len(_TRUNK):], None, shape
        return None, None, None
    if not key.startswith("visual."):
        return None, None, None
    name = key[len("visual."):]
    if name == "class_embedding":  # (D,) -> (1, 1, D)
        return "cls_token", lambda v: v.reshape(1, 1, -1), (1, 1, *shape)
    if name == "positional_embedding":  # (L, D) -> (1, L, D)
        return "pos_embed", lambda v: v.reshape(1, *v.shape), (1, *shape)
    if name == "proj":  # (D, E), applied as x @ proj -> timm's Linear (E, D)
        return "head.weight", lambda v: v.T, tuple(shape[::-1])
    for old, new in _SWAPS:
        name = name.replace(old, new)
    # Anything unknown (an attention pool, ...) stays, named, and is then
    # refused as a leftover by the conversion.
    return name, None, shape


def timm_view(source):
    """`TimmView(source)`: an OpenCLIP state dict's image tower in timm's layout."""
    return TimmView(source)
