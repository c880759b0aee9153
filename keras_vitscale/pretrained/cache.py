"""The converted-weights cache: one Keras preset directory per source commit.

A checkpoint converted from the Hub is written once, as an ordinary preset
directory (config.json, model.weights.h5, metadata.json), under

    KVS_CACHE/<org>--<repo>/<commit>/

`KVS_CACHE` defaults to `$XDG_CACHE_HOME/keras_vitscale` (or
`~/.cache/keras_vitscale`). Later loads of the same repo and commit read that
directory: no download of the weights, no conversion, no torch.

Each entry is written into a temporary directory beside it and renamed into
place in one step, so an interrupted or failed write (a full disk, Ctrl-C)
leaves no partial entry; the temporary directory is removed on failure.

Example:
```python
from keras_vitscale.pretrained import cache
cache.entry_dir("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "5f1c...")
```
"""

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "KVS_CACHE"
COMPLETE_MARKER = "metadata.json"  # written last by presets.write_directory


def cache_dir():
    """The cache root: KVS_CACHE, else the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "keras_vitscale"


def repo_dir(repo_id):
    """Where the entries of one source repo live (`org/name` -> `org--name`)."""
    return cache_dir() / repo_id.replace("/", "--")


def entry_dir(repo_id, commit):
    """The preset directory of `repo_id` at `commit` (it may not exist yet)."""
    return repo_dir(repo_id) / commit


def cached_entry(repo_id, commit):
    """The complete cached entry of `repo_id` at `commit`, or None."""
    path = entry_dir(repo_id, commit)
    return path if (path / COMPLETE_MARKER).exists() else None


def cached_commits(repo_id):
    """Commits of `repo_id` with a complete entry, newest first."""
    root = repo_dir(repo_id)
    if not root.is_dir():
        return []
    entries = [p for p in root.iterdir() if not p.name.startswith(".")
               and (p / COMPLETE_MARKER).exists()]
    return [p.name for p in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)]


@contextlib.contextmanager
def writing_entry(repo_id, commit, size_hint=None):
    """Context manager: yields a temporary directory that becomes the entry on success.

    On any error the temporary directory is deleted and nothing is left in
    the cache; a full disk becomes an OSError that says where and what to do.

    Args:
        repo_id, commit: the entry's key.
        size_hint: bytes the entry will take, for the full-disk message.

    Example:
    ```python
    with writing_entry(repo, commit) as tmp:
        model.save_to_preset(tmp)
    ```
    """
    final = entry_dir(repo_id, commit)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=final.parent))
    try:
        yield tmp
        _move_into_place(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            need = f" (about {size_hint / 1e9:.1f} GB)" if size_hint else ""
            raise OSError(err.errno,
                          f"No space left on the device while writing the converted "
                          f"checkpoint{need} to {final.parent}. Nothing was kept in the "
                          f"cache. Free space there, or point {CACHE_ENV} to a disk with "
                          "room, and load again.") from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp, final):
    """Renames `tmp` to `final` atomically; an older entry there is replaced."""
    if final.exists():
        # A stale entry (another config, or incomplete): swap it out first so
        # the final name always holds a complete directory or none.
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
        os.replace(final, old / "entry")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
