"""Reading source checkpoints from disk: safetensors, .npz, torch state dicts.

Every reader returns `{name: array}` in the source's own names and layout;
the source modules (timm_layout.py, big_vision.py, transformers.py) map those
names to ours, and `common.gather_weights` reads each tensor once, when its
variable is filled. `SafetensorsReader` (safetensors_reader.py) is such a
mapping: it parses the header when opened and reads one tensor per lookup
with numpy, so a conversion streams tensor by tensor and needs no torch.

This module never imports model.py: the pretrained-weights loader uses it.

Nothing here downloads: timm's pretrained weights are taken from the local
Hugging Face or torch.hub cache only.

Example:
```python
from keras_vitscale.convert import files
state = files.load_state_dict("vit_s16.safetensors")        # {timm name: array}, lazy
state.shapes["pos_embed"]                                    # from the header
tree = files.read_npz("siglip.npz:params/img")               # .arrays, .root, .path
hf_config, state = files.read_transformers_directory("saved_vit/")
```
"""

import collections
import json
import logging
import os
import pickle
import re
import zipfile

import numpy as np

from keras_vitscale.convert.open_clip_layout import is_open_clip, timm_view
from keras_vitscale.convert.safetensors_reader import SafetensorsReader

logger = logging.getLogger("keras_vitscale")

# Where big_vision training checkpoints keep the model, tried in this order.
NPZ_ROOTS = ("params/", "opt/target/")
_NPZ_MARKER = "embedding/kernel"  # every ViT root has its patch embedding

NpzTree = collections.namedtuple("NpzTree", ["path", "root", "arrays"])
NpzTree.__doc__ = """A big_vision ViT read from an .npz file.

Args:
    path: the .npz file.
    root: the prefix of the ViT's arrays in it ("", "params/img/", ...).
    arrays: `{name relative to root: array}`.
"""


# ---- safetensors and torch state dicts ----------------------------------------
def read_safetensors(path):
    """{name: array} of a .safetensors file, read one tensor per lookup.

    A `SafetensorsReader`: nothing but the header is read until a tensor is
    looked up; bfloat16 tensors come back as float32.

    Raises:
        ValueError: a truncated or corrupt file.
    """
    return SafetensorsReader(path)


def _torch_load(torch, path):
    # mmap keeps the file's tensors out of memory until they are read; a
    # legacy (non-zip) file cannot be mapped and is read whole.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(path):
    """Reads a timm state dict from .safetensors or .pth/.pt/.bin.

    .safetensors files are read lazily (`SafetensorsReader`), without torch.
    .pth/.bin files need torch and are read with
    `torch.load(weights_only=True)`, which refuses pickled code; a
    {"model": ...} or {"state_dict": ...} wrapper is unwrapped.

    Raises:
        ImportError: a pickled checkpoint without torch installed.
        ValueError: a truncated or corrupt file, or no state dict in it.

    Example:
    ```python
    model = convert.from_timm(load_state_dict("ckpt.pth"), num_heads=6)
    ```
    """
    path = str(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"{path!r} is a pickled PyTorch checkpoint, which only torch can read: "
            "pip install torch, or use the repository's model.safetensors, which "
            "needs no torch.") from error
    try:
        data = _torch_load(torch, path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(
            f"Cannot read {path!r} as a PyTorch checkpoint ({type(error).__name__}: "
            f"{error}). The file is truncated or corrupt (an interrupted download or "
            "copy?), or not a checkpoint; download or save it again.") from error
    # Training checkpoints nest the weights one or two levels down.
    while isinstance(data, dict) and "patch_embed.proj.weight" not in data:
        inner = [data[k] for k in ("state_dict", "model", "module")
                 if isinstance(data.get(k), dict)]
        if not inner:
            break
        data = inner[0]
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} holds a {type(data).__name__}, not a state dict.")
    return data


def open_checkpoint(path):
    """A timm checkpoint file as a timm-layout state dict, read lazily where possible.

    model.safetensors (and any .safetensors) is a `SafetensorsReader`: the
    header is checked now, each tensor read on lookup, no torch needed.
    pytorch_model.bin / .pth need torch (`load_state_dict`). An OpenCLIP
    file (open_clip_model.safetensors) is seen through
    `open_clip_layout.timm_view`, in timm's names, as timm loads it.

    Args:
        path: the downloaded weights file.

    Returns:
        A mapping `{timm name: array}`; its `.shapes` (where present) or
        `common.shapes_of` give the shapes without reading data.

    Raises:
        ValueError: a truncated or corrupt file (named, saying to download
            it again).
        ImportError: a pickled checkpoint without torch.

    Example:
    ```python
    state = open_checkpoint(hf_hub_download("timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
                                            "model.safetensors"))
    ```
    """
    state = load_state_dict(path)
    return timm_view(state) if is_open_clip(state) else state


# ---- timm: model names and its cache --------------------------------------------
def load_timm_source(source, pretrained=False):
    """A timm model name or a checkpoint path -> a timm module or a state dict.

    Args:
        source: a timm model name ("vit_small_patch16_224", with an optional
            ".tag") or a path to a .pth/.pt/.bin/.safetensors state dict.
        pretrained: load timm's pretrained weights for a model name, from the
            local cache only; this never downloads. Without it a model name
            gives timm's random initialisation.

    With KERAS_BACKEND=tensorflow, import timm before Keras: timm loads
    triton (through torchvision), which crashes after TensorFlow is loaded.

    Example:
    ```python
    model = from_timm(load_timm_source("vit_tiny_patch16_224"))   # random weights
    model = from_timm(load_timm_source("ckpt.safetensors"), num_heads=4)
    ```
    """
    source = str(source)
    if os.path.exists(source):
        return load_state_dict(source)
    if re.search(r"\.(pth|pt|bin|safetensors)$", source):
        raise FileNotFoundError(f"No checkpoint file at {source!r}.")
    import timm

    if not timm.is_model(source.split(".")[0]):
        raise ValueError(f"{source!r} is neither a file nor a timm model name; list the "
                         "names with timm.list_models('vit_*').")
    if not pretrained:
        return timm.create_model(source, pretrained=False)
    cached = cached_timm_weights(source)
    if cached is None:
        raise FileNotFoundError(
            f"timm's pretrained weights for {source!r} are not in the local cache, and "
            "this converter never downloads. Fetch them once with timm.create_model("
            f"{source!r}, pretrained=True) where there is network, or pass a state-dict "
            "file instead.")
    # Point timm at the cached file so that its loader cannot reach the network.
    return timm.create_model(source, pretrained=True, pretrained_cfg_overlay={"file": cached})


def cached_timm_weights(name):
    """Path of timm's cached pretrained weights for model `name`, or None."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo = cfg["hf_hub_id"].split("@")[0]
        names = [cfg.get("hf_hub_filename")] if cfg.get("hf_hub_filename") else [
            "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]
        for filename in names:
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return path
    if cfg.get("url"):
        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg["url"]))
        if os.path.exists(path):
            return path
    return None


# ---- big_vision .npz --------------------------------------------------------------
def read_npz(spec, names=None):
    """The ViT arrays of a big_vision .npz, as an `NpzTree`.

    Args:
        spec: "file.npz" or "file.npz:sub/tree" (big_vision's syntax). Without
            a sub-tree the ViT is looked for at the root, then under
            "params/" and "opt/target/" (training checkpoints).
        names: read only these names (relative to the root); None reads
            every array under the root. Others (optimizer state, other
            towers) are never read.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file, or no ViT at the chosen
            root (the message lists the roots that exist).

    Example:
    ```python
    tree = read_npz("siglip.npz:params/img")
    tree.arrays["embedding/kernel"].shape     # (ph, pw, C, D)
    ```
    """
    path, subtree = str(spec), None
    if not os.path.exists(path) and ":" in path:
        path, subtree = path.rsplit(":", 1)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No .npz checkpoint at {path!r}.")
    try:
        # allow_pickle=False: an .npz of object arrays would run code on load.
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise _corrupt_npz(path, error) from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} holds one {loaded.dtype} array of shape {loaded.shape} "
                         "(np.save), not named parameters; save the checkpoint with "
                         "np.savez(path, **{name: array}) as big_vision does.")
    with loaded:
        root = _npz_root(loaded.files, subtree, path)
        wanted = [k for k in loaded.files if k.startswith(root)
                  and (names is None or k[len(root):] in names)]
        try:
            # Read every wanted member now: a damaged one fails here, not mid-copy.
            arrays = {k[len(root):]: loaded[k] for k in wanted}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
            raise _corrupt_npz(path, error) from error
    if names is None and len(arrays) < len(loaded.files):
        logger.info("read_npz: reading %d arrays under %r, leaving %d others "
                    "(optimizer state, other towers)", len(arrays), root or "/",
                    len(loaded.files) - len(arrays))
    return NpzTree(path, root, arrays)


def _corrupt_npz(path, error):
    return ValueError(
        f"Cannot read {path!r} as an .npz checkpoint ({type(error).__name__}: "
        f"{error}). The file is truncated or corrupt (an interrupted download or "
        "copy?); fetch or save it again and compare its size with the source.")


def _npz_root(names, subtree, path):
    if subtree is not None:
        root = subtree.strip("/") + "/"
        if root + _NPZ_MARKER not in names:
            raise ValueError(
                f"{path!r} has no ViT under {subtree!r} (no {root}{_NPZ_MARKER}); "
                f"ViT roots in the file: {_npz_roots_in(names) or 'none'}.")
        return root
    for root in ("",) + NPZ_ROOTS:
        if root + _NPZ_MARKER in names:
            return root
    others = _npz_roots_in(names)
    raise ValueError(
        f"{path!r} is not a big_vision ViT checkpoint: no '{_NPZ_MARKER}' at its "
        f"root or under {', '.join(NPZ_ROOTS)} (first keys: {sorted(names)[:5]}). "
        + (f"Choose a tower with '{path}:<root>', one of {others}." if others else ""))


def _npz_roots_in(names):
    return sorted(k[:-len(_NPZ_MARKER)].rstrip("/") for k in names
                  if k.endswith("/" + _NPZ_MARKER))


# ---- transformers save_pretrained directories -----------------------------------------
def transformers_directory(source):
    """The directory of a `save_pretrained` checkpoint given it or a file in it."""
    source = str(source)
    return (os.path.dirname(source) or ".") if os.path.isfile(source) else source


def read_transformers_config(source):
    """The parsed config.json of a `save_pretrained` directory.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: no config.json in it.
    """
    directory = transformers_directory(source)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No transformers checkpoint directory at {str(source)!r}.")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{directory!r} has no config.json; save the model with "
                         "save_pretrained(directory), which writes it beside the weights.")
    with open(config_path) as f:
        return json.load(f)


def read_transformers_directory(source):
    """(config dict, {name as in the file: array}) of a `save_pretrained` directory.

    The weights are a `SafetensorsReader` over model.safetensors or every
    shard its index names (read per lookup), without transformers or torch.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: a missing config.json, only pickled (.bin) weights, or a
            truncated or corrupt safetensors file.
    """
    hf_config = read_transformers_config(source)
    return hf_config, SafetensorsReader(_transformers_weight_files(transformers_directory(source)))


def _transformers_weight_files(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    pickled = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
    raise ValueError(
        f"{directory!r} has no model.safetensors (nor a sharded index)"
        + (f", only pickled weights {pickled}, which this converter does not unpickle; "
           "re-save them with model.save_pretrained(directory) (safetensors is the default)"
           if pickled else "") + ".")
