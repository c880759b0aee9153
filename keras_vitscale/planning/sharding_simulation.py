"""JAX only: plan the sharding of a ViT too big to build, by compiling, not running.

`compile_train_step` traces the training tool's step (`model.stateless_call`,
a softmax cross-entropy, `jax.value_and_grad`, `optimizer.stateless_apply`)
for a mesh spec of `keras_vitscale.training.jax_mesh.make_distribution`
("data:N", "fsdp:N", "data:N,model:M", "fsdp:N,model:M") and compiles it
from abstract shapes: no weight is ever allocated, so a few full-width
ViT-22B blocks compile on a laptop's virtual CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`). It reads per-device
bytes from XLA's `memory_analysis()` and the collectives (all-gather,
reduce-scatter, all-reduce, all-to-all, collective-permute, with their
bytes) from the compiled per-device program.

Extrapolation model (`extrapolate`), for a full-depth model on a mesh of
the same kind (same "model" size, any data or fsdp size), from slices of
the same width compiled at two or more depths:

    per-device peak(L, N) = arguments(L, N) + temporaries(L, N) + other outputs
    arguments(L, N)   = the sum over variables of one device's shard under
                        the N-device mesh's layouts, plus the batch shard:
                        exact, from the layouts the training tool uses
                        (equal to XLA's argument bytes to the byte);
    temporaries(L, N) = t0 + t1 * L                  (least squares on slices)
                        + gradients(L, N) - gradients(L, n)
    other outputs     = the same linear fit (a few bytes: parameters and
                        optimizer state are donated)

where L is the depth, n the simulated mesh size and gradients(L, N) the
per-device gradient bytes (sharded like their parameters), which XLA counts
as temporaries. With N = n (compile on the target mesh itself) only the
depth is extrapolated; the slice depths not used in the fit check it. With
N > n everything else in the temporaries (activations at a fixed batch per
shard, weights FSDP gathers, update scratch) is taken as independent of the
shard count. That holds for data and data+model meshes (the per-device
program does not change with the data size) but not for FSDP: XLA's
partitioner chooses by size, and with a small global batch (8 devices) it
moves activations rather than gathering weights, while at 256-1024 devices
it gathers every block's weights; it also replicates tensors whose
dimensions the larger mesh does not divide. JAX compiles for 1024 virtual
CPU devices without trouble, so compile FSDP slices on the pod mesh itself
(benchmarks/sharding_simulation.py measures both: scaling fsdp:8 slices
underestimated ViT-22B on fsdp:1024 9-17x).

How the model is built without memory: `abstract_variables` makes every
Keras variable created inside it keep its shape, dtype and layout (from the
current `keras.distribution`) but no value; a read outside a JAX trace is an
error. Keras 3.15 has no public "meta" variables: `keras.StatelessScope`
defers initialisation only until the scope exits, and reading a deferred
variable during the functional build runs its (unseeded) initializer inside
a trace, so this patches the JAX variable's initialisation for the duration.

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
from keras_vitscale import sharding_plan as sp
sp.use_virtual_devices(8)                                # before JAX starts
config = sp.model_config("vit_22b14")                    # 48 blocks, 22B params
slices = [sp.compile_train_step(config.replace(depth=d), "fsdp:8", "adam")
          for d in (1, 2)]                               # full width, 1 and 2 blocks
print(slices[1].peak / 2**30, slices[1].collectives["all-gather"])
print(sp.extrapolate(config, "fsdp:1024", slices)["peak"] / 2**30)
```
"""

import contextlib
import dataclasses
import math
import re
import time

import keras

OPTIMIZERS = ("adam", "bf16_adam", "scaling_adafactor")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
# Bytes per element of the HLO types a training step uses.
HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.M)
_ARRAY_RE = re.compile(r"\b(" + "|".join(HLO_BYTES) + r")\[([\d,]*)\]")


def _check_backend():
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"keras_vitscale.sharding_plan compiles with XLA through JAX; the Keras "
            f"backend is {keras.backend.backend()!r}. Set KERAS_BACKEND=jax.")


# The CPU compiler's default scheduler favours concurrency over memory; the
# memory-minimising one is closer to what a TPU/GPU compiler aims for and
# lowered the slices' temporaries by up to 30% here. Optimisation level 0 skips
# LLVM's work on code that is never run (it halves compile time; the memory
# analysis is the same).
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


def scale_mesh(spec, num_devices):
    """The same kind of mesh on `num_devices`: the data or fsdp size grows.

    Example:
    ```python
    scale_mesh("data:2,model:4", 1024)  # "data:256,model:4"
    ```
    """
    from keras_vitscale.mesh_spec import parse_mesh

    axes = parse_mesh(spec)
    if num_devices % axes["model"]:
        raise ValueError(f"{num_devices} devices cannot hold mesh {spec!r}'s "
                         f"model:{axes['model']}; use a multiple of {axes['model']}.")
    batch = "fsdp" if axes["fsdp"] > 1 else "data"
    parts = [f"{batch}:{num_devices // axes['model']}"]
    if axes["model"] > 1:
        parts.append(f"model:{axes['model']}")
    return ",".join(parts)


@contextlib.contextmanager
def abstract_variables():
    """Keras variables created inside have a shape, dtype and layout, no value.

    The layout is what the current `keras.distribution` gives the variable,
    as at a normal creation. Reading such a variable inside a JAX trace
    yields zeros of its shape (enough for Keras' symbolic build); outside a
    trace it raises, so nothing full-size is ever allocated by accident. Use
    the variables only through `stateless_call` / `stateless_apply`.

    Example:
    ```python
    with distribution.scope(), abstract_variables():
        model = kvs.ViT(config=config)   # no memory for the weights
    ```
    """
    _check_backend()
    import jax.numpy as jnp
    from keras.src.backend.jax.core import JaxVariable
    from keras.src.utils.jax_utils import is_in_jax_tracing_scope

    def placeholder(shape, dtype=None):
        if not is_in_jax_tracing_scope():
            raise RuntimeError(
                "An abstract variable (made under sharding_plan.abstract_variables) "
                "was read outside a JAX trace; it has no value. Pass values through "
                "stateless_call / stateless_apply instead.")
        return jnp.zeros(shape, dtype)

    def initialize(self, initializer):
        self._initialize_layout()   # the layout a real creation would get
        self._value = None
        self._initializer = placeholder

    def initialize_from_value(self, value):
        # A variable made from a value (an optimizer's step counter) keeps
        # that value, which exists already, unplaced: placing it would need
        # the mesh's devices, which may be placeholders.
        self._shape = self._validate_shape(value.shape)
        self._initialize_layout()
        self._value = value

    originals = (JaxVariable._initialize_with_initializer, JaxVariable._initialize)
    JaxVariable._initialize_with_initializer = initialize
    JaxVariable._initialize = initialize_from_value
    try:
        yield
    finally:
        JaxVariable._initialize_with_initializer, JaxVariable._initialize = originals


def make_optimizer(name):
    """A fresh optimizer: "adam" (Keras, float32 slots), "bf16_adam" or
    "scaling_adafactor" (kvs defaults).

    Example:
    ```python
    make_optimizer("scaling_adafactor")
    ```
    """
    from keras_vitscale import optimizers

    makers = {"adam": lambda: keras.optimizers.Adam(1e-3),
              "bf16_adam": lambda: optimizers.BF16Adam(1e-3),
              "scaling_adafactor": lambda: optimizers.ScalingAdafactor(1e-3)}
    if name not in makers:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}.")
    return makers[name]()


def abstract_train_state(config, distribution, optimizer="scaling_adafactor",
                         dtype_policy="mixed_bfloat16"):
    """A model and a built optimizer whose variables hold no values.

    Args:
        config: a `kvs.ViTConfig`.
        distribution: a `keras.distribution.Distribution` (e.g. from
            `make_distribution`); its devices need not exist unless the
            step is compiled.
        optimizer: a name from `OPTIMIZERS`.
        dtype_policy: the model's Keras dtype policy.

    Returns:
        (model, optimizer).

    Example:
    ```python
    dist = make_distribution("fsdp:8", jax.devices(), config)
    model, opt = abstract_train_state(config, dist, "adam")
    ```
    """
    from keras_vitscale.model import ViT

    with distribution.scope(), abstract_variables():
        model = ViT(config=config, dtype=dtype_policy)
        opt = make_optimizer(optimizer)
        opt.build(model.trainable_variables)
    return model, opt


def shard_bytes(variable):
    """Bytes of one device's shard of a variable under its layout."""
    size = math.prod(variable.shape) * _dtype_bytes(variable.dtype)
    layout = getattr(variable, "_layout", None)
    if layout is None or layout.device_mesh is None:
        return size
    mesh = dict(zip(layout.device_mesh.axis_names, layout.device_mesh.shape))
    for axis in layout.axes:
        if axis is not None:
            size //= mesh[axis]
    return size


def _dtype_bytes(dtype):
    import numpy as np

    return 2 if "bfloat16" in str(dtype) else np.dtype(str(dtype)).itemsize


def _mesh_size(spec):
    from keras_vitscale.mesh_spec import parse_mesh

    return math.prod(parse_mesh(spec).values())


def _batch_shards(spec):
    from keras_vitscale.mesh_spec import parse_mesh

    axes = parse_mesh(spec)
    return axes["data"] * axes["fsdp"]


def _distribution(spec, devices, config, min_size):
    from keras_vitscale.training.jax_mesh import make_distribution

    return make_distribution(spec, devices, config, min_size=min_size)


def _batch_bytes(config, batch_per_shard):
    # One device holds one batch shard: float32 images and int32 labels
    # (under model parallelism the shard is replicated over "model").
    h, w = config.image_size
    return batch_per_shard * (h * w * config.in_channels * 4 + 4)


def layout_memory(config, spec, optimizer="scaling_adafactor",
                  dtype_policy="mixed_bfloat16", batch_per_shard=1, min_size=None):
    """Per-device bytes fixed by the layouts alone, on a mesh of any size.

    No devices are needed: the mesh is made of placeholder devices, the
    model and optimizer are abstract, and each variable's shard is read
    from the layout the training tool's distribution gives it.

    Args:
        config: a `kvs.ViTConfig` (any depth).
        spec: a mesh spec such as "fsdp:1024" or "data:256,model:4".
        optimizer: a name from `OPTIMIZERS`.
        dtype_policy: the model's Keras dtype policy.
        batch_per_shard: examples per batch shard (global batch / (data*fsdp)).
        min_size: FSDP's smallest sharded variable (default: the tool's).

    Returns:
        {"params", "optimizer_state", "gradients", "batch", "arguments"}:
        per-device bytes; gradients are sharded like their parameters.

    Example:
    ```python
    layout_memory(config, "fsdp:1024", "adam")["arguments"] / 2**30
    ```
    """
    _check_backend()
    if config.depth > 2:
        # Every block has the same variables, shapes and layouts, so the
        # bytes are exactly linear in depth: two small builds give any depth
        # (building 48 abstract ViT-22B blocks takes a minute).
        one, two = (layout_memory(config.replace(depth=d), spec, optimizer, dtype_policy,
                                  batch_per_shard, min_size) for d in (1, 2))
        return {k: one[k] + (config.depth - 1) * (two[k] - one[k]) for k in one}
    key = (repr(config.to_dict()), spec, optimizer, dtype_policy, batch_per_shard, min_size)
    if key not in _LAYOUT_CACHE:
        devices = [f"placeholder:{i}" for i in range(_mesh_size(spec))]
        dist = _distribution(spec, devices, config, min_size)
        model, opt = abstract_train_state(config, dist, optimizer, dtype_policy)
        _LAYOUT_CACHE[key] = _layout_bytes(config, model, opt, batch_per_shard)
    return dict(_LAYOUT_CACHE[key])


_LAYOUT_CACHE = {}


def _layout_bytes(config, model, opt, batch_per_shard):
    out = {"params": sum(shard_bytes(v) for v in model.variables),
           "optimizer_state": sum(shard_bytes(v) for v in opt.variables),
           # Gradients have their parameter's dtype and layout.
           "gradients": sum(shard_bytes(v) for v in model.trainable_variables),
           "batch": _batch_bytes(config, batch_per_shard)}
    out["arguments"] = out["params"] + out["optimizer_state"] + out["batch"]
    return out


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
    _check_backend()
    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    size = _mesh_size(spec)
    if devices is None:
        available = jax.devices()
        if len(available) < size:
            raise ValueError(
                f"mesh {spec!r} needs {size} devices but JAX sees {len(available)}; "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={size} (or more) "
                "before JAX starts, or choose a smaller mesh.")
        devices = available[:size]
    dist = _distribution(spec, devices, config, min_size)
    model, opt = abstract_train_state(config, dist, optimizer, dtype_policy)
    mesh = jax.sharding.Mesh(dist.device_mesh.devices, dist.device_mesh.axis_names)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def sharding(variable):
        layout = getattr(variable, "_layout", None)
        return replicated if layout is None else layout.backend_layout

    def specs(variables):
        return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=sharding(v))
                for v in variables]

    trainable = specs(model.trainable_variables)
    non_trainable = specs(model.non_trainable_variables)
    opt_vars = specs(opt.variables)
    batch = batch_per_shard * _batch_shards(spec)
    image_shape = (batch, *config.image_size, config.in_channels)
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32,
                                  sharding=dist.get_data_layout(image_shape).backend_layout)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32,
                                  sharding=dist.get_data_layout((batch,)).backend_layout)

    def loss_fn(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, images,
                                                     training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                            from_logits=True)
        return jnp.mean(loss), non_trainable

    def step(trainable, opt_vars, non_trainable, images, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, images, labels)
        trainable, opt_vars = opt.stateless_apply(opt_vars, grads, trainable)
        return loss, trainable, opt_vars, non_trainable

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
    layout = _layout_bytes(config, model, opt, batch_per_shard)
    return StepMemory(
        spec=spec, depth=config.depth, optimizer=optimizer,
        batch_per_shard=batch_per_shard, dtype_policy=dtype_policy,
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes, temps=stats.temp_size_in_bytes,
        layout=layout, collectives=count_collectives(compiled.as_text()),
        compile_seconds=time.perf_counter() - start)


@dataclasses.dataclass
class DepthFit:
    """value(L) = fixed + per_layer * L, least squares over slice depths.

    Example:
    ```python
    fit = fit_depth([1, 2], [3.0e9, 4.5e9])
    fit.predict(48)
    ```
    """

    fixed: float
    per_layer: float

    def predict(self, depth):
        return self.fixed + self.per_layer * depth


def fit_depth(depths, values):
    """Fits `DepthFit` to (depth, value) pairs; needs two distinct depths.

    Args:
        depths: slice depths, e.g. [1, 2].
        values: the measured bytes (or counts) at those depths.

    Returns:
        A `DepthFit`.
    """
    depths, values = list(depths), list(values)
    if len(set(depths)) < 2 or len(depths) != len(values):
        raise ValueError(
            f"fit_depth needs values at two or more distinct depths; got depths "
            f"{depths} for {len(values)} values. Compile one more slice depth.")
    n = len(depths)
    mean_d, mean_v = sum(depths) / n, sum(values) / n
    slope = (sum((d - mean_d) * (v - mean_v) for d, v in zip(depths, values))
             / sum((d - mean_d) ** 2 for d in depths))
    return DepthFit(fixed=mean_v - slope * mean_d, per_layer=slope)


def extrapolate(config, spec, slices, min_size=None):
    """Per-device bytes of the full `config` on mesh `spec`, from compiled slices.

    Args:
        config: the full model's `ViTConfig` (the slices' width, any depth).
        spec: the target mesh, of any size, e.g. "fsdp:1024"; the same kind
            of mesh as the slices' ("fsdp:8" slices for an "fsdp:N" target,
            "data:2,model:4" slices for a "data:N,model:4" target).
        slices: `StepMemory`s of one optimizer, batch per shard and mesh,
            at two or more depths.
        min_size: FSDP's smallest sharded variable (default: the tool's).

    Returns:
        {"arguments", "gradients", "temps", "peak", "fit": DepthFit of the
        slices' temporaries}: per-device bytes (see the module docstring).

    Example:
    ```python
    slices = [compile_train_step(cfg.replace(depth=d), "fsdp:8") for d in (1, 2)]
    extrapolate(cfg, "fsdp:1024", slices)["peak"] / 2**30
    ```
    """
    first = slices[0]
    for s in slices:
        if (s.spec, s.optimizer, s.batch_per_shard, s.dtype_policy) != (
                first.spec, first.optimizer, first.batch_per_shard, first.dtype_policy):
            raise ValueError(
                "extrapolate needs slices that differ only in depth; got "
                f"{[(s.spec, s.optimizer, s.batch_per_shard, s.depth) for s in slices]}.")
    from keras_vitscale.mesh_spec import parse_mesh

    small, big = parse_mesh(first.spec), parse_mesh(spec)
    kind = lambda axes: ("fsdp" if axes["fsdp"] > 1 else "data", axes["model"])  # noqa: E731
    if kind(small) != kind(big):
        raise ValueError(
            f"extrapolate from slices on {first.spec!r} to {spec!r}: the target must be "
            "the same kind of mesh with the same model size (only the data or fsdp "
            "size may grow), e.g. 'fsdp:8' -> 'fsdp:1024'.")
    temps = fit_depth([s.depth for s in slices], [s.temps for s in slices])
    extra = fit_depth([s.depth for s in slices],
                      [s.outputs - s.aliased for s in slices])
    target = layout_memory(config, spec, first.optimizer, first.dtype_policy,
                           first.batch_per_shard, min_size)
    here = layout_memory(config, first.spec, first.optimizer, first.dtype_policy,
                         first.batch_per_shard, min_size)
    temps_full = temps.predict(config.depth) + target["gradients"] - here["gradients"]
    peak = target["arguments"] + temps_full + extra.predict(config.depth)
    return {"arguments": target["arguments"], "gradients": target["gradients"],
            "temps": int(temps_full), "peak": int(peak), "fit": temps}


def simulate(config, meshes, optimizers=OPTIMIZERS, depths=(1, 2), scale_to=(),
             batch_per_shard=1, dtype_policy="mixed_bfloat16", min_size=None, log=None,
             compile_fn=None):
    """Compiles depth slices of `config` per mesh and optimizer; extrapolates.

    Args:
        config: the full model's `ViTConfig`; slices keep its width.
        meshes: mesh specs to compile on, e.g. ["data:8", "fsdp:8",
            "data:2,model:4"] (needs that many devices, see
            `use_virtual_devices`).
        optimizers: names from `OPTIMIZERS`.
        depths: slice depths (two or more).
        scale_to: device counts to extrapolate each mesh to, e.g. (256, 1024)
            (`scale_mesh`: the data or fsdp size grows).
        batch_per_shard: examples per batch shard.
        dtype_policy: the model's Keras dtype policy.
        min_size: FSDP's smallest sharded variable (default: the tool's).
        log: optional callable given one line per compiled slice.
        compile_fn: what compiles a slice, with `compile_train_step`'s
            signature (default: it); e.g. a wrapper that caches.

    Returns:
        One dict per (mesh, optimizer): "mesh", "optimizer", "slices" (the
        `StepMemory`s), "per_layer" (peak bytes each block adds),
        "collectives_per_layer" ({op: bytes each block adds}) and "full"
        ({mesh spec: `extrapolate` dict} for the mesh itself and each
        scaled one).

    Example:
    ```python
    rows = simulate(config, ["fsdp:8"], ["adam"], scale_to=(1024,))
    rows[0]["full"]["fsdp:1024"]["peak"] / 2**30
    ```
    """
    compile_fn = compile_fn or compile_train_step
    rows = []
    for mesh in meshes:
        for optimizer in optimizers:
            slices = []
            for depth in depths:
                step = compile_fn(config.replace(depth=depth), mesh, optimizer,
                                  batch_per_shard, dtype_policy, min_size=min_size)
                slices.append(step)
                if log:
                    log(f"{config.variant or 'ViT'} {mesh} {optimizer} depth {depth}: "
                        f"peak {step.peak / 2**30:.2f} GiB per device, compiled in "
                        f"{step.compile_seconds:.0f} s")
            targets = [mesh] + [scale_mesh(mesh, n) for n in scale_to]
            full = {spec: extrapolate(config, spec, slices, min_size) for spec in targets}
            per_op = {op: fit_depth(depths, [s.collectives[op]["bytes"] for s in slices])
                      .per_layer for op in COLLECTIVES}
            rows.append({"mesh": mesh, "optimizer": optimizer, "slices": slices,
                         "per_layer": fit_depth(depths, [s.peak for s in slices]).per_layer,
                         "collectives_per_layer": per_op, "full": full})
    return rows


def format_table(rows, depth):
    """A Markdown table of `simulate`'s rows (GiB per device).

    Args:
        rows: `simulate`'s result for one model.
        depth: the full model's depth (for the header).
    """
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    depths = [s.depth for s in rows[0]["slices"]]
    header = (["mesh", "optimizer"] + [f"{d} block{'s' * (d > 1)}" for d in depths]
              + ["per block", f"{depth} blocks: mesh (scaled meshes)",
                 "collectives per block MiB (AG/RS/AR/A2A/CP)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        full = row["full"]
        scaled = ", ".join(f"{spec} {gib(x['peak'])}" for spec, x in full.items()
                           if spec != row["mesh"])
        target = gib(full[row["mesh"]]["peak"]) + (f" ({scaled})" if scaled else "")
        ops = "/".join(mib(max(0, row["collectives_per_layer"][op])) for op in COLLECTIVES)
        cells = ([row["mesh"], row["optimizer"]] + [gib(s.peak) for s in row["slices"]]
                 + [gib(row["per_layer"]), target, ops])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_config(name, **overrides):
    """The `ViTConfig` for a preset name ("vit_22b14") or a variant ("22B/14").

    A variant that a built-in preset has ("G/14" -> vit_bigG14) gets that
    preset's recipe (MAP head, ViT-22B's parallel blocks and qk-norm), so
    the simulated model is the one the presets train; "vit_*" presets come
    before others of the same variant (SimplEsT-ViT's "S/16").

    Example:
    ```python
    model_config("22B/14").block   # "parallel"
    ```
    """
    from keras_vitscale import presets
    from keras_vitscale.config import ViTConfig

    if name in presets.REGISTRY:
        return presets.builtin_config(name, **overrides)
    # The plain ViT preset first: "S/16" is also SimplEsT-ViT's variant.
    matches = sorted((not preset.startswith("vit_"), preset)
                     for preset, entry in presets.REGISTRY.items()
                     if entry["config"].get("variant") == name)
    if matches:
        return presets.builtin_config(matches[0][1], **overrides)
    return ViTConfig.from_variant(name, **overrides)
