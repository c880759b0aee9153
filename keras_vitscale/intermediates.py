"""Per-block features of a `kvs.ViT`: timm's `forward_intermediates`, channels last.

Dense prediction (segmentation, depth) and retrieval read the token grids of
chosen encoder blocks, and often the final embedding beside them. A ViT is a
Keras functional model, so these come from a functional sub-model wired out
of the ViT's own graph: it shares the ViT's layers and weights, runs on every
backend, and (built once per argument set) can be jit-compiled or used in
`predict` like any Keras model.

Semantics follow timm's `VisionTransformer.forward_intermediates`:
- `indices`: None takes every block, an int n the last n blocks, a list those
  blocks (negative counts from the end). Features come in block order, each
  block once, whatever the order of the list.
- `norm=True` passes each taken block's tokens through the final LayerNorm
  ("encoder_norm"). A model whose final norm comes after pooling
  (`norm_position="after_pool"`, timm's `fc_norm`) has no token norm in timm
  (its `norm` is Identity), so there `norm=True` leaves the tokens as they
  are; a "vanilla" model has no LayerNorm at all and refuses `norm=True`.
- The prefix tokens (class and register tokens) are split off; the patch
  tokens become a (B, gh, gw, D) grid ("NHWC", timm's NCHW transposed) or
  stay (B, L, D) ("NLC").
- The final output is the model's own output (logits; the projection of a
  CLIP-style tower whose head is the projection; the pooled features of a
  headless model), i.e. timm's `forward_head(forward_intermediates(x)[0])`;
  `pre_logits=True` gives the features the head reads instead.
- `stop_early=True` runs no block after the last taken one. With the final
  output requested it is, as in timm, the head applied to that block's
  tokens (the model truncated there), not the full model's output.
"""

import numbers
import weakref

import keras
from keras import ops

OUTPUT_FORMATS = ("NHWC", "NLC")

# ViT -> {argument tuple: sub-model}. Kept outside the ViT: an attribute of a
# keras.Model holding models would be tracked as sub-layers (and serialised).
_CACHE = weakref.WeakKeyDictionary()


def take_indices(depth, indices=None):
    """The absolute block indices `indices` selects, sorted and unique.

    Args:
        depth: the number of encoder blocks.
        indices: None (all blocks), an int n (the last n blocks) or a
            sequence of block indices (negative ones count from the end).

    Returns:
        A tuple of ints in [0, depth), ascending.

    Raises:
        ValueError: for an n or an index outside the model's blocks, or an
            empty sequence; the message names the value and the valid range.

    Example:
    ```python
    take_indices(12, 3)          # (9, 10, 11)
    take_indices(12, [-1, 2])    # (2, 11)
    ```
    """
    if indices is None:
        return tuple(range(depth))
    if _is_int(indices):
        n = int(indices)
        if not 0 < n <= depth:
            raise ValueError(
                f"indices={n} asks for the last {n} blocks, but the model has {depth}; "
                f"pass an int from 1 to {depth}, or a list of block indices.")
        return tuple(range(depth - n, depth))
    try:
        chosen = list(indices)
    except TypeError:
        raise TypeError(
            f"indices must be None, an int (the last n blocks) or a list of block "
            f"indices; got {type(indices).__name__} {indices!r}.") from None
    if not chosen:
        raise ValueError("indices=[] selects no block; pass None for all blocks, or "
                         f"block indices from {-depth} to {depth - 1}.")
    taken = set()
    for index in chosen:
        if not _is_int(index):
            raise TypeError(f"indices must hold ints; got {index!r} in {indices!r}.")
        if not -depth <= int(index) < depth:
            raise ValueError(
                f"Block index {int(index)} in indices={list(chosen)!r} is out of range: "
                f"the model has {depth} blocks, so use indices from {-depth} to "
                f"{depth - 1} (negative ones count from the end).")
        taken.add(int(index) % depth)
    return tuple(sorted(taken))


def _is_int(value):
    # numpy integers count; bool is an int to Python, but True as "the last 1
    # block" would be a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(model, norm, output_fmt, intermediates_only, pre_logits):
    if output_fmt not in OUTPUT_FORMATS:
        hint = (" This library is channels-last: ask for 'NHWC' and transpose with "
                "(0, 3, 1, 2) for timm's NCHW layout." if output_fmt == "NCHW" else "")
        raise ValueError(f"output_fmt must be one of {list(OUTPUT_FORMATS)}; got "
                         f"{output_fmt!r}.{hint}")
    if norm and model.config.block == "vanilla":
        raise ValueError(
            "norm=True applies the final LayerNorm, but a block='vanilla' model "
            "(SimplEsT-ViT) has none; call with norm=False.")
    if pre_logits and intermediates_only:
        raise ValueError(
            "pre_logits=True chooses the final output, which intermediates_only=True "
            "leaves out; drop one of them.")


def _layer_output(model, name):
    """The tensor a layer gives in the ViT's own graph (its first call)."""
    return model.get_layer(name).output


def _pre_logits(model):
    """The features the head reads (after pooling, norm, representation)."""
    if not model.config.num_classes:
        return model.outputs[0]
    return model.get_layer("head_dropout").input


def intermediates_model(model, indices=None, norm=False, output_fmt="NHWC",
                        stop_early=False, intermediates_only=False,
                        return_prefix_tokens=False, pre_logits=False):
    """A Keras model: images -> the outputs of `forward_intermediates`.

    It shares the ViT's layers and weights (training it trains the ViT) and
    is built once per argument set. Use it where a compiled call matters:
    `predict`, or inside a larger functional model.

    Args:
        model: a `kvs.ViT`.
        indices, norm, output_fmt, stop_early, intermediates_only,
        return_prefix_tokens, pre_logits: as `forward_intermediates`.

    Returns:
        A `keras.Model` whose output is `[feature, ...]`, or
        `(final, [feature, ...])`; each feature is `(patches, prefix)` with
        `return_prefix_tokens` on a model with prefix tokens.

    Example:
    ```python
    features = intermediates_model(vit, indices=[3, 7, 11], intermediates_only=True)
    grids = features.predict(images)   # three (B, 14, 14, 768) arrays for B/16
    ```
    """
    taken = take_indices(model.config.depth, indices)
    _check_arguments(model, norm, output_fmt, intermediates_only, pre_logits)
    key = (taken, bool(norm), output_fmt, bool(stop_early), bool(intermediates_only),
           bool(return_prefix_tokens), bool(pre_logits))
    cache = _CACHE.setdefault(model, {})
    if key not in cache:
        cache[key] = _build(model, *key)
    return cache[key]


def _build(model, taken, norm, output_fmt, stop_early, intermediates_only,
           return_prefix_tokens, pre_logits):
    c = model.config
    prefix = c.num_prefix_tokens  # class and register tokens
    # timm's fc_norm models keep no token norm (their `norm` is Identity).
    token_norm = norm and c.norm_position == "before_pool"
    features = []
    for i in taken:
        x = _layer_output(model, f"encoder_block_{i}")
        if token_norm:
            # A second call of the ViT's own LayerNorm: same weights, a new node.
            x = model.get_layer("encoder_norm")(x)
        patches = x[:, prefix:] if prefix else x
        if output_fmt == "NHWC":
            patches = ops.reshape(patches, (-1, *c.grid_size, c.width))
        if return_prefix_tokens and prefix:
            features.append((patches, x[:, :prefix]))
        else:
            features.append(patches)
    name = f"{model.name}_intermediates"
    if intermediates_only:
        # In a 1-tuple: Keras unwraps a one-element output list, not the list inside.
        return keras.Model(model.inputs[0], (features,), name=name)
    final = _pre_logits(model) if pre_logits else model.outputs[0]
    last = taken[-1]
    if stop_early and last < c.depth - 1:
        # The model's tail (norm, pooling, head) as a sub-model from the last
        # block's output, applied to block `last` instead: blocks after it
        # never run. Every block gives tokens of the same shape.
        top = _layer_output(model, f"encoder_block_{c.depth - 1}")
        tail = keras.Model(top, final, name=f"{model.name}_tail")
        final = tail(_layer_output(model, f"encoder_block_{last}"))
    return keras.Model(model.inputs[0], (final, features), name=name)


def forward_intermediates(model, images, indices=None, norm=False, output_fmt="NHWC",
                          stop_early=False, intermediates_only=False,
                          return_prefix_tokens=False, pre_logits=False):
    """Chosen blocks' token features, and the final output, of a `kvs.ViT`.

    timm's `VisionTransformer.forward_intermediates` on every Keras backend,
    channels last (see the module docstring for the exact semantics).

    Args:
        model: a `kvs.ViT`.
        images: (B, H, W, C) images at the model's resolution.
        indices: None (every block), an int n (the last n blocks) or a list of
            block indices (negative ones count from the end).
        norm: pass each feature through the final LayerNorm.
        output_fmt: "NHWC" for (B, gh, gw, D) grids, "NLC" for (B, L, D).
        stop_early: run no block after the last taken one.
        intermediates_only: return only the list of features.
        return_prefix_tokens: each feature becomes (patches, prefix tokens of
            shape (B, P, D)) on a model with class or register tokens.
        pre_logits: the final output is the features the head reads (timm's
            `forward_head(..., pre_logits=True)`) instead of the model output.

    Returns:
        `(final, [feature, ...])`, or `[feature, ...]` with
        `intermediates_only`.

    Example:
    ```python
    logits, grids = forward_intermediates(vit, images, indices=4)
    grids = forward_intermediates(vit, images, indices=[2, 5, 8, 11], norm=True,
                                  stop_early=True, intermediates_only=True)
    ```
    """
    sub = intermediates_model(
        model, indices=indices, norm=norm, output_fmt=output_fmt, stop_early=stop_early,
        intermediates_only=intermediates_only, return_prefix_tokens=return_prefix_tokens,
        pre_logits=pre_logits)
    outputs = sub(images, training=False)
    if intermediates_only:
        return _as_features(outputs)
    final, features = outputs
    return final, _as_features(features)


def _as_features(features):
    # Keras may hand nested outputs back as lists; timm's shape is a list of
    # tensors or of (patches, prefix) tuples.
    return [tuple(f) if isinstance(f, (list, tuple)) else f for f in features]
