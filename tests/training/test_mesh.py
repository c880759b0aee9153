"""JAX DataParallel over 8 virtual CPU devices matches one device."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="--mesh needs the JAX backend (keras.distribution)")

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from keras_vitscale.training import train
    assert len(jax.devices()) == 8, jax.devices()
    root = sys.argv[1]
    tiny = dict(variant="mu", patch_size=4, image_size=16, batch_size=16, steps=6,
                log_every=1, checkpoint_every=6, eval_every=6, fewshot="none")
    errors = {}
    for name, extra in (("bad_batch", {"mesh": "data:8", "batch_size": 12}),
                        ("bad_size", {"mesh": "data:4"})):
        try:
            train({"workdir": f"{root}/{name}", **tiny, **extra}, progress=False)
        except ValueError as err:
            errors[name] = str(err)
    out = {"errors": errors}
    for name, mesh in (("single", None), ("data8", "data:8"), ("dp4mp2", "data:4,model:2")):
        summary = train({"workdir": f"{root}/{name}", **tiny, "mesh": mesh},
                        progress=False, log=lambda m: None)
        rows = [json.loads(x) for x in open(f"{root}/{name}/metrics.jsonl")]
        out[name] = {"loss": [r["loss"] for r in rows], "val": summary["val_accuracy"]}
        import keras
        keras.distribution.set_distribution(None)
    print("RESULT" + json.dumps(out))
""")


def test_data_parallel_matches_single_device(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[1])
    assert "not divisible by the data-parallel size 8" in out["errors"]["bad_batch"]
    assert "has 4 devices but JAX sees 8" in out["errors"]["bad_size"]
    single = out["single"]["loss"]
    assert len(single) == 6
    for name in ("data8", "dp4mp2"):
        for a, b in zip(single, out[name]["loss"], strict=True):
            assert abs(a - b) <= 1e-4 * abs(a), (name, single, out[name]["loss"])
