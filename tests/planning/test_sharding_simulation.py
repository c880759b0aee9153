"""Sharding simulation: compiled (never run) sharded steps on 8 virtual CPU devices."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

from keras_vitscale.planning import sharding_simulation as sim

# A tiny width keeps each compile near a second; min_size=0 lets FSDP shard
# even these small tensors, as it shards the real ones (>= 2**20 elements).
SCRIPT = textwrap.dedent("""
    import json
    from keras_vitscale import ViTConfig
    from keras_vitscale.planning import abstract_state, compiled_step, sharding_simulation as sim
    assert len(compiled_step.use_virtual_devices(8)) == 8
    cfg = ViTConfig(width=32, depth=3, mlp_dim=128, num_heads=2, patch_size=8,
                    image_size=16, num_classes=8, pooling="gap")
    def run(spec, depth, opt="adam"):
        return compiled_step.compile_train_step(cfg.replace(depth=depth), spec, opt,
                                                batch_per_shard=2, dtype_policy="float32", min_size=0)
    out = {}
    steps = {(spec, d): run(spec, d) for spec in ("data:8", "fsdp:8") for d in (1, 2, 3)
             if (spec, d) != ("data:8", 3)}
    steps[("data:2,model:4", 1)] = run("data:2,model:4", 1)
    for (spec, d), s in steps.items():
        out[f"{spec}@{d}"] = dict(arguments=s.arguments, layout=s.layout, peak=s.peak,
                                  collectives=s.collectives)
    fsdp8 = [steps[("fsdp:8", d)] for d in (1, 2)]
    out["depth_check"] = sim.extrapolate(cfg, "fsdp:8", fsdp8, min_size=0)["peak"]
    out["scaled"] = sim.scale_mesh("data:2,model:4", 1024)
    out["layout16"] = abstract_state.layout_memory(cfg, "fsdp:16", "adam", "float32", 2, min_size=0)
    out["layout8"] = abstract_state.layout_memory(cfg, "fsdp:8", "adam", "float32", 2, min_size=0)
    try:
        sim.extrapolate(cfg, "data:64", fsdp8)
    except ValueError as err:
        out["kind_error"] = str(err)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def simulated():
    if keras.backend.backend() != "jax":
        pytest.skip("the sharding simulation compiles the step with XLA through JAX (KERAS_BACKEND=jax)")
    # The 8 virtual devices must exist before JAX starts, so the compiles run
    # in a fresh process (this one's JAX already has its single device).
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT")[1])


def test_layouts_predict_xla_arguments_to_the_byte(simulated):
    for key, step in simulated.items():
        if "@" in key:
            assert step["arguments"] == step["layout"]["arguments"], key


def test_fsdp_cuts_argument_bytes_eightfold(simulated):
    # Parameters and optimizer state (the batch shard is the same per device):
    # 1/8 under fsdp:8, up to 3% more for the replicated step counter.
    def state(step):
        return step["layout"]["params"] + step["layout"]["optimizer_state"]

    for depth in (1, 2):
        ratio = state(simulated[f"fsdp:8@{depth}"]) / state(simulated[f"data:8@{depth}"])
        assert 1 / 8 <= ratio <= 1.03 / 8, (depth, ratio)
    # On placeholder devices: twice the shards, about half the bytes each.
    half = simulated["layout16"]["params"] / simulated["layout8"]["params"]
    assert 0.5 <= half <= 0.55, half


def test_collectives_follow_the_mesh(simulated):
    for depth in (1, 2):
        data = simulated[f"data:8@{depth}"]["collectives"]
        fsdp = simulated[f"fsdp:8@{depth}"]["collectives"]
        assert data["all-gather"]["count"] == 0, data        # weights are replicated
        assert data["all-reduce"]["count"] >= 1, data        # the gradient sum
        assert fsdp["all-gather"]["count"] >= 1, fsdp         # weights gathered to use
    # More blocks gather more weights.
    gathered = [simulated[f"fsdp:8@{d}"]["collectives"]["all-gather"]["bytes"]
                for d in (1, 2, 3)]
    assert gathered[0] < gathered[1] < gathered[2], gathered
    assert simulated["data:2,model:4@1"]["collectives"]["all-reduce"]["count"] >= 1


def test_extrapolation_reproduces_held_out_slice(simulated):
    # Fit on 1 and 2 blocks, predict the peak with 3 blocks within 5% (the
    # benchmark's check on ViT-G/14 to ViT-22B slices is in benchmarks/RESULTS.md).
    measured = simulated["fsdp:8@3"]["peak"]
    assert abs(simulated["depth_check"] - measured) <= 0.05 * measured, (
        simulated["depth_check"], measured)
    assert "same kind of mesh" in simulated["kind_error"]
    assert simulated["scaled"] == "data:256,model:4"


def test_fit_depth_needs_two_depths():
    fit = sim.fit_depth([1, 2, 3], [10.0, 13.0, 16.0])
    assert (fit.fixed, fit.per_layer) == pytest.approx((7.0, 3.0))
    assert fit.predict(48) == pytest.approx(151.0)
    with pytest.raises(ValueError, match="two or more distinct depths"):
        sim.fit_depth([2, 2], [1.0, 1.0])


def test_model_config_and_scale_mesh():
    assert sim.model_config("22B/14").block == "parallel"       # the vit_22b14 recipe
    assert sim.model_config("vit_bigG14").pooling == "map"
    assert sim.model_config("S/16").block == "sequential"        # vit_s16, not SimplEsT
    assert sim.model_config("M/16").depth == 12                  # no preset: the variant
    assert sim.scale_mesh("fsdp:8", 1024) == "fsdp:1024"
    assert sim.scale_mesh("data:2,model:4", 256) == "data:64,model:4"
    with pytest.raises(ValueError, match="multiple of 4"):
        sim.scale_mesh("data:2,model:4", 10)
    with pytest.raises(ValueError, match=r"Unknown ViT variant 'Z/9'.*22B.*built-in preset"):
        sim.model_config("Z/9")
