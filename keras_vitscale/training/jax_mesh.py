"""JAX only: device meshes for `--mesh`, and the layout of every variable.

Mesh specs:
- `data:N`: `keras.distribution.DataParallel`; the batch is split over N
  devices, weights are replicated.
- `fsdp:N`: fully sharded data parallel (ZeRO-3, as big_vision's "fsdp"
  sharding rule): the batch is split over N devices, and every variable of
  at least `FSDP_MIN_SIZE` elements is sharded over the same N devices along
  its largest dimension divisible by N. Optimizer slots follow their
  parameter's layout, so weights and optimizer state are both 1/N per device.
- `data:N,model:M` and `fsdp:N,model:M`: the same over a (N, M) mesh, plus
  Megatron-style tensor parallelism over "model" (`MODEL_PARALLEL_LAYOUT`:
  column-split the QKV and MLP-in kernels, row-split the attention-out and
  MLP-out kernels). A tensor that gets both is sharded on two different
  dimensions, "model" where the Megatron rule says and "fsdp" on the largest
  remaining one.

The layout of each variable is computed from its path and shape
(`variable_layout`), never guessed from names alone: `make_distribution`
writes it into a `keras.distribution.LayoutMap` under each exact variable
path of a model or a `ViTConfig` (`config.parameter_shapes()`), and a
variable it was not told about (an optimizer statistic of its own shape) gets
the same rule applied to its shape when it is created.

Multi-host input is sharded by the data pipeline itself (one shard per
process), so Keras' own dataset auto-sharding is turned off.

The trainer does not call this module directly: `devices.py` picks it on the
JAX backend (and `tf_strategy.py` on TensorFlow). Every function that places
or queries devices refuses another backend with an error that says so;
`parse_mesh` and `variable_layout` are plain Python (the memory planner uses
them on any backend).
"""

import contextlib
import math
import re

import keras

from keras_vitscale import mesh_spec

# regex on variable.path -> sharding of that variable over the "model" axis.
MODEL_PARALLEL_LAYOUT = {
    r".*attention/qkv/kernel": (None, "model"),
    r".*attention/qkv/bias": ("model",),
    r".*attention/out/kernel": ("model", None),
    r".*mlp/dense_1/kernel": (None, "model"),
    r".*mlp/dense_1/bias": ("model",),
    r".*mlp/dense_2/kernel": ("model", None),
    # The parallel block (ViT-22B) fuses QKV with MLP-in and attention-out
    # with MLP-out: the same column/row split of the fused matrices.
    r".*qkv_mlp_in/kernel": (None, "model"),
    r".*qkv_mlp_in/qkv_bias": ("model",),
    r".*qkv_mlp_in/mlp_bias": ("model",),
    r".*attn_mlp_out/kernel": ("model", None),
}

# Smaller variables stay replicated under FSDP: sharding them saves little
# memory and costs a collective each. 2**20 elements is big_vision's 4 MiB of
# float32.
FSDP_MIN_SIZE = 2**20

# Mesh axis names as keras.distribution sees them ("batch" is Keras' name
# for the data-parallel axis).
_AXIS_NAMES = {"data": "batch", "fsdp": "fsdp", "model": "model"}


def require_jax(what):
    """Raises a ValueError naming `what` unless the Keras backend is JAX.

    Args:
        what: the function or flag that needs JAX, for the message.

    Example:
    ```python
    require_jax("jax_mesh.setup")   # ValueError on TensorFlow or torch
    ```
    """
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"{what} needs the JAX backend (KERAS_BACKEND=jax) but the Keras backend is "
            f"{backend!r}; set KERAS_BACKEND=jax, or call "
            "keras_vitscale.training.devices, which picks the set-up of each backend.")


def parse_mesh(spec):
    """`mesh_spec.parse_mesh`, refusing a hybrid data x fsdp mesh, which the
    trainer's layouts do not support (the memory planner does model it)."""
    axes = mesh_spec.parse_mesh(spec)
    if axes["data"] > 1 and axes["fsdp"] > 1:
        raise ValueError(f"--mesh {spec!r} names both data and fsdp; use one of them "
                         f"(a hybrid data x fsdp mesh is not supported), e.g. "
                         f"'fsdp:{axes['data'] * axes['fsdp']}'.")
    return axes


def variable_layout(path, shape, axes, min_size=FSDP_MIN_SIZE):
    """The mesh axis of each dimension of one variable.

    Args:
        path: the variable's path, e.g. "encoder_block_0/mlp/dense_1/kernel".
        shape: its shape.
        axes: mesh sizes from `parse_mesh`.
        min_size: variables with fewer elements are not FSDP-sharded.

    Returns:
        A tuple with one entry per dimension: "model", "fsdp" or None.

    Raises:
        ValueError: a tensor-parallel dimension is not divisible by the
            "model" size.

    Example:
    ```python
    variable_layout("encoder_block_0/mlp/dense_1/kernel", (768, 3072),
                    parse_mesh("fsdp:4,model:2"), min_size=0)  # ("fsdp", "model")
    ```
    """
    shape = tuple(int(d) for d in shape)
    layout = [None] * len(shape)
    if axes["model"] > 1:
        for pattern, tp in MODEL_PARALLEL_LAYOUT.items():
            if re.fullmatch(pattern, path) and len(tp) == len(shape):
                for dim, axis in zip(shape, tp):
                    if axis == "model" and dim % axes["model"]:
                        raise ValueError(
                            f"{path} has a dimension of {dim}, not divisible by "
                            f"model:{axes['model']}; choose a model size that divides "
                            "the width and MLP size.")
                layout = list(tp)
                break
    n = axes["fsdp"]
    if n > 1 and math.prod(shape) >= min_size:
        free = [i for i, dim in enumerate(shape) if layout[i] is None and dim % n == 0]
        if free:
            # The largest dimension: its shards are the least ragged. Ties go
            # to the later (output) dimension.
            layout[max(free, key=lambda i: (shape[i], i))] = "fsdp"
    return tuple(layout)


def _shapes_of(model_or_config):
    if model_or_config is None:
        return {}
    if isinstance(model_or_config, dict):
        return dict(model_or_config)
    if hasattr(model_or_config, "parameter_shapes"):  # a kvs.ViTConfig
        return model_or_config.parameter_shapes()
    if hasattr(model_or_config, "weights"):  # a built keras model
        return {v.path: tuple(v.shape) for v in model_or_config.weights}
    raise TypeError(f"make_distribution got {type(model_or_config).__name__}; pass a "
                    "kvs.ViTConfig, a built keras model or a {path: shape} dict.")


class ShardedModelParallel(keras.distribution.ModelParallel):
    """`ModelParallel` whose layouts come from `variable_layout`.

    Variables named in the layout map get their listed layout; any other
    variable (made later, e.g. an optimizer statistic with its own shape and
    no parameter layout to follow) gets `variable_layout` of its own path and
    shape, recorded under its exact path, so the rule is the same whether the
    model was known up front or not.

    Make it with `make_distribution` rather than directly.

    Example:
    ```python
    dist = make_distribution("fsdp:8", jax.devices(), vit_config)
    dist.layout_map["head/kernel"].axes  # e.g. (None, "fsdp") or (None, None)
    ```
    """

    def __init__(self, layout_map, batch_dim_name, axes, min_size):
        super().__init__(layout_map=layout_map, batch_dim_name=batch_dim_name,
                         auto_shard_dataset=False)
        self.layout_map = layout_map
        self.axes = dict(axes)
        self.min_size = min_size

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is None and self._layout_map[variable.path] is None:
            self._layout_map[variable.path] = variable_layout(
                variable.path, variable.shape, self.axes, self.min_size)
        return super().get_variable_layout(variable)


def _check_devices(spec, axes, devices):
    size = math.prod(axes.values())
    if size != len(devices):
        import jax

        platform = jax.devices()[0].platform
        raise ValueError(
            f"--mesh {spec!r} has {size} devices but JAX sees {len(devices)} "
            f"({platform}); use a mesh whose sizes multiply to {len(devices)}, "
            "e.g. 'data:%d'. (On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "makes N virtual devices.)" % len(devices))


def make_distribution(spec, devices=None, model_or_config=None, min_size=None):
    """The `keras.distribution.Distribution` of a mesh spec, not installed.

    Nothing is built or placed: with a `ViTConfig` this is enough to lower
    or compile a sharded training step of a model too big for one host.

    Args:
        spec: "data:N", "fsdp:N", "data:N,model:M" or "fsdp:N,model:M".
        devices: the devices, as many as the mesh has (default: all of
            JAX's, across hosts).
        model_or_config: a `kvs.ViTConfig`, a built model or a
            {variable path: shape} dict. Its variables' layouts are written
            into the layout map under their exact paths (and checked now);
            without it, each variable's layout is computed from its shape as
            it is created.
        min_size: variables with fewer elements are not FSDP-sharded
            (default `FSDP_MIN_SIZE`).

    Returns:
        `keras.distribution.DataParallel` for "data:N", else a
        `ShardedModelParallel` (a `keras.distribution.ModelParallel`) over
        a mesh with axes ("batch" or "fsdp", "model").

    Raises:
        ValueError: a bad spec, another backend than JAX, a mesh whose
            size is not the number of devices, or a tensor-parallel
            dimension the "model" size does not divide.

    Example:
    ```python
    config = kvs.ViTConfig.from_variant("B/16", num_classes=1000)
    dist = make_distribution("fsdp:4,model:2", jax.devices(), config)
    dist.layout_map["encoder_block_0/mlp/dense_1/kernel"].axes  # ("fsdp", "model")
    ```
    """
    axes = parse_mesh(spec)
    require_jax("jax_mesh.make_distribution")
    if devices is None:
        devices = keras.distribution.list_devices()
    devices = list(devices)
    _check_devices(spec, axes, devices)
    min_size = FSDP_MIN_SIZE if min_size is None else int(min_size)
    if axes["fsdp"] == 1 and axes["model"] == 1:
        return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    batch = "fsdp" if axes["fsdp"] > 1 else "data"
    names = (_AXIS_NAMES[batch], "model")
    mesh = keras.distribution.DeviceMesh((axes[batch], axes["model"]), names, devices=devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for path, shape in _shapes_of(model_or_config).items():
        layout_map[path] = variable_layout(path, shape, axes, min_size)
    return ShardedModelParallel(layout_map, names[0], axes, min_size)


def setup(spec, batch_size):
    """Installs the distribution of a mesh spec; returns the scope to build in.

    Args:
        spec: a mesh spec (see `make_distribution`).
        batch_size: the global batch size.

    Returns:
        A context manager that does nothing: JAX's distribution is global,
        installed here before the model is built.

    Raises:
        ValueError: another backend, a mesh whose size differs from the
            number of devices, or a batch the data axis cannot split.

    Example:
    ```python
    with setup("fsdp:8", batch_size=256):
        model = kvs.ViT(variant="B/16", num_classes=1000)  # sharded as made
    ```
    """
    axes = parse_mesh(spec)
    require_jax(f"--mesh {spec!r}")
    import jax

    devices = jax.devices()
    _check_devices(spec, axes, devices)
    split = axes["data"] * axes["fsdp"]
    if batch_size % split:
        raise ValueError(
            f"--batch-size {batch_size} is not divisible by the data-parallel size "
            f"{split} of --mesh {spec!r}; use a multiple of {split}, e.g. "
            f"{split * max(1, round(batch_size / split))}.")
    # The model is built after this (its layouts come from each variable's
    # shape as it is created): nothing is replicated first and resharded.
    keras.distribution.set_distribution(make_distribution(spec, devices))
    return contextlib.nullcontext()


def check_model_parallel(model, spec):
    """Fails if a model-parallel mesh would shard a dimension unevenly.

    Args:
        model: a built model.
        spec: its mesh spec, or None.

    Raises:
        ValueError: a tensor-parallel dimension the "model" size does not
            divide (the message names the variable).

    Example:
    ```python
    check_model_parallel(model, "data:2,model:4")
    ```
    """
    axes = parse_mesh(spec) if spec else None
    if not axes or axes["model"] == 1:
        return
    for v in model.trainable_variables:
        variable_layout(v.path, v.shape, axes, min_size=math.inf)


def wait_for_all_processes(name):
    """Returns once every JAX process has got here (at once with one process).

    Process 0 writes the workdir after training while the others have
    nothing left to do; without this they would reach JAX's shutdown barrier
    first and time it out.

    Args:
        name: the barrier's name, the same in every process.

    Example:
    ```python
    wait_for_all_processes("keras_vitscale.train:end")
    ```
    """
    require_jax("jax_mesh.wait_for_all_processes")
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_info():
    """(process index, process count) of this JAX process: (0, 1) on one host.

    Example:
    ```python
    index, count = process_info()
    ```
    """
    require_jax("jax_mesh.process_info")
    import jax

    return jax.process_index(), jax.process_count()
