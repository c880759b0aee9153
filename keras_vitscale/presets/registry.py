"""The built-in presets: one JSON file per preset, read once, by name.

A built-in preset is `NAME.json`: the architecture ("config", big_vision's
numerics), "metadata" (params, GFLOPs, paper, licence) and "weights", a list
of published checkpoints, each a *tag*: its source repo on the Hugging Face
Hub (timm's layout), licence, classes, label set, preprocessing and the
config fields the checkpoint needs beyond the architecture (timm's exact
GELU, a 21k head, no head). The first tag is the default. A handle is
`PRESET`, `PRESET.TAG` or either with `@REVISION` (a branch, tag or commit of
the source repo).

The files live in the repository's top-level presets/ folder; the wheel
ships them inside this package as presets/builtin/.
"""

import collections
import collections.abc
import json
import re
from pathlib import Path

from keras_vitscale.config import ViTConfig

# Case-insensitive file systems cannot hold vit_g14.json and vit_G14.json
# side by side, so ViT-G/14 lives in vit_bigG14.json (OpenCLIP's name).
ALIASES = {"vit_G14": "vit_bigG14"}


def builtin_dir():
    """Where the built-in JSON files are: inside the wheel, or the repo.

    Example:
    ```python
    sorted(p.stem for p in builtin_dir().glob("*.json"))  # ['simplest_vit_s16', ...]
    ```
    """
    packaged = Path(__file__).parent / "builtin"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "presets"  # an editable install


def _read_builtin():
    table = {}
    for path in sorted(builtin_dir().glob("*.json")):
        with open(path) as f:
            table[path.stem] = json.load(f)
    return table


class PresetRegistry(collections.abc.Mapping):
    """Read-only mapping: preset name -> its JSON (config, metadata, weights).

    Aliases (`ALIASES`) resolve to their preset; the files are read on first
    use.

    Example:
    ```python
    sorted(kvs.ViT.presets)             # ['simplest_vit_s16', ..., 'vit_ti16']
    kvs.ViT.presets["vit_g14"]["metadata"]["params"]
    ```
    """

    def __init__(self):
        self._table = None

    def _data(self):
        if self._table is None:
            self._table = _read_builtin()
        return self._table

    def __getitem__(self, name):
        return self._data()[ALIASES.get(name, name)]

    def __contains__(self, name):
        return ALIASES.get(name, name) in self._data()

    def __iter__(self):
        return iter(self._data())

    def __len__(self):
        return len(self._data())

    def __repr__(self):
        return describe(self)


REGISTRY = PresetRegistry()


PresetHandle = collections.namedtuple("PresetHandle", ["name", "tag", "revision"])
PresetHandle.__doc__ = """A parsed built-in handle `PRESET[.TAG][@REVISION]`.

Args:
    name: the preset's file name (aliases resolved).
    tag: the checkpoint tag, or None for the default (first) one.
    revision: a branch, tag or commit of the source repo, or None.
"""

_HANDLE = re.compile(r"^([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?(?:@(\S+))?$")


def parse_handle(handle):
    """`PRESET[.TAG][@REVISION]` -> `PresetHandle`, or None if it names no built-in preset.

    Only the preset name is checked here; `weights_entry` checks the tag.

    Example:
    ```python
    parse_handle("vit_b16.augreg_in21k@main")  # PresetHandle('vit_b16', 'augreg_in21k', 'main')
    parse_handle("runs/digits/model")          # None
    ```
    """
    match = _HANDLE.match(str(handle))
    if not match or match.group(1) not in REGISTRY:
        return None
    return PresetHandle(ALIASES.get(match.group(1), match.group(1)), match.group(2),
                        match.group(3))


def tags(name):
    """The checkpoint entries of a built-in preset, default first ([] if none)."""
    return list(REGISTRY[name].get("weights") or [])


def weights_entry(name, tag=None):
    """The checkpoint entry of `name`'s `tag` (default: the first), or None.

    Raises:
        ValueError: an unknown tag (the message lists the preset's tags).

    Example:
    ```python
    weights_entry("vit_b16")["source"]   # 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'
    ```
    """
    entries = tags(name)
    if tag is None:
        return entries[0] if entries else None
    for entry in entries:
        if entry["tag"] == tag:
            return entry
    known = ", ".join(f"{name}.{e['tag']}" for e in entries)
    raise ValueError(
        f"Preset {name!r} has no tag {tag!r}; "
        + (f"its tags are {known} (the first is the default)." if entries else
           "it has no published checkpoint, so it takes no tag: use "
           f"{name!r} (fresh weights)."))


def builtin_config(name, tag=None, **overrides):
    """The `ViTConfig` of a built-in preset (and tag), with overrides applied.

    Without `tag` this is the architecture with big_vision's numerics, as
    training from scratch uses it; with a tag, the checkpoint's fields
    (e.g. timm's exact GELU, its number of classes) are applied too.

    Args:
        name: a name in `REGISTRY` or an alias.
        tag: a checkpoint tag of the preset (see `weights_entry`).
        **overrides: `ViTConfig` fields to change (num_classes, image_size, ...).

    Example:
    ```python
    builtin_config("vit_b16", num_classes=10).num_classes   # 10
    builtin_config("vit_b16", tag="augreg_in21k").num_classes   # 21843
    ```
    """
    entry = REGISTRY[name]
    fields = dict(entry["config"])
    if tag is not None:
        fields.update(weights_entry(name, tag)["config"])
    variant = fields.pop("variant", None)
    fields.update(overrides)
    if variant is None:
        return ViTConfig(**fields)
    return ViTConfig.from_variant(variant, **fields)


def describe(registry):
    """A table of every preset and tag: source, licence, classes, resolution, preprocessing."""
    rows = [("handle", "source (Hugging Face Hub)", "licence", "classes", "size",
             "crop", "interp.", "mean / std")]
    for name in sorted(registry):
        entries = tags(name)
        if not entries:
            config = builtin_config(name)
            rows.append((name, "none: fresh weights", "", str(config.num_classes),
                         str(config.image_size[0]), "", "", ""))
        for i, entry in enumerate(entries):
            pre = entry["preprocessing"]
            handle = f"{name}.{entry['tag']}" + (" (default)" if i == 0 else "")
            rows.append((handle, entry["source"], entry["licence"],
                         str(entry["num_classes"] or "features"), str(pre["input_size"][1]),
                         f"{pre['crop_pct']:g} {pre['crop_mode']}", pre["interpolation"],
                         f"{_short(pre['mean'])} / {_short(pre['std'])}"))
    from keras_vitscale.convert.timm_hub_config import LOADABLE_FAMILIES

    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                      for row in rows)
    return (f"{table}\n\nAny timm checkpoint on the Hub of these families also loads, by "
            "kvs.ViT.from_preset('hf://timm/<name>.<tag>'):\n"
            + "\n".join(f"- {family}" for family in LOADABLE_FAMILIES))


def _short(values):
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"
