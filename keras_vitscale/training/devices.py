"""The devices a run trains on, picked by Keras backend.

One entry point for the trainer, whatever the backend:
- JAX: `jax_mesh.py` (`keras.distribution` meshes: data, FSDP, tensor
  parallel, multi-host).
- TensorFlow: `tf_strategy.py` (`MirroredStrategy` for `--mesh data:N`,
  `TPUStrategy` for `--tpu`); data-parallel only.
- torch: one device; `--mesh` and `--tpu` are refused with the fix.

Those two modules do not import each other. `jax_mesh` imports no JAX at
load time; `tf_strategy` imports TensorFlow, so it is loaded only on the
TensorFlow backend.
"""

import contextlib

import keras

from keras_vitscale import mesh_spec
from keras_vitscale.training import jax_mesh


def process_info():
    """(process index, process count): JAX's in a multi-host run, else (0, 1).

    Example:
    ```python
    index, count = process_info()
    chief = index == 0
    ```
    """
    if keras.backend.backend() == "jax":
        return jax_mesh.process_info()
    return 0, 1


def setup(spec, batch_size, tpu=None):
    """Sets up the devices of `--mesh` / `--tpu`; returns the scope to build in.

    Args:
        spec: a mesh spec ("data:N", "fsdp:N", "data:N,model:M",
            "fsdp:N,model:M"), or None for one device.
        batch_size: the global batch size; the data-parallel size must
            divide it.
        tpu: TensorFlow only: a TPU name, "grpc://host:port" address or
            "local", for `TPUStrategy`.

    Returns:
        A context manager: the model, optimizer and metrics are made inside
        it (a strategy's scope on TensorFlow; on JAX the distribution is
        global and the scope does nothing).

    Raises:
        ValueError: a mesh or TPU the backend cannot use (model or FSDP axes
            off JAX, `--tpu` off TensorFlow, any mesh on torch), a mesh whose
            size differs from the devices, or a batch the data axis cannot
            split. The message names the value and the fix.

    Example:
    ```python
    with setup("data:8", batch_size=256):
        model = kvs.ViT(variant="S/16", num_classes=1000)
    ```
    """
    if not spec and not tpu:
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_vitscale.training import tf_strategy

        return tf_strategy.setup(spec, batch_size, tpu)
    if tpu:
        raise ValueError(f"--tpu {tpu!r} needs the TensorFlow backend (KERAS_BACKEND="
                         "tensorflow, TPUStrategy); on JAX a TPU VM's chips are JAX "
                         "devices: drop --tpu and use --mesh.")
    if backend == "jax":
        return jax_mesh.setup(spec, batch_size)
    mesh_spec.parse_mesh(spec)  # a malformed spec is named as such first
    raise ValueError(
        f"--mesh {spec!r} needs the JAX backend (KERAS_BACKEND=jax); the "
        f"{backend} backend trains on a single device in this tool. "
        "Drop --mesh or set KERAS_BACKEND=jax.")


def check_model_parallel(model, spec):
    """Fails if a model-parallel mesh would shard a dimension unevenly.

    Only JAX has model-parallel meshes; on the other backends `setup` has
    already refused a "model" axis, so this does nothing there.

    Args:
        model: the built model.
        spec: its mesh spec, or None.

    Raises:
        ValueError: a tensor-parallel dimension the "model" size does not
            divide (the message names the variable and the fix).

    Example:
    ```python
    check_model_parallel(model, "data:2,model:4")
    ```
    """
    if spec and keras.backend.backend() == "jax":
        jax_mesh.check_model_parallel(model, spec)


def wait_for_all_processes(name):
    """Returns once every process of a multi-process run has got here.

    A multi-process run is JAX's (`jax_mesh.wait_for_all_processes`, which
    says why the trainer waits); with one process, as on TensorFlow and
    torch, this returns at once.

    Args:
        name: the barrier's name, the same in every process.

    Example:
    ```python
    devices.wait_for_all_processes("end of training")
    ```
    """
    if keras.backend.backend() == "jax":
        jax_mesh.wait_for_all_processes(name)
