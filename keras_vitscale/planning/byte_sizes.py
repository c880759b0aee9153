"""Memory sizes as people write them ("16GiB", "80GB") and as the planner prints them."""

import re

_UNITS = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(value):
    """Bytes from a number of bytes or a size string with a unit.

    A string needs its unit: "16" alone is refused rather than read as 16
    bytes, since a device memory of 16 bytes is never what was meant.

    Args:
        value: an int or float (bytes), or a string such as "16GiB" (2^30),
            "16G" (2^30), "80GB" (10^9) or "512B" (bytes).

    Returns:
        The size in bytes, an int.

    Raises:
        ValueError: the string has no unit or is not a size; the message
            names the value and how to write it.

    Example:
    ```python
    parse_bytes("16GiB")   # 17179869184
    parse_bytes("80GB")    # 80000000000
    ```
    """
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(value))
    if match and not match.group(2):
        number = match.group(1)
        raise ValueError(
            f"Cannot read {value!r} as a memory size: it has no unit. Write "
            f"'{number}GiB' (2^30 bytes), '{number}GB' (10^9 bytes) or '{number}B' "
            "for bytes.")
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"Cannot read {value!r} as a memory size; write e.g. '16GiB', "
            "'80GB' or '512B' (units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB).")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n):
    """Human-readable binary size.

    Example:
    ```python
    format_bytes(7 * 2**30)   # '7.00 GiB'
    ```
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
