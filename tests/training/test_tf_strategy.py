"""TensorFlow tf.distribute: MirroredStrategy over 2 logical CPUs matches one
device; mesh and --tpu errors are clear and quick.

Three subprocesses run side by side (TensorFlow's logical devices must be set
before it initialises, and a TPU connection attempt changes the process'
eager context): "mirrored" trains on `--mesh data:2`, "single" the same runs
on one device, "tpu" tries TPUs that are not there.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies (--mesh data:N, --tpu) are the TensorFlow "
           "backend's; JAX meshes are tested in test_mesh.py")

# Clipping at 0.1 makes every step clip, and these learning rates make the
# trajectory sensitive to where it happens: clipping each replica's
# half-gradient before the all-reduce (Keras' TensorFlow default) moves the
# losses far past the 1e-4 bound within 6 steps, while clipping the summed
# gradient stays well inside it. Adam gets a lower rate because a higher one
# amplifies run-to-run float noise too close to the bound.
TINY = dict(variant="mu", patch_size=4, image_size=16, batch_size=16, steps=6, log_every=1,
            checkpoint_every=3, keep_checkpoints=3, eval_every=6, fewshot="none",
            clipnorm=0.1, lr_by_optimizer={"adam": 0.005, "adafactor": 0.01})

COMMON = textwrap.dedent("""
    import json, sys
    import numpy as np
    root, tiny = sys.argv[1], json.loads(sys.argv[2])
    lr = tiny.pop("lr_by_optimizer")

    def losses(workdir):
        return [json.loads(x)["loss"] for x in open(f"{workdir}/metrics.jsonl")]
""")

MIRRORED = COMMON + textwrap.dedent("""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_vitscale.model import ViT
    from keras_vitscale.training import callbacks, train

    out = {"errors": {}}
    for name, extra in (("bad_batch", {"mesh": "data:2", "batch_size": 15}),
                        ("bad_size", {"mesh": "data:3"}),
                        ("model_axis", {"mesh": "data:1,model:2"}),
                        ("fsdp_axis", {"mesh": "fsdp:2"}),
                        ("tpu_and_model", {"mesh": "data:2,model:2", "tpu": "local"})):
        try:
            train({"workdir": f"{root}/{name}", **tiny, **extra}, progress=False)
            out["errors"][name] = None
        except ValueError as err:
            out["errors"][name] = str(err)

    class Interrupted(Exception):
        pass

    save = callbacks.RunMonitor.save

    def save_then_die_at_3(self):  # a crash right after the step-3 checkpoint
        save(self)
        if self.step == 3 and dying:
            raise Interrupted()

    callbacks.RunMonitor.save = save_then_die_at_3
    runs = {}
    for opt in ("adam", "adafactor"):
        workdir, logs = f"{root}/{opt}", []
        dying = opt == "adafactor"
        try:
            summary = train({"workdir": workdir, **tiny, "optimizer": opt, "lr": lr[opt],
                             "mesh": "data:2"}, progress=False, log=logs.append)
        except Interrupted:
            dying = False
            summary = train({"workdir": workdir, **tiny, "optimizer": opt, "lr": lr[opt],
                             "mesh": "data:2"}, progress=False, log=logs.append)
        # The preset written under the strategy, read back on one device,
        # must hold the final checkpoint's weights.
        model = ViT.from_preset(f"{workdir}/model")
        ckpt = f"{workdir}/checkpoints/ckpt_{tiny['steps']:08d}"
        meta = json.load(open(f"{ckpt}/meta.json"))
        with np.load(f"{ckpt}/state.npz") as state:
            saved = {p: state[f"v{i}"] for i, p in enumerate(meta["paths"])}
        preset_diff = max(float(np.max(np.abs(np.asarray(w.numpy(), "float32") - saved[w.path])))
                          for w in model.weights)
        runs[opt] = {"loss": losses(workdir), "val_accuracy": summary["val_accuracy"],
                     "val_loss": summary["val_loss"], "resumed_from": summary["resumed_from"],
                     "logs": logs, "preset_max_diff": preset_diff,
                     "preset_missing": [w.path for w in model.weights if w.path not in saved]}
    out["runs"] = runs
    print("RESULT" + json.dumps(out))
""")

SINGLE = COMMON + textwrap.dedent("""
    import tensorflow as tf
    from keras_vitscale.training import train
    assert len(tf.config.list_logical_devices("CPU")) == 1
    runs = {}
    for opt in ("adam", "adafactor"):
        summary = train({"workdir": f"{root}/{opt}", **tiny, "optimizer": opt, "lr": lr[opt]},
                        progress=False, log=lambda m: None)
        runs[opt] = {"loss": losses(f"{root}/{opt}"), "val_accuracy": summary["val_accuracy"],
                     "val_loss": summary["val_loss"]}
    print("RESULT" + json.dumps({"runs": runs}))
""")

TPU = COMMON + textwrap.dedent("""
    import socket, threading, time
    import tensorflow as tf
    from keras_vitscale.training import tf_strategy, train

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # Accepts TCP connections and never answers: TensorFlow alone would wait
    # on it for minutes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in iter(int, 1)],
                     daemon=True).start()
    # A real TensorFlow gRPC worker without TPUs.
    port = free_port()
    server = tf.distribute.Server(tf.train.ClusterSpec({"worker": [f"localhost:{port}"]}),
                                  job_name="worker", task_index=0, start=True)
    tf_strategy.CONNECT_TIMEOUT_S = 3.0
    cases = [("local", "local"), ("closed_port", f"grpc://127.0.0.1:{free_port()}"),
             ("unknown_name", "no-such-tpu-kvs-test"),
             ("silent_peer", f"grpc://127.0.0.1:{silent.getsockname()[1]}"),
             ("worker_without_tpu", f"grpc://localhost:{port}")]
    out = {}
    for name, tpu in cases:
        started = time.perf_counter()
        try:
            # Through train(): the trainer must hand --tpu to tf_strategy.
            train({"workdir": f"{root}/{name}", **tiny, "tpu": tpu}, progress=False)
            message = None
        except ValueError as err:
            message = str(err)
        out[name] = {"tpu": tpu, "error": message,
                     "seconds": round(time.perf_counter() - started, 2)}
    print("RESULT" + json.dumps(out), flush=True)
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf_strategy")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", script, str(root / name), json.dumps(TINY)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, script in (("mirrored", MIRRORED), ("single", SINGLE), ("tpu", TPU))}
    out = {"root": root}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "RESULT" in stdout, (name, stderr[-3000:])
        out[name] = json.loads(stdout.split("RESULT", 1)[1])
    return out


def _close(a, b, rel=1e-4):
    return abs(a - b) <= rel * abs(a)


def test_mesh_errors_name_the_value_and_the_fix(results):
    errors = results["mirrored"]["errors"]
    assert "--batch-size 15 is not divisible by the data-parallel size 2" in errors["bad_batch"]
    assert "use a multiple of 2" in errors["bad_batch"]
    bad_size = errors["bad_size"]
    assert "asks for 3 replicas but TensorFlow sees 2 CPU" in bad_size
    assert "device:CPU:0" in bad_size and "device:CPU:1" in bad_size
    assert "--mesh data:2" in bad_size
    for name in ("model_axis", "tpu_and_model"):
        assert "the 'model' axis is not supported on the TensorFlow backend" in errors[name]
        assert "KERAS_BACKEND=jax" in errors[name] and "data:N" in errors[name]
    # tf_strategy refuses an fsdp axis as it does a model axis.
    assert "'fsdp:2'" in errors["fsdp_axis"] and "KERAS_BACKEND=jax" in errors["fsdp_axis"]


@pytest.mark.parametrize("optimizer", ["adam", "adafactor"])
def test_data_parallel_losses_match_one_device(results, optimizer):
    single = results["single"]["runs"][optimizer]["loss"]
    mirrored = results["mirrored"]["runs"][optimizer]["loss"]
    assert len(single) == TINY["steps"]
    for a, b in zip(single, mirrored, strict=True):
        assert _close(a, b), (optimizer, single, mirrored)


def _final_state(workdir):
    ckpt = workdir / "checkpoints" / f"ckpt_{TINY['steps']:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    with np.load(ckpt / "state.npz") as state:
        values = [state[f"v{i}"] for i in range(len(meta["paths"]))]
    return meta["paths"], meta["dtypes"], values


def test_checkpoint_resume_and_preset_under_strategy(results):
    run = results["mirrored"]["runs"]["adafactor"]
    # Interrupted after the step-3 checkpoint, then resumed from it.
    assert run["resumed_from"] == 3
    assert any("Resuming from" in m and "(step 3)" in m for m in run["logs"]), run["logs"]
    for optimizer in ("adam", "adafactor"):
        # Every variable (model + MirroredVariable optimizer slots) is stored
        # under the same path as on one device, with about the same values.
        paths_2, _, values_2 = _final_state(results["root"] / "mirrored" / optimizer)
        paths_1, dtypes, values_1 = _final_state(results["root"] / "single" / optimizer)
        assert paths_2 == paths_1
        # Elements whose exact gradient is zero (the attention key bias)
        # take +-lr steps from float noise, and bfloat16 slots round to a
        # neighbour, so up to 1% of the values may differ by more than 2e-4;
        # a skipped all-reduce or a doubled update moves far more of them.
        bad = total = 0
        for path, dtype, a, b in zip(paths_1, dtypes, values_1, values_2):
            assert a.shape == b.shape, path
            rtol = 1e-2 if dtype == "bfloat16" else 0.0
            bad += int(np.sum(np.abs(a - b) > 2e-4 + rtol * np.abs(a)))
            total += a.size
        assert bad <= 0.01 * total, (optimizer, bad, total)
        mirrored = results["mirrored"]["runs"][optimizer]
        assert mirrored["preset_missing"] == []
        assert mirrored["preset_max_diff"] == 0.0


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_eval_metrics_match_one_device(results, metric):
    # The held-out split (217 digits 0-5) is padded to whole batches under a
    # mesh; the padding must not count.
    for optimizer in ("adam", "adafactor"):
        single = results["single"]["runs"][optimizer][metric]
        mirrored = results["mirrored"]["runs"][optimizer][metric]
        assert _close(single, mirrored), (optimizer, metric, single, mirrored)


def test_tpu_errors_are_quick_and_clear(results):
    out = results["tpu"]
    for name, case in out.items():
        assert case["error"] is not None, name
        assert case["error"].startswith(f"--tpu {case['tpu']!r}: no TPU reachable"), case
        assert "Fix:" in case["error"] and "drop --tpu" in case["error"], case
        # CONNECT_TIMEOUT_S is 3 s in the subprocess; each step is bounded.
        assert case["seconds"] < 15, case
    assert "TPU VM" in out["local"]["error"]
    assert "Connection refused" in out["closed_port"]["error"]
    assert out["closed_port"]["tpu"] in out["closed_port"]["error"]
    assert "resolving the TPU" in out["unknown_name"]["error"]
    assert "no gRPC server answered within 3 s" in out["silent_peer"]["error"]
    assert "initialising the TPU system" in out["worker_without_tpu"]["error"]
