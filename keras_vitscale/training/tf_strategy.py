"""TensorFlow only: `tf.distribute` strategies for `--mesh data:N` and `--tpu`.

`--mesh data:N` is `tf.distribute.MirroredStrategy` over the N local GPUs,
or over N logical CPU devices on a machine without GPUs. `--tpu NAME` is
`tf.distribute.TPUStrategy` on a Cloud TPU reached by name or grpc://
address ('local' for the chips of a TPU VM). Both are data-parallel: every
replica holds all the weights and takes an equal slice of the global batch.
Model-parallel and FSDP meshes need the JAX backend (`keras.distribution`).

`--tpu` with `--mesh`: the mesh may only be `data:N`, and N must equal the
TPU's replica count (the mesh then just states what the TPU gives).

`setup` returns `strategy.scope()`; the model, optimizer and metrics must be
made inside it, which `train` does. `model.fit` then splits each global
batch over the replicas and sums the gradients across them. The trainer
reaches this module through `devices.py`, which picks it on the TensorFlow
backend; `setup` refuses another backend, whose variables a strategy cannot
hold.

Reaching a TPU is bounded in time: a wrong name or address, or a host where
nothing (or something other than a gRPC server) answers, is a `ValueError`
after at most `CONNECT_TIMEOUT_S` seconds per connection step, where
TensorFlow alone would retry for minutes.
"""

import socket
import threading
from urllib.parse import urlparse

import keras
import tensorflow as tf

from keras_vitscale import mesh_spec

# Seconds allowed for each of: resolving the TPU's name (Cloud TPU API), a
# TCP connection to its worker, and a gRPC handshake with it. TensorFlow
# itself retries an unreachable gRPC worker for minutes.
CONNECT_TIMEOUT_S = 30.0

# Mesh axes other backends understand and TensorFlow (here) does not.
_JAX_ONLY_AXES = ("model", "fsdp")


def setup(spec, batch_size, tpu=None):
    """Creates the strategy for `--mesh` / `--tpu`; returns its scope.

    Args:
        spec: "data:N" or None. Model-parallel ("data:N,model:M") and FSDP
            meshes are refused: TensorFlow is data-parallel only here.
        batch_size: the global batch size; it must split evenly over the
            replicas.
        tpu: a TPU name, "grpc://host:port" address or "local" (a TPU VM's
            own chips), or None for `MirroredStrategy` over local devices.

    Returns:
        The strategy's scope (a context manager) to make the model,
        optimizer and metrics in.

    Raises:
        ValueError: another backend than TensorFlow, a model-parallel or
            malformed mesh, a data size that differs from the devices
            TensorFlow sees (or from the TPU's replicas), a batch the
            replicas cannot split, or an unreachable TPU. The message names
            the value and the fix.

    Example:
    ```python
    # Two logical CPU devices, made before TensorFlow initialises:
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    scope = setup("data:2", batch_size=16)
    with scope:
        model = build_and_compile()   # MirroredVariables
    ```
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"tf_strategy.setup makes tf.distribute strategies, which hold TensorFlow "
            f"variables only, but the Keras backend is {backend!r}; set "
            "KERAS_BACKEND=tensorflow, or call keras_vitscale.training.devices.setup, "
            "which picks the set-up of each backend.")
    data = data_size(spec) if spec else None
    if tpu:
        strategy = tpu_strategy(tpu)
        replicas = strategy.num_replicas_in_sync
        if data is not None and data != replicas:
            raise ValueError(
                f"--mesh {spec!r} asks for {data} data-parallel replicas but TPU "
                f"{tpu!r} has {replicas}; drop --mesh (the TPU's replicas are "
                f"used) or pass --mesh data:{replicas}.")
    else:
        strategy = mirrored_strategy(data, spec)
        replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        where = f"--mesh {spec!r}" if not tpu else f"TPU {tpu!r}"
        raise ValueError(
            f"--batch-size {batch_size} is not divisible by the data-parallel size "
            f"{replicas} of {where}; use a multiple of {replicas}, e.g. "
            f"{replicas * max(1, round(batch_size / replicas))}.")
    return strategy.scope()


def data_size(spec):
    """The N of "data:N"; refuses the axes TensorFlow cannot shard over.

    Args:
        spec: a `--mesh` string.

    Returns:
        The data-parallel size, an int >= 1.

    Raises:
        ValueError: a model or fsdp axis (of size > 1), or a malformed spec.

    Example:
    ```python
    data_size("data:8")          # 8
    data_size("data:4,model:2")  # ValueError: ... KERAS_BACKEND=jax ...
    ```
    """
    for part in str(spec).split(","):
        name, _, size = part.strip().partition(":")
        if name in _JAX_ONLY_AXES and size.strip() != "1":
            raise ValueError(
                f"--mesh {spec!r}: the {name!r} axis is not supported on the TensorFlow "
                "backend, which trains data-parallel only (MirroredStrategy / "
                "TPUStrategy). Set KERAS_BACKEND=jax for model-parallel or FSDP meshes, "
                "or use --mesh data:N here.")
    return mesh_spec.parse_mesh(spec)["data"]


def mirrored_strategy(data, spec=None):
    """`MirroredStrategy` over exactly `data` local GPUs (else CPU devices).

    Args:
        data: the number of replicas; it must equal the number of GPUs
            TensorFlow sees, or of its logical CPU devices when there is no
            GPU.
        spec: the `--mesh` string, for error messages.

    Returns:
        A `tf.distribute.MirroredStrategy`.

    Raises:
        ValueError: `data` differs from the device count (the message lists
            the devices).

    Example:
    ```python
    strategy = mirrored_strategy(2)     # 2 GPUs, or 2 logical CPUs
    ```
    """
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    kind = "GPU" if gpus else "CPU (no GPU found)"
    if data != len(devices):
        names = ", ".join(d.name for d in devices)
        if gpus:
            hint = ("or choose the GPUs with CUDA_VISIBLE_DEVICES before starting, e.g. "
                    f"CUDA_VISIBLE_DEVICES={','.join(str(i) for i in range(data))}")
        else:
            hint = ("or, for CPU-only tests, make N logical CPU devices before TensorFlow "
                    "initialises: tf.config.set_logical_device_configuration("
                    "tf.config.list_physical_devices('CPU')[0], "
                    "[tf.config.LogicalDeviceConfiguration()] * N)")
        raise ValueError(
            f"--mesh {spec or f'data:{data}'!r} asks for {data} replicas but TensorFlow "
            f"sees {len(devices)} {kind} device(s): {names}. Use --mesh "
            f"data:{len(devices)}, {hint}.")
    return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])


def _bounded(fn, seconds, what):
    """Runs `fn()` with a time limit; re-raises its error.

    A call still running at the limit is left behind in a daemon thread (a
    blocking lookup cannot be cancelled) and TimeoutError is raised.
    """
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, name=f"kvs-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _tpu_error(tpu, step, err):
    # TensorFlow's messages run to many lines (kernel lists); the first says it.
    lines = str(err).strip().splitlines()
    why = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    if tpu == "local":
        fix = ("'local' means this machine is a TPU VM with TPU chips attached and a "
               "TPU build of TensorFlow; on another machine pass the TPU's name or "
               "grpc://host:8470 address, or drop --tpu (and use --mesh data:N for "
               "GPUs/CPUs)")
    else:
        fix = ("check the TPU name (and that this VM is in the TPU's project and zone) "
               "or its grpc://host:port address (port 8470), that the TPU is READY and "
               "reachable from here, or pass --tpu local on a TPU VM; or drop --tpu")
    return ValueError(f"--tpu {tpu!r}: no TPU reachable ({step} failed: {why}). Fix: {fix}.")


def _probe_address(master, seconds):
    """Checks, within `seconds`, that a gRPC server answers at `master`.

    TensorFlow's own connection attempt cannot be bounded: it waits inside
    one C++ call (holding the GIL once the eager context is initialised)
    while gRPC retries a closed port or a silent peer for minutes.
    """
    import grpc  # a TensorFlow dependency

    parsed = urlparse(master if "://" in master else f"grpc://{master}")
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"cannot read host:port from {master!r}")
    # A plain TCP connection first: a refused or unroutable address is named
    # as such, instead of as a gRPC timeout.
    with socket.create_connection((parsed.hostname, parsed.port), timeout=seconds):
        pass
    channel = grpc.insecure_channel(f"{parsed.hostname}:{parsed.port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=seconds)
    except grpc.FutureTimeoutError:
        raise TimeoutError(f"something accepts TCP connections at {parsed.hostname}:"
                           f"{parsed.port} but no gRPC server answered within "
                           f"{seconds:g} s") from None
    finally:
        channel.close()


def tpu_strategy(tpu, timeout=None):
    """Connects to a TPU and returns a `tf.distribute.TPUStrategy` on it.

    Args:
        tpu: a TPU name (looked up with the Cloud TPU API), a
            "grpc://host:port" address, or "local" on a TPU VM.
        timeout: seconds allowed for each connection step (resolving, TCP
            connection, gRPC handshake); default `CONNECT_TIMEOUT_S`.

    Returns:
        A `tf.distribute.TPUStrategy` over all the TPU's cores.

    Raises:
        ValueError: no TPU could be reached; it says which step failed, the
            address tried and what to check.

    Example:
    ```python
    strategy = tpu_strategy("local")      # on a TPU VM
    strategy.num_replicas_in_sync         # e.g. 8
    ```
    """
    seconds = CONNECT_TIMEOUT_S if timeout is None else float(timeout)
    resolver_cls = tf.distribute.cluster_resolver.TPUClusterResolver
    step = "resolving the TPU (TPUClusterResolver)"
    try:
        # A name is looked up through the GCE metadata server and the Cloud
        # TPU API, which can stall on a machine outside Google Cloud.
        resolver = _bounded(lambda: resolver_cls(tpu=tpu), seconds, "TPU resolver")
        if tpu != "local":
            master = _bounded(resolver.master, seconds, "TPU address lookup")
            step = f"reaching the TPU worker at {master}"
            _probe_address(master, seconds)
        step = "connecting to the TPU" + (" worker" if tpu != "local" else "")
        tf.config.experimental_connect_to_cluster(resolver)
        step = "initialising the TPU system (no TPU cores found?)"
        tf.tpu.experimental.initialize_tpu_system(resolver)
        step = "creating TPUStrategy"
        strategy = tf.distribute.TPUStrategy(resolver)
    except (tf.errors.OpError, OSError, ValueError, RuntimeError, TimeoutError,
            ImportError) as err:
        raise _tpu_error(tpu, step, err) from None
    return strategy
