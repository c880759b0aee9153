"""What each JAX formulation choice buys: an A/B of kvs.ViT variants on XLA-CPU.

Figures, not assertions. The profile of the JAX step (jax.profiler trace of
ViT-S/16, batch 8, per-thunk times joined to the compiled HLO) showed the
attention as one YNNPACK fusion of QK^T, softmax and AV taking 27% of the
forward pass, the exact GELU's erfc among the largest elementwise fusions,
and, in the backward pass, LayerNorm-gradient fusions of up to 179 operands
(each block's residual gradient recomputed from every later block's). This
script measures the changes made for them, each against the formulation it
replaced, in one process, in interleaved rounds:

- `before`: attention written as "bthd,bshd->bhts" einsums, GELU as
  `jax.nn.gelu(approximate=False)` (erfc); the code before this change;
- `+ head-major attention`: (B, H, N, dh) operands and batched matmuls (the
  current `keras_vitscale.layers.attention.attention`);
- `+ erf GELU`: the same function written with erf (the current
  `keras_vitscale.layers.mlp.gelu`);
- `+ LayerNorm gradient`: `keras_vitscale.layers.LayerNorm`'s hand-written
  gradient instead of differentiating `keras.layers.LayerNormalization`,
  i.e. the library as it is now.

Each variant is traced while its formulation is patched in, so after the
first (compiling) step the patches no longer matter and the variants can be
timed alternately. Inference is `predict_on_batch`, training
`train_on_batch` with AdamW, as in benchmarks/throughput.py; ratios are per
round against `before`.

A second table compares XLA-CPU compiler options on the current library
(forward and gradient of a jitted `stateless_call`, since Keras' own jit
takes no compiler options): the default against YNNPACK fusions off
(`xla_cpu_experimental_ynn_fusion_type=""`, i.e. Eigen matmuls).

Usage:
    python benchmarks/jax_formulations.py                 # S/16, batch 8, 9 rounds
    python benchmarks/jax_formulations.py --models S/16 B/16 --rounds 5 --no-write
"""

import argparse
import datetime
import importlib
import os
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)
from throughput import IMAGE_SIZE, LEARNING_RATE, NUM_CLASSES, WEIGHT_DECAY  # noqa: E402
from throughput import _kvs_model as make_model  # noqa: E402  (timm-like kvs.ViT)

ATTENTION = importlib.import_module("keras_vitscale.layers.attention")
MLP = importlib.import_module("keras_vitscale.layers.mlp")
NORM = importlib.import_module("keras_vitscale.layers.normalization")
KERAS_LAYER_NORM = keras.layers.LayerNormalization.call  # autodiff through Keras' op


def einsum_attention(query, key, value, bias=None):
    """The attention before the change: einsums in token-major layout."""
    scale = ops.cast(1.0 / (query.shape[-1] ** 0.5), query.dtype)
    logits = ops.einsum("bthd,bshd->bhts", query * scale, key)
    if bias is not None:
        logits = logits + bias
    return ops.einsum("bhts,bshd->bthd", ops.softmax(logits, axis=-1), value)


def erfc_gelu(x, flavour):
    """The GELU before the change: jax.nn.gelu, whose exact form uses erfc."""
    return ops.gelu(x, approximate=(flavour == "tanh"))


# (attention, GELU, LayerNorm.call) for each variant.
VARIANTS = {
    "before": (einsum_attention, erfc_gelu, KERAS_LAYER_NORM),
    "+ head-major attention": (ATTENTION.attention, erfc_gelu, KERAS_LAYER_NORM),
    "+ erf GELU": (ATTENTION.attention, MLP.gelu, KERAS_LAYER_NORM),
    "+ LayerNorm gradient (current)": (ATTENTION.attention, MLP.gelu, NORM.LayerNorm.call),
}
COMPILER_OPTIONS = {
    "default": {},
    "YNNPACK fusions off": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


def data(batch):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    return jnp.asarray(images), jnp.asarray(rng.integers(0, NUM_CLASSES, (batch,)))


def formulation_cases(variant, batch):
    """{name: (infer step, train step)}, each traced under its formulation."""
    images, labels = data(batch)
    current = ATTENTION.attention, MLP.gelu, NORM.LayerNorm.call
    cases = {}
    try:
        for name, (attention, gelu, layer_norm) in VARIANTS.items():
            ATTENTION.attention, MLP.gelu, NORM.LayerNorm.call = attention, gelu, layer_norm
            model = make_model(variant)
            optimizer = keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
            model.compile(optimizer=optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            infer = lambda m=model: m.predict_on_batch(images)  # noqa: E731
            train = lambda m=model: m.train_on_batch(images, labels)  # noqa: E731
            for step in (infer, train, infer, train):  # compile, then one warm-up each
                step()
            cases[name] = (infer, train)
    finally:
        ATTENTION.attention, MLP.gelu, NORM.LayerNorm.call = current
    return cases


def option_cases(variant, batch):
    """{name: (jitted forward, jitted gradient)} compiled with each option set."""
    images, labels = data(batch)
    model = make_model(variant)
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def forward(params, x):
        return model.stateless_call(params, frozen, x, training=False)[0]

    def loss(params, x, y):
        logits = model.stateless_call(params, frozen, x, training=True)[0]
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(batch), y])

    cases = {}
    for name, options in COMPILER_OPTIONS.items():
        fwd = jax.jit(forward, compiler_options=options)
        grad = jax.jit(jax.grad(loss), compiler_options=options)
        infer = lambda f=fwd: f(trainable, images).block_until_ready()  # noqa: E731
        train = lambda g=grad: jax.block_until_ready(g(trainable, images, labels))  # noqa: E731
        for step in (infer, train, infer, train):
            step()
        cases[name] = (infer, train)
    return cases


def time_rounds(cases, rounds, batch):
    """Interleaved rounds; returns {name: ([infer images/s], [train images/s])}."""
    names = list(cases)
    out = {n: ([], []) for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i, step in enumerate(cases[name]):
                start = time.perf_counter()
                step()
                out[name][i].append(batch / (time.perf_counter() - start))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {out[n][1][-1]:.2f}" for n in names), flush=True)
    return out


def table(title, variant, batch, timings, what):
    base = next(iter(timings))
    lines = [f"| model | batch | {what} | inference images/s | vs {base} | "
             f"training images/s | vs {base} |", "|---|---|---|---|---|---|---|"]
    for name, (infer, train) in timings.items():
        ratio = [statistics.median(a / b for a, b in zip(mine, ref))
                 for mine, ref in zip((infer, train), timings[base])]
        lines.append(f"| {variant} | {batch} | {name} | {statistics.median(infer):.2f} | "
                     f"{ratio[0]:.2f}x | {statistics.median(train):.2f} | {ratio[1]:.2f}x |")
    return f"{title}\n\n" + "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is compared.")
    p.add_argument("--models", nargs="+", default=["S/16"], help="ViT variants (default: S/16).")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8).")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (default: 9).")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone.")
    args = p.parse_args(argv)
    load_start, start = os.getloadavg(), time.perf_counter()
    parts = []
    for variant in args.models:
        print(f"{variant}: formulations", flush=True)
        timings = time_rounds(formulation_cases(variant, args.batch_size), args.rounds,
                              args.batch_size)
        parts.append(table("Formulations (Keras predict_on_batch / train_on_batch):", variant,
                           args.batch_size, timings, "formulation"))
        print(f"{variant}: compiler options", flush=True)
        timings = time_rounds(option_cases(variant, args.batch_size), args.rounds,
                              args.batch_size)
        parts.append(table("XLA-CPU compiler options (jitted forward / gradient, no optimizer):",
                           variant, args.batch_size, timings, "options"))
    fmt = lambda t: " ".join(f"{x:.2f}" for x in t)  # noqa: E731
    text = "\n".join([
        f"Date: {datetime.date.today().isoformat()}. {os.cpu_count()} cores, no GPU. "
        f"jax {jax.__version__}, keras {keras.__version__}. Medians of {args.rounds} "
        "interleaved rounds; ratios per round against the first row of each table.",
        f"Load average: start {fmt(load_start)}, end {fmt(os.getloadavg())}. "
        f"Wall time {(time.perf_counter() - start) / 60:.1f} min.",
        "", "\n\n".join(parts)])
    print("\n" + text)
    if not args.no_write:
        results.write_section("jax_formulations", text,
                              title="JAX formulations A/B (benchmarks/jax_formulations.py)")
        print(f"\nwrote section 'jax_formulations' to {results.RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
