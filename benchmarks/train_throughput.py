"""Training images/s of kvs.ViT on each Keras backend, as ratios to timm (issue #4).

A thin front over benchmarks/throughput.py (same workers, same interleaved
rounds, same report), with this issue's defaults: training steps only
(forward + backward + AdamW), ViT-S/16 and ViT-B/16 at batch 8, kvs.ViT on
the JAX, TensorFlow and PyTorch backends and timm in PyTorch eager mode, all
in the same run. Reported per contender: median images/s, the ratio to timm
eager from the same rounds, and the model FLOPs utilisation against a float32
numpy matmul peak measured in every round (MFU = 3 x forward FLOPs/image x
images/s / peak). Add keras-hub or torch.compile with --keras-hub /
--timm-compile train; every option of throughput.py applies.

It writes the `train_throughput` section of benchmarks/RESULTS.md. Run it on
a quiet machine: on a shared one the ratios hold (all contenders share the
rounds' load) but the absolute figures and MFU do not.

Usage:
    python benchmarks/train_throughput.py            # S/16 + B/16, batch 8
    python benchmarks/train_throughput.py --quick    # ViT-S/16, 3 rounds, no write
    python benchmarks/train_throughput.py --backends jax --repeats 7 --no-write
"""

import sys

import throughput  # noqa: E402  (benchmarks/throughput.py: the measuring machinery)

TITLE = "Training throughput: images/s vs timm eager, and MFU (benchmarks/train_throughput.py)"


def main(argv=None):
    parser = throughput.build_parser(__doc__.split("\n\n")[0], modes=("train",),
                                     timm_compile="none", keras_hub=False,
                                     raw="train_throughput_raw.json")
    return throughput.execute(parser.parse_args(argv), "train_throughput", TITLE)


if __name__ == "__main__":
    sys.exit(main())
