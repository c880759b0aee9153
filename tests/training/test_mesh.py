"""JAX meshes over 8 virtual CPU devices match one device, and FSDP shards.

One subprocess (XLA only makes virtual devices when the flag is set before
JAX starts) trains the same tiny run on one device, `data:8`,
`data:4,model:2`, `fsdp:8` and `fsdp:4,model:2`, and records where every
model and optimizer variable lives at the last checkpoint.
"""

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
    import jax, keras
    import keras_vitscale as kvs
    from keras_vitscale.training import checkpoint, jax_mesh, train
    assert len(jax.devices()) == 8, jax.devices()
    root = sys.argv[1]
    # The tiny model's kernels are 1-6k elements: shard everything from 512.
    jax_mesh.FSDP_MIN_SIZE = 512
    tiny = dict(variant="mu", patch_size=4, image_size=16, batch_size=16, steps=6,
                log_every=1, checkpoint_every=6, eval_every=6, fewshot="none",
                optimizer="adafactor")
    errors = {}
    for name, extra in (("bad_batch", {"mesh": "data:8", "batch_size": 12}),
                        ("bad_size", {"mesh": "data:4"}),
                        ("bad_spec", {"mesh": "data:2,fsdp:4"}),
                        ("bad_model", {"mesh": "fsdp:2,model:4", "width": 34,
                                       "num_heads": 2})):
        try:
            train({"workdir": f"{root}/{name}", **tiny, **extra}, progress=False,
                  log=lambda m: None)
        except ValueError as err:
            errors[name] = str(err)
        keras.distribution.set_distribution(None)
    out = {"errors": errors}

    # The layouts of the variables as trained, seen by the last checkpoint.
    placed = {}
    save = checkpoint.CheckpointManager.save
    def spy(self, step, model, optimizer, extra=None):
        placed.clear()
        for v in list(model.variables) + list(optimizer.variables):
            value = v.value
            spec = list(getattr(value.sharding, "spec", ()))  # () on one device
            spec += [None] * (len(v.shape) - len(spec))
            placed[v.path] = {"shape": list(v.shape), "spec": spec,
                              "shard": list(value.addressable_shards[0].data.shape),
                              "bytes": value.nbytes,
                              "device0": value.addressable_shards[0].data.nbytes}
        return save(self, step, model, optimizer, extra)
    checkpoint.CheckpointManager.save = spy

    for name, mesh in (("single", None), ("data8", "data:8"), ("dp4mp2", "data:4,model:2"),
                       ("fsdp8", "fsdp:8"), ("fsdp4mp2", "fsdp:4,model:2")):
        summary = train({"workdir": f"{root}/{name}", **tiny, "mesh": mesh},
                        progress=False, log=lambda m: None)
        rows = [json.loads(x) for x in open(f"{root}/{name}/metrics.jsonl")]
        out[name] = {"loss": [r["loss"] for r in rows], "placed": dict(placed),
                     "val_accuracy": summary["val_accuracy"], "val_loss": summary["val_loss"]}
        keras.distribution.set_distribution(None)

    # From a config alone, as for compiling ViT-22B slices: same layouts.
    config = kvs.ViTConfig.from_variant("mu", patch_size=4, image_size=16, num_classes=10)
    dist = jax_mesh.make_distribution("fsdp:4,model:2", jax.devices(), config)
    out["from_config"] = {p: list(dist.layout_map[p].axes) for p in config.parameter_shapes()}
    print("RESULT" + json.dumps(out))
""")

LAYER = "encoder_block_0"


def _slot(placed, param, slot):
    """The optimizer slot `slot` of parameter path `param`."""
    suffix = param.replace("/", "_") + "_" + slot
    (found,) = [v for p, v in placed.items() if p.endswith(suffix)]
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT")[1])


def test_bad_meshes_are_named(runs):
    errors = runs["errors"]
    assert "not divisible by the data-parallel size 8" in errors["bad_batch"]
    assert "has 4 devices but JAX sees 8" in errors["bad_size"]
    assert "names both data and fsdp" in errors["bad_spec"]
    assert "not divisible by model:4" in errors["bad_model"]


@pytest.mark.parametrize("name", ["data8", "dp4mp2", "fsdp8", "fsdp4mp2"])
def test_mesh_matches_single_device(runs, name):
    single = runs["single"]["loss"]
    assert len(single) == 6
    for a, b in zip(single, runs[name]["loss"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (name, single, runs[name]["loss"])


def test_mesh_val_accuracy_matches_single_device(runs):
    # On a mesh the 217 held-out digits 0-5 are padded to 224 with zero-weight
    # examples; a weighted accuracy does not count them.
    single = runs["single"]["val_accuracy"]
    for name in ("data8", "dp4mp2", "fsdp8", "fsdp4mp2"):
        assert abs(runs[name]["val_accuracy"] - single) <= 1e-6, (name, runs[name], single)


def test_mesh_val_loss_matches_single_device(runs):
    single = runs["single"]["val_loss"]
    for name in ("data8", "fsdp4mp2"):
        assert abs(runs[name]["val_loss"] - single) <= 1e-4 * single, (name, runs[name], single)


def test_fsdp_shards_weights_and_optimizer_state(runs):
    placed = runs["fsdp8"]["placed"]
    expected = {  # path: (spec, shard shape on one device)
        f"{LAYER}/attention/qkv/kernel": ([None, "fsdp"], [32, 12]),
        f"{LAYER}/attention/out/kernel": ([None, "fsdp"], [32, 4]),
        f"{LAYER}/mlp/dense_1/kernel": ([None, "fsdp"], [32, 16]),
        f"{LAYER}/mlp/dense_2/kernel": (["fsdp", None], [16, 32]),
        "patch_embedding/kernel": ([None, None, None, "fsdp"], [4, 4, 3, 4]),
        "head/kernel": ([None, None], [32, 6]),         # 192 < 512 elements: replicated
        f"{LAYER}/mlp/dense_1/bias": ([None], [128]),
    }
    for path, (spec, shard) in expected.items():
        assert (placed[path]["spec"], placed[path]["shard"]) == (spec, shard), path
    # Every model variable of >= 512 elements is split 8 ways.
    model = {p: v for p, v in placed.items() if p in runs["from_config"]}
    for path, v in model.items():
        if v["bytes"] >= 512 * 4:
            assert v["device0"] * 8 == v["bytes"], (path, v)
    # Optimizer slots follow their parameter: the momentum has its layout,
    # the factored second moments keep the sharding of the dimension left.
    kernel = f"{LAYER}/mlp/dense_1/kernel"                       # (32, 128)
    assert _slot(placed, kernel, "momentum")["spec"] == [None, "fsdp"]
    assert _slot(placed, kernel, "momentum")["shard"] == [32, 16]
    assert _slot(placed, kernel, "v_col")["spec"] == ["fsdp"]
    assert _slot(placed, kernel, "v_row")["spec"] == [None]
    # ZeRO-3: one device holds 1/8 of the big model and optimizer state;
    # the replicated small vectors of this tiny model add a little more.
    total = sum(v["bytes"] for v in placed.values())
    device0 = sum(v["device0"] for v in placed.values())
    assert device0 < 0.22 * total, (device0, total)


def test_fsdp_with_tensor_parallel_uses_two_dimensions(runs):
    placed = runs["fsdp4mp2"]["placed"]
    expected = {
        f"{LAYER}/attention/qkv/kernel": (["fsdp", "model"], [8, 48]),
        f"{LAYER}/attention/out/kernel": (["model", "fsdp"], [16, 8]),
        f"{LAYER}/mlp/dense_1/kernel": (["fsdp", "model"], [8, 64]),
        f"{LAYER}/mlp/dense_2/kernel": (["model", "fsdp"], [64, 8]),
        f"{LAYER}/mlp/dense_1/bias": (["model"], [64]),
        "patch_embedding/kernel": ([None, None, None, "fsdp"], [4, 4, 3, 8]),
    }
    for path, (spec, shard) in expected.items():
        assert (placed[path]["spec"], placed[path]["shard"]) == (spec, shard), path
    kernel = f"{LAYER}/mlp/dense_1/kernel"
    assert _slot(placed, kernel, "momentum")["spec"] == ["fsdp", "model"]
    assert _slot(placed, kernel, "v_col")["spec"] == ["model"]
    assert _slot(placed, kernel, "v_row")["spec"] == ["fsdp"]
    # make_distribution from the ViTConfig alone gives the layouts the
    # trainer's model got, variable by variable.
    for path, axes in runs["from_config"].items():
        assert placed[path]["spec"] == axes, path
