"""Keep freed host memory in the process: glibc malloc settings for CPU training.

Why: XLA on CPU gives every run of a compiled program one temporary buffer
for its intermediates (886 MiB for ViT-S/16's batch-8 training step on JAX,
3.7 GiB at batch 32). glibc serves a block that large with its own mmap and
unmaps it when it is freed, so each step faults the whole buffer back in,
page by page, zero-filled by the kernel. Measured here (2 cores): 260,000
minor faults and 0.7 s of kernel time per 2.0-2.3 s ViT-S/16 gradient step;
with the settings below, 1,500 faults and 0.02 s, and the step 10-25%
faster. In two back-to-back benchmarks/throughput.py runs, each with every
worker (timm's too) under one setting, JAX training went from 0.76x to
0.98x timm eager and TensorFlow's from 0.70x to 0.83x; the full table under
this setting has JAX at 0.90x (ViT-S/16) and 0.97x (B/16) (RESULTS.md).

The settings, glibc's documented environment variables:
- MALLOC_ARENA_MAX=1: every thread allocates from the main heap. A thread's
  own arena cannot hold a block over 64 MiB and would mmap it anyway.
- MALLOC_MMAP_MAX_=0: never serve a block with its own mmap.
- MALLOC_TRIM_THRESHOLD_ (2^60 bytes): never hand the heap's free top back
  to the kernel, so the next step reuses the same pages.

The cost: the process keeps its peak memory until it exits, and threads
share one heap lock. The heap also grows for a while before it settles: the
buffer is an aligned allocation, glibc frees the spare bytes after the
block, and when a small allocation that lives on takes them, the freed block
is a few bytes too small for the next aligned request, so the heap grows by
a fresh buffer, faulted in once (reproduced with posix_memalign alone).
Measured: the ViT-S/16 step faulted its buffer in on 3 of 40 steps (glibc
defaults: all 40), at a peak resident size of 3.4 GiB against 1.7 GiB; with
a 192 MiB buffer the heap stopped growing within 50 steps in both 300-step
runs. Fine for a training process on a CPU; on GPU and TPU hosts the big
buffers live on the device while many input-pipeline threads allocate on
the host, so `auto` leaves those alone.

glibc reads these variables only when a process starts, so they take effect
by starting the process again (`relaunch_with_retaining_malloc`) or by
setting them for a child process (`retaining_malloc_env`).
"""

import glob
import os
import platform
import sys

RETAINING_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**60),
}
MODES = ("auto", "retain", "system")
# Device nodes of the accelerators whose hosts `auto` leaves alone: NVIDIA
# GPUs and TPU VMs (/dev/accel*, or /dev/vfio on newer TPU generations).
ACCELERATOR_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def has_glibc():
    """True on Linux with glibc, the only C library these settings apply to."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def accelerator_visible():
    """True when an NVIDIA GPU or TPU device node exists on this host."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_GLOBS)


def wants_retaining_malloc(mode, tpu=None):
    """Whether `mode` asks for the retaining settings on this host.

    Args:
        mode: "retain" (always; an error without glibc), "system" (never) or
            "auto" (only where glibc runs and training will be on the CPU: no
            `tpu` named and no accelerator device node).
        tpu: the training tool's --tpu value, if any.

    Returns:
        bool.

    Raises:
        ValueError: for an unknown mode, or "retain" without glibc.
    """
    if mode not in MODES:
        raise ValueError(f"host malloc mode {mode!r} is not one of {', '.join(MODES)}.")
    if mode == "system":
        return False
    if mode == "retain":
        if not has_glibc():
            raise ValueError(
                f"--host-malloc retain needs Linux with glibc; this is {sys.platform} "
                f"({platform.libc_ver()[0] or 'no glibc'}). Use --host-malloc system.")
        return True
    return has_glibc() and not tpu and not accelerator_visible()


def retaining_malloc_env(environ=None):
    """A copy of `environ` (default os.environ) with the retaining settings.

    A variable the caller already set is kept as it is: whoever set it
    manages malloc.
    """
    env = dict(os.environ if environ is None else environ)
    for name, value in RETAINING_MALLOC_ENV.items():
        env.setdefault(name, value)
    return env


def relaunch_with_retaining_malloc():
    """Starts this Python process again with the retaining settings, unless set.

    Replaces the process (`os.execve`: same process id, same command line,
    interpreter options included, from `sys.orig_argv`) when none of the
    variables is set; returns when they are set already, by an earlier
    relaunch or by the user (who then manages malloc). Call it first thing
    under `if __name__ == "__main__":`, before any work; `relaunch_if_wanted`
    does that for a tool's --host-malloc flag.
    """
    if any(name in os.environ for name in RETAINING_MALLOC_ENV):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], retaining_malloc_env())


def add_host_malloc_flag(parser):
    """Adds the tools' `--host-malloc auto|retain|system` flag to `parser`."""
    parser.add_argument(
        "--host-malloc", choices=MODES, default="auto",
        help="'retain': restart with glibc malloc keeping freed memory (MALLOC_ARENA_MAX=1, "
        "MALLOC_MMAP_MAX_=0, no trimming), so XLA's per-step temporary buffer is not "
        "page-faulted in again every step (10-25%% faster CPU training steps, for up to "
        "twice the resident memory); 'auto' (default): retain when training on the CPU of "
        "a Linux/glibc host (no --tpu, no GPU/TPU device); 'system': leave malloc alone")


def relaunch_if_wanted(mode, tpu=None):
    """A tool's first step: relaunch when `mode` (its --host-malloc) asks.

    An unknown mode, or "retain" without glibc, prints the error and exits
    with status 2 before any work. The training tools call it through
    tools/early_relaunch.py, before they import Keras.

    Example:
    ```python
    if __name__ == "__main__":
        args = parser.parse_args()
        host_memory.relaunch_if_wanted(args.host_malloc, args.tpu)
        sys.exit(main())
    ```
    """
    try:
        wanted = wants_retaining_malloc(mode, tpu)
    except ValueError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(2)
    if wanted:
        relaunch_with_retaining_malloc()
