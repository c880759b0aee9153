"""Abstract training state: layouts without values, on placeholder devices."""

import keras
import pytest

from keras_vitscale import ViTConfig
from keras_vitscale.planning import abstract_state

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="abstract state is built under a JAX distribution")

CONFIG = ViTConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, image_size=16,
                   num_classes=4)


def test_variables_have_layouts_and_no_value():
    from keras_vitscale.training.jax_mesh import make_distribution

    devices = [f"placeholder:{i}" for i in range(4)]   # no such devices are needed
    dist = make_distribution("fsdp:4", devices, CONFIG, min_size=0)
    model, opt = abstract_state.abstract_train_state(CONFIG, dist, "adam")
    kernel = next(v for v in model.trainable_variables if v.path.endswith("dense_1/kernel"))
    assert "fsdp" in dist.get_variable_layout(kernel).axes
    # Optimizer slots follow their parameter's layout.
    slots = [v for v in opt.variables if v.shape == kernel.shape
             and v.path.startswith(f"{opt.name}/" + kernel.path.replace("/", "_"))]
    assert slots and all(dist.get_variable_layout(s).axes == dist.get_variable_layout(kernel).axes
                         for s in slots)
    with pytest.raises(RuntimeError, match="read outside a JAX trace"):
        kernel.numpy()


def test_layout_memory_shards_state_over_fsdp():
    data = abstract_state.layout_memory(CONFIG, "data:4", "adam", "float32", 1, min_size=0)
    fsdp = abstract_state.layout_memory(CONFIG, "fsdp:4", "adam", "float32", 1, min_size=0)
    assert data["batch"] == fsdp["batch"]
    assert fsdp["params"] < data["params"] / 3
    assert data["optimizer_state"] > 2 * data["params"]   # two float32 slots and a counter
    assert fsdp["arguments"] == fsdp["params"] + fsdp["optimizer_state"] + fsdp["batch"]


def test_later_stateless_scopes_leave_the_state_abstract():
    # keras.StatelessScope(initialize_variables=False) would register each
    # variable for initialization at the next top-level StatelessScope exit
    # (every stateless_call does one): with placeholder devices that raises,
    # with real ones it allocates every weight full size.
    from keras_vitscale.training.jax_mesh import make_distribution

    dist = make_distribution("fsdp:4", [f"placeholder:{i}" for i in range(4)], CONFIG,
                             min_size=0)
    model, opt = abstract_state.abstract_train_state(CONFIG, dist, "adam")
    with keras.StatelessScope():
        pass
    kernel = model.trainable_variables[0]
    with pytest.raises(RuntimeError, match="read outside a JAX trace"):
        kernel.numpy()
