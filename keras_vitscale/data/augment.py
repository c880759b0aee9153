"""Batch augmentation with Keras' own layers, from a spec string.

"randaugment:10,mixup:0.2" -> keras.layers.RandAugment (2 ops, level 10 of
10, as big_vision's randaug(2, 10)) then keras.layers.MixUp(alpha=0.2).
"cutmix:1.0" -> keras.layers.CutMix(factor=1.0). "none" or "" -> nothing.

The Keras layers draw from their own seed generators, so they are seeded
from (run seed, first step): a run is reproducible for a seed, and a resumed
run is reproducible for a resume point, but with these layers a resumed run
does not repeat the uninterrupted run's draws exactly (crop and flip, which
are stateless, do).
"""

import keras

AUGMENTATIONS = ("randaugment", "mixup", "cutmix")


def parse_spec(spec):
    """Parses "name:value,..." into [(name, float), ...], checking names and values.

    Example:
    ```python
    parse_spec("randaugment:10,mixup:0.2")  # [("randaugment", 10.0), ("mixup", 0.2)]
    ```
    """
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return []
    items = []
    for part in str(spec).split(","):
        name, _, value = part.strip().partition(":")
        name = name.strip().lower()
        if name not in AUGMENTATIONS:
            raise ValueError(f"Unknown augmentation {name!r} in --augment {spec!r}; "
                             f"use a comma list of {', '.join(AUGMENTATIONS)} with a "
                             "value each, e.g. 'randaugment:10,mixup:0.2', or 'none'.")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"Augmentation {name!r} in --augment {spec!r} needs a "
                             f"number after ':', e.g. '{name}:0.2'; got {value!r}.") from None
        if number <= 0 or (name == "randaugment" and number > 10):
            raise ValueError(f"{name}:{value} is out of range; randaugment takes a "
                             "level in (0, 10], mixup/cutmix a positive alpha.")
        items.append((name, number))
    return items


def build_layers(spec, seed):
    """The Keras layers for a spec, seeded with `seed` (an int)."""
    layers = []
    for i, (name, value) in enumerate(parse_spec(spec)):
        layer_seed = (seed * 1000003 + i) % (2**31 - 1)
        if name == "randaugment":
            layers.append(("images", keras.layers.RandAugment(
                value_range=(0, 255), num_ops=2, factor=value / 10.0, seed=layer_seed)))
        elif name == "mixup":
            layers.append(("both", keras.layers.MixUp(alpha=value, seed=layer_seed)))
        else:
            layers.append(("both", keras.layers.CutMix(factor=value, seed=layer_seed)))
    return layers


def apply(layers, images, labels):
    """Runs the layers on a batch of [0, 255] images and one-hot labels."""
    for kind, layer in layers:
        if kind == "images":
            images = layer(images, training=True)
        else:
            out = layer({"images": images, "labels": labels}, training=True)
            images, labels = out["images"], out["labels"]
    return images, labels
