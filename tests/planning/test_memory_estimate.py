"""Memory estimate: byte counts from shapes, optimizer ratios, mesh, errors."""

import math

import pytest

import keras_vitscale as kvs
from keras_vitscale.planning import memory_estimate
from keras_vitscale.config import ViTConfig


def test_vit_g14_parameters_are_about_7gb_in_float32():
    est = memory_estimate.estimate("G/14", batch_size=1)
    assert est.num_params == ViTConfig.from_variant("G/14").count_params()
    assert 1.84e9 < est.num_params < 1.85e9  # Table 2: 1843M
    assert est.params == 4 * est.num_params
    assert est.params == pytest.approx(1843e6 * 4, rel=2e-3)  # ~7.37 GB
    assert est.gradients == est.params
    half = memory_estimate.estimate("G/14", batch_size=1, param_dtype="bfloat16")
    assert half.params == 2 * est.num_params


@pytest.mark.parametrize("variant", ["B/16", "G/14"])
def test_optimizer_state_ratios(variant):
    ratio = {
        opt: memory_estimate.estimate(variant, optimizer=opt).optimizer_state / (4 * ViTConfig.from_variant(variant).count_params())
        for opt in memory_estimate.OPTIMIZERS
    }
    assert ratio["adam"] == 2.0
    assert ratio["bf16_adam"] == 1.5
    assert ratio["sgd"] == 0.0
    # bf16 momentum (0.5x) plus factored second moments, a few vectors.
    assert 0.5 < ratio["scaling_adafactor"] <= 0.51


def test_scaling_adafactor_factors_by_second_largest_dim():
    # A (16, 4096) kernel: second-largest dim 16 < 32, so a full float32
    # second moment (4 bytes) plus the bf16 momentum (2 bytes) per entry.
    cfg = ViTConfig(width=16, depth=1, mlp_dim=4096, num_heads=2, patch_size=8,
                    image_size=32, num_classes=0)
    est = memory_estimate.estimate(cfg, optimizer="scaling_adafactor")
    expected = 0
    for shape in cfg.parameter_shapes().values():
        size = math.prod(shape)
        dims = sorted(shape)
        if len(shape) >= 2 and dims[-2] >= 32:
            expected += 4 * (size // dims[-1] + size // dims[-2]) + 2 * size
        else:
            expected += 6 * size
    assert est.optimizer_state == expected


def test_activations_per_block_and_remat():
    cfg = ViTConfig.from_variant("B/16", num_classes=1000)
    n, d, m, h = cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.num_heads
    est = memory_estimate.estimate("B/16", batch_size=8)
    # 8 n d + 2 n m activations in float32 plus float32 softmax probabilities.
    assert est.activations_per_block == 4 * (8 * n * d + 2 * n * m) + 4 * h * n * n
    remat = memory_estimate.estimate("B/16", batch_size=8, remat=True)
    assert remat.activations < est.activations / 4
    assert remat.activations == remat.activations_remat == est.activations_remat
    half = memory_estimate.estimate("B/16", batch_size=8, compute_dtype="bfloat16")
    assert half.activations < 0.7 * est.activations
    assert memory_estimate.estimate("B/16", batch_size=16).activations == 2 * est.activations
    assert remat.hardware_flops_per_step == pytest.approx(4 / 3 * est.flops_per_step)
    assert est.flops_per_step == pytest.approx(3 * 8 * cfg.flops_per_image())


def test_activations_of_the_checkpoint_options():
    # DINOv2's block: SwiGLU saves [a | b], silu(a) and the product (4 n m),
    # LayerScale its two branch outputs (2 n d); registers are tokens.
    cfg = ViTConfig.from_variant("B/16", num_register_tokens=4, layer_scale=1e-5,
                                 mlp_type="swiglu")
    n, d, m, h = cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.num_heads
    assert n == 197 + 4
    est = memory_estimate.estimate(cfg, batch_size=8)
    assert est.activations_per_block == 4 * (10 * n * d + 4 * n * m) + 4 * h * n * n
    assert est.num_params == cfg.count_params()
    # The pre-encoder LayerNorm keeps its input once, outside the blocks.
    plain = ViTConfig.from_variant("B/16")
    pre = memory_estimate.estimate(plain.replace(pre_norm=True), batch_size=8)
    base = memory_estimate.estimate(plain, batch_size=8)
    assert pre.activations - base.activations == 8 * 4 * 197 * 768


def test_mesh_divides_state_and_batch():
    base = memory_estimate.estimate("L/16", batch_size=64)
    fsdp = memory_estimate.estimate("L/16", batch_size=64, mesh={"data": 2, "fsdp": 4})
    model = memory_estimate.estimate("L/16", batch_size=64, mesh="data:8,model:4")
    # Matrices sharded over fsdp*model; vectors (0.1% of ViT-L) replicated.
    shapes = ViTConfig.from_variant("L/16").parameter_shapes().values()
    expected = sum(4 * math.prod(s) / (4 if len(s) >= 2 else 1) for s in shapes)
    assert fsdp.per_device["params"] == int(expected)
    assert model.per_device["gradients"] == int(expected)
    assert fsdp.per_device["params"] == pytest.approx(base.params / 4, rel=5e-3)
    assert fsdp.per_device["optimizer_state"] == pytest.approx(2 * expected, rel=1e-9)
    # The batch is split over data*fsdp: 8 devices in both meshes.
    assert fsdp.device_batch_size == model.device_batch_size == 8
    assert fsdp.per_device["activations"] == pytest.approx(base.activations / 8, rel=1e-9)
    # Model parallelism also splits heads and MLP columns, not width-d tensors.
    ratio = model.per_device["activations"] / fsdp.per_device["activations"]
    assert 0.25 < ratio < 0.6
    assert model.per_device["total"] == sum(
        model.per_device[k] for k in ("params", "gradients", "optimizer_state", "activations"))
    assert model.num_devices == 32
    assert model.fits("16GiB") and not base.fits("1GB")


def test_bad_inputs_list_the_accepted_values():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lion'.*'adam', 'bf16_adam', 'scaling_adafactor', 'sgd'"):
        memory_estimate.estimate("B/16", optimizer="lion")
    with pytest.raises(ValueError, match=r"Unknown variant 'X/16'.*Ti.*22B"):
        memory_estimate.estimate("X/16")
    with pytest.raises(ValueError, match=r"Unknown mesh axis 'tensor'.*'data', 'fsdp', 'model'"):
        memory_estimate.estimate("B/16", mesh={"tensor": 2})
    with pytest.raises(ValueError, match=r"batch_size=12 must be a positive multiple of data\*fsdp = 8"):
        memory_estimate.estimate("B/16", batch_size=12, mesh="data:8")
    with pytest.raises(ValueError, match=r"Unknown compute_dtype 'fp8'"):
        memory_estimate.estimate("B/16", compute_dtype="fp8")


def test_kvs_memory_is_the_estimate_module():
    # kvs.memory, the planner's former name, still answers.
    assert kvs.memory is kvs.planning.memory_estimate
    assert kvs.planning.estimate is memory_estimate.estimate
    assert kvs.memory.estimate("B/16").fits("16GiB")
