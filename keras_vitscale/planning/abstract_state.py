"""JAX only: a ViT's training state with shapes, dtypes and layouts but no values.

`abstract_train_state` builds the model and its optimizer as the training
tool does, under a mesh's `keras.distribution`, without allocating a
weight, so a full-width ViT-22B block can be planned on a laptop and a mesh
of any size can be planned without its devices (`layout_memory`).

How: every variable gets the layout a real creation gets (Keras asks the
current distribution, `distribution.get_variable_layout`, and optimizer
slots follow their parameter's), and a placeholder instead of a value:
reading it inside a JAX trace yields zeros of its shape (enough for Keras'
symbolic build), outside a trace it raises, so nothing full-size is ever
allocated by accident. Use the variables only through
`model.stateless_call` and `optimizer.stateless_apply`.

The one private Keras hook: Keras 3.15 has no public "meta" variables, so
`_deferred_variables` replaces `JaxVariable._initialize_with_initializer`
(one method, for the duration of the build) to keep the layout and swap the
initializer for the placeholder. The public route,
`keras.StatelessScope(initialize_variables=False)` plus
`keras.Variable(..., layout=...)` stand-ins for the optimizer's build, gives
the same layouts but is not equivalent: it leaves every model variable in
Keras' global list of uninitialized variables, which the next top-level
`StatelessScope` (every `stateless_call` / `stateless_apply`) initializes
for real (every weight full size, and an error on placeholder devices);
and a read outside a trace would run the layer's initializer at full size
instead of raising. `tests/planning/test_abstract_state.py` checks both.
(The initializers themselves run inside a trace too: they fix their seeds
when constructed, as Keras' own do.)
"""

import contextlib
import math

import keras

from keras_vitscale.mesh_spec import parse_mesh

OPTIMIZERS = ("adam", "bf16_adam", "scaling_adafactor")


def require_jax(what="keras_vitscale.planning's sharding simulation"):
    """Raises unless the Keras backend is JAX (the simulation compiles with XLA)."""
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"{what} compiles with XLA through JAX; the Keras backend is "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=jax.")


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


def _placeholder(shape, dtype=None):
    import jax
    import jax.numpy as jnp

    # A scalar probe: inside a trace it is a tracer, outside it allocates nothing big.
    if not isinstance(jnp.zeros(()), jax.core.Tracer):
        raise RuntimeError(
            "A variable of keras_vitscale.planning.abstract_state was read outside a JAX "
            "trace; it has no value. Pass values through stateless_call / "
            "stateless_apply instead.")
    return jnp.zeros(shape, dtype)


@contextlib.contextmanager
def _deferred_variables():
    """JAX variables created inside get their layout and a placeholder, no value.

    The module docstring says why this is the one use of a private Keras
    class: `JaxVariable._initialize_with_initializer` is replaced for the
    duration of the block and restored after.
    """
    from keras.src.backend.jax.core import JaxVariable

    def defer(variable, initializer):
        variable._initialize_layout()   # Keras' own: what a real creation gets
        variable._value = None
        variable._initializer = _placeholder

    original = JaxVariable._initialize_with_initializer
    JaxVariable._initialize_with_initializer = defer
    try:
        yield
    finally:
        JaxVariable._initialize_with_initializer = original


def abstract_train_state(config, distribution, optimizer="scaling_adafactor",
                         dtype_policy="mixed_bfloat16"):
    """A model and a built optimizer whose variables hold no values.

    Args:
        config: a `kvs.ViTConfig`.
        distribution: a `keras.distribution.Distribution` (e.g. from
            `keras_vitscale.training.jax_mesh.make_distribution`); its
            devices need not exist unless the step is compiled.
        optimizer: a name from `OPTIMIZERS`.
        dtype_policy: the model's Keras dtype policy.

    Returns:
        (model, optimizer). Read every variable's layout with
        `distribution.get_variable_layout(variable)`.

    Example:
    ```python
    dist = make_distribution("fsdp:8", jax.devices(), config)
    model, opt = abstract_train_state(config, dist, "adam")
    ```
    """
    require_jax()
    from keras_vitscale.model import ViT

    # Constructed before the scopes: its step counter and learning rate are
    # scalars made from values, replicated as the distribution would lay them
    # out, and placing them would need the mesh's devices (maybe placeholders).
    opt = make_optimizer(optimizer)
    with distribution.scope(), _deferred_variables():
        model = ViT(config=config, dtype=dtype_policy)
        opt.build(model.trainable_variables)
    return model, opt


def shard_bytes(variable, layout=None):
    """Bytes of one device's shard of a variable under `layout` (None: whole).

    Example:
    ```python
    shard_bytes(v, distribution.get_variable_layout(v))
    ```
    """
    size = math.prod(variable.shape) * _dtype_bytes(variable.dtype)
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


def batch_shards(spec):
    """The devices a mesh spec splits the batch over (data * fsdp)."""
    axes = parse_mesh(spec)
    return axes["data"] * axes["fsdp"]


def mesh_size(spec):
    """The number of devices of a mesh spec."""
    return math.prod(parse_mesh(spec).values())


def make_distribution(spec, devices, config, min_size):
    """The training tool's distribution for `spec` (keras_vitscale.training.jax_mesh)."""
    # Imported here: `import keras_vitscale` loads planning and must not load training.
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
    require_jax()
    if config.depth > 2:
        # Every block has the same variables, shapes and layouts, so the
        # bytes are exactly linear in depth: two small builds give any depth
        # (building every block of a deep model abstractly is slow).
        one, two = (layout_memory(config.replace(depth=d), spec, optimizer, dtype_policy,
                                  batch_per_shard, min_size) for d in (1, 2))
        return {k: one[k] + (config.depth - 1) * (two[k] - one[k]) for k in one}
    key = (repr(config.to_dict()), spec, optimizer, dtype_policy, batch_per_shard, min_size)
    if key not in _LAYOUT_CACHE:
        devices = [f"placeholder:{i}" for i in range(mesh_size(spec))]
        dist = make_distribution(spec, devices, config, min_size)
        model, opt = abstract_train_state(config, dist, optimizer, dtype_policy)
        _LAYOUT_CACHE[key] = layout_bytes(config, dist, model, opt, batch_per_shard)
    return dict(_LAYOUT_CACHE[key])


_LAYOUT_CACHE = {}


def layout_bytes(config, distribution, model, opt, batch_per_shard):
    """`layout_memory`'s dict for an abstract model and optimizer already built."""
    def total(variables):
        return sum(shard_bytes(v, distribution.get_variable_layout(v)) for v in variables)

    out = {"params": total(model.variables),
           "optimizer_state": total(opt.variables),
           # Gradients have their parameter's dtype and layout.
           "gradients": total(model.trainable_variables),
           "batch": _batch_bytes(config, batch_per_shard)}
    out["arguments"] = out["params"] + out["optimizer_state"] + out["batch"]
    return out
