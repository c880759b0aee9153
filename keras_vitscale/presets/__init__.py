"""Presets: the built-in registry, preset directories and weight transfer.

A preset is data, not code. `registry` holds the built-in presets (one JSON
file each), `directory` reads and writes preset directories (config.json,
model.weights.h5, metadata.json) and never imports anything named in a file,
`transfer` loads weights across resolutions and head sizes, and `loader`
builds a model from either. No module here imports the model or the Hub:
the model class is passed in.

Example:
```python
from keras_vitscale import presets
presets.builtin_config("vit_b16").width          # 768
presets.read_directory_config("out/vit_mu8")     # the ViTConfig it holds
```
"""

from keras_vitscale.presets.directory import (CONFIG_FILE, DEFAULT_MAX_SHARD_GB,
                                              METADATA_FILE, SHARDED_WEIGHTS_FILE,
                                              WEIGHTS_FILE, read_config_file,
                                              read_directory_config, resolve_directory,
                                              weights_path, write_directory)
from keras_vitscale.presets.loader import load
from keras_vitscale.presets.registry import (ALIASES, REGISTRY, PresetHandle, PresetRegistry,
                                             builtin_config, builtin_dir, parse_handle, tags,
                                             weights_entry)
from keras_vitscale.presets.transfer import load_weights_into, transfer_weights

__all__ = [
    "ALIASES", "CONFIG_FILE", "DEFAULT_MAX_SHARD_GB", "METADATA_FILE", "PresetHandle",
    "PresetRegistry", "REGISTRY", "SHARDED_WEIGHTS_FILE", "WEIGHTS_FILE", "builtin_config",
    "builtin_dir", "load", "load_weights_into", "parse_handle", "read_config_file",
    "read_directory_config", "resolve_directory", "tags", "transfer_weights", "weights_entry",
    "weights_path", "write_directory",
]
