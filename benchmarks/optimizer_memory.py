"""Optimizer-state memory and step time: Keras Adam vs BF16Adam vs ScalingAdafactor.

Figures, not assertions. Prints a table and writes it between the
`optimizer_memory` markers of benchmarks/RESULTS.md (other sections of that
file belong to other benchmarks and are left untouched).

- Memory: optimizer-state bytes / parameter bytes (float32 parameters) for
  ViT-B/16 and ViT-G/14 with a 1000-class head, counted from the parameter
  shapes of `ViTConfig.parameter_shapes()` through each optimizer's
  `state_specs` (what its `build` creates), so G/14 is never materialised.
  Keras Adam keeps two slots of the parameter's shape and dtype. The counts
  are cross-checked against really built optimizers on ViT-S/16.
- Step time on ViT-S/16 relative to Keras Adam: the optimizer update alone
  (compiled where the backend compiles, on random gradients) and a whole
  `train_on_batch` step of `kvs.ViT("S/16")` at a small batch.

Usage: KERAS_BACKEND=jax python benchmarks/optimizer_memory.py [--batch 4]
"""

import argparse
import math
import os
import re
import time

import keras
import ml_dtypes  # noqa: F401  (numpy learns "bfloat16")
import numpy as np

from keras_vitscale.config import ViTConfig
from keras_vitscale.optimizers import BF16Adam, ScalingAdafactor

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)

RESULTS = results.RESULTS
TARGETS = {"keras.Adam": "2.0", "BF16Adam": "<= 1.5", "ScalingAdafactor": "<= 0.51"}


def optimizers():
    return {
        "keras.Adam": keras.optimizers.Adam(1e-3),
        "BF16Adam": BF16Adam(1e-3),
        "ScalingAdafactor": ScalingAdafactor(1e-3),
    }


def _bytes(shape, dtype):
    return math.prod(shape) * np.dtype(keras.backend.standardize_dtype(dtype)).itemsize


def state_bytes(name, optimizer, shapes):
    total = 0
    for shape in shapes:
        if name == "keras.Adam":  # momentum + velocity, shape/dtype of param
            total += 2 * _bytes(shape, "float32")
        else:
            total += sum(_bytes(s, d) for _, s, d, _ in optimizer.state_specs(shape))
    return total


def memory_table():
    rows = []
    for variant in ("B/16", "G/14"):
        shapes = list(ViTConfig.from_variant(variant, num_classes=1000).parameter_shapes().values())
        param_bytes = sum(_bytes(s, "float32") for s in shapes)
        for name, opt in optimizers().items():
            ratio = state_bytes(name, opt, shapes) / param_bytes
            rows.append((variant, name, param_bytes / 2**30, ratio))
    return rows


def _variables(variant):
    shapes = ViTConfig.from_variant(variant, num_classes=1000).parameter_shapes()
    rng = np.random.default_rng(0)
    return [
        keras.Variable(rng.normal(size=s).astype("float32") * 0.02, name=re.sub(r"\W", "_", p))
        for p, s in shapes.items()
    ]


def cross_check(variables):
    """Built state bytes (iteration/lr scalars excluded) vs the counts."""
    shapes = [tuple(v.shape) for v in variables]
    out = {}
    for name, opt in optimizers().items():
        opt.build(variables)
        built = sum(_bytes(v.shape, v.dtype) for v in opt.variables if len(v.shape))
        out[name] = (built, state_bytes(name, opt, shapes))
    return out


def _timed(fn, repeats):
    fn()  # compile / warm up
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def update_times(variables, repeats):
    rng = np.random.default_rng(1)
    grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in variables]
    backend = keras.backend.backend()
    times = {}
    for name, opt in optimizers().items():
        opt.build(variables)
        if backend == "jax":
            import jax

            apply = jax.jit(opt.stateless_apply)
            state = {"opt": [v.value for v in opt.variables], "train": [v.value for v in variables]}

            def step(state=state, apply=apply):
                state["train"], state["opt"] = apply(state["opt"], grads, state["train"])
                jax.block_until_ready(state["train"])

        elif backend == "tensorflow":
            import tensorflow as tf

            step = tf.function(lambda opt=opt: opt.apply(grads, variables))
        else:
            step = lambda opt=opt: opt.apply(grads, variables)  # noqa: E731
        times[name] = _timed(step, repeats)
    return times


def train_step_times(batch, repeats):
    from keras_vitscale.model import ViT

    rng = np.random.default_rng(2)
    x = rng.normal(size=(batch, 224, 224, 3)).astype("float32")
    y = rng.integers(0, 1000, size=(batch,))
    times = {}
    for name, opt in optimizers().items():
        keras.utils.set_random_seed(0)
        model = ViT(variant="S/16", num_classes=1000)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        times[name] = _timed(lambda: model.train_on_batch(x, y), repeats)
    return times


def write_section(text):
    results.write_section("optimizer_memory", text)

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="images per train step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer")
    parser.add_argument("--no-train-step", action="store_true", help="skip the whole-model step")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    lines = ["## Optimizer state memory and step time", ""]
    lines += ["Optimizer-state bytes / float32 parameter bytes (from shapes):", ""]
    lines += ["| model | params GiB | optimizer | state / params | target |", "|---|---|---|---|---|"]
    for variant, name, gib, ratio in memory_table():
        lines.append(f"| ViT-{variant} | {gib:.2f} | {name} | {ratio:.5f} | {TARGETS[name]} |")

    variables = _variables("S/16")
    checks = cross_check(variables)
    agree = all(built == counted for built, counted in checks.values())
    lines += ["", f"Counts equal the bytes of really built optimizers on ViT-S/16: {agree} "
              + ", ".join(f"{k} {b / 2**20:.1f} MiB" for k, (b, _) in checks.items()) + "."]

    backend = keras.backend.backend()
    device = "CPU" if not any("gpu" in str(d).lower() for d in keras.distribution.list_devices()) else "GPU"
    upd = update_times(variables, args.repeats)
    lines += ["", f"Step time on ViT-S/16, {backend} backend, {device}, {os.cpu_count()} cores, same run:", ""]
    lines += ["| optimizer | update only (ms) | vs Adam | train step (ms) | vs Adam |", "|---|---|---|---|---|"]
    steps = {} if args.no_train_step else train_step_times(args.batch, max(2, args.repeats // 2))
    for name in upd:
        row = f"| {name} | {1e3 * upd[name]:.1f} | {upd[name] / upd['keras.Adam']:.2f} |"
        if steps:
            row += f" {1e3 * steps[name]:.0f} | {steps[name] / steps['keras.Adam']:.2f} |"
        else:
            row += " - | - |"
        lines.append(row)
    if steps:
        lines += ["", f"Train step: `kvs.ViT(variant=\"S/16\")`, batch {args.batch} at 224 px, `train_on_batch`."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"\nwrote section to {RESULTS}")


if __name__ == "__main__":
    main()
