"""Mesh specs such as "fsdp:4,model:2": the one parser of `--mesh`.

Plain Python with no backend import: the JAX mesh set-up, the TensorFlow
strategies and the memory planner all read a spec through `parse_mesh`.
"""

MESH_AXES = ("data", "fsdp", "model")

SPEC_HELP = ("use 'data:N', 'fsdp:N', 'data:N,model:M' or 'fsdp:N,model:M' with "
             "positive integer sizes, e.g. 'data:8', 'fsdp:8' or 'fsdp:4,model:2'")


def parse_mesh(spec):
    """Axis sizes of a mesh spec, 1 for the axes it does not name.

    Args:
        spec: a string such as "data:8" or "fsdp:4,model:2", a dict of axis
            sizes, or None (one device).

    Returns:
        {"data": int, "fsdp": int, "model": int}.

    Raises:
        ValueError: an unknown axis, a repeated axis or a size that is not a
            positive integer; the message shows the accepted forms.

    Example:
    ```python
    parse_mesh("fsdp:4,model:2")  # {"data": 1, "fsdp": 4, "model": 2}
    ```
    """
    if spec is None:
        return dict.fromkeys(MESH_AXES, 1)
    if isinstance(spec, dict):
        axes = dict(spec)
        for name, size in axes.items():
            if name not in MESH_AXES:
                raise ValueError(f"Unknown mesh axis {name!r}; the axes are {list(MESH_AXES)}.")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"Mesh axis {name!r} has size {size!r}; use a positive "
                                 "integer.")
    else:
        axes = {}
        for part in str(spec).split(","):
            name, _, size = part.strip().partition(":")
            if name not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in axes:
                raise ValueError(f"Bad --mesh {spec!r}; {SPEC_HELP}.")
            axes[name] = int(size)
    return {name: axes.get(name, 1) for name in MESH_AXES}


def device_count(spec):
    """How many devices a mesh spec spans: the product of its axis sizes."""
    count = 1
    for size in parse_mesh(spec).values():
        count *= size
    return count
