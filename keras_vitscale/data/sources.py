"""Where images come from: digits, synthetic, folder:PATH and tfds:NAME[:SPLIT].

A source has a train split and a fixed held-out split. Most splits are
*indexed* (example i can be loaded on its own), so the training stream is a
per-epoch seeded permutation of indices that can start at any position
without reading what came before. TFDS splits are *streamed*: a resumed run
skips records (cheap: images are decoded only after the skip).
"""

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# The digits split is fixed, whatever the run seed, so held-out numbers
# from different runs are comparable.
DIGITS_HELD_OUT = 360
FOLDER_EVAL_DIRS = ("val", "validation", "test")
KNOWN = "digits, digits:CLASSES, synthetic, folder:PATH, tfds:NAME[:SPLIT]"
DIGIT_CLASS_FORMS = ("a range 'digits:0-5', a list 'digits:0,2,4' or both "
                     "'digits:0-3,7'; classes are digits 0-9")


@dataclasses.dataclass
class IndexedSplit:
    """`size` examples, `load(index) -> (image (H, W, C), label)` in tf.data."""

    size: int
    load: object


@dataclasses.dataclass
class StreamSplit:
    """A split read in order: `make(seed, shuffle) -> tf.data of (raw, label)`;
    `decode(raw) -> image` runs after any skip."""

    size: int
    make: object
    decode: object


@dataclasses.dataclass
class Source:
    """A dataset: train and held-out splits plus facts the pipeline needs.

    Args:
        name: the spec it was made from, e.g. "digits".
        num_classes: label count.
        train: an `IndexedSplit` or `StreamSplit`.
        held_out: the fixed evaluation split.
        natural_images: False for digits-like data, where flips and strong
            crops change the class (a flipped 2 is not a 2): augmentation
            defaults to off.
        eval_crop_fraction: central-crop fraction at evaluation (1.0 for
            images that fill the frame).
    """

    name: str
    num_classes: int
    train: object
    held_out: object
    natural_images: bool = True
    eval_crop_fraction: float = 0.875


def load_source(spec, data_dir=None, num_classes=None, image_size=(32, 32)):
    """Parses a dataset spec and returns its `Source`.

    Args:
        spec: "digits", "digits:CLASSES" (a class split such as "digits:0-5"
            or "digits:0,2,4": labels remapped to 0..k-1 in class order, each
            class keeping its examples of the ten-class train/held-out split),
            "synthetic", "folder:PATH" or "tfds:NAME[:SPLIT]".
        data_dir: TFDS data directory (tfds only; nothing is downloaded).
        num_classes: class count for "synthetic" (default 10); for other
            sources it must match the data if given.
        image_size: (h, w); the size synthetic images are made at.

    Example:
    ```python
    source = load_source("digits")
    source.num_classes, source.train.size, source.held_out.size  # 10, 1437, 360
    load_source("digits:6-9").num_classes                        # 4
    ```
    """
    spec = str(spec)
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        source = _digits(digit_classes(spec))
    elif kind == "synthetic" and not arg:
        source = _synthetic(num_classes or 10, image_size)
    elif kind == "folder" and arg:
        source = _folder(arg)
    elif kind == "tfds" and arg:
        source = _tfds(arg, data_dir)
    else:
        raise ValueError(f"Unknown dataset {spec!r}; use one of: {KNOWN}.")
    if num_classes is not None and num_classes != source.num_classes:
        raise ValueError(
            f"--num-classes {num_classes} does not match dataset {spec!r}, which "
            f"has {source.num_classes} classes; drop --num-classes or pass "
            f"{source.num_classes}.")
    source.name = spec
    return source


def _array_split(images, labels):
    images = tf.constant(images)
    labels = tf.constant(labels, tf.int32)
    return IndexedSplit(int(images.shape[0]),
                        lambda i: (tf.gather(images, i), tf.gather(labels, i)))


def digit_classes(spec):
    """The digit classes a digits spec names, sorted: "digits" is all ten,
    "digits:0-5" a range, "digits:0,2,4" a list (ranges and lists mix).
    Anything else is a ValueError naming the spec and the accepted forms.

    Args:
        spec: a dataset spec starting with "digits".

    Example:
    ```python
    digit_classes("digits:0-3,7")  # (0, 1, 2, 3, 7)
    digit_classes("digits")        # (0, 1, ..., 9)
    ```
    """
    spec = str(spec)
    kind, colon, arg = spec.partition(":")
    if kind != "digits":
        raise ValueError(f"{spec!r} is not a digits spec; use {DIGIT_CLASS_FORMS}.")
    if not colon:
        return tuple(range(10))
    classes = set()
    for part in arg.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"Dataset {spec!r}: {part!r} is not a digit or a range "
                             f"of digits; use {DIGIT_CLASS_FORMS}.")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if not 0 <= low <= high <= 9:
            raise ValueError(f"Dataset {spec!r}: {part!r} is not within the digits "
                             f"0-9 (or its range runs backwards); use {DIGIT_CLASS_FORMS}.")
        classes.update(range(low, high + 1))
    return tuple(sorted(classes))


def _digits(classes=tuple(range(10))):
    # scikit-learn ships these 1797 8x8 digits inside the wheel: real data
    # with no download.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    # The ten-class split first, then the classes: a class split holds
    # exactly the examples that the full "digits" has for those classes.
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_HELD_OUT, stratify=labels, random_state=0)
    name = "digits"
    if len(classes) < 10:
        remap = np.full(10, -1, np.int32)
        remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
        keep_tr, keep_te = remap[y_tr] >= 0, remap[y_te] >= 0
        x_tr, y_tr = x_tr[keep_tr], remap[y_tr[keep_tr]]
        x_te, y_te = x_te[keep_te], remap[y_te[keep_te]]
        name = "digits:" + ",".join(map(str, classes))
    return Source(name, len(classes), _array_split(x_tr, y_tr), _array_split(x_te, y_te),
                  natural_images=False, eval_crop_fraction=1.0)


def _synthetic(num_classes, image_size, train_size=4096, held_out_size=512):
    h, w = image_size

    def split(size, salt):
        def load(i):
            seed = tf.stack([tf.constant(salt, tf.int64), tf.cast(i, tf.int64)])
            image = tf.random.stateless_uniform((h, w, 3), seed, 0, 256, tf.int32)
            return tf.cast(image, tf.uint8), tf.cast(i % num_classes, tf.int32)
        return IndexedSplit(size, load)

    return Source("synthetic", num_classes, split(train_size, 1), split(held_out_size, 2))


def _list_images(root):
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((Path(root) / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(path))
                labels.append(label)
    return classes, paths, labels


def _file_split(paths, labels):
    paths = tf.constant(paths)
    labels = tf.constant(labels, tf.int32)

    def load(i):
        data = tf.io.read_file(tf.gather(paths, i))
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image, tf.gather(labels, i)
    return IndexedSplit(int(paths.shape[0]), load)


def _folder(path):
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"folder:{path}: {str(root)!r} is not a directory; pass a "
                         "directory with one subfolder of images per class.")
    train_dir = root / "train"
    eval_dir = next((root / d for d in FOLDER_EVAL_DIRS if (root / d).is_dir()), None)
    if train_dir.is_dir() and eval_dir is not None:
        classes, paths, labels = _list_images(train_dir)
        eval_classes, eval_paths, eval_labels = _list_images(eval_dir)
        if eval_classes != classes:
            raise ValueError(f"folder:{path}: class folders differ between "
                             f"{train_dir} {classes} and {eval_dir} {eval_classes}.")
        train, held_out = (paths, labels), (eval_paths, eval_labels)
    else:
        classes, paths, labels = _list_images(root)
        # No val/ folder: hold out every 10th image of each class (a fixed
        # split, independent of the seed).
        train, held_out = ([], []), ([], [])
        counters = {}
        for p, y in zip(paths, labels):
            counters[y] = counters.get(y, 0) + 1
            target = held_out if counters[y] % 10 == 0 else train
            target[0].append(p)
            target[1].append(y)
    if len(classes) < 2 or not train[0] or not held_out[0]:
        raise ValueError(
            f"folder:{path}: found {len(classes)} class folder(s) and "
            f"{len(train[0])} train / {len(held_out[0])} held-out images "
            f"({', '.join(IMAGE_EXTENSIONS)}); need >= 2 class subfolders and >= 10 "
            "images per class (or train/ and val/ folders).")
    return Source(f"folder:{path}", len(classes), _file_split(*train), _file_split(*held_out))


def _tfds(arg, data_dir):
    import tensorflow_datasets as tfds

    name, _, train_split = arg.partition(":")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # tfds raises several types for unknown names
        raise ValueError(f"tfds:{arg}: no TFDS dataset {name!r} in data dir "
                         f"{data_dir!r} ({type(err).__name__}: {err}). Prepare it "
                         "there first (this tool never downloads) and pass "
                         "--data-dir.") from err
    info = builder.info
    splits = dict(info.splits)
    if not splits:
        raise ValueError(f"tfds:{arg}: {name!r} is not prepared in data dir "
                         f"{data_dir!r}; run tfds build / download_and_prepare there "
                         "first and pass --data-dir (this tool never downloads).")
    train_split = train_split or "train"
    if train_split.split("[")[0] not in splits:
        raise ValueError(f"tfds:{arg}: unknown split {train_split!r}; "
                         f"{name} has {sorted(splits)}.")
    held_name = next((s for s in ("validation", "test") if s in splits
                      and s != train_split), None)
    if held_name is None:  # hold out the last 10% of the train split
        held_name, train_split = f"{train_split}[90%:]", f"{train_split}[:90%]"
    if "image" not in info.features or "label" not in info.features:
        raise ValueError(f"tfds:{arg}: needs 'image' and 'label' features; has "
                         f"{sorted(info.features)}.")
    num_classes = info.features["label"].num_classes
    image_feature = info.features["image"]

    def split(split_name):
        size = builder.info.splits[split_name].num_examples

        def make(seed, shuffle):
            read = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16)
            ds = builder.as_dataset(split=split_name, shuffle_files=shuffle,
                                    read_config=read,
                                    decoders={"image": tfds.decode.SkipDecoding()})
            return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))

        def decode(raw):
            image = image_feature.decode_example(raw)
            if image.shape[-1] is None:
                image.set_shape([None, None, 3])
            return image
        return StreamSplit(size, make, decode)

    return Source(f"tfds:{arg}", num_classes, split(train_split), split(held_name))
