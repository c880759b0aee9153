"""A .safetensors reader in plain numpy that streams one tensor per lookup.

The format: an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}`,
then the tensors' bytes, offsets counted from the end of the header.
Everything the header claims is checked against the file's size when it is
opened, so a truncated or corrupt download is named before any data is read.

Reads are plain `readinto` calls, not mmap: mapped pages would count in the
process's resident memory for as long as the mapping lives, and conversion
is meant to hold one tensor at a time. Neither torch nor the safetensors
package is needed, bfloat16 included.

This module imports nothing of the package: the pretrained-weights loader
(which model.py imports) reads checkpoints through it.

Example:
```python
from keras_vitscale.convert.safetensors_reader import SafetensorsReader
state = SafetensorsReader("model.safetensors")
state.shapes["pos_embed"], state.dtypes["pos_embed"]   # ((1, 197, 768), 'F32')
```
"""

import collections.abc
import json
import math
import os

import numpy as np

# safetensors dtype -> (numpy dtype of the stored bytes, bytes per element).
# BF16 is stored as its uint16 bits and widened to float32 on read.
_SAFETENSORS_DTYPES = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U8": ("u1", 1), "BOOL": ("?", 1),
}
# A header longer than this is not a header (safetensors caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsReader(collections.abc.Mapping):
    """{name: numpy array} of .safetensors files, one tensor read per lookup.

    Opening parses the headers only (8-byte little-endian length + JSON) and
    checks them against the file sizes, so a truncated or corrupt download
    fails here, before any tensor is read. `.shapes` and `.dtypes` come from
    the headers. Each lookup reads one tensor with plain file reads into a
    fresh buffer (the file is never mapped, so its pages do not stay in the
    process's memory); float16 stays
    float16, bfloat16 becomes float32 by a bit shift; neither torch nor the
    safetensors package is needed.

    Args:
        paths: one .safetensors file, or the shards of one checkpoint (a
            name in two shards is an error).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file (named, with the fix).

    Example:
    ```python
    state = SafetensorsReader("model.safetensors")
    state.shapes["patch_embed.proj.weight"]     # (768, 3, 16, 16), nothing read
    kernel = state["patch_embed.proj.weight"]   # reads that tensor only
    ```
    """

    def __init__(self, paths):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.paths = [str(p) for p in paths]
        self.metadata = {}
        self._entries = {}  # name -> (path, file offset, dtype, shape)
        for path in self.paths:
            header, data_start, metadata = read_safetensors_header(path)
            self.metadata.update(metadata)
            for name, (dtype, shape, begin, _) in header.items():
                if name in self._entries:
                    raise ValueError(f"{name!r} is in both {self._entries[name][0]!r} and "
                                     f"{path!r}; pass the shards of one checkpoint.")
                self._entries[name] = (path, data_start + begin, dtype, shape)
        self.shapes = {name: entry[3] for name, entry in self._entries.items()}
        self.dtypes = {name: entry[2] for name, entry in self._entries.items()}

    def __getitem__(self, name):
        path, offset, dtype, shape = self._entries[name]
        numpy_dtype, size = _SAFETENSORS_DTYPES[dtype]
        count = math.prod(shape)
        array = np.empty(count, numpy_dtype)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(array).cast("B")) if count else 0
        if got != count * size:
            raise _corrupt_safetensors(path, f"{name!r} ends past the end of the file")
        if dtype == "BF16":  # bfloat16 is the upper half of a float32
            widened = np.empty(count, np.uint32)
            widened[...] = array
            widened <<= 16
            array = widened.view(np.float32)
        return array.reshape(shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __repr__(self):
        return f"SafetensorsReader({self.paths}, {len(self)} tensors)"


def read_safetensors_header(path):
    """({name: (dtype, shape, begin, end)}, data start, metadata) of a .safetensors file.

    Offsets are relative to the data start, as in the file. Only the header
    is read; its length, JSON and every tensor's extent are checked against
    the file's size, so a truncated download is caught before any data.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file (named, with the fix).

    Example:
    ```python
    header, start, metadata = read_safetensors_header("model.safetensors")
    ```
    """
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt_safetensors(path, f"{size} bytes, shorter than the header length")
        length = int.from_bytes(prefix, "little")
        if length > min(_MAX_HEADER, size - 8):
            raise _corrupt_safetensors(path, f"a header length of {length} bytes in a file "
                                             f"of {size}")
        raw = f.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt_safetensors(path, f"its header is not JSON ({error})") from error
    if not isinstance(parsed, dict):
        raise _corrupt_safetensors(path, "its header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    header = {}
    for name, entry in parsed.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
            itemsize = _SAFETENSORS_DTYPES[dtype][1]
        except (KeyError, TypeError, ValueError) as error:
            raise _corrupt_safetensors(
                path, f"a malformed header entry for {name!r}: {entry!r}") from error
        if not 0 <= begin <= end or end - begin != math.prod(shape) * itemsize:
            raise _corrupt_safetensors(
                path, f"{name!r} spans bytes {begin}..{end}, not the "
                      f"{math.prod(shape) * itemsize} its {dtype} shape {shape} needs")
        if end > data_size:
            raise _corrupt_safetensors(
                path, f"{name!r} ends at byte {end} of the data, which holds {data_size}")
        header[name] = (dtype, shape, begin, end)
    return header, 8 + length, metadata


def _corrupt_safetensors(path, why):
    return ValueError(
        f"Cannot read {path!r} as safetensors: {why}. The file is truncated or corrupt "
        "(an interrupted download or copy?); download or save it again.")
