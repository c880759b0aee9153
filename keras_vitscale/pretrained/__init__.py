"""Real weights: built-in tags and timm repos on the Hub, converted once and cached.

`resolve_directory` turns any handle into a local preset directory:

- `PRESET[.TAG][@REVISION]` (a built-in preset with published weights): the
  tag's source repo on the Hub, converted into the preset's config
  (`timm_hub.fetch`, cached by repo and commit in `cache`);
- `hf://org/repo[@REVISION]`: a keras_vitscale preset repo (downloaded as is,
  `keras_vitscale.hub`) or a timm repo (config.json names an
  `architecture`), converted like a built-in tag;
- a local preset directory, as is.

`preprocessing_for` and `labels_for` give a handle's preprocessing and
label facts without downloading weights.

Example:
```python
from keras_vitscale import pretrained
pretrained.resolve_directory("vit_b16.augreg_in21k", model_class=kvs.ViT)
pretrained.preprocessing_for("vit_b16")["crop_pct"]      # 0.9
```
"""

import json
from pathlib import Path

from keras_vitscale import hub
from keras_vitscale.presets.directory import METADATA_FILE, resolve_directory as local_directory
from keras_vitscale.presets.registry import builtin_config, parse_handle, weights_entry
from keras_vitscale.pretrained import cache, timm_hub

_INFO_KEYS = ("tag", "description", "licence", "num_classes", "labels", "activation",
              "preprocessing")


def _builtin(handle):
    """(PresetHandle, weights entry) of a built-in handle, or (None, None)."""
    if Path(str(handle)).expanduser().is_dir():
        return None, None
    parsed = parse_handle(handle)
    if parsed is None:
        return None, None
    return parsed, weights_entry(parsed.name, parsed.tag)


def _timm_repo(handle, token):
    """(repo_id, revision, config.json) of an "hf://" handle naming a timm repo,
    or None for a keras_vitscale preset repo. Only config.json is fetched."""
    repo_id, revision = hub.parse_handle(handle)
    hf_config, _ = timm_hub.download_config(repo_id, revision, token, str(handle))
    return (repo_id, revision, hf_config) if timm_hub.is_timm_config(hf_config) else None


def resolve_directory(handle, model_class, token=None, verbose=True):
    """A local preset directory for any handle, downloading and converting as needed.

    Args:
        handle: "PRESET[.TAG][@REV]", "hf://org/repo[@REV]" or a directory.
        model_class: the model class converted checkpoints are built with.
        token: a Hub token for private or gated repos.
        verbose: a progress bar over conversions (downloads show huggingface_hub's).

    Raises:
        ValueError: a built-in preset without weights, an unknown tag, or a
            checkpoint that cannot be represented.

    Example:
    ```python
    resolve_directory("vit_s16", model_class=kvs.ViT)   # KVS_CACHE/timm--vit_small.../<commit>
    ```
    """
    parsed, entry = _builtin(handle)
    if parsed is not None:
        if entry is None:
            raise ValueError(f"Preset {parsed.name!r} has no published weights; build it with "
                             f"kvs.ViT.from_preset({parsed.name!r}, load_weights=False).")
        config = builtin_config(parsed.name, tag=entry["tag"])
        info = {k: entry[k] for k in _INFO_KEYS if k in entry}
        return timm_hub.fetch(entry["source"], model_class,
                              revision=parsed.revision, config=config,
                              info={"preset": parsed.name, **info}, token=token,
                              handle=str(handle), verbose=verbose)
    if str(handle).startswith("hf://"):
        timm_repo = _timm_repo(handle, token)
        if timm_repo is not None:
            repo_id, revision, _ = timm_repo
            return timm_hub.fetch(repo_id, model_class, revision=revision, token=token,
                                  handle=str(handle), verbose=verbose)
        return hub.resolve_directory(handle, token=token)
    return local_directory(handle)


def _info(handle, token=None):
    """The recorded facts (preprocessing, labels, ...) of a handle, without weights."""
    parsed, entry = _builtin(handle)
    if parsed is not None:
        return dict(entry or {})
    if str(handle).startswith("hf://"):
        timm_repo = _timm_repo(handle, token)
        if timm_repo is not None:
            return timm_hub.info_from_timm(timm_repo[2])
        directory = hub.resolve_directory(handle, token=token)
    else:
        directory = local_directory(handle)
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def preprocessing_for(handle, token=None):
    """The preprocessing a checkpoint was trained with, in timm's keys.

    Returns:
        {"input_size": [3, H, W], "crop_pct", "crop_mode", "interpolation",
        "mean", "std"}.

    Raises:
        ValueError: a handle with no recorded preprocessing (a preset without
            published weights, or a directory saved without it).

    Example:
    ```python
    preprocessing_for("vit_so400m14_siglip_378")["crop_mode"]   # 'squash'
    ```
    """
    info = _info(handle, token)
    if not info.get("preprocessing"):
        raise ValueError(
            f"{str(handle)!r} records no preprocessing (a preset without published weights, "
            "or a preset directory saved without it); build kvs.ImagePreprocessor("
            "image_size=..., mean=..., std=...) with the values it was trained with.")
    return dict(info["preprocessing"])


def labels_for(handle, token=None):
    """{"label_set": "imagenet-1k" | "imagenet-21k" | None, "activation": ...} of a handle.

    Example:
    ```python
    labels_for("vit_b16.augreg_in21k")   # {'label_set': 'imagenet-21k', 'activation': 'sigmoid'}
    ```
    """
    info = _info(handle, token)
    return {"label_set": info.get("labels"), "activation": info.get("activation")}


__all__ = ["cache", "labels_for", "preprocessing_for", "resolve_directory", "timm_hub"]
