"""Images/s of kvs.ViT on each Keras backend, next to timm and keras-hub.

Figures, not assertions. Prints a report per mode and writes it between the
`throughput_infer` / `throughput_train` markers of benchmarks/RESULTS.md
(a run rewrites only the modes it measured; other sections of that file
belong to other benchmarks and are left untouched).

What is timed, per model (ViT-S/16, ViT-B/16, and with `--models So400m/14`
SigLIP's shape-optimised MAP tower; 224 px, float32, 1000 classes)
and batch size:
- inference (`--modes infer`): one forward pass (Keras `predict_on_batch`;
  timm under `torch.inference_mode()`);
- training (`--modes train`): forward + backward + AdamW update (Keras
  `model.compile` + `train_on_batch`, default `jit_compile`; timm
  `loss.backward()` + `torch.optim.AdamW`).

Contenders:
- `kvs/<backend>`: `kvs.ViT` configured like timm's `vit_*_patch16_224` (or, for
  So400m/14, `vit_so400m_patch14_siglip_224`)
  (class token, learned position embedding covering it, exact GELU,
  token pooling), so all models do the same arithmetic;
- `keras-hub/<backend>`: keras-hub's `ViTBackbone` + a Dense head on the
  class token, when keras-hub imports (else "not available" and why);
- `timm eager` (PyTorch, 2 threads) and `timm compile` (`torch.compile`).

Each Keras backend runs in its own worker process (KERAS_BACKEND is fixed per
process) and timm in another. The driver builds and warms up every
contender, then times them in rounds, one step each per round (A B C A B C
...), so load from other processes on a shared machine hits all of them
alike; each round also times a float32 numpy 2048x2048 matmul, the peak for
model FLOPs utilisation: MFU = k x forward FLOPs/image x images/s / peak,
with k = 1 for inference and 3 for training, forward FLOPs from
`ViTConfig.flops_per_image()`. Reported: medians over rounds, ratios to
timm eager from the same rounds, and MFU. On a shared machine the ratios
hold (every contender shares the rounds' load); the absolute figures and
MFU need a quiet one.

Host malloc: every worker, timm's included, starts with glibc malloc keeping
freed memory (`--host-malloc retain`: MALLOC_ARENA_MAX=1, MALLOC_MMAP_MAX_=0,
MALLOC_TRIM_THRESHOLD_ huge; a variable already set in the environment is
kept). With glibc's defaults XLA's per-step temporary buffer is unmapped
after every step and page-faulted in again on the next, which slows CPU
training (RESULTS.md, throughput section). `--host-malloc system` measures
glibc's defaults.

Usage:
    python benchmarks/throughput.py                # S/16 + B/16, batch 8, both modes (long)
    python benchmarks/throughput.py --modes train --timm-compile none --no-keras-hub
        # training only: kvs on every backend vs timm eager, with MFU
    python benchmarks/throughput.py --quick        # ViT-S/16, batch 8, 3 rounds, no write
    python benchmarks/throughput.py --models S/16 --batch-sizes 8 32 \\
        --backends jax --modes infer --repeats 7 --no-write
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

import results  # noqa: E402  (benchmarks/results.py: the shared RESULTS.md writer)

RESULTS = results.RESULTS
# glibc's documented malloc variables, read once when a process starts, so they
# are set in each worker's environment: every thread allocates from the main
# heap (a thread arena would mmap big blocks anyway), no block gets its own
# mmap, and the heap's free top is never trimmed, so the next step reuses the
# same pages instead of faulting a fresh buffer in.
RETAINING_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**60),
}
MALLOC_NOTE = {
    "retain": "Host malloc: every worker (timm too) runs with glibc keeping freed memory "
              "(--host-malloc retain: MALLOC_ARENA_MAX=1, MALLOC_MMAP_MAX_=0, no trimming).",
    "system": "Host malloc: glibc defaults (--host-malloc system).",
}
TAG = "@@throughput "  # prefix of the workers' protocol lines on stdout
IMAGE_SIZE, NUM_CLASSES, THREADS = 224, 1000, 2
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.05
TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
              "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224",
              "So400m/14": "vit_so400m_patch14_siglip_224"}
# kvs fields that make each variant compute what its timm model does: class-token
# ViTs (position embedding covering the class token), or SigLIP's MAP tower.
CLASS_TOKEN = dict(pooling="tok", posemb="learn", posemb_covers_class_token=True, gelu="exact")
KVS_FIELDS = {"So400m/14": dict(pooling="map", posemb="learn", gelu="exact")}


def kvs_config(variant):
    from keras_vitscale.config import ViTConfig

    return ViTConfig.from_variant(variant, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE,
                                  **KVS_FIELDS.get(variant, CLASS_TOKEN))


# ---------------------------------------------------------------- workers --
# A worker reads one JSON command per line on stdin and answers one line
# `TAG + json` on stdout; anything else it prints (library logs) is ignored.

def _kvs_model(variant, **_):
    import keras_vitscale as kvs

    return kvs.ViT(config=kvs_config(variant))


def _keras_hub_model(variant, **_):
    import keras
    import keras_hub

    from keras_vitscale.config import ViTConfig

    if variant in KVS_FIELDS:
        raise ValueError(f"keras-hub's ViTBackbone has no MAP head for {variant}")
    c = ViTConfig.from_variant(variant)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), patch_size=c.patch_size[0],
        num_layers=c.depth, num_heads=c.num_heads, hidden_dim=c.width, mlp_dim=c.mlp_dim)
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    logits = keras.layers.Dense(NUM_CLASSES)(backbone(images)[:, 0])
    return keras.Model(images, logits)


class KerasCase:
    """One Keras model at one batch size, timed for inference or training."""

    def __init__(self, contender, variant, batch, mode):
        import keras

        build = {"kvs": _kvs_model, "keras-hub": _keras_hub_model}[contender]
        self.model = build(variant)
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
        self.images = keras.ops.convert_to_tensor(images)
        self.labels = keras.ops.convert_to_tensor(rng.integers(0, NUM_CLASSES, (batch,)))
        self.mode = mode
        if mode == "train":
            self.model.compile(
                optimizer=keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def step(self):
        if self.mode == "train":
            self.model.train_on_batch(self.images, self.labels)  # returns a synced loss
        else:
            self.model.predict_on_batch(self.images)  # returns numpy


class TimmCase:
    """A timm model at one batch size, eager or under torch.compile."""

    def __init__(self, contender, variant, batch, mode):
        import timm
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.model = timm.create_model(TIMM_NAMES[variant], pretrained=False,
                                       num_classes=NUM_CLASSES)
        self.model.train(mode == "train")
        self.forward = torch.compile(self.model) if contender == "timm-compile" else self.model
        self.images = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
        self.labels = torch.randint(0, NUM_CLASSES, (batch,))
        self.mode = mode
        if mode == "train":
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE,
                                               weight_decay=WEIGHT_DECAY)

    def step(self):
        torch = self.torch
        if self.mode == "train":
            loss = torch.nn.functional.cross_entropy(self.forward(self.images), self.labels)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                self.forward(self.images)


def _versions(kind):
    out = {"python": platform.python_version(), "numpy": np.__version__}
    if kind == "timm":
        import timm
        import torch

        out.update(torch=torch.__version__, timm=timm.__version__)
        return out
    import keras

    out["keras"] = keras.__version__
    backend = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    out[backend] = __import__(module).__version__
    try:
        import keras_hub

        out["keras_hub"] = keras_hub.__version__
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        out["keras_hub"] = f"not available: {type(e).__name__}: {e}"
    return out


def _set_threads(kind):
    if kind in ("timm", "torch"):
        import torch

        torch.set_num_threads(THREADS)
    elif kind == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(THREADS)


def worker(kind):
    """kind: "timm" or a Keras backend name (KERAS_BACKEND is set by the driver)."""
    _set_threads(kind)
    cases = {}

    def answer(payload):
        sys.stdout.write(TAG + json.dumps(payload) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "versions":
                answer(_versions(kind))
            elif cmd["cmd"] == "setup":
                start = time.perf_counter()
                make = TimmCase if kind == "timm" else KerasCase
                case = make(cmd["contender"], cmd["variant"], cmd["batch"], cmd["mode"])
                built = time.perf_counter()
                case.step()  # traces / compiles
                first = time.perf_counter()
                for _ in range(cmd["warmup"]):
                    case.step()
                cases[cmd["id"]] = case
                answer({"ok": True, "build_s": built - start, "first_step_s": first - built,
                        "warmup_s": time.perf_counter() - first})
            elif cmd["cmd"] == "measure":
                start = time.perf_counter()
                cases[cmd["id"]].step()
                answer({"ok": True, "seconds": time.perf_counter() - start})
            elif cmd["cmd"] == "drop":
                cases.clear()
                gc.collect()
                answer({"ok": True})
            elif cmd["cmd"] == "quit":
                answer({"ok": True})
                return
        except Exception as e:  # noqa: BLE001  (reported to the driver)
            cases.pop(cmd.get("id"), None)
            answer({"ok": False, "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-2000:]})


# ----------------------------------------------------------------- driver --

def has_glibc():
    """True on Linux with glibc, the only C library the malloc variables apply to."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def worker_env(host_malloc, keras_backend=None):
    """The environment of a benchmark worker process.

    Args:
        host_malloc: "retain" (RETAINING_MALLOC_ENV for every worker, timm's
            included; a variable already set in the environment is kept, its
            setter manages malloc) or "system" (glibc's defaults). "retain"
            without glibc exits with an error that says to use "system".
        keras_backend: KERAS_BACKEND for a Keras worker; None for PyTorch.

    Example:
    ```python
    env = worker_env("retain", "jax")  # env["MALLOC_ARENA_MAX"] == "1"
    ```
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    if host_malloc not in ("retain", "system"):
        raise SystemExit(f"ERROR: --host-malloc {host_malloc!r} is not one of retain, system.")
    if host_malloc == "retain":
        if not has_glibc():
            raise SystemExit(
                f"ERROR: --host-malloc retain needs Linux with glibc; this is {sys.platform} "
                f"({platform.libc_ver()[0] or 'no glibc'}). Use --host-malloc system.")
        for name, value in RETAINING_MALLOC_ENV.items():
            env.setdefault(name, value)
    if keras_backend:
        env["KERAS_BACKEND"] = keras_backend
    return env


class Worker:
    def __init__(self, kind, log, host_malloc="retain"):
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env=worker_env(host_malloc, None if kind == "timm" else kind))

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise RuntimeError(f"worker {self.kind} exited (see its log)")

    def close(self):
        try:
            self.ask(cmd="quit")
        except Exception:  # noqa: BLE001
            pass
        self.proc.wait(timeout=60)


def matmul_gflops(n=2048, tries=3):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def contenders(backends, timm_compile, mode, keras_hub=True):
    out = []
    for backend in backends:
        out += [("kvs", backend)] + ([("keras-hub", backend)] if keras_hub else [])
    out.append(("timm-eager", "timm"))
    if timm_compile == "all" or timm_compile == mode:
        out.append(("timm-compile", "timm"))
    return out


def label(contender, kind):
    return contender if kind == "timm" else f"{contender}/{kind}"


def run(args):
    load_start = os.getloadavg()
    kinds = list(args.backends) + ["timm"]
    log = open(args.log, "w")
    workers = {k: Worker(k, log, args.host_malloc) for k in kinds}
    versions = {k: w.ask(cmd="versions") for k, w in workers.items()}
    hub_missing = {k: v["keras_hub"] for k, v in versions.items()
                   if str(v.get("keras_hub", "")).startswith("not available")}
    rows, peaks, wall_start = [], [], time.perf_counter()
    for variant in args.models:
        flops = kvs_config(variant).flops_per_image()
        for batch in args.batch_sizes:
            for mode in args.modes:
                repeats = args.repeats or (5 if variant == "S/16" else 3)
                ready = []
                for contender, kind in contenders(args.backends, args.timm_compile, mode,
                                                  args.keras_hub):
                    name = label(contender, kind)
                    if contender == "keras-hub" and kind in hub_missing:
                        rows.append(dict(variant=variant, batch=batch, mode=mode, name=name,
                                         error=hub_missing[kind]))
                        continue
                    case_id = f"{variant} {batch} {mode} {contender}"
                    print(f"setup {variant} b{batch} {mode:5s} {name} ...", end=" ", flush=True)
                    reply = workers[kind].ask(cmd="setup", id=case_id, contender=contender,
                                              variant=variant, batch=batch, mode=mode,
                                              warmup=args.warmup)
                    if reply["ok"]:
                        print(f"first step {reply['first_step_s']:.1f} s", flush=True)
                        ready.append((name, kind, case_id, reply))
                    else:
                        print("failed:", reply["error"], flush=True)
                        rows.append(dict(variant=variant, batch=batch, mode=mode, name=name,
                                         error="failed: " + reply["error"]))
                times = {name: [] for name, *_ in ready}
                for r in range(repeats):
                    order = ready[r % len(ready):] + ready[:r % len(ready)] if ready else []
                    for name, kind, case_id, _ in order:
                        times[name].append(workers[kind].ask(cmd="measure", id=case_id)["seconds"])
                    peaks.append(matmul_gflops())
                    print(f"  round {r + 1}/{repeats}: " + ", ".join(
                        f"{n} {batch / t[-1]:.1f}" for n, t in times.items()), flush=True)
                for name, kind, case_id, reply in ready:
                    rows.append(dict(variant=variant, batch=batch, mode=mode, name=name,
                                     seconds=times[name], flops=flops,
                                     first_step_s=reply["first_step_s"]))
                for w in workers.values():
                    w.ask(cmd="drop")
    for w in workers.values():
        w.close()
    log.close()
    return dict(rows=rows, peaks=peaks, versions=versions, load_start=load_start,
                load_end=os.getloadavg(), wall_s=time.perf_counter() - wall_start,
                host_malloc=args.host_malloc)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


MODE_TITLES = {
    "infer": "Inference: images/s vs timm and keras-hub",
    "train": "Training: images/s vs timm eager, and MFU",
}
MODE_STEPS = {
    "infer": "Inference = one forward pass (Keras: predict_on_batch; timm: "
             "torch.inference_mode). MFU = forward FLOPs/image (ViTConfig.flops_per_image) "
             "x images/s / matmul peak.",
    "train": "Training = forward + backward + AdamW (Keras: compile + train_on_batch, default "
             "jit_compile; timm: loss.backward + torch.optim.AdamW). MFU = 3 x forward "
             "FLOPs/image (ViTConfig.flops_per_image) x images/s / matmul peak.",
}


def section_name(mode):
    """The RESULTS.md marker name of one mode's report, e.g. "throughput_train"."""
    return f"throughput_{mode}"


def report(res, args, mode):
    """One mode's Markdown block: set-up, versions, load, matmul peak and the table.

    Args:
        res: `run`'s result (or the same read back from --raw).
        args: the parsed arguments (for the warm-up count).
        mode: "infer" or "train"; only that mode's rows are reported.

    Example:
    ```python
    text = report(res, args, "train")  # "### Training: ..." and its table
    ```
    """
    rows = [row for row in res["rows"] if row["mode"] == mode]
    peak = statistics.median(res["peaks"]) if res["peaks"] else float("nan")
    reference = {}
    for row in rows:
        if "seconds" in row and row["name"] == "timm-eager":
            reference[row["variant"], row["batch"]] = row
    lines = ["| model | batch | mode | contender | images/s (median) | min-max | vs timm eager "
             "(same rounds) | MFU | first step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    k = 3 if mode == "train" else 1
    for row in rows:
        head = f"| {row['variant']} | {row['batch']} | {row['mode']} | {row['name']} |"
        if "error" in row:
            lines.append(f"{head} {row['error'][:150]} | | | | |")
            continue
        per_round = [row["batch"] / s for s in row["seconds"]]
        ips = statistics.median(per_round)
        ref = reference.get((row["variant"], row["batch"]))
        ratio = ""
        if ref is not None:
            # ratio per round, then the median: both ran under the same load
            ratio = f"{statistics.median(r / s for r, s in zip(ref['seconds'], row['seconds'])):.2f}x"
        mfu = k * row["flops"] * ips / (peak * 1e9)
        lines.append(f"{head} {ips:.2f} | {min(per_round):.2f}-{max(per_round):.2f} | {ratio} "
                     f"| {100 * mfu:.1f}% | {row['first_step_s']:.1f} |")
    table = "\n".join(lines)
    v = {}
    for kind_versions in res["versions"].values():
        v.update(kind_versions)
    versions = ", ".join(f"{name} {val}" for name, val in sorted(v.items())
                         if not str(val).startswith("not available"))
    fmt = lambda t: " ".join(f"{x:.2f}" for x in t)  # noqa: E731
    header = [
        f"### {MODE_TITLES[mode]}",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {os.cpu_count()} cores, "
        f"{_cpu_model()}, {platform.machine()}, no GPU; shared with other jobs.",
        f"Versions: {versions}.",
        f"Load average (1/5/15 min): start {fmt(res['load_start'])}, end {fmt(res['load_end'])}. "
        f"Wall time {res['wall_s'] / 60:.1f} min (the whole run, all modes).",
        f"Matmul peak (float32 numpy 2048x2048, once per round): median {peak:.0f} GFLOP/s, "
        f"range {min(res['peaks']):.0f}-{max(res['peaks']):.0f}." if res["peaks"] else "",
        MALLOC_NOTE[res.get("host_malloc", "system")],
        "",
        "224 px, float32, 1000 classes, random data; kvs.ViT configured like each timm model "
        "(class token, learned posemb covering it, exact GELU; So400m/14: SigLIP's MAP tower "
        f"without a class token). {MODE_STEPS[mode]} Contenders timed in "
        "interleaved rounds, one step each per round; "
        f"{args.warmup} warm-up step(s) after the first (compiling) one. vs timm eager = median "
        "over rounds of (timm eager step time / contender step time).",
        "",
        table,
    ]
    return "\n".join(header)


def build_parser():
    """The command line (see the module docstring for what is timed)."""
    tmp = os.environ.get("TMPDIR", "/tmp")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is timed.")
    p.add_argument("--models", nargs="+", default=["S/16", "B/16"], choices=sorted(TIMM_NAMES),
                   help="ViT variants (default: S/16 B/16; So400m/14 is SigLIP's MAP tower).")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8],
                   help="batch sizes (default: 8; larger batches take proportionally longer).")
    p.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"],
                   choices=["jax", "tensorflow", "torch"],
                   help="Keras backends (default: jax tensorflow torch).")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"],
                   help="what to time: inference, training (forward + backward + AdamW, "
                        "reported with MFU), or both (default: infer train). Each mode "
                        "writes its own block of RESULTS.md.")
    p.add_argument("--keras-hub", action=argparse.BooleanOptionalAction, default=True,
                   help="time keras-hub's ViTBackbone too (default: %(default)s).")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed rounds per case (default: 5 for S/16, 3 for larger models).")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps after the first (compiling) one (default: 1).")
    p.add_argument("--timm-compile", choices=["none", "infer", "train", "all"], default="infer",
                   help="where to add the torch.compile contender (default: %(default)s; "
                        "its compile takes minutes, for training longer).")
    p.add_argument("--quick", action="store_true",
                   help="ViT-S/16, batch 8, 3 rounds, no torch.compile; does not write RESULTS.md.")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone.")
    p.add_argument("--log", default=os.path.join(tmp, "throughput_workers.log"),
                   help="where the workers' stderr goes (default: %(default)s).")
    p.add_argument("--raw", default=os.path.join(tmp, "throughput_raw.json"),
                   help="where the raw per-round timings are saved, JSON (default: %(default)s).")
    p.add_argument("--from-raw", action="store_true",
                   help="re-make the report from --raw without measuring (only --modes).")
    p.add_argument("--host-malloc", choices=("retain", "system"), default="retain",
                   help="'retain' (default): start every worker, timm's too, with glibc "
                        "malloc keeping freed memory (MALLOC_ARENA_MAX=1, MALLOC_MMAP_MAX_=0, "
                        "no trimming; variables already set are kept), so XLA's per-step "
                        "buffers are not page-faulted in again each step; 'system': glibc's "
                        "defaults.")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    """Measures (or reads --raw), prints each mode's report, writes RESULTS.md.

    Args:
        argv: the command line without the program name (default: sys.argv[1:]).
    """
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.models, args.batch_sizes, args.timm_compile = ["S/16"], [8], "none"
        args.repeats, args.no_write = args.repeats or 3, True
    if args.from_raw:
        with open(args.raw) as f:
            res = json.load(f)
    else:
        res = run(args)
        with open(args.raw, "w") as f:
            json.dump(res, f)
    measured = {row["mode"] for row in res["rows"]}
    for mode in [m for m in args.modes if m in measured]:
        text = report(res, args, mode)
        print("\n" + text)
        if not args.no_write:
            results.write_section(section_name(mode), text)
            print(f"\nwrote section {section_name(mode)!r} to {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
