"""ViTConfig: shapes, analytic counts against timm / the papers, validation."""

import json
import math

import pytest

from keras_vitscale.config import VARIANTS, ViTConfig, parse_variant

# timm's class-token ViT with a 1000-class head: its models' parameter counts.
TIMM_EXACT = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656}
TIMM_ROUNDED_M = {"B/32": 88.22, "L/16": 304.33, "H/14": 632.05, "g/14": 1012.61,
                  "G/14": 1844.44}
# Scaling ViT, Table 2, GFLOPs at 224 px.
TABLE2_GFLOPS = {"Ti/16": 2.5, "S/16": 9.2, "B/32": 8.7, "B/16": 35.1, "L/16": 122.9}
TABLE2_GFLOPS_MAP = {"g/14": 533.1, "G/14": 965.3}


def timm_shaped(variant, **kw):
    return ViTConfig.from_variant(variant, posemb_covers_class_token=True, **kw)


@pytest.mark.parametrize("variant,count", TIMM_EXACT.items())
def test_count_equals_timm_exactly(variant, count):
    assert timm_shaped(variant).count_params() == count


@pytest.mark.parametrize("variant,millions", TIMM_ROUNDED_M.items())
def test_count_matches_timm_rounded(variant, millions):
    assert round(timm_shaped(variant).count_params() / 1e6, 2) == pytest.approx(millions, abs=0.011)


def test_h14_without_head():
    assert timm_shaped("H/14", num_classes=0).count_params() == 630_764_800


@pytest.mark.parametrize("variant,gflops", TABLE2_GFLOPS.items())
def test_flops_match_table2(variant, gflops):
    # Table 2 rounds to 0.1 and its B/32 is 1.4% below the analytic count.
    assert ViTConfig.from_variant(variant).flops_per_image() / 1e9 == pytest.approx(gflops, rel=0.015)


@pytest.mark.parametrize("variant,gflops", TABLE2_GFLOPS_MAP.items())
def test_flops_match_table2_map_head(variant, gflops):
    cfg = ViTConfig.from_variant(variant, pooling="map")
    assert cfg.flops_per_image() / 1e9 == pytest.approx(gflops, rel=0.005)


def test_22b_encoder_is_21_7_billion_without_building():
    cfg = ViTConfig.from_variant("22B/14", block="parallel", qk_norm=True, qkv_bias=False,
                                 norm_bias=False, pooling="map")
    encoder = sum(math.prod(shape) for path, shape in cfg.parameter_shapes().items()
                  if path.startswith("encoder_block_"))
    assert encoder == pytest.approx(12 * 48 * 6144**2, rel=0.002)
    assert cfg.count_params() / 1e9 == pytest.approx(22.2, abs=0.05)


def test_parallel_block_has_the_same_matmul_weights_as_sequential():
    seq = ViTConfig.from_variant("B/16")
    par = seq.replace(block="parallel")
    # Fusing moves weights between matrices but keeps the kernels' sizes.
    def kernel_size(cfg):
        return sum(math.prod(s) for p, s in cfg.parameter_shapes().items()
                   if p.endswith("kernel") and p.startswith("encoder"))

    assert kernel_size(seq) == kernel_size(par)


def test_variant_parsing_is_case_sensitive():
    assert parse_variant("g/14") == ("g", 14)
    assert parse_variant("G/14") == ("G", 14)
    assert ViTConfig.from_variant("g/14").width == 1408
    assert ViTConfig.from_variant("G/14").width == 1664
    assert parse_variant("22B/14") == ("22B", 14)
    assert parse_variant("mu") == ("mu", None)


def test_all_variants_listed_in_unknown_error():
    with pytest.raises(ValueError) as err:
        ViTConfig.from_variant("X/16")
    for name in VARIANTS:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs,words", [
    (dict(image_size=225), ["225", "not divisible by patch_size 16", "224", "240"]),
    (dict(image_size=(224, 200)), ["200", "192", "208"]),
    (dict(num_heads=7), ["num_heads 7", "768"]),
    (dict(width=770, num_heads=2, posemb="sincos2d"), ["sincos2d", "770", "768", "772"]),
    (dict(pooling="avg"), ["'avg'", "tok", "gap", "map", "none"]),
    (dict(posemb="rope"), ["'rope'", "learn", "sincos2d"]),
    (dict(block="moe"), ["'moe'", "parallel"]),
    (dict(pooling="gap", class_token=False, posemb_covers_class_token=True), ["class_token"]),
])
def test_bad_config_errors_name_value_and_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        ViTConfig.from_variant("B/16", **kwargs)
    for word in words:
        assert word in str(err.value)


def test_conflicting_patch_size_is_refused():
    with pytest.raises(ValueError, match="fixes patch_size 16"):
        ViTConfig.from_variant("B/16", patch_size=14)


def test_round_trips_through_json():
    cfg = ViTConfig.from_variant("S/16", image_size=(224, 160), pooling="map", qk_norm=True,
                                 gelu="exact", head_bias_init=-10.0)
    again = ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="Unknown ViTConfig field"):
        ViTConfig.from_dict({**cfg.to_dict(), "hidden_size": 3})


def test_defaults_follow_big_vision():
    cfg = ViTConfig()
    assert cfg.layer_norm_epsilon == 1e-6 and cfg.gelu == "tanh"
    assert cfg.head_zero_init and not cfg.posemb_covers_class_token


def test_non_square_grid_and_tokens():
    cfg = ViTConfig.from_variant("mu/8", image_size=(32, 48))
    assert cfg.grid_size == (4, 6)
    assert cfg.num_tokens == 25
    assert ViTConfig.from_variant("mu/8", image_size=32, pooling="gap").num_tokens == 16
