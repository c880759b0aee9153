"""Converting real checkpoints: time and peak memory, and the cached second load.

Figures, not assertions; written between the `conversion` markers of
benchmarks/RESULTS.md.

1. Conversion (`--models so400m g14`): a checkpoint in timm's layout with
   random weights (float32 model.safetensors, the tensors of timm's
   full-size model built on the meta device) is converted as
   `kvs.ViT.from_preset` converts a download: `files.open_checkpoint`
   (numpy, tensor by tensor), the model built from the preset's config,
   the weights streamed in, the preset directory written. Each conversion
   runs in a fresh process; reported: wall time, peak RSS (ru_maxrss), the
   RSS after the imports, and peak / float32 model size (target <= 1.3).
2. Second load (`--second-load`): vit_b16's default tag converted once into
   a temporary KVS_CACHE (random weights, the Hugging Face cache laid out as
   after a download, offline), then timed in fresh processes, interleaved:
   `from_preset("vit_b16")` (reads the cache: no conversion) against
   `from_preset("vit_b16", load_weights=False)` (fresh weights). Target:
   at most 2x.

Usage:
    python benchmarks/conversion.py                      # both parts, writes RESULTS.md
    python benchmarks/conversion.py --models so400m --repeats 1 --no-write
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

# name -> (built-in preset, timm model name, classes)
MODELS = {"so400m": ("vit_so400m14_siglip", "vit_so400m_patch14_siglip_224", 0),
          "g14": ("vit_g14_clip", "vit_giant_patch14_clip_224", 1024)}
B16_REPO = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"


def write_random_safetensors(timm_name, num_classes, path, seed=0):
    """timm's full-size tensors (names, shapes) with random float32 values, streamed
    to a .safetensors file one tensor at a time (nothing model-sized in memory)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            f.write(rng.normal(0, 0.02, shape).astype("<f4").tobytes())
    return offset


# Peak RSS from /proc (VmHWM): unlike ru_maxrss it starts afresh at exec, so
# the parent's own memory does not leak into the child's figure.
CONVERT_CHILD = r"""
import json, os, sys, tempfile, time
import keras_vitscale as kvs
from keras_vitscale.convert.files import open_checkpoint
from keras_vitscale.pretrained import timm_hub
from keras_vitscale.presets import builtin_config, weights_entry
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
preset, path, out = sys.argv[1:4]
entry = weights_entry(preset)
config = builtin_config(preset, tag=entry["tag"])
after_imports = rss()
start = time.perf_counter()
directory = timm_hub.convert_checkpoint(kvs.ViT, config, open_checkpoint(path), out,
                                        metadata={"benchmark": True}, verbose=False)
seconds = time.perf_counter() - start
print("RESULT " + json.dumps(dict(seconds=seconds, peak=rss(), after_imports=after_imports,
                                  params=config.count_params())))
"""

LOAD_CHILD = r"""
import json, sys, time
import keras_vitscale as kvs
load = sys.argv[1] == "cached"
start = time.perf_counter()
model = kvs.ViT.from_preset("vit_b16", load_weights=load)
print("RESULT " + json.dumps(dict(seconds=time.perf_counter() - start)))
"""


def run_child(code, args, env=None):
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")


# glibc malloc as it starts, and with a fixed mmap threshold: glibc raises its
# threshold each time a large block is freed, after which the freed random
# initial values and the converted tensors pile up in the heap instead of
# going back to the system (README "Performance").
MALLOC_SETTINGS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=1048576":
                   {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def conversion(models, repeats, workdir):
    rows = []
    for key in models:
        preset, timm_name, classes = MODELS[key]
        source = Path(workdir) / f"{key}.safetensors"
        print(f"writing {source} ...", flush=True)
        file_bytes = write_random_safetensors(timm_name, classes, source)
        for r in range(repeats):
            for malloc, env in MALLOC_SETTINGS.items():
                out = Path(workdir) / f"{key}_preset_{r}"
                res = run_child(CONVERT_CHILD, [preset, str(source), str(out)], env)
                res.update(model=key, preset=preset, file_bytes=file_bytes, malloc=malloc)
                rows.append(res)
                print(f"{key} ({malloc}): {res['seconds']:.1f} s, peak {res['peak'] / 1e9:.2f} "
                      f"GB ({res['peak'] / (4 * res['params']):.2f}x the float32 model)",
                      flush=True)
                subprocess.run(["rm", "-rf", str(out)])
        source.unlink()
    return rows


def second_load(repeats, workdir):
    """Converts vit_b16 once into a fresh cache, then times both loads."""
    env = dict(KVS_CACHE=str(Path(workdir) / "kvs_cache"), HF_HOME=str(Path(workdir) / "hf"),
               HF_HUB_OFFLINE="1")
    commit = "0" * 40
    snapshot = Path(env["HF_HOME"]) / "hub" / f"models--{B16_REPO.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    (snapshot / "snapshots" / commit / "config.json").write_text(json.dumps(
        {"architecture": "vit_base_patch16_224", "num_classes": 1000}))
    source = Path(workdir) / "b16.safetensors"
    write_random_safetensors("vit_base_patch16_224", 1000, source)
    entry = Path(env["KVS_CACHE"]) / B16_REPO.replace("/", "--") / commit
    run_child(CONVERT_CHILD, ["vit_b16", str(source), str(entry)])
    times = {"cached": [], "fresh": []}
    for r in range(repeats):
        for kind in (("cached", "fresh") if r % 2 == 0 else ("fresh", "cached")):
            times[kind].append(run_child(LOAD_CHILD, [kind], env)["seconds"])
        print(f"round {r + 1}: cached {times['cached'][-1]:.2f} s, fresh "
              f"{times['fresh'][-1]:.2f} s", flush=True)
    return times


def report(rows, times, backend, load):
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores; Keras backend "
             f"{backend}; load average {load[0]:.1f} -> {load[1]:.1f}. Random float32 "
             "weights in timm's layout; each figure from a fresh process.", ""]
    if rows:
        lines += ["| checkpoint | malloc | float32 model | time | peak RSS | after imports | "
                  "peak / model | (peak - imports) / model |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            model_bytes = 4 * r["params"]
            lines.append(f"| {r['preset']} | {r['malloc']} | {model_bytes / 1e9:.2f} GB "
                         f"| {r['seconds']:.1f} s | {r['peak'] / 1e9:.2f} GB | "
                         f"{r['after_imports'] / 1e9:.2f} GB | {r['peak'] / model_bytes:.2f}x | "
                         f"{(r['peak'] - r['after_imports']) / model_bytes:.2f}x |")
        lines.append("")
    if times:
        cached, fresh = statistics.median(times["cached"]), statistics.median(times["fresh"])
        lines += [f"Second load of vit_b16 (cached preset, offline) {cached:.2f} s against "
                  f"building it with fresh weights {fresh:.2f} s: {cached / fresh:.2f}x "
                  f"(medians of {len(times['cached'])} interleaved rounds; target <= 2x)."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", nargs="*", default=["so400m", "g14"], choices=sorted(MODELS),
                   help="checkpoints to convert (default: so400m g14; none: skip).")
    p.add_argument("--second-load", action=argparse.BooleanOptionalAction, default=True,
                   help="time vit_b16's cached load against a fresh build (default: on).")
    p.add_argument("--repeats", type=int, default=3, help="rounds per measurement (default: 3).")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                   help="write the conversion section of RESULTS.md (default: on).")
    args = p.parse_args(argv)
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        rows = conversion(args.models, max(1, args.repeats // 3), workdir) if args.models else []
        times = second_load(args.repeats, workdir) if args.second_load else None
    text = report(rows, times, backend, (load_start[0], os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section("conversion", text, title="Converting checkpoints")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.0f} s")
    sys.exit(code)
