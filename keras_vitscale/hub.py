"""Hugging Face Hub: publish a preset with a model card, load "hf://" handles.

A Hub repo holds a preset directory (config.json, model.weights.h5 or
model.weights.json plus shards, metadata.json), a model card README.md and,
on request, model.safetensors for other frameworks. Everything goes through
`huggingface_hub`: one commit per push, its cache for downloads.

Loading downloads config.json first and checks it with the preset reader
before any weights are fetched, so a malformed or foreign config costs one
small request and nothing named in it is ever imported.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE
once, when it is first imported (Keras imports it). This module reads them
again at each call and passes them on, so setting them later in a running
process (a notebook cell, a test) takes effect.
"""

import json
import logging
import os
import re
import tempfile
from pathlib import Path

from keras_vitscale.presets.directory import (CONFIG_FILE, METADATA_FILE,
                                              SHARDED_WEIGHTS_FILE, WEIGHTS_FILE,
                                              read_config_file, read_directory_config)
from keras_vitscale.presets.directory import resolve_directory as local_directory

logger = logging.getLogger("keras_vitscale")

README_FILE = "README.md"
SAFETENSORS_FILE = "model.safetensors"
SHARD_PATTERN = "model_*.weights.h5"  # how Keras names weight shards
# The files a preset consists of; everything else in a repo is left alone on
# download, and replaced or deleted on push so no stale weights survive.
PRESET_PATTERNS = (CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, SHARDED_WEIGHTS_FILE,
                   SHARD_PATTERN)
WEIGHT_PATTERNS = (WEIGHTS_FILE, SHARDED_WEIGHTS_FILE, SHARD_PATTERN, SAFETENSORS_FILE)

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HANDLE = re.compile(rf"^hf://({_NAME}/{_NAME})(?:@(\S+))?$")
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")


def parse_handle(handle):
    """Splits "hf://org/repo[@revision]" into (repo_id, revision or None).

    Example:
    ```python
    parse_handle("hf://org/vit-mu8@v1")   # ("org/vit-mu8", "v1")
    ```
    """
    match = _HANDLE.match(str(handle))
    if not match:
        raise ValueError(
            f"Invalid Hugging Face handle {str(handle)!r}: expected 'hf://org/repo' or "
            "'hf://org/repo@revision' (a branch, tag or commit), e.g. "
            "'hf://my-org/vit-b16@main'.")
    return match.group(1), match.group(2)


def _repo_id(repo_id):
    repo_id = str(repo_id)
    bare = repo_id[len("hf://"):] if repo_id.startswith("hf://") else repo_id
    if not _REPO_ID.match(bare):
        raise ValueError(
            f"Invalid Hugging Face repo id {repo_id!r}: expected 'org/repo' (letters, "
            "digits, '.', '_', '-'), e.g. 'my-org/vit-b16'.")
    return bare


def _is_true(value):
    return str(value).strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_settings():
    """(endpoint, cache_dir, offline) as the environment says now.

    None means "huggingface_hub's own default". See the module docstring for
    why they are read here rather than left to huggingface_hub.
    """
    from huggingface_hub import is_offline_mode

    endpoint = os.environ.get("HF_ENDPOINT") or None
    cache_dir = os.environ.get("HF_HUB_CACHE")
    if not cache_dir and os.environ.get("HF_HOME"):
        cache_dir = os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    offline = _is_true(os.environ.get("HF_HUB_OFFLINE", "")) or is_offline_mode()
    return endpoint.rstrip("/") if endpoint else None, cache_dir or None, offline


# ---- download ---------------------------------------------------------------
def download_file(repo_id, filename, revision=None, token=None, handle=None):
    """Downloads one file of a Hub repo into the huggingface_hub cache.

    Honours HF_ENDPOINT, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE and tokens as
    any huggingface_hub client does; errors name the repo and the fix.

    Returns:
        The local path; its parent directory is named after the commit.

    Example:
    ```python
    path = download_file("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "config.json")
    ```
    """
    from huggingface_hub import hf_hub_download

    endpoint, cache_dir, offline = hub_settings()
    with download_errors(handle or f"hf://{repo_id}", repo_id, revision, offline, cache_dir,
                         filename):
        return hf_hub_download(repo_id=repo_id, filename=filename, revision=revision,
                               cache_dir=cache_dir, endpoint=endpoint, token=token,
                               local_files_only=offline)


def download_preset(handle, token=None):
    """Downloads a preset from the Hub into the huggingface_hub cache.

    config.json comes first and is checked (it must name keras_vitscale.ViT
    and hold a valid ViTConfig); only then are metadata and weights fetched.
    With HF_HUB_OFFLINE=1 a cached preset is used and nothing is requested.

    Args:
        handle: "hf://org/repo" or "hf://org/repo@revision".
        token: a Hub token for private repos; default: HF_TOKEN or the saved
            login.

    Returns:
        The local snapshot directory (a preset directory).

    Example:
    ```python
    directory = kvs.hub.download_preset("hf://my-org/vit-b16")
    model = kvs.ViT.from_preset("hf://my-org/vit-b16")  # the same, then loads
    ```
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_handle(handle)
    config_path = download_file(repo_id, CONFIG_FILE, revision, token, handle)
    read_config_file(config_path)  # raises on a bad or foreign config
    # The cache keeps each file under snapshots/<commit>/: pinning the rest of
    # the download to that commit keeps config and weights from one commit even
    # if the branch moves in between.
    commit = Path(config_path).parent.name
    endpoint, cache_dir, offline = hub_settings()
    with download_errors(handle, repo_id, revision, offline, cache_dir):
        directory = snapshot_download(
            repo_id=repo_id, revision=commit, allow_patterns=list(PRESET_PATTERNS),
            cache_dir=cache_dir, endpoint=endpoint, token=token, local_files_only=offline)
    return directory


def resolve_directory(handle, token=None):
    """A local preset directory for a handle: downloads "hf://" ones first.

    Args:
        handle: "hf://org/repo[@revision]" or a local preset directory.
        token: a Hub token for private repos (Hub handles only).

    Example:
    ```python
    resolve_directory("hf://my-org/vit-b16")   # the cached snapshot directory
    resolve_directory("out/vit_mu8")           # Path('out/vit_mu8')
    ```
    """
    if str(handle).startswith("hf://"):
        return Path(download_preset(handle, token=token))
    return local_directory(handle)


# huggingface_hub's HTTP stack, whose transport errors mean a broken connection.
_HTTP_CLIENTS = ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "requests", "urllib3")


class download_errors:
    """Turns huggingface_hub's download errors into ones that name the repo and the fix.

    Args:
        handle: what the user asked for, for the messages.
        repo_id, revision: the repo and revision being downloaded.
        offline, cache_dir: as `hub_settings()` gives them.
        filename: the file being fetched (default: the preset's config.json).
    """

    def __init__(self, handle, repo_id, revision, offline, cache_dir, filename=CONFIG_FILE):
        self.handle, self.repo_id, self.revision = handle, repo_id, revision
        self.offline, self.cache_dir, self.filename = offline, cache_dir, filename

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback):
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        if err is None:
            return False
        repo = f"Hugging Face repo {self.repo_id!r}"
        if isinstance(err, LocalEntryNotFoundError):
            where = self.cache_dir or "the default Hugging Face cache"
            if self.offline:
                command = f"hf download {self.repo_id}" + (
                    f" --revision {self.revision}" if self.revision else "")
                raise FileNotFoundError(
                    f"{self.handle!r} is not cached in {where}, and offline mode "
                    "(HF_HUB_OFFLINE=1) forbids downloading it. Load it once online, or "
                    f"fetch it with `{command}` (older clients: `huggingface-cli "
                    "download`) using the same HF_HOME / HF_HUB_CACHE.") from err
            raise ConnectionError(
                f"Could not reach the Hugging Face Hub for {self.handle!r}, and it is not "
                f"cached in {where}. Check the connection (and HF_ENDPOINT, if set) and "
                f"try again. ({type(err).__name__}: {err})") from err
        if isinstance(err, RevisionNotFoundError):
            raise FileNotFoundError(
                f"{repo} has no revision {self.revision!r}; use an existing branch, tag or "
                f"commit, or drop '@{self.revision}' for the default branch.") from err
        if isinstance(err, RepositoryNotFoundError):
            status = err.response.status_code if err.response is not None else "?"
            raise FileNotFoundError(
                f"{repo} does not exist or is not accessible (HTTP {status}). Check the "
                "name; for a private or gated repo log in with `hf auth login` or set "
                "HF_TOKEN.") from err
        if isinstance(err, EntryNotFoundError):
            if self.filename != CONFIG_FILE:
                raise FileNotFoundError(f"{repo} has no {self.filename}.") from err
            raise FileNotFoundError(
                f"{repo} has no {CONFIG_FILE}, so it is neither a keras_vitscale preset "
                "nor a timm checkpoint; publish a preset with kvs.hub.push_to_hub(model, "
                "repo_id).") from err
        if isinstance(err, HfHubHTTPError):
            raise OSError(f"Downloading {self.filename} of {self.handle!r} from the Hugging "
                          f"Face Hub failed: {err}") from err
        if type(err).__module__.split(".")[0] in _HTTP_CLIENTS:
            # The connection failed mid-transfer, after huggingface_hub's own retries.
            raise OSError(f"The download of {self.filename} from {repo} broke off "
                          f"({type(err).__name__}: {err}). Nothing was converted or cached; "
                          "load again to resume the download.") from err
        if isinstance(err, OSError) and "onsistency check failed" in str(err):
            # huggingface_hub's size check: the connection dropped mid-file.
            raise OSError(f"The download of {self.filename} from {repo} was cut short "
                          f"({err}). Nothing was kept; load again to retry.") from err
        return False


# ---- model card -------------------------------------------------------------
def _read_workdir(workdir):
    """(training settings, {metric: (value, step)}) from a run's workdir."""
    from keras_vitscale.training.run_log import METRICS_FILE, read_json, read_metrics

    workdir = Path(workdir)
    config_path, metrics_path = workdir / "config.json", workdir / METRICS_FILE
    if not config_path.exists() and not metrics_path.exists():
        raise FileNotFoundError(
            f"Workdir {str(workdir)!r} has neither config.json nor {METRICS_FILE}; pass "
            "the directory a training run wrote, or workdir=None.")
    settings = read_json(config_path) if config_path.exists() else {}
    results = {}
    for row in read_metrics(metrics_path):  # later rows replace earlier values
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                results[key] = (value, row.get("step"))
    return settings, results


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(config, repo_id, metadata=None, workdir=None, revision=None,
               license="apache-2.0"):
    """The README.md text of a published preset: YAML front matter and body.

    Args:
        config: the model's `ViTConfig`.
        repo_id: "org/repo", for the title and the usage snippet.
        metadata: the preset's metadata.json contents.
        workdir: a training run directory; its config.json gives the recipe
            and its metrics.jsonl the results (last value of each metric).
        revision: the branch the card is pushed to, for the usage snippet.
        license: a Hub licence id, e.g. "apache-2.0" or "cc-by-nc-4.0".

    Example:
    ```python
    text = model_card(model.config, "my-org/vit-mu8", workdir="runs/digits")
    ```
    """
    from huggingface_hub import ModelCardData

    card_data = ModelCardData(
        library_name="keras-vitscale", license=license,
        pipeline_tag="image-classification" if config.num_classes else "image-feature-extraction",
        tags=["vision-transformer", "keras", "keras-vitscale"])
    params = config.count_params()
    gflops = config.flops_per_image() / 1e9
    handle = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    name = config.variant or f"{config.width}w x {config.depth}d"
    output = (f"logits of shape (batch, {config.num_classes})" if config.num_classes
              else f"features of shape (batch, {config.feature_dim})")
    parts = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# {repo_id.split('/')[-1]}",
        f"A Vision Transformer (ViT {name}) for keras_vitscale (`pip install "
        "keras-vitscale`), Keras 3 on JAX, TensorFlow or PyTorch. The repo is a "
        "keras_vitscale preset: "
        f"`{CONFIG_FILE}`, the weights (`{WEIGHTS_FILE}`, or "
        f"`{SHARDED_WEIGHTS_FILE}` plus shards) and `{METADATA_FILE}`.",
        "## Architecture",
        _table(("field", "value"), sorted(config.to_dict().items())),
        f"Parameters: {params:,}. Forward pass: {gflops:.3g} GFLOPs per image.",
    ]
    if workdir is not None:
        settings, results = _read_workdir(workdir)
        scalars = sorted((k, v) for k, v in settings.items()
                         if isinstance(v, (str, int, float, bool)) or v is None)
        parts += ["## Training recipe",
                  _table(("setting", "value"), scalars) if scalars else "Not recorded."]
        parts += ["## Results",
                  _table(("metric", "value", "step"),
                         [(k, f"{v:.6g}", s) for k, (v, s) in sorted(results.items())])
                  if results else "No metrics recorded."]
    shown = ("parameter_count", "gflops")  # given above, unrounded
    extra = {k: v for k, v in (metadata or {}).items()
             if isinstance(v, (str, int, float)) and k not in shown}
    if extra:
        parts += ["## Metadata", _table(("key", "value"), sorted(extra.items()))]
    h, w = config.image_size
    parts += ["## Usage", (
        "```python\n"
        "import numpy as np\n"
        "import keras_vitscale as kvs\n\n"
        f'model = kvs.ViT.from_preset("{handle}")\n'
        f"images = np.zeros((1, {h}, {w}, {config.in_channels}), \"float32\")"
        "  # channels last, preprocessed as in training\n"
        f"outputs = model(images)  # {output}\n"
        "```\n"
        "Fine-tune at another resolution or head size with "
        f'`kvs.ViT.from_preset("{handle}", image_size=384, num_classes=10)`.')]
    return "\n\n".join(parts) + "\n"


# ---- upload -----------------------------------------------------------------
def locate_preset(path):
    """(preset directory, workdir or None) for a preset directory or a workdir.

    Args:
        path: a preset directory, or a training workdir holding exactly one
            exported preset directory.

    Example:
    ```python
    locate_preset("runs/digits")   # (Path('runs/digits/final'), Path('runs/digits'))
    ```
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory; pass a model, a preset "
                                "directory or a training workdir.")
    config = path / CONFIG_FILE
    if config.exists():
        try:
            is_preset = "class_name" in json.loads(config.read_text())
        except json.JSONDecodeError:
            is_preset = True  # the preset reader reports it, naming the file
        if is_preset:
            return path, None
    # A training workdir: its config.json is the run's settings, and the
    # model is a preset directory exported inside it.
    found = sorted(d for d in path.iterdir()
                   if d.is_dir() and (d / CONFIG_FILE).exists()
                   and (d / METADATA_FILE).exists())
    if len(found) != 1:
        raise FileNotFoundError(
            f"{str(path)!r} is neither a preset directory nor a workdir holding exactly "
            f"one (found {[d.name for d in found]}); pass the preset directory (written "
            "by model.save_to_preset) and the run with workdir=.")
    return found[0], path


def _write_safetensors(model, path):
    import keras
    import numpy as np
    try:
        from safetensors.numpy import save_file
    except ImportError as err:
        raise ImportError("safetensors=True needs the safetensors package: "
                          "pip install safetensors") from err
    tensors = {}
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable.value)
        if value.dtype.name == "bfloat16":  # not a numpy dtype safetensors knows
            value = value.astype(np.float32)
        tensors[variable.path] = np.ascontiguousarray(value)
    save_file(tensors, str(path), metadata={"format": "keras_vitscale"})


def push_to_hub(model_or_preset_dir, repo_id, private=False, revision=None,
                commit_message=None, token=None, workdir=None, safetensors=False,
                license="apache-2.0", max_shard_size_gb=None, model=None):
    """Publishes a model or preset directory to the Hub in one commit.

    Uploads config.json, the weights (sharded above `max_shard_size_gb`),
    metadata.json, a model card README.md and, with `safetensors=True`, a
    flat model.safetensors ({variable.path: array}) for other frameworks.
    Weight files left from an earlier push in another layout are deleted in
    the same commit. The local preset directory is never modified.

    Args:
        model_or_preset_dir: a model (anything with `save_to_preset`, e.g. a
            `kvs.ViT`), a preset directory, or a training workdir holding one
            exported preset directory.
        repo_id: "org/repo"; created if missing.
        private: create the repo private (an existing repo keeps its setting).
        revision: a branch to commit to (created from main if missing);
            default: main.
        commit_message: default: "Upload keras_vitscale preset".
        token: a Hub token with write access; default: HF_TOKEN or the saved
            login (`hf auth login`).
        workdir: a training run whose config.json and metrics.jsonl go into
            the model card.
        safetensors: also upload model.safetensors. It is written from the
            model's variables, so with a directory pass `model=` too.
        license: the licence id in the model card, e.g. "apache-2.0".
        max_shard_size_gb: shard the weights above this size (a model only).
        model: with a directory and `safetensors=True`, the model loaded from
            it (`kvs.ViT.from_preset(preset_dir)`); this module moves files
            and builds no model.

    Returns:
        The commit (a `huggingface_hub.CommitInfo`, a str of its URL).

    Example:
    ```python
    kvs.hub.push_to_hub(model, "my-org/vit-mu8", workdir="runs/digits")
    kvs.ViT.from_preset("hf://my-org/vit-mu8")
    ```
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import filter_repo_objects

    repo_id = _repo_id(repo_id)
    is_model = hasattr(model_or_preset_dir, "save_to_preset")
    if safetensors and model is None and not is_model:
        raise ValueError(
            f"safetensors=True with {str(model_or_preset_dir)!r} needs the model's "
            "variables: pass model=kvs.ViT.from_preset(preset_dir) as well, or push the "
            "model itself.")
    endpoint, _, _ = hub_settings()
    with tempfile.TemporaryDirectory(prefix="kvs-push-") as staging:
        staging = Path(staging)
        if is_model:
            model, preset_dir = model_or_preset_dir, staging / "preset"
            model.save_to_preset(preset_dir, max_shard_size_gb=max_shard_size_gb)
        else:
            preset_dir, found_workdir = locate_preset(model_or_preset_dir)
            workdir = workdir if workdir is not None else found_workdir
        config = read_directory_config(preset_dir)
        metadata = json.loads((preset_dir / METADATA_FILE).read_text())
        files = {name: preset_dir / name for name in
                 filter_repo_objects([p.name for p in preset_dir.iterdir()],
                                     allow_patterns=list(PRESET_PATTERNS))}
        if SHARDED_WEIGHTS_FILE in files:
            files.pop(WEIGHTS_FILE, None)  # the loader would pick the shards
        (staging / README_FILE).write_text(
            model_card(config, repo_id, metadata=metadata, workdir=workdir,
                       revision=revision, license=license))
        files[README_FILE] = staging / README_FILE
        if safetensors:
            _write_safetensors(model, staging / SAFETENSORS_FILE)
            files[SAFETENSORS_FILE] = staging / SAFETENSORS_FILE

        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            remote = api.list_repo_files(repo_id, revision=revision)
            stale = [name for name in filter_repo_objects(remote, allow_patterns=list(
                WEIGHT_PATTERNS)) if name not in files]
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                          for name, path in sorted(files.items())]
            operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
            return api.create_commit(
                repo_id, operations=operations, revision=revision,
                commit_message=commit_message or "Upload keras_vitscale preset")
        except (HfHubHTTPError, OSError) as err:
            source = ("the model" if is_model
                      else f"preset directory {str(preset_dir)!r}")
            raise RuntimeError(
                f"Pushing to Hugging Face repo {repo_id!r} failed: {err}\nNothing was "
                f"changed locally ({source} is intact). A Hub commit is all-or-nothing, "
                "so running push_to_hub again is safe; for HTTP 401/403 check that the "
                "token (HF_TOKEN or `hf auth login`) may write to the repo.") from err

