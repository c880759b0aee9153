"""Checkpoints in timm's layout on the Hugging Face Hub -> cached Keras presets.

A timm repo (`timm/<model name>.<tag>`) holds config.json (timm's
`architecture`, `num_classes`, `pretrained_cfg`) and the weights, as
model.safetensors, else pytorch_model.bin, else open_clip_model.safetensors
(timm's own order). Fetching one:

1. config.json, which also pins the commit every later file comes from;
2. the converted preset in the cache for that repo and commit, if there is
   one: done, nothing else is downloaded or converted;
3. the weights file's safetensors header (a ranged request of a few kB):
   the tensor names and shapes are checked against the target config, or
   give the config of a repo that is not a built-in preset, so a checkpoint
   the library cannot represent is refused before its weights download;
4. the weights, through huggingface_hub (its cache, progress bar, offline
   mode, endpoint and token);
5. the conversion, tensor by tensor, into a Keras model, written to the
   cache as a preset directory in one atomic step.

Example:
```python
directory = fetch("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", model_class=kvs.ViT)
```
"""

import json
import logging
from pathlib import Path

from keras_vitscale import hub
from keras_vitscale.convert.common import shapes_of, stream_weights
from keras_vitscale.convert.files import open_checkpoint
from keras_vitscale.convert.timm_hub_config import config_from_timm_repo
from keras_vitscale.convert.timm_layout import check_state_dict, timm_recipe
from keras_vitscale.presets.directory import CONFIG_FILE, read_directory_config
from keras_vitscale.pretrained import cache

logger = logging.getLogger("keras_vitscale")

# The label set a head of this many classes has, and how it was trained: the
# ImageNet-21k heads of Google's checkpoints (AugReg, the original ViT) with a
# sigmoid, timm's ImageNet-1k and -12k heads with a softmax.
LABELS_BY_CLASSES = {1000: ("imagenet-1k", "softmax"), 11821: ("imagenet-12k", "softmax"),
                     21843: ("imagenet-21k", "sigmoid")}

# timm's order of preference for a repo's weights.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def is_timm_config(hf_config):
    """Whether a repo's config.json is timm's (it names an `architecture`)."""
    return isinstance(hf_config, dict) and "architecture" in hf_config \
        and "class_name" not in hf_config


def download_config(repo_id, revision=None, token=None, handle=None):
    """(config.json as a dict, commit) of a Hub repo.

    Example:
    ```python
    hf_config, commit = download_config("timm/vit_small_patch16_224.augreg_in21k_ft_in1k")
    ```
    """
    path = Path(hub.download_file(repo_id, CONFIG_FILE, revision, token, handle))
    try:
        hf_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{CONFIG_FILE} of Hugging Face repo {repo_id!r} is not valid JSON "
                         f"({err}); the file at {path} is corrupt: delete it and load "
                         "again.") from err
    return hf_config, path.parent.name


def fetch(repo_id, model_class, revision=None, config=None, info=None, token=None,
          handle=None, verbose=True):
    """The cached preset directory of a timm checkpoint, converting it the first time.

    Args:
        repo_id: "org/name" of a timm-layout repo, e.g. "timm/vit_base_patch16_224.augreg_in21k".
        model_class: the Keras model class to convert into (`kvs.ViT`).
        revision: a branch, tag or commit; default: the repo's main branch.
        config: the `ViTConfig` the checkpoint must fit (a built-in preset's);
            None reads it from the repo's config.json and tensor shapes.
        info: metadata to record with the preset (tag, licence, labels,
            preprocessing); default: taken from the repo's pretrained_cfg.
        token: a Hub token for private or gated repos.
        handle: what the user asked for, for messages.
        verbose: a progress bar over the conversion (huggingface_hub shows its own
            for the download; HF_HUB_DISABLE_PROGRESS_BARS=1 hides it).

    Returns:
        A `Path` to a preset directory (config.json, model.weights.h5, metadata.json).

    Raises:
        ValueError: a checkpoint that does not fit `config`, or one whose
            architecture the library cannot represent (naming the feature),
            or a corrupt download (naming the file).
        FileNotFoundError: offline with nothing cached, no such repo or revision.
    """
    handle = handle or f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    try:
        hf_config, commit = download_config(repo_id, revision, token, handle)
    except FileNotFoundError:
        # Offline with the Hugging Face cache cleared: a converted copy still serves.
        offline_copy = _offline_entry(repo_id, revision, config)
        if offline_copy is None:
            raise
        return offline_copy
    if not is_timm_config(hf_config):
        raise ValueError(f"{handle!r}: config.json is not timm's (no 'architecture'); it "
                         "is not a timm checkpoint.")
    cached = cache.cached_entry(repo_id, commit)
    if cached is not None and (config is None or read_directory_config(cached) == config):
        return cached
    filename = _weights_file(repo_id, commit, token, handle)
    shapes = _header_shapes(repo_id, commit, filename, token)
    if shapes is not None:  # refuse before the weights download
        config = _checked_config(hf_config, shapes, config, handle)
    path = hub.download_file(repo_id, filename, commit, token, handle)
    source = open_checkpoint(path)
    config = _checked_config(hf_config, shapes_of(source), config, handle)
    metadata = {"source": f"hf://{repo_id}", "source_commit": commit,
                "timm_architecture": hf_config.get("architecture"),
                **info_from_timm(hf_config), **(info or {})}
    return _convert_to_cache(model_class, config, source, repo_id, commit, metadata, verbose)


def _weights_file(repo_id, commit, token, handle):
    """The first of `WEIGHT_FILES` the repo has at `commit`."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    endpoint, cache_dir, offline = hub.hub_settings()
    if offline:
        for filename in WEIGHT_FILES:
            if isinstance(try_to_load_from_cache(repo_id, filename, cache_dir, commit), str):
                return filename
        raise FileNotFoundError(
            f"{handle!r}: the weights of {repo_id} (commit {commit[:12]}) are neither "
            f"converted in {cache.cache_dir()} nor downloaded, and offline mode "
            "(HF_HUB_OFFLINE=1) forbids fetching them. Load it once online, or fetch them "
            f"with `hf download {repo_id} model.safetensors config.json`.")
    with hub.download_errors(handle, repo_id, commit, offline, cache_dir, "the file list"):
        present = set(HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=commit,
                                                                token=token))
    for filename in WEIGHT_FILES:
        if filename in present:
            return filename
    raise FileNotFoundError(
        f"Hugging Face repo {repo_id!r} has none of {list(WEIGHT_FILES)} (it has "
        f"{sorted(present)[:8]}); it is not a timm checkpoint that can be loaded.")


def _header_shapes(repo_id, commit, filename, token):
    """{tensor: shape} from a remote safetensors header, or None if not available.

    Only the header is fetched (a ranged request); a .bin file, offline mode,
    or a server without ranges give None and the check waits for the file.
    """
    from huggingface_hub import HfApi

    endpoint, _, offline = hub.hub_settings()
    if offline or not filename.endswith(".safetensors"):
        return None
    try:
        header = HfApi(endpoint=endpoint).parse_safetensors_file_metadata(
            repo_id, filename, revision=commit, token=token)
    except Exception as err:  # the full download below checks everything again
        logger.info("No safetensors header for %s/%s (%s); checking after the download.",
                    repo_id, filename, err)
        return None
    return {name: tuple(t.shape) for name, t in header.tensors.items()}


def _checked_config(hf_config, shapes, config, handle):
    """The config the tensors give (or `config`), checked against every tensor."""
    if config is None:
        config = config_from_timm_repo(hf_config, shapes)
    try:
        check_state_dict(shapes, config)
    except ValueError as err:
        raise ValueError(f"{handle!r}: {err}") from None
    return config


def info_from_timm(hf_config):
    """Preprocessing and label facts from timm's pretrained_cfg."""
    cfg = hf_config.get("pretrained_cfg") or {}
    keys = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
    info = {}
    if all(k in cfg for k in ("input_size", "mean", "std")):
        info["preprocessing"] = {k: cfg[k] for k in keys if k in cfg}
    classes = hf_config.get("num_classes", cfg.get("num_classes"))
    info["num_classes"] = classes
    info["labels"], info["activation"] = LABELS_BY_CLASSES.get(classes, (None, None))
    if cfg.get("license"):
        info["licence"] = cfg["license"]
    return info


def convert_checkpoint(model_class, config, source, directory, metadata=None, verbose=True):
    """Converts a timm-layout state dict into a preset directory, one tensor at a time.

    Peak memory is the model plus one tensor: each converted array is
    assigned to its variable and dropped before the next is read.

    Args:
        model_class: the Keras model class (`kvs.ViT`).
        config: the target `ViTConfig` (checked against every tensor first).
        source: `{timm name: array}`, e.g. `files.open_checkpoint(path)` (lazy).
        directory: where to write config.json, model.weights.h5, metadata.json.
        metadata: extra entries for metadata.json.
        verbose: a progress bar over the tensors.

    Returns:
        `directory`.

    Example:
    ```python
    convert_checkpoint(kvs.ViT, builtin_config("vit_s16", tag="augreg_in21k_ft_in1k"),
                       open_checkpoint("model.safetensors"), "vit_s16_preset")
    ```
    """
    model = model_class(config=config)
    variables = {v.path: v for v in model.weights}
    for path, array in stream_weights(config, source, timm_recipe(config, source),
                                      source_name="timm", verbose=verbose):
        variables[path].assign(array)
    model.save_to_preset(directory, metadata=metadata)
    return directory


def _convert_to_cache(model_class, config, source, repo_id, commit, metadata, verbose):
    """Converts into a temporary directory that becomes the cache entry on success."""
    with cache.writing_entry(repo_id, commit, size_hint=4 * config.count_params()) as tmp:
        convert_checkpoint(model_class, config, source, tmp, metadata, verbose)
    logger.info("Converted %s@%s into %s", repo_id, commit[:12], cache.entry_dir(repo_id, commit))
    return cache.entry_dir(repo_id, commit)


def _offline_entry(repo_id, revision, config):
    """The newest converted entry of `repo_id` (at `revision` if it is a commit)
    when offline, or None."""
    if not hub.hub_settings()[2]:
        return None
    commits = cache.cached_commits(repo_id)
    if revision:
        commits = [c for c in commits if c == revision]
    for commit in commits:
        entry = cache.cached_entry(repo_id, commit)
        if config is None or read_directory_config(entry) == config:
            logger.info("Offline: using the converted %s@%s from %s", repo_id, commit[:12], entry)
            return entry
    return None
