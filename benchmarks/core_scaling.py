"""How the ViT-S/16 training work scales from one CPU core to all of them.

Figures, not assertions. Prints a table and writes the `core_scaling` section
of benchmarks/RESULTS.md.

Why: `train_throughput` compares kvs/jax with timm eager on all cores of the
machine and finds a gap. This script splits that gap in two questions: how
fast is each program on one core (the kernels), and how much does it gain
from the other cores (the parallelism of each part)?

Timed, per contender and core count, each in its own worker process that
pins itself to the first N cores (`os.sched_setaffinity`) before importing
anything, so that XLA, Eigen and PyTorch all size their thread pools to N:
- attention: the attention core at ViT-S/16 shapes (batch 8, 197 tokens,
  6 heads of 64), forward + backward. kvs: `layers.attention.attention`
  under `jax.jit(jax.grad(...))`; PyTorch: `scaled_dot_product_attention`
  and `backward()`.
- gradient: the ViT-S/16 batch-8 gradient (forward + backward, no
  optimizer). kvs: `kvs.ViT` configured like timm (see throughput.py),
  `stateless_call` under `jax.jit(jax.grad(...))`; timm:
  `vit_small_patch16_224`, cross-entropy, `backward()`.
Rounds interleave all workers, one timing each per round, so that load from
other processes hits all of them alike. Every worker runs under the same host
malloc setting (default: retaining, as the training tools on a CPU host).

Usage:
    python benchmarks/core_scaling.py                 # 7 rounds, ~6 min on 2 cores
    python benchmarks/core_scaling.py --repeats 3 --no-write
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)
import throughput  # noqa: E402  (models configured like timm, worker env, malloc notes)

TAG = "@@core_scaling "  # prefix of the workers' answer lines on stdout
BATCH, TOKENS, HEADS, HEAD_DIM = 8, 197, 6, 64  # ViT-S/16 at 224 px
PARTS = ("attention", "gradient")
TITLE = "Core scaling: one core vs all, kvs/jax vs PyTorch (benchmarks/core_scaling.py)"


# ---------------------------------------------------------------- workers --

def _jax_parts():
    import jax
    import jax.numpy as jnp

    from keras_vitscale.layers.attention import attention

    rng = np.random.default_rng(0)
    qkv = [jnp.asarray(rng.standard_normal((BATCH, TOKENS, HEADS, HEAD_DIM), np.float32))
           for _ in range(3)]
    attention_grad = jax.jit(jax.grad(
        lambda q, k, v: jnp.sum(attention(q, k, v) ** 2), argnums=(0, 1, 2)))

    model = throughput._kvs_model("S/16")
    images = jnp.asarray(rng.uniform(-1, 1, (BATCH, 224, 224, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, throughput.NUM_CLASSES, (BATCH,)))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, images, labels):
        logits, _ = model.stateless_call(trainable, non_trainable, images, training=True)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(BATCH), labels])

    model_grad = jax.jit(jax.grad(loss))
    return {
        "attention": lambda: jax.block_until_ready(attention_grad(*qkv)),
        "gradient": lambda: jax.block_until_ready(model_grad(trainable, images, labels)),
    }


def _torch_parts(cores):
    import timm
    import torch

    torch.set_num_threads(cores)
    torch.manual_seed(0)
    qkv = [torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, requires_grad=True) for _ in range(3)]

    def attention_step():
        out = torch.nn.functional.scaled_dot_product_attention(*qkv)
        (out**2).sum().backward()
        for t in qkv:
            t.grad = None

    model = timm.create_model(throughput.TIMM_NAMES["S/16"], num_classes=throughput.NUM_CLASSES)
    images = torch.rand(BATCH, 3, 224, 224) * 2 - 1
    labels = torch.randint(0, throughput.NUM_CLASSES, (BATCH,))

    def gradient_step():
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        model.zero_grad(set_to_none=True)

    return {"attention": attention_step, "gradient": gradient_step}


def worker(kind, cores, warmup):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    parts = _jax_parts() if kind == "jax" else _torch_parts(cores)
    for step in parts.values():
        for _ in range(1 + warmup):  # compile, then let the heap settle
            step()
    print(TAG + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        part = line.strip()
        if part == "quit":
            return
        start = time.perf_counter()
        parts[part]()
        print(TAG + json.dumps({"seconds": time.perf_counter() - start}), flush=True)


# ----------------------------------------------------------------- driver --

class Worker:
    def __init__(self, kind, cores, warmup, host_malloc, log):
        self.name = f"{'kvs/jax' if kind == 'jax' else 'torch'} x{cores}"
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", kind,
             "--cores", str(cores), "--warmup", str(warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env=throughput.worker_env(host_malloc, "jax" if kind == "jax" else None))

    def answer(self):
        """The worker's next answer line (its other output is library logs)."""
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise RuntimeError(f"worker {self.name} exited early (see core_scaling_workers.log)")

    def time(self, part):
        self.proc.stdin.write(part + "\n")
        self.proc.stdin.flush()
        return self.answer()["seconds"]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def run(args):
    all_cores = len(os.sched_getaffinity(0))
    core_counts = sorted({1, all_cores})
    start, load_start = time.perf_counter(), os.getloadavg()
    times = {}  # (part, kind, cores) -> [seconds per round]
    with open("core_scaling_workers.log", "w") as log:
        workers = {(kind, cores): Worker(kind, cores, args.warmup, args.host_malloc, log)
                   for kind in ("jax", "torch") for cores in core_counts}
        for w in workers.values():  # set-up (compiles, warm-up) runs in parallel
            w.answer()
        for round_ in range(args.repeats):
            print(f"round {round_ + 1}/{args.repeats}", flush=True)
            for part in PARTS:
                for key, w in workers.items():
                    times.setdefault((part,) + key, []).append(w.time(part))
        for w in workers.values():
            w.close()
    return {"times": {"|".join(map(str, k)): v for k, v in times.items()},
            "core_counts": core_counts, "repeats": args.repeats, "warmup": args.warmup,
            "host_malloc": args.host_malloc, "date": str(datetime.date.today()),
            "cpu": throughput._cpu_model(), "load_start": load_start,
            "load_end": os.getloadavg(), "wall_s": time.perf_counter() - start}


def _median_ratio(numerators, denominators):
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def report(res):
    times = {tuple(k.split("|")): v for k, v in res["times"].items()}
    counts = [str(c) for c in res["core_counts"]]
    most = counts[-1]
    lines = [
        f"Date: {res['date']}. Machine: {most} cores, {res['cpu']}, no GPU; "
        "shared with other jobs.",
        "Load average (1/5/15 min): start {}, end {}. Wall time {:.1f} min.".format(
            " ".join(f"{x:.2f}" for x in res["load_start"]),
            " ".join(f"{x:.2f}" for x in res["load_end"]), res["wall_s"] / 60),
        throughput.MALLOC_NOTE[res["host_malloc"]],
        "",
        f"Medians of {res['repeats']} interleaved rounds after {res['warmup']} warm-up steps. "
        "'speed-up' = median over rounds of (time on 1 core / time on all cores); "
        "'kvs vs torch' = median over rounds of (PyTorch time / kvs time) at the same core "
        "count, above 1 when kvs is faster.",
        "",
        "| part | contender | cores | ms (median) | min-max | speed-up from 1 core | kvs vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in PARTS:
        for kind, name in (("jax", "kvs/jax"), ("torch", "PyTorch")):
            for cores in counts:
                t = times[(part, kind, cores)]
                speedup = (f"{_median_ratio(times[(part, kind, '1')], t):.2f}x"
                           if cores != "1" else "")
                versus = (f"{_median_ratio(times[(part, 'torch', cores)], t):.2f}x"
                          if kind == "jax" else "")
                lines.append(
                    f"| {part} | {name} | {cores} | {statistics.median(t) * 1e3:.1f} | "
                    f"{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f} | {speedup} | {versus} |")
    if most != "1":
        lines += ["", "Reading (figures of this run):"]
        for part in PARTS:
            kvs_gain = _median_ratio(times[(part, "jax", "1")], times[(part, "jax", most)])
            torch_gain = _median_ratio(times[(part, "torch", "1")], times[(part, "torch", most)])
            lines.append(
                f"- {part}: on 1 core kvs runs at "
                f"{_median_ratio(times[(part, 'torch', '1')], times[(part, 'jax', '1')]):.2f}x "
                f"PyTorch's speed, on {most} at "
                f"{_median_ratio(times[(part, 'torch', most)], times[(part, 'jax', most)]):.2f}x; "
                f"going from 1 to {most} cores kvs gains {kvs_gain:.2f}x, PyTorch {torch_gain:.2f}x.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes the core_scaling section of benchmarks/RESULTS.md.")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps after the compiling one (default 3)")
    parser.add_argument("--host-malloc", choices=("retain", "system"), default="retain",
                        help="malloc settings of every worker (default retain; see "
                             "keras_vitscale/training/host_memory.py)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--raw", default="core_scaling_raw.json",
                        help="where the per-round times are saved (default %(default)s)")
    parser.add_argument("--from-raw", action="store_true",
                        help="report the times saved in --raw instead of measuring")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.cores, args.warmup)
    if args.from_raw:
        with open(args.raw) as f:
            res = json.load(f)
    else:
        res = run(args)
        with open(args.raw, "w") as f:
            json.dump(res, f)
    text = report(res)
    print("\n" + text)
    if not args.no_write:
        results.write_section("core_scaling", text, TITLE)
        print(f"\nwrote section 'core_scaling' to {results.RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
