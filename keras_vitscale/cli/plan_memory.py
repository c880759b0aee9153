"""kvs-plan-memory (`python tools/plan_memory.py`): which ViT variants fit
on a device, with which optimizer and batch size.

Table mode (default, analytic, `kvs.planning.estimate`): one row per variant
and one column per optimizer; each cell is the largest power-of-two batch
per device whose training step fits in the given device memory ("-": not
even batch 1), in the spirit of the Scaling ViT paper's study of model
shape versus optimizer memory.

--simulate (JAX, `keras_vitscale.planning.sharding_simulation`): compiles, without running
or allocating, the training step of full-width slices (1 and 2 blocks) of
each model on virtual CPU devices under the training tool's meshes, reads
XLA's per-device memory and collectives, and extrapolates to full depth and
to larger meshes (--scale-to).

Example:
    kvs-plan-memory --device-memory 16GiB
    kvs-plan-memory --device-memory 80GiB --compute-dtype bfloat16 \\
        --remat --mesh data:8,fsdp:4
    KERAS_BACKEND=jax kvs-plan-memory --simulate --variants 22B/14 \\
        --meshes fsdp:8 data:2,model:4 --scale-to 256 1024 --device-memory 16GiB
"""

import math
import sys

from keras_vitscale.cli import common

PROG = "kvs-plan-memory"

DEFAULT_VARIANTS = "Ti/16,S/16,B/16,L/16,H/14,g/14,G/14,e/14,22B/14"
SIMULATE_VARIANTS = "G/14,e/14,22B/14"
SIMULATE_OPTIMIZERS = "scaling_adafactor,bf16_adam,adam"
SIMULATE_MESHES = ["data:8", "fsdp:8", "data:2,model:4"]


def build_parser():
    """The planner's flags."""
    parser = common.parser(
        "plan-memory",
        (
            "Table of the largest power-of-two per-device batch size at which "
            "each ViT variant trains within --device-memory, per optimizer "
            "(adam: 2 float32 slots; bf16_adam: bfloat16 + float32; "
            "scaling_adafactor: bfloat16 momentum + factored second moment; "
            "sgd: none). Estimates count parameters, gradients, optimizer "
            "state and saved activations (see keras_vitscale/planning/memory_estimate.py); "
            "leave headroom for framework workspace. With --simulate (JAX): compile, "
            "never run, the sharded training step of 1- and 2-block full-width slices on "
            "virtual CPU devices under the training tool's meshes, read XLA's per-device "
            "memory and collectives, and extrapolate to full depth and to --scale-to "
            "devices (see keras_vitscale/planning/sharding_simulation.py)."
        ),
        epilog=(f"Examples: {PROG} --device-memory 16GiB --remat; "
                f"KERAS_BACKEND=jax {PROG} --simulate --variants 22B/14 "
                "--meshes fsdp:8 --scale-to 1024 --device-memory 16GiB"),
    )
    parser.add_argument("--device-memory", default="16GiB", help="memory per device with its unit, e.g. 16GiB (2^30 bytes), 80GB (10^9 bytes) (default: 16GiB).")
    parser.add_argument("--variants", default=None, help=f"comma-separated variants or preset names (default: {DEFAULT_VARIANTS}; with --simulate {SIMULATE_VARIANTS}, each with its preset's recipe).")
    parser.add_argument("--optimizers", default=None, help=f"comma-separated optimizers (default: all four; with --simulate {SIMULATE_OPTIMIZERS}, sgd is not simulated).")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224).")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000).")
    parser.add_argument("--param-dtype", default="float32", help="float32 or bfloat16 (default: float32).")
    parser.add_argument("--compute-dtype", default="float32", help="activation dtype, float32 or bfloat16 (default: float32; --simulate: see --dtype-policy).")
    parser.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass.")
    parser.add_argument("--mesh", default=None, help="table mode: device mesh, e.g. data:8,fsdp:4,model:2 (default: one device).")
    parser.add_argument("--max-batch", type=int, default=4096, help="table mode: largest per-device batch tried (default: 4096).")
    sim = parser.add_argument_group(
        "--simulate", "compile sharded training steps on virtual CPU devices (JAX backend)")
    sim.add_argument("--simulate", action="store_true", help="compile slices and extrapolate instead of the analytic table.")
    sim.add_argument("--meshes", nargs="+", default=SIMULATE_MESHES, metavar="SPEC", help=f"training-tool mesh specs to compile on, space-separated (default: {' '.join(SIMULATE_MESHES)}); virtual CPU devices are made for the largest.")
    sim.add_argument("--depths", default="1,2", help="comma-separated slice depths to fit on (default: 1,2).")
    sim.add_argument("--scale-to", nargs="*", type=int, default=[256, 1024], metavar="N", help="device counts to extrapolate each mesh to, the data or fsdp size growing (default: 256 1024).")
    sim.add_argument("--batch-per-shard", type=int, default=1, help="examples per batch shard, i.e. global batch / (data*fsdp) (default: 1).")
    sim.add_argument("--dtype-policy", default="mixed_bfloat16", help="Keras dtype policy of the model (default: mixed_bfloat16: float32 weights, bfloat16 compute).")
    return parser


def largest_batch(memory, variant, optimizer, budget, max_batch, **kw):
    """Largest power-of-two per-device batch that fits, or 0."""
    shards = kw["mesh"]["data"] * kw["mesh"]["fsdp"]
    best, batch = 0, 1
    while batch <= max_batch:
        est = memory.estimate(variant, batch_size=batch * shards, optimizer=optimizer, **kw)
        if est.per_device["total"] > budget:
            break
        best, batch = batch, batch * 2
    return best


def _names(text, default):
    return [x.strip() for x in (text or default).split(",") if x.strip()]


class _BadSettings(Exception):
    """A setting the planner cannot use; `main` prints it and returns 2."""


def _fail(message):
    raise _BadSettings(message)


def _device_memory(text):
    from keras_vitscale.planning import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        _fail(f"--device-memory: {err}")


def simulate(args):
    """--simulate: compiled slices per mesh and optimizer, extrapolated."""
    import keras

    from keras_vitscale.mesh_spec import parse_mesh
    from keras_vitscale.planning import abstract_state, compiled_step, format_bytes
    from keras_vitscale.planning import sharding_simulation as sim

    if keras.backend.backend() != "jax":
        _fail(f"--simulate compiles with XLA through JAX; the Keras backend is "
              f"{keras.backend.backend()!r}. Run with KERAS_BACKEND=jax.")
    optimizers = _names(args.optimizers, SIMULATE_OPTIMIZERS)
    unknown = sorted(set(optimizers) - set(abstract_state.OPTIMIZERS))
    if unknown:
        _fail(f"--simulate does not know optimizer(s) {unknown}; choose from "
              f"{list(abstract_state.OPTIMIZERS)}.")
    try:
        depths = [int(d) for d in _names(args.depths, "")]
    except ValueError:
        _fail(f"--depths {args.depths!r}: give comma-separated block counts such as 1,2.")
    budget = _device_memory(args.device_memory)
    try:
        size = max(math.prod(parse_mesh(m).values()) for m in args.meshes)
    except ValueError as err:
        _fail(f"--meshes: {err}")
    configs = {}
    for name in _names(args.variants, SIMULATE_VARIANTS):
        try:
            configs[name] = sim.model_config(name, image_size=args.image_size,
                                             num_classes=args.num_classes, remat=args.remat)
        except ValueError as err:
            _fail(f"--variants {name!r}: {err}")
    compiled_step.use_virtual_devices(size)
    results = {}
    for name, config in configs.items():
        rows = sim.simulate(
            config, args.meshes, optimizers, depths, args.scale_to, args.batch_per_shard,
            args.dtype_policy, log=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"\n{name}: {config.count_params() / 1e9:.2f}B parameters, {config.depth} "
              f"blocks, {args.image_size}px, {args.dtype_policy}, batch {args.batch_per_shard} "
              f"per shard, remat={args.remat}. Peak GiB per device (XLA on CPU):")
        print(sim.format_table(rows, config.depth))
        fitting = [f"{spec} {row['optimizer']}" for row in rows
                   for spec, full in row["full"].items() if full["peak"] <= budget]
        print(f"Fits in {format_bytes(budget)} at {config.depth} blocks: "
              f"{', '.join(fitting) or 'none of these'}.")
        if args.scale_to and any("fsdp" in m for m in args.meshes):
            print("Caution: FSDP figures scaled from a smaller mesh can be far off (XLA "
                  "shards differently at another batch size; see benchmarks/RESULTS.md); "
                  "compile on the target mesh itself, e.g. --meshes fsdp:1024 --scale-to.")
        results[name] = rows
    return results


def main(argv=None):
    """Prints the fit table (or the --simulate tables); returns the exit
    status: 0 done, 2 bad settings."""
    args = build_parser().parse_args(argv)
    try:
        if args.simulate:
            simulate(args)
        else:
            table(args)
    except _BadSettings as err:
        return common.fail(str(err), PROG)
    return 0


def table(args):
    """The analytic table: its rows, also printed."""
    from keras_vitscale.mesh_spec import parse_mesh
    from keras_vitscale.planning import memory_estimate as memory

    budget = _device_memory(args.device_memory)
    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as err:
        _fail(f"--mesh: {err}")
    variants = _names(args.variants, DEFAULT_VARIANTS)
    optimizers = _names(args.optimizers, "adam,bf16_adam,scaling_adafactor,sgd")
    kw = dict(image_size=args.image_size, num_classes=args.num_classes,
              param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
              remat=args.remat, mesh=mesh)
    for variant in variants:  # bad settings: one clear error, not a traceback
        for optimizer in optimizers:
            try:
                memory.estimate(variant, batch_size=mesh["data"] * mesh["fsdp"],
                                optimizer=optimizer, **kw)
            except ValueError as err:
                unknown = str(err).startswith("Unknown variant")
                _fail(f"--variants {variant!r}: {err}" if unknown else str(err))
    header = ["variant"] + optimizers + ["params", "weights"]
    rows = []
    for variant in variants:
        cells = [str(largest_batch(memory, variant, o, budget, args.max_batch, **kw) or "-")
                 for o in optimizers]
        est = memory.estimate(variant, batch_size=mesh["data"] * mesh["fsdp"], **kw)
        rows.append([variant] + cells + [f"{est.num_params / 1e6:.0f}M",
                                         memory.format_bytes(est.per_device["params"])])
    mesh_text = ",".join(f"{k}:{v}" for k, v in mesh.items())
    print(f"Largest per-device batch (power of two) fitting in {memory.format_bytes(budget)} "
          f"per device; {args.image_size}px, params {args.param_dtype}, compute "
          f"{args.compute_dtype}, remat={args.remat}, mesh {mesh_text}. '-': does not fit.")
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
