"""Shared test set-up: one Keras backend per pytest process (KERAS_BACKEND)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
# TensorFlow is imported by the data pipelines on every backend; keep it quiet
# and off the GPU-less machine's logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No test may reach the internet: huggingface_hub (imported by Keras) would
# otherwise send telemetry on its first request.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# timm pulls torch._dynamo and triton; imported after TensorFlow that chain
# segfaults, so the outside references load first.
try:
    import timm  # noqa: F401, E402
except ImportError:
    pass

import keras  # noqa: E402


def pytest_report_header(config):
    return f"keras backend: {keras.backend.backend()} (keras {keras.version()})"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(autouse=True)
def _converted_weights_cache(tmp_path_factory, monkeypatch):
    """Converted checkpoints go to a temporary KVS_CACHE, never the user's."""
    monkeypatch.setenv("KVS_CACHE", str(tmp_path_factory.mktemp("kvs_cache")))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_images(config, batch=2, seed=0):
    """Images in [-1, 1] for a ViTConfig."""
    rng = np.random.default_rng(seed)
    shape = (batch, *config.image_size, config.in_channels)
    return rng.uniform(-1, 1, shape).astype("float32")


def compiled_gradient_hlo(model, batch=4):
    """XLA's compiled HLO text for the gradient of sum(logits^2) (JAX only)."""
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]
    images = jnp.asarray(random_images(model.config, batch=batch))

    def loss(trainable):
        logits, _ = model.stateless_call(trainable, frozen, images, training=True)
        return jnp.sum(logits**2)

    return jax.jit(jax.grad(loss)).lower(trainable).compile().as_text()


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_script():
    """Runs `python tools/<tool>.py ARGS` from the repository root, as a user
    does, importing this checkout's keras_vitscale (not an installed one);
    returns the CompletedProcess."""

    def run(tool, *args, timeout=120):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / f"{tool}.py"), *args],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return run
