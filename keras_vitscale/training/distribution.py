"""JAX only: device meshes for `--mesh data:N` and `--mesh data:N,model:M`.

`data:N` is `keras.distribution.DataParallel` over N devices (the batch is
split, weights are replicated). `data:N,model:M` is
`keras.distribution.ModelParallel` with a `LayoutMap` that shards the
attention and MLP matmuls Megatron-style over the "model" axis (column-split
the QKV and MLP-in kernels, row-split the attention-out and MLP-out
kernels). Multi-host input is sharded by the data pipeline itself (one shard
per process), so Keras' own dataset auto-sharding is turned off.

The TensorFlow and torch backends train on one device here; asking them for
a mesh is an error that says so.
"""

import contextlib
import math
import re

import keras

# regex on variable.path -> sharding of that variable over ("batch", "model").
MODEL_PARALLEL_LAYOUT = {
    r".*attention/qkv/kernel": (None, "model"),
    r".*attention/qkv/bias": ("model",),
    r".*attention/out/kernel": ("model", None),
    r".*mlp/dense_1/kernel": (None, "model"),
    r".*mlp/dense_1/bias": ("model",),
    r".*mlp/dense_2/kernel": ("model", None),
}


def parse_mesh(spec):
    """"data:4,model:2" -> {"data": 4, "model": 2}; checks names and sizes."""
    axes = {}
    for part in str(spec).split(","):
        name, _, size = part.strip().partition(":")
        if name not in ("data", "model") or not size.isdigit() or int(size) < 1 or name in axes:
            raise ValueError(f"Bad --mesh {spec!r}; use 'data:N' or 'data:N,model:M' "
                             "with positive integer sizes, e.g. 'data:8' or 'data:4,model:2'.")
        axes[name] = int(size)
    if "data" not in axes:
        axes = {"data": 1, **axes}
    return axes


def setup(spec, batch_size, tpu=None):
    """Installs the distribution for a mesh spec; returns the scope to build in.

    Args:
        spec: "data:N" or "data:N,model:M", or None for one device.
        batch_size: the global batch size.
        tpu: TensorFlow only: a TPU name or address for `TPUStrategy`.

    Returns:
        A context manager: the model and optimizer are made inside it.

    Raises:
        ValueError: on a backend other than JAX, a mesh whose size differs
            from the number of devices, or a batch the data axis cannot split.
    """
    if not spec and not tpu:
        return contextlib.nullcontext()
    if keras.backend.backend() == "tensorflow":
        from keras_vitscale.training import tf_strategy

        return tf_strategy.setup(spec, batch_size, tpu)
    if tpu:
        raise ValueError(f"--tpu {tpu!r} needs the TensorFlow backend (KERAS_BACKEND="
                         "tensorflow, TPUStrategy); on JAX a TPU VM's chips are JAX "
                         "devices: drop --tpu and use --mesh.")
    axes = parse_mesh(spec)
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"--mesh {spec!r} needs the JAX backend (KERAS_BACKEND=jax); the "
            f"{keras.backend.backend()} backend trains on a single device in this tool. "
            "Drop --mesh or set KERAS_BACKEND=jax.")
    import jax

    devices = jax.devices()
    size = math.prod(axes.values())
    if size != len(devices):
        raise ValueError(
            f"--mesh {spec!r} has {size} devices but JAX sees {len(devices)} "
            f"({devices[0].platform}); use a mesh whose sizes multiply to {len(devices)}, "
            "e.g. 'data:%d'. (On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "makes N virtual devices.)" % len(devices))
    data = axes["data"]
    if batch_size % data:
        raise ValueError(
            f"--batch-size {batch_size} is not divisible by the data-parallel size "
            f"{data} of --mesh {spec!r}; use a multiple of {data}, e.g. "
            f"{data * max(1, round(batch_size / data))}.")
    if axes.get("model", 1) == 1:
        distribution = keras.distribution.DataParallel(devices=devices,
                                                       auto_shard_dataset=False)
    else:
        mesh = keras.distribution.DeviceMesh((data, axes["model"]), ["batch", "model"],
                                             devices=devices)
        layout_map = keras.distribution.LayoutMap(mesh)
        for pattern, axes_spec in MODEL_PARALLEL_LAYOUT.items():
            layout_map[pattern] = axes_spec
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)
    return contextlib.nullcontext()


def check_model_parallel(model, spec):
    """Fails if a model-parallel mesh would shard a dimension unevenly."""
    axes = parse_mesh(spec) if spec else {}
    m = axes.get("model", 1)
    if m == 1:
        return
    for v in model.trainable_variables:
        for pattern, layout in MODEL_PARALLEL_LAYOUT.items():
            if re.fullmatch(pattern, v.path):
                for dim, axis in zip(v.shape, layout):
                    if axis == "model" and dim % m:
                        raise ValueError(f"{v.path} has a dimension of {dim}, not divisible "
                                         f"by model:{m} of --mesh {spec!r}; choose a model "
                                         "size that divides the width and MLP size.")


def process_info():
    """(process index, process count): JAX's in a multi-host run, else (0, 1)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index(), jax.process_count()
    return 0, 1
