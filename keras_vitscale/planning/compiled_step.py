"""JAX only: one sharded training step, compiled (never run), and what it costs.

`compile_train_step` traces the training tool's step (`model.stateless_call`,
a softmax cross-entropy, `jax.value_and_grad`, `optimizer.stateless_apply`)
for a mesh spec of `keras_vitscale.training.jax_mesh.make_distribution`
("data:N", "fsdp:N", "data:N,model:M", "fsdp:N,model:M") and compiles it
from abstract shapes (`abstract_state`): no weight is ever allocated, so a
few full-width ViT-22B blocks compile on a laptop's virtual CPU devices
(`use_virtual_devices`). It reads per-device bytes from XLA's
`memory_analysis()` and the collectives (all-gather, reduce-scatter,
all-reduce, all-to-all, collective-permute, with their bytes) from the
compiled per-device program.

The numbers are XLA-on-CPU's. On CPU the partitioner's all-reduce + slice
of each full gradient stays (there is no reduce-scatter pass), FSDP weights
are gathered in their float32 parameter dtype and cast to bfloat16 after,
and the buffer assignment does not turn remat (`jax.checkpoint`) into a
lower peak (see the memory validation in benchmarks/RESULTS.md). TPU and
GPU compilers run other passes and schedules, so read the FSDP figures as
likely high. Framework workspace and the overlap of collectives with
compute are not modelled.

Example:
```python
# KERAS_BACKEND=jax python
from keras_vitscale.planning import compiled_step
compiled_step.use_virtual_devices(8)                     # before JAX starts
step = compiled_step.compile_train_step(config.replace(depth=2), "fsdp:8", "adam")
print(step.peak / 2**30, step.collectives["all-gather"])
```
"""

import dataclasses
import math
import re
import time

import keras

from keras_vitscale.planning.abstract_state import (
    abstract_train_state,
    batch_shards,
    layout_bytes,
    make_distribution,
    mesh_size,
    require_jax,
)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")

# Bytes per element of the HLO types a training step uses.
HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.M)
_ARRAY_RE = re.compile(r"\b(" + "|".join(HLO_BYTES) + r")\[([\d,]*)\]")


# The CPU compiler's default scheduler favours concurrency over memory; the
# memory-minimising one is closer to what a TPU/GPU compiler aims for.
# Optimisation level 0 skips LLVM's work on code that is never run (faster
# compiles; the memory analysis is the same).
SIMULATION_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
                        "--xla_backend_optimization_level=0")


def use_virtual_devices(num_devices, flags=SIMULATION_XLA_FLAGS):
    """Makes JAX start with `num_devices` virtual CPU devices; returns them.

    Must run before anything asks JAX for its devices (importing Keras or
    keras_vitscale is fine).

    Args:
        num_devices: how many CPU devices (the largest mesh to compile).
        flags: other XLA flags (default `SIMULATION_XLA_FLAGS`).

    Example:
    ```python
    devices = use_virtual_devices(1024)   # then compile fsdp:1024 slices
    ```
    """
    import os

    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={int(num_devices)}", flags]))
    import jax

    devices = jax.devices()
    if len(devices) < num_devices:
        raise RuntimeError(
            f"JAX started with {len(devices)} device(s) before use_virtual_devices("
            f"{num_devices}) ran; call it first, or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={num_devices} before starting Python.")
    return devices


def count_collectives(hlo_text):
    """{op: {"count", "bytes"}} of the collectives in compiled HLO text.

    Bytes are each op's result shape on one device (for an all-gather the
    gathered tensor, for a reduce-scatter the scattered shard). Each op
    written in the program counts once; a training step has no loops. On
    CPU collectives are synchronous; an async "-start" op (GPU/TPU) counts
    its whole (operand, result) tuple.

    Example:
    ```python
    count_collectives(compiled.as_text())["all-gather"]  # {"count": 12, "bytes": ...}
    ```
    """
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for match in _COLLECTIVE_RE.finditer(hlo_text):
        size = 0
        for dtype, dims in _ARRAY_RE.findall(match.group("shape")):
            size += HLO_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        out[match.group("op")]["count"] += 1
        out[match.group("op")]["bytes"] += size
    return out


@dataclasses.dataclass
class StepMemory:
    """One compiled training step on one device of the mesh.

    Attributes:
        spec, depth, optimizer, batch_per_shard, dtype_policy: the inputs.
        arguments, outputs, aliased, temps: XLA's per-device bytes
            (`memory_analysis()`); parameters and optimizer state are donated,
            so most outputs alias arguments.
        layout: `layout_memory` of the same step (what the layouts predict).
        collectives: `count_collectives` of the compiled program.
        compile_seconds: lowering + compilation time.
    """

    spec: str
    depth: int
    optimizer: str
    batch_per_shard: int
    dtype_policy: str
    arguments: int
    outputs: int
    aliased: int
    temps: int
    layout: dict
    collectives: dict
    compile_seconds: float

    @property
    def peak(self):
        """Bytes live at once on one device: arguments, new outputs, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temps


def train_step(model, optimizer):
    """The training step as a pure function, ready for `jax.jit`.

    `step(trainable, optimizer_variables, non_trainable, images, labels)`
    returns `(loss, trainable, optimizer_variables, non_trainable)`: a
    softmax cross-entropy on the logits, `jax.value_and_grad`, and
    `optimizer.stateless_apply`, as the training tool's step.

    Example:
    ```python
    step = train_step(model, optimizer)
    jax.jit(step, donate_argnums=(0, 1, 2)).lower(*abstract_arguments).compile()
    ```
    """
    import jax
    import jax.numpy as jnp

    def loss_fn(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, images,
                                                     training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                            from_logits=True)
        return jnp.mean(loss), non_trainable

    def step(trainable, opt_vars, non_trainable, images, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, images, labels)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, trainable, opt_vars, non_trainable

    return step


def compile_train_step(config, spec, optimizer="scaling_adafactor", batch_per_shard=1,
                       dtype_policy="mixed_bfloat16", devices=None, min_size=None):
    """Compiles (never runs) one sharded training step; returns its `StepMemory`.

    Args:
        config: a `kvs.ViTConfig`, e.g. a full-width slice
            `ViTConfig.from_variant("22B/14", ...).replace(depth=2)`.
        spec: a mesh spec of the training tool ("data:8", "fsdp:8",
            "data:2,model:4", "fsdp:2,model:4").
        optimizer: a name from `OPTIMIZERS`.
        batch_per_shard: examples per batch shard; the global batch is this
            times data * fsdp.
        dtype_policy: the model's Keras dtype policy.
        devices: the devices (default: the first N of `jax.devices()`).
        min_size: FSDP's smallest sharded variable (default: the tool's).

    Returns:
        A `StepMemory`.

    Raises:
        ValueError: fewer devices than the mesh needs, naming the XLA flag.

    Example:
    ```python
    step = compile_train_step(config.replace(depth=2), "fsdp:8", "adam")
    step.peak, step.collectives["reduce-scatter"]["count"]
    ```
    """
    require_jax()
    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    size = mesh_size(spec)
    if devices is None:
        available = jax.devices()
        if len(available) < size:
            raise ValueError(
                f"mesh {spec!r} needs {size} devices but JAX sees {len(available)}; "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={size} (or more) "
                "before JAX starts, or choose a smaller mesh.")
        devices = available[:size]
    dist = make_distribution(spec, devices, config, min_size)
    model, opt = abstract_train_state(config, dist, optimizer, dtype_policy)
    mesh = jax.sharding.Mesh(dist.device_mesh.devices, dist.device_mesh.axis_names)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def sharding(variable):
        return dist.get_variable_layout(variable).backend_layout

    def specs(variables):
        return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=sharding(v))
                for v in variables]

    trainable = specs(model.trainable_variables)
    non_trainable = specs(model.non_trainable_variables)
    opt_vars = specs(opt.variables)
    batch = batch_per_shard * batch_shards(spec)
    image_shape = (batch, *config.image_size, config.in_channels)
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32,
                                  sharding=dist.get_data_layout(image_shape).backend_layout)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32,
                                  sharding=dist.get_data_layout((batch,)).backend_layout)

    step = train_step(model, opt)

    def shardings(structs):
        return [s.sharding for s in structs]

    # Parameters and optimizer state are donated, as a training loop does,
    # so the updated values reuse their buffers.
    jitted = jax.jit(
        step,
        in_shardings=(shardings(trainable), shardings(opt_vars),
                      shardings(non_trainable), images.sharding, labels.sharding),
        out_shardings=(replicated, shardings(trainable), shardings(opt_vars),
                       shardings(non_trainable)),
        donate_argnums=(0, 1, 2))
    with dist.scope():
        compiled = jitted.lower(trainable, opt_vars, non_trainable, images,
                                labels).compile()
    stats = compiled.memory_analysis()
    layout = layout_bytes(config, dist, model, opt, batch_per_shard)
    return StepMemory(
        spec=spec, depth=config.depth, optimizer=optimizer,
        batch_per_shard=batch_per_shard, dtype_policy=dtype_policy,
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes, temps=stats.temp_size_in_bytes,
        layout=layout, collectives=count_collectives(compiled.as_text()),
        compile_seconds=time.perf_counter() - start)
