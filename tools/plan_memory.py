"""Which ViT variants fit on a device, with which optimizer and batch size.

Prints one row per variant and one column per optimizer; each cell is the
largest power-of-two batch per device whose training step fits in the given
device memory ("-": not even batch 1), in the spirit of the Scaling ViT
paper's study of model shape versus optimizer memory.

Example:
    python tools/plan_memory.py --device-memory 16GiB
    python tools/plan_memory.py --device-memory 80GiB --compute-dtype bfloat16 \\
        --remat --mesh data:8,fsdp:4
"""

import argparse
import sys

DEFAULT_VARIANTS = "Ti/16,S/16,B/16,L/16,H/14,g/14,G/14,e/14,22B/14"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Table of the largest power-of-two per-device batch size at which "
            "each ViT variant trains within --device-memory, per optimizer "
            "(adam: 2 float32 slots; bf16_adam: bfloat16 + float32; "
            "scaling_adafactor: bfloat16 momentum + factored second moment; "
            "sgd: none). Estimates count parameters, gradients, optimizer "
            "state and saved activations (see keras_vitscale/memory.py); "
            "leave headroom for framework workspace."
        ),
        epilog="Example: python tools/plan_memory.py --device-memory 16GiB --remat",
    )
    parser.add_argument("--device-memory", default="16GiB", help="memory per device, e.g. 16GiB, 80GB (default: 16GiB).")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated variants (default: {DEFAULT_VARIANTS}).")
    parser.add_argument("--optimizers", default="adam,bf16_adam,scaling_adafactor,sgd", help="comma-separated optimizers (default: all four).")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224).")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000).")
    parser.add_argument("--param-dtype", default="float32", help="float32 or bfloat16 (default: float32).")
    parser.add_argument("--compute-dtype", default="float32", help="activation dtype, float32 or bfloat16 (default: float32).")
    parser.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass.")
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. data:8,fsdp:4,model:2 (default: one device).")
    parser.add_argument("--max-batch", type=int, default=4096, help="largest per-device batch tried (default: 4096).")
    return parser.parse_args(argv)


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


def main(argv=None):
    args = parse_args(argv)
    # Imported after parsing so that --help answers without loading Keras.
    from keras_vitscale import memory

    budget = memory.parse_bytes(args.device_memory)
    mesh = memory.parse_mesh(args.mesh)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    kw = dict(image_size=args.image_size, num_classes=args.num_classes,
              param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
              remat=args.remat, mesh=mesh)
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
    main(sys.argv[1:])
