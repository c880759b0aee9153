"""JAX only: plan the sharding of a ViT too big to build, from compiled depth slices.

`simulate` compiles full-width slices of a model at a few depths per mesh
and optimizer (`compiled_step.compile_train_step`: XLA's per-device bytes
and collectives, without allocating a weight) and extrapolates them to the
full depth and to larger meshes of the same kind.

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
partitioner chooses by size, and with a small global batch it moves
activations rather than gathering weights, while on a pod-sized mesh it
gathers every block's weights; it also replicates tensors whose
dimensions the larger mesh does not divide. JAX compiles for a pod's count
of virtual CPU devices, so compile FSDP slices on the pod mesh itself
(benchmarks/sharding_simulation.py measures both; see its section of
benchmarks/RESULTS.md).

Example:
```python
# KERAS_BACKEND=jax python
from keras_vitscale.planning import compiled_step, sharding_simulation as sim
compiled_step.use_virtual_devices(8)                     # before JAX starts
config = sim.model_config("vit_22b14")                   # 48 blocks, 22B params
slices = [compiled_step.compile_train_step(config.replace(depth=d), "fsdp:8", "adam")
          for d in (1, 2)]                               # full width, 1 and 2 blocks
print(sim.extrapolate(config, "fsdp:1024", slices)["peak"] / 2**30)
```
"""

import dataclasses

from keras_vitscale.mesh_spec import parse_mesh
from keras_vitscale.planning.abstract_state import OPTIMIZERS, layout_memory
from keras_vitscale.planning.compiled_step import COLLECTIVES, compile_train_step


def scale_mesh(spec, num_devices):
    """The same kind of mesh on `num_devices`: the data or fsdp size grows.

    Example:
    ```python
    scale_mesh("data:2,model:4", 1024)  # "data:256,model:4"
    ```
    """
    axes = parse_mesh(spec)
    if num_devices % axes["model"]:
        raise ValueError(f"{num_devices} devices cannot hold mesh {spec!r}'s "
                         f"model:{axes['model']}; use a multiple of {axes['model']}.")
    batch = "fsdp" if axes["fsdp"] > 1 else "data"
    parts = [f"{batch}:{num_devices // axes['model']}"]
    if axes["model"] > 1:
        parts.append(f"model:{axes['model']}")
    return ",".join(parts)


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

    Raises:
        ValueError: neither a preset nor a variant; it lists the variants.

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
    try:
        return ViTConfig.from_variant(name, **overrides)
    except ValueError as err:
        raise ValueError(f"{err} Or name a built-in preset, e.g. 'vit_22b14'.") from None
