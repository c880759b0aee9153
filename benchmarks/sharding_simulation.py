"""ViT-G/14, ViT-e/14 and ViT-22B on pods, by simulation (issue #8).

Compiles, never runs, the sharded training step of full-width slices (1 and
2 blocks) on virtual CPU devices with `keras_vitscale.planning`, under
the training tool's meshes, with ScalingAdafactor, BF16Adam and Keras Adam:

1. 8 devices, meshes data:8, fsdp:8, data:2,model:4: per-device peak of the
   slices, the bytes each block adds, the collectives each block adds, and
   the extrapolation to full depth on 8 devices and to 256 and 1024 devices
   (the data or fsdp size grows; see the model in planning/sharding_simulation.py).
2. Checks: a held-out 3-block slice against the 1+2-block fit; the layouts'
   argument bytes against XLA's.
3. ViT-22B compiled on the pod meshes themselves (256 and 1024 virtual
   devices), so that only the depth is extrapolated, and the 8-device shard
   scaling compared with it.
4. Which mesh and optimizer fit ViT-22B in 16 GiB and 95 GiB per device.

Usage (JAX; about 10 minutes on 2 idle cores, several times that on a busy
machine; --cache makes an interrupted run resume):
    KERAS_BACKEND=jax python benchmarks/sharding_simulation.py \\
        [--quick] [--cache /tmp/sharding.json] [--no-write]
It prints the tables and rewrites the `sharding_simulation` section of
benchmarks/RESULTS.md.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)

os.environ.setdefault("KERAS_BACKEND", "jax")

VARIANTS = ("G/14", "e/14", "22B/14")
OPTIMIZERS = ("scaling_adafactor", "bf16_adam", "adam")
MESHES = ("data:8", "fsdp:8", "data:2,model:4")
POD_SIZES = (256, 1024)
# ViT-22B compiled on the pod meshes themselves (the fsdp sizes are where
# shard scaling matters: data and data+model do not change per device).
POD_MESHES = ("fsdp:256", "fsdp:1024", "fsdp:256,model:4", "fsdp:64,model:16")
# ViT-22B only, on 8 devices: the widest tensor parallelism (48 heads / 8).
EXTRA_22B_MESHES = ("model:8",)
# Held-out slices: (variant, mesh, depths beyond the 1+2 fit), ScalingAdafactor.
CHECKS = [("G/14", "fsdp:8", (3,)), ("G/14", "data:2,model:4", (3,)),
          ("e/14", "fsdp:8", (3,)), ("e/14", "data:2,model:4", (3,)),
          ("22B/14", "fsdp:8", (3, 4)), ("22B/14", "data:2,model:4", (3, 4))]
POD_CHECKS = [("22B/14", "fsdp:1024", (3,)), ("22B/14", "fsdp:64,model:16", (3,))]
# Data+model meshes compiled at pod size too: data:64,model:4 checks that the
# data:2,model:4 figures carry over; data:32,model:8 has a data axis, which
# the 8-device model:8 mesh lacks (no gradient all-reduce there).
POD_SCALE_CHECKS = ("data:64,model:4", "data:32,model:8")
BUDGETS = {"16 GiB": 16 * 2**30, "95 GiB": 95 * 2**30}
GIB = 2**30


class Cache:
    """`compile_train_step` through a JSON file of compiled slices, so an
    interrupted run resumes where it stopped."""

    def __init__(self, path):
        from keras_vitscale.planning import compiled_step

        self.sp, self.path, self.data = compiled_step, path, {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def compile(self, config, spec, optimizer, batch_per_shard, dtype_policy, min_size=None):
        key = json.dumps([config.to_dict(), spec, optimizer, batch_per_shard, dtype_policy,
                          min_size], sort_keys=True)
        if key not in self.data:
            step = self.sp.compile_train_step(config, spec, optimizer, batch_per_shard,
                                              dtype_policy, min_size=min_size)
            print(f"  {config.variant} {spec} {optimizer} {config.depth} block(s): peak "
                  f"{step.peak / GIB:.2f} GiB, compiled in {step.compile_seconds:.0f} s",
                  flush=True)
            self.data[key] = dataclasses.asdict(step)
            if self.path:
                with open(self.path, "w") as f:
                    json.dump(self.data, f)
        return self.sp.StepMemory(**self.data[key])


def depth_checks(sp, cache, configs, checks, args):
    """Held-out slices: [(case, depth, predicted, compiled, full-depth drift)].

    The prediction is from the 1+2-block fit; the drift is how much the
    full-depth peak moves when every compiled depth is fitted instead.
    """
    out = []
    for name, mesh, held_out in checks:
        if name not in configs:
            continue
        config = configs[name]
        slices = [cache.compile(config.replace(depth=d), mesh, "scaling_adafactor",
                                args.batch_per_shard, args.dtype_policy)
                  for d in (1, 2) + tuple(held_out)]
        full_two = sp.extrapolate(config, mesh, slices[:2])["peak"]
        drift = sp.extrapolate(config, mesh, slices)["peak"] / full_two - 1
        for step in slices[2:]:
            predicted = sp.extrapolate(config.replace(depth=step.depth), mesh,
                                       slices[:2])["peak"]
            out.append((f"{name} {mesh}", step.depth, predicted, step.peak, drift))
    return out


def verdict(rows, pod_rows):
    """{budget: [(mesh, optimizer, GiB, how)]} fitting ViT-22B at full depth.

    FSDP meshes count only where compiled on the pod mesh itself: scaling
    the 8-device FSDP slices is far off (see the shard-scaling check).
    """
    from keras_vitscale.mesh_spec import parse_mesh

    best = {}
    for row in rows:
        source = parse_mesh(row["mesh"])
        for spec, full in row["full"].items():
            # Scaled figures only from a mesh that has the data axis: FSDP's
            # do not carry over, nor a data:1 mesh's (no gradient all-reduce).
            if spec == row["mesh"] or ("fsdp" not in spec and source["data"] > 1):
                how = "8 devices" if spec == row["mesh"] else "scaled from 8 devices"
                best[(spec, row["optimizer"])] = (full["peak"], how)
    for row in pod_rows:  # compiled on the pod mesh: only the depth is extrapolated
        best[(row["mesh"], row["optimizer"])] = (row["full"][row["mesh"]]["peak"],
                                                 "compiled on the pod mesh")
    return {label: sorted(((spec, opt, peak / GIB, how) for (spec, opt), (peak, how)
                           in best.items() if peak <= budget), key=lambda x: x[2])
            for label, budget in BUDGETS.items()}


def explain(rows, pod_rows):
    """The reading of the ViT-22B figures, with the numbers it rests on."""
    def row(rows, mesh, optimizer):
        return next(r for r in rows if r["mesh"] == mesh and r["optimizer"] == optimizer)

    mib = lambda r, op: r["collectives_per_layer"][op] / 2**20  # noqa: E731
    small, big = row(rows, "fsdp:8", "scaling_adafactor"), row(pod_rows, "fsdp:1024",
                                                                 "scaling_adafactor")
    adam = row(pod_rows, "fsdp:1024", "adam")
    return (
        "### Reading\n\n"
        "- FSDP does not scale from 8 devices. With one example per device on 8 "
        f"devices XLA leaves ViT-22B's weights sharded and moves activations instead "
        f"(per block {mib(small, 'all-gather'):.0f} MiB all-gathered, "
        f"{mib(small, 'all-to-all'):.0f} MiB all-to-all, "
        f"{mib(small, 'collective-permute'):.0f} MiB collective-permute); on 1024 devices, "
        f"where the global batch outweighs a block's weights, it gathers each block's "
        f"float32 weights ({mib(big, 'all-gather'):.0f} MiB per block) and all-reduces "
        f"its full gradients ({mib(big, 'all-reduce'):.0f} MiB; the CPU compiler forms no "
        f"reduce-scatter). Compile FSDP plans on the pod mesh itself.\n"
        f"- On the pod meshes XLA on CPU keeps these full-size per-block buffers live "
        f"across the step: each block adds {big['per_layer'] / GIB:.2f} GiB with "
        f"ScalingAdafactor and {adam['per_layer'] / GIB:.2f} GiB with Adam, so pure FSDP "
        f"needs {big['full']['fsdp:1024']['peak'] / GIB:.0f}-"
        f"{adam['full']['fsdp:1024']['peak'] / GIB:.0f} GiB per device where the analytic "
        f"planner, which counts one shard of everything, says about 3 GiB. Whether a TPU "
        f"or GPU compiler frees them block by block is beyond this CPU simulation; "
        f"remat (ViTConfig.remat) cut the growth per block only from 1.74 to 1.50 GiB in "
        f"a spot check (fsdp:1024, ScalingAdafactor, 1 and 2 blocks).\n"
        "- Tensor parallelism keeps the block weights split (under fsdp+model only the "
        "fsdp part is gathered), so the meshes with a model axis are the ones that fit "
        "here. With data:N,model:4 "
        "the optimizer decides: ScalingAdafactor "
        f"{row(rows, 'data:2,model:4', 'scaling_adafactor')['full']['data:2,model:4']['peak'] / GIB:.1f}"
        " GiB, BF16Adam "
        f"{row(rows, 'data:2,model:4', 'bf16_adam')['full']['data:2,model:4']['peak'] / GIB:.1f}"
        " GiB, Adam "
        f"{row(rows, 'data:2,model:4', 'adam')['full']['data:2,model:4']['peak'] / GIB:.1f} GiB.\n"
        "- 16 GiB needs a wide model axis as well as FSDP: on 1024 devices "
        "fsdp:64,model:16 (48 heads / 16) takes ScalingAdafactor "
        + ", BF16Adam ".join(
            f"{row(pod_rows, 'fsdp:64,model:16', o)['full']['fsdp:64,model:16']['peak'] / GIB:.1f}"
            for o in ("scaling_adafactor", "bf16_adam"))
        + " and Adam "
        f"{row(pod_rows, 'fsdp:64,model:16', 'adam')['full']['fsdp:64,model:16']['peak'] / GIB:.1f}"
        " GiB per device.")


def analytic(config, spec, optimizer, args):
    """`kvs.planning.estimate` of the same step (GiB), without and with remat."""
    from keras_vitscale.planning import memory_estimate as memory
    from keras_vitscale.mesh_spec import parse_mesh

    mesh = parse_mesh(spec)
    compute = "bfloat16" if "bfloat16" in args.dtype_policy else "float32"
    return [memory.estimate(config, batch_size=args.batch_per_shard * mesh["data"] * mesh["fsdp"],
                            optimizer=optimizer, compute_dtype=compute, remat=remat,
                            mesh=mesh).per_device["total"] / GIB for remat in (False, True)]


def report(sp, configs, tables, checks, arg_diffs, pod_rows, shard_checks, fits,
           compare, header):
    lines = [header, ""]
    for name, rows in tables.items():
        config = configs[name]
        lines += [f"### {name}: {config.count_params() / 1e9:.2f}B parameters, "
                  f"{config.depth} blocks (preset recipe: {config.block} blocks, "
                  f"{config.pooling} head)", "",
                  "Peak GiB per device (XLA on CPU) of 1- and 2-block slices on 8 "
                  "devices, what each block adds, and the full depth on the same mesh "
                  "and scaled to 256 and 1024 devices (the FSDP scaling is far off, see "
                  "the checks):", "",
                  sp.format_table(rows, config.depth), ""]
    if pod_rows:
        config = configs["22B/14"]
        lines += ["### ViT-22B compiled on pod meshes (256 and 1024 virtual devices)", "",
                  sp.format_table(pod_rows, config.depth), ""]
    lines += ["### Checks", ""]
    lines += ["Held-out slices (ScalingAdafactor): the peak predicted from the 1- and "
              "2-block slices against the compiled one, and how much the full-depth "
              "figure moves when all compiled depths are fitted instead of 1 and 2:", "",
              "| slice | blocks | predicted GiB | compiled GiB | error | full-depth drift |",
              "|---|---|---|---|---|---|"]
    for case, depth, predicted, measured, drift in checks:
        lines.append(f"| {case} | {depth} | {predicted / GIB:.3f} | {measured / GIB:.3f} | "
                     f"{100 * (predicted - measured) / measured:+.2f}% | "
                     f"{100 * drift:+.1f}% |")
    lines += ["", f"Argument bytes from the layouts vs XLA's, over all {arg_diffs[1]} "
              f"compiled slices: largest difference {arg_diffs[0]} bytes.", ""]
    if shard_checks:
        lines += ["Scaling the 8-device slices to pod meshes (module docstring's model) "
                  "against slices compiled on the pod mesh, ViT-22B at 48 blocks:", "",
                  "| mesh, optimizer | scaled from 8 devices GiB | compiled on the pod "
                  "mesh GiB | scaled / compiled |", "|---|---|---|---|"]
        for case, scaled, direct in shard_checks:
            lines.append(f"| {case} | {scaled / GIB:.2f} | {direct / GIB:.2f} | "
                         f"{scaled / direct:.2f} |")
        lines.append("")
    lines += ["### ViT-22B: what fits", "",
              "Full depth (48 blocks), batch 1 per batch shard, as XLA on CPU compiles "
              "it. FSDP counts only where compiled on the pod mesh itself. A data+model "
              "mesh with a data axis has the same per-device program at any data size "
              "(data:2,model:4 and data:64,model:4 agree to the byte), so it counts when "
              "scaled; model:8 has no data axis, hence no gradient all-reduce, and reads "
              "2-19% below data:32,model:8.", ""]
    for label, options in fits.items():
        shown = "; ".join(f"{spec} {opt} {gib:.1f} GiB ({how})"
                          for spec, opt, gib, how in options) or "none of the simulated meshes"
        lines.append(f"- {label} per device: {shown}.")
    if compare:
        lines += ["", "Compiled against the analytic planner (`kvs.planning.estimate`, which "
                  "counts no gathered weights or full-size gradients):", "",
                  "| mesh | optimizer | compiled GiB | analytic GiB | analytic, remat GiB |",
                  "|---|---|---|---|---|"]
        for spec, optimizer, compiled, (plain, remat) in compare:
            lines.append(f"| {spec} | {optimizer} | {compiled:.1f} | {plain:.1f} | "
                         f"{remat:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ViT-22B only, ScalingAdafactor only, no pod compiles.")
    parser.add_argument("--cache", help="JSON file of compiled slices to reuse and extend.")
    parser.add_argument("--batch-per-shard", type=int, default=1,
                        help="examples per batch shard (default: 1).")
    parser.add_argument("--dtype-policy", default="mixed_bfloat16",
                        help="Keras dtype policy (default: mixed_bfloat16).")
    parser.add_argument("--no-write", action="store_true", help="print only.")
    args = parser.parse_args(argv)
    import keras

    from keras_vitscale.planning import compiled_step
    from keras_vitscale.planning import sharding_simulation as sp

    if keras.backend.backend() != "jax":
        sys.exit(f"needs KERAS_BACKEND=jax (got {keras.backend.backend()}): it compiles "
                 "with XLA through JAX.")
    variants = ("22B/14",) if args.quick else VARIANTS
    optimizers = ("scaling_adafactor",) if args.quick else OPTIMIZERS
    pods = () if args.quick else POD_MESHES
    compiled_step.use_virtual_devices(max(POD_SIZES) if pods else 8)
    import jax

    start, load = time.time(), os.getloadavg()[0]
    cache = Cache(args.cache)
    configs = {name: sp.model_config(name) for name in variants}
    tables = {}
    for name in variants:
        print(f"{name}:", flush=True)
        meshes = MESHES + (EXTRA_22B_MESHES if name == "22B/14" and not args.quick else ())
        tables[name] = sp.simulate(configs[name], meshes, optimizers, (1, 2), POD_SIZES,
                                   args.batch_per_shard, args.dtype_policy,
                                   compile_fn=cache.compile)
    checks = depth_checks(sp, cache, configs, CHECKS, args)
    pod_rows, scale_rows, shard_checks = [], [], []
    if pods:
        print("22B/14 on pod meshes:", flush=True)
        pod_rows = sp.simulate(configs["22B/14"], pods, optimizers, (1, 2), (),
                               args.batch_per_shard, args.dtype_policy,
                               compile_fn=cache.compile)
        checks += depth_checks(sp, cache, configs, POD_CHECKS, args)
        scale_rows = sp.simulate(configs["22B/14"], POD_SCALE_CHECKS, optimizers,
                                 (1, 2), (), args.batch_per_shard, args.dtype_policy,
                                 compile_fn=cache.compile)
        scaled = {(spec, row["optimizer"]): full["peak"] for row in tables["22B/14"]
                  for spec, full in row["full"].items()}
        for row in pod_rows + scale_rows:
            key = (row["mesh"], row["optimizer"])
            if key in scaled:
                shard_checks.append((f"{row['mesh']} {row['optimizer']}", scaled[key],
                                     row["full"][row["mesh"]]["peak"]))
    steps = [compiled_step.StepMemory(**v) for v in cache.data.values()]
    arg_diffs = (max(abs(s.arguments - s.layout["arguments"]) for s in steps), len(steps))
    fits = verdict(tables.get("22B/14", []), pod_rows + scale_rows)
    compare = [(row["mesh"], row["optimizer"], row["full"][row["mesh"]]["peak"] / GIB,
                analytic(configs["22B/14"], row["mesh"], row["optimizer"], args))
               for row in pod_rows + scale_rows]
    reading = explain(tables.get("22B/14", []), pod_rows) if pod_rows else ""
    device = jax.devices()[0]
    header = (
        f"Compiled with jax {jax.__version__} for {device.platform} ({platform.machine()}) "
        f"virtual devices, never run. {args.dtype_policy} (float32 weights, gradients "
        f"and optimizer statistics as each optimizer keeps them), batch "
        f"{args.batch_per_shard} per batch shard, no remat, the presets' recipes. "
        f"Peak = XLA's arguments + temporaries + non-aliased outputs on one device. "
        f"{len(steps)} slices compiled in {sum(s.compile_seconds for s in steps) / 60:.0f} "
        f"min in all (this report: {(time.time() - start) / 60:.1f} min, reusing "
        f"--cache) on a 2-core machine shared with other jobs (load average {load:.1f} "
        f"at the start): compile times are not measurements, the bytes are.")
    body = report(sp, configs, tables, checks, arg_diffs, pod_rows, shard_checks, fits,
                  compare, header)
    if reading:
        body += "\n\n" + reading
    print(body)
    if not args.no_write:
        results.write_section("sharding_simulation", body,
                              title="ViT-22B and pods by simulation "
                                    "(benchmarks/sharding_simulation.py)")
        print(f"wrote {results.RESULTS}")


if __name__ == "__main__":
    main()
