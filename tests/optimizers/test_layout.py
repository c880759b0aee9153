"""Optimizer state follows the parameters' sharding under ModelParallel.

Needs 8 (virtual CPU) JAX devices, which XLA only creates when the flag is
set before JAX starts: the check runs in a fresh subprocess.
"""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np
    from keras.distribution import DeviceMesh, LayoutMap, ModelParallel
    from keras_vitscale.optimizers import BF16Adam, ScalingAdafactor

    mesh = DeviceMesh((2, 4), ("batch", "model"), keras.distribution.list_devices())
    layout_map = LayoutMap(mesh)
    layout_map[".*dense_in/kernel"] = ("batch", "model")    # (64, 128)
    layout_map[".*dense_in/bias"] = ("model",)
    layout_map[".*dense_out/kernel"] = ("model", None)      # (128, 8)
    keras.distribution.set_distribution(ModelParallel(layout_map=layout_map))

    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, name="dense_in"),
        keras.layers.Dense(8, name="dense_out"),
    ])
    for optimizer in [ScalingAdafactor(0.01), BF16Adam(0.01)]:
        if isinstance(optimizer, ScalingAdafactor):
            # A real sharded training step; BF16Adam's slots are only built.
            model.compile(optimizer=optimizer, loss="mse")
            model.fit(np.ones((16, 64), "float32"), np.zeros((16, 8), "float32"),
                      batch_size=8, epochs=1, verbose=0)
        else:
            optimizer.build(model.trainable_variables)
        for v in optimizer.variables:
            name = v.path.split("/")[-1].replace("sequential_", "")
            spec = tuple(v.value.sharding.spec) if v.shape else ()
            spec = spec + (None,) * (len(v.shape) - len(spec))
            print(name, tuple(v.shape), spec)
    """
)


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution layouts of variables are JAX-only",
)
def test_slots_are_sharded_like_parameters():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    specs = {}
    for line in result.stdout.splitlines():
        name, rest = line.split(" ", 1)
        specs[name] = eval(rest.replace(") (", "), ("), {})  # "(shape), (spec)"
    # Factored kernel (64, 128): v_row drops the largest axis (1, "model"),
    # v_col drops axis 0 ("batch"); the bf16 momentum keeps both.
    assert specs["dense_in_kernel_v_row"] == ((64,), ("batch",))
    assert specs["dense_in_kernel_v_col"] == ((128,), ("model",))
    assert specs["dense_in_kernel_momentum"][1] == ("batch", "model")
    assert specs["dense_in_bias_v"] == ((128,), ("model",))
    # (128, 8) is not factored (8 < 32): full second moment, same layout.
    assert specs["dense_out_kernel_v"] == ((128, 8), ("model", None))
    # BF16Adam's slots (built last, same names) follow the parameters too.
    assert specs["dense_in_kernel_velocity"][1] == ("batch", "model")
