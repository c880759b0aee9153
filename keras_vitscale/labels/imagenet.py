"""Class names of the ImageNet heads, read from the package's data files.

Each label set is one gzip text file beside this module, `<label set>.tsv.gz`:
one line per class in the order of the head's outputs, a WordNet synset id, a
tab, and the synset's lemma names (comma separated). The files were written
once from timm's bundled ImageNet info (timm/data/_info: the synset list of
each set and imagenet_synset_to_lemma.txt); they are facts, and
tests/test_labels.py checks them against timm's `ImageNetInfo`.
"""

import functools
import gzip
from importlib import resources

# Label set -> number of classes. "imagenet-21k" is Google's 21,843-class
# order (timm's "imagenet-21k-goog"), the order of the AugReg and original
# ViT in21k heads; "imagenet-12k" is timm's 11,821-class subset of it.
LABEL_SETS = {"imagenet-1k": 1000, "imagenet-12k": 11821, "imagenet-21k": 21843}
# timm's names for the same sets.
ALIASES = {"imagenet-21k-goog": "imagenet-21k"}


def resolve_label_set(label_set):
    """A label set's canonical name, or a ValueError listing the known ones."""
    name = ALIASES.get(label_set, label_set)
    if name not in LABEL_SETS:
        raise ValueError(f"Unknown label set {label_set!r}; known: "
                         f"{sorted(LABEL_SETS)} (and timm's names {sorted(ALIASES)}).")
    return name


@functools.lru_cache(maxsize=None)
def _read(name):
    data = resources.files(__package__).joinpath(f"{name}.tsv.gz").read_bytes()
    rows = tuple(tuple(line.split("\t")) for line in
                 gzip.decompress(data).decode("utf-8").splitlines())
    if len(rows) != LABEL_SETS[name]:  # a damaged install, not a user error
        raise RuntimeError(f"{name}.tsv.gz holds {len(rows)} classes, expected "
                           f"{LABEL_SETS[name]}; reinstall keras-vitscale.")
    return rows


def imagenet_labels(label_set="imagenet-1k"):
    """The (synset, name) of each class of an ImageNet head, in output order.

    Args:
        label_set: "imagenet-1k" (1000 classes), "imagenet-21k" (21,843:
            Google's order, as the AugReg in21k heads) or "imagenet-12k"
            (11,821: timm's in12k heads).

    Returns:
        A list of (WordNet synset id, lemma names) pairs, one per output.

    Example:
    ```python
    kvs.labels.imagenet_labels("imagenet-1k")[0]   # ("n01440764", "tench, Tinca tinca")
    ```
    """
    return list(_read(resolve_label_set(label_set)))


def label_set_for_num_classes(num_classes):
    """The label set whose head has `num_classes` outputs, or None.

    Example:
    ```python
    label_set_for_num_classes(21843)   # "imagenet-21k"
    ```
    """
    return next((name for name, n in LABEL_SETS.items() if n == num_classes), None)
