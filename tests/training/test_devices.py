"""`training.devices` picks the set-up of the backend; the backend-specific
modules refuse the wrong backend. Fast: nothing here trains."""

from types import SimpleNamespace

import keras
import pytest

from keras_vitscale.training import devices
from keras_vitscale.training import jax_mesh

BACKEND = keras.backend.backend()


def test_one_device_needs_no_set_up():
    with devices.setup(None, batch_size=16):
        pass
    assert devices.process_info() == (0, 1)
    devices.wait_for_all_processes("test_devices")  # one process: returns at once
    devices.check_model_parallel(None, None)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="--tpu is TensorFlow's (TPUStrategy)")
def test_tpu_off_tensorflow_names_the_backend():
    with pytest.raises(ValueError, match="--tpu 'local' needs the TensorFlow backend"):
        devices.setup(None, 16, tpu="local")


@pytest.mark.skipif(BACKEND != "torch", reason="torch trains on one device")
@pytest.mark.parametrize("spec, match", [("data:2", "needs the JAX backend"),
                                         ("data:1", "Drop --mesh or set KERAS_BACKEND=jax"),
                                         ("pipeline:2", "Bad --mesh")])
def test_torch_refuses_any_mesh(spec, match):
    with pytest.raises(ValueError, match=match):
        devices.setup(spec, 16)


def test_check_model_parallel_names_the_uneven_dimension():
    model = SimpleNamespace(trainable_variables=[
        SimpleNamespace(path="encoder_block_0/mlp/dense_1/kernel", shape=(34, 130))])
    if BACKEND == "jax":
        with pytest.raises(ValueError, match="dimension of 130, not divisible by model:4"):
            devices.check_model_parallel(model, "data:1,model:4")
    else:  # no model axis off JAX: setup has refused it already
        devices.check_model_parallel(model, "data:1,model:4")
    devices.check_model_parallel(model, "data:4")  # no model axis: nothing to check


@pytest.mark.skipif(BACKEND == "jax", reason="checks the refusal on other backends")
def test_jax_mesh_refuses_other_backends():
    for call in (lambda: jax_mesh.setup("data:1", 16), jax_mesh.process_info,
                 lambda: jax_mesh.wait_for_all_processes("x"),
                 lambda: jax_mesh.make_distribution("data:1")):
        with pytest.raises(ValueError, match="needs the JAX backend"):
            call()
    # Plain Python, usable by the planner on any backend:
    assert jax_mesh.parse_mesh("fsdp:4,model:2")["model"] == 2


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the refusal on other backends")
def test_tf_strategy_refuses_other_backends():
    pytest.importorskip("tensorflow")
    from keras_vitscale.training import tf_strategy

    with pytest.raises(ValueError, match="set KERAS_BACKEND=tensorflow"):
        tf_strategy.setup("data:1", 16)
