"""The built-in presets: one JSON file per preset, read once, by name.

A built-in preset is `NAME.json` (config, metadata, weights handle or
null). The files live in the repository's top-level presets/ folder; the
wheel ships them inside this package as presets/builtin/.
"""

import collections.abc
import json
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
        return f"PresetRegistry({sorted(self._data())})"


REGISTRY = PresetRegistry()


def builtin_config(name, **overrides):
    """The `ViTConfig` of a built-in preset, with overrides applied.

    Args:
        name: a name in `REGISTRY` or an alias.
        **overrides: `ViTConfig` fields to change (num_classes, image_size, ...).

    Example:
    ```python
    builtin_config("vit_b16", num_classes=10).num_classes   # 10
    ```
    """
    entry = REGISTRY[name]
    fields = dict(entry["config"])
    variant = fields.pop("variant", None)
    fields.update(overrides)
    if variant is None:
        return ViTConfig(**fields)
    return ViTConfig.from_variant(variant, **fields)
