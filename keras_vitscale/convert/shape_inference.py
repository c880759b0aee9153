"""What a checkpoint's shapes imply: a variant's shape fields, the image grid.

Shared by the converters that infer a `ViTConfig` from arrays (big_vision,
timm, transformers): `variant_fields` says what `variant="B/16"` fixes, and
`infer_grid` reads the image size and whether the position embedding covers
the prefix tokens from the embedding's length.

Example:
```python
infer_grid(197, 1, (16, 16))   # ((224, 224), True): a class token with a position
```
"""

import math

from keras_vitscale.config import ViTConfig, parse_variant

# What `variant=` fixes in a converter.
_SHAPE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


def variant_fields(variant):
    """The `ViTConfig` shape fields a `variant=` argument fixes, as a dict.

    Width, depth, MLP width and heads always; the patch size only when the
    variant names one ("B/16", not "B"). Everything else (pooling, class
    token, head, image size) stays what the checkpoint says.

    Example:
    ```python
    variant_fields("B/16")   # {'width': 768, ..., 'patch_size': (16, 16), 'variant': 'B/16'}
    ```
    """
    reference = ViTConfig.from_variant(variant)
    fields = {f: getattr(reference, f) for f in _SHAPE_FIELDS
              if f != "patch_size" or parse_variant(variant)[1] is not None}
    fields["variant"] = str(variant)
    return fields


def infer_grid(length, prefix_tokens, patch, image_size=None, key="position embedding"):
    """(image_size, posemb_covers_class_token) from a position-embedding length.

    Args:
        length: positions in the stored embedding.
        prefix_tokens: the class and register tokens before the patches
            (an int; a bool for "has a class token"), which may own positions.
        patch: (ph, pw).
        image_size: the training size when known (required for non-square
            grids); then only the prefix-token question is answered.
        key: the checkpoint's name for the embedding, for messages.

    Example:
    ```python
    infer_grid(197, 1, (16, 16))   # ((224, 224), True)
    infer_grid(1369, 5, (14, 14))  # ((518, 518), False): DINOv2 reg4
    ```
    """
    prefix = int(prefix_tokens)
    tokens = f" (+{prefix} prefix token{'s' if prefix > 1 else ''})" if prefix else ""
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        patches = (h // patch[0]) * (w // patch[1])
        if length == patches or (prefix and length == patches + prefix):
            return (h, w), length != patches
        raise ValueError(
            f"{key} has {length} positions but image_size {(h, w)} with patch {patch} "
            f"gives {patches} patches{tokens}; pass the image size the checkpoint was "
            "trained at, then resample with ViT.from_preset(..., image_size=...).")
    # Prefix tokens with their own positions first: 197 = 14*14 + 1 reads as
    # a 14x14 grid, not as a 197-patch strip (which no square side gives).
    for covers in (True, False) if prefix and length > prefix else (False,):
        side = math.isqrt(length - prefix * covers)
        if side * side == length - prefix * covers:
            return (side * patch[0], side * patch[1]), covers
    raise ValueError(
        f"{key} length {length} is not a square grid"
        f"{f' (with or without {prefix} prefix-token position(s))' if prefix else ''}; "
        "pass image_size=(height, width) for a non-square checkpoint.")
