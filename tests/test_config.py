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


# ---- the options real checkpoints need (issue 19) ---------------------------------
NEW_FIELDS = ("pre_norm", "patch_bias", "head_bias", "layer_scale", "num_register_tokens",
              "mlp_type")


@pytest.mark.parametrize("kwargs,words", [
    (dict(layer_scale=1e-5, block="parallel"), ["layer_scale=1e-05", "'parallel'",
                                                "block='sequential'"]),
    (dict(layer_scale=0.0), ["layer_scale", "0.0", "None"]),
    (dict(layer_scale="1e-5"), ["layer_scale", "'1e-5'"]),
    (dict(mlp_type="swiglu", block="parallel"), ["mlp_type='swiglu'", "'parallel'"]),
    (dict(mlp_type="swiglu", block="vanilla", pooling="gap", class_token=False),
     ["mlp_type='swiglu'", "'vanilla'"]),
    (dict(mlp_type="geglu"), ["'geglu'", "gelu", "swiglu"]),
    (dict(mlp_type="swiglu", pooling="map"), ["swiglu", "map", "'tok'"]),
    (dict(num_register_tokens=-1), ["num_register_tokens", "-1", ">= 0"]),
    (dict(num_register_tokens=2.0), ["num_register_tokens", "2.0"]),
    (dict(num_register_tokens=4, block="vanilla", pooling="gap", class_token=False),
     ["vanilla", "num_register_tokens=0", "num_register_tokens=4"]),
    (dict(pre_norm=True, block="vanilla", pooling="gap", class_token=False),
     ["vanilla", "pre_norm=False"]),
    (dict(pooling="gap", class_token=False, num_register_tokens=0,
          posemb_covers_class_token=True), ["class_token=True", "num_register_tokens"]),
    (dict(head_bias=False, head_bias_init=-10.0), ["head_bias_init=-10.0", "head_bias=True"]),
    (dict(posemb="sincos2d", posemb_covers_class_token=True),
     ["sincos2d", "posemb_covers_class_token=False"]),
])
def test_bad_new_options_name_value_and_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        ViTConfig.from_variant("B/16", **kwargs)
    for word in words:
        assert word in str(err.value)


def test_new_options_round_trip_and_old_files_load():
    cfg = ViTConfig.from_variant("S/16", pre_norm=True, patch_bias=False, head_bias=False,
                                 layer_scale=1e-5, num_register_tokens=4, mlp_type="swiglu",
                                 posemb_covers_class_token=True)
    again = ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.layer_scale == 1e-5 and again.num_register_tokens == 4
    # A config.json written before these fields existed builds today's model.
    old = {k: v for k, v in ViTConfig.from_variant("S/16").to_dict().items()
           if k not in NEW_FIELDS}
    loaded = ViTConfig.from_dict(old)
    assert loaded == ViTConfig.from_variant("S/16")
    assert (loaded.pre_norm, loaded.patch_bias, loaded.head_bias, loaded.layer_scale,
            loaded.num_register_tokens, loaded.mlp_type) == (False, True, True, None, 0, "gelu")


def test_prefix_tokens_and_posemb_length():
    cfg = ViTConfig.from_variant("g/14", image_size=518, num_register_tokens=4)
    assert cfg.num_prefix_tokens == 5 and cfg.num_tokens == 37 * 37 + 5
    assert cfg.posemb_length == 37 * 37  # DINOv2: patches only
    assert cfg.replace(posemb_covers_class_token=True).posemb_length == 37 * 37 + 5
    no_class = cfg.replace(class_token=False, pooling="gap")
    assert no_class.num_prefix_tokens == 4 and no_class.num_tokens == 37 * 37 + 4


def test_so400m_variant():
    cfg = ViTConfig.from_variant("So400m/14", pooling="map", num_classes=0)
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads) == (1152, 27, 4304, 16)
    assert not cfg.class_token and cfg.head_dim == 72
    fields = TIMM_MODELS["vit_so400m_patch14_siglip_224"][2]
    assert cfg.replace(gelu="exact").parameter_shapes() == ViTConfig(**fields).parameter_shapes()


def test_flops_of_new_options_by_formula():
    base = ViTConfig.from_variant("B/16")
    d, m, depth, p = 768, 3072, 12, 196

    def by_formula(n, mlp_in, head=1000):
        per_block = n * (4 * d * d + d * mlp_in + m * d) + 2 * n * n * d
        return 2 * (p * 16 * 16 * 3 * d + depth * per_block + d * head)

    assert base.flops_per_image() == by_formula(197, m)
    # Norms, LayerScale and biases are elementwise: no FLOPs counted.
    for fields in (dict(pre_norm=True), dict(layer_scale=1e-5), dict(patch_bias=False),
                   dict(head_bias=False)):
        assert base.replace(**fields).flops_per_image() == base.flops_per_image(), fields
    # Registers are tokens; SwiGLU's first matmul is (D, 2M).
    assert base.replace(num_register_tokens=4).flops_per_image() == by_formula(201, m)
    assert base.replace(mlp_type="swiglu").flops_per_image() == by_formula(197, 2 * m)


def test_parameter_shapes_of_new_options():
    cfg = ViTConfig.from_variant("mu/8", image_size=32, pre_norm=True, patch_bias=False,
                                 head_bias=False, layer_scale=0.1, num_register_tokens=2,
                                 mlp_type="swiglu", posemb_covers_class_token=True)
    shapes = cfg.parameter_shapes()
    assert "patch_embedding/bias" not in shapes and "head/bias" not in shapes
    assert shapes["register_tokens/tokens"] == (1, 2, 32)
    assert shapes["position_embedding/embedding"] == (1, 16 + 3, 32)
    assert shapes["pre_norm/gamma"] == shapes["pre_norm/beta"] == (32,)
    assert shapes["encoder_block_0/layer_scale_1/gamma"] == (32,)
    assert shapes["encoder_block_0/layer_scale_2/gamma"] == (32,)
    assert shapes["encoder_block_0/mlp/dense_1/kernel"] == (32, 256)
    assert shapes["encoder_block_0/mlp/dense_1/bias"] == (256,)
    assert shapes["encoder_block_0/mlp/dense_2/kernel"] == (128, 32)
    assert "pre_norm/beta" not in cfg.replace(norm_bias=False).parameter_shapes()


# ---- counts against timm's models, built on the meta device (nothing allocated) ------
_CLIP = dict(patch_size=14, image_size=224, pooling="tok", class_token=True,
             posemb_covers_class_token=True, pre_norm=True, patch_bias=False,
             layer_norm_epsilon=1e-5, gelu="exact",
             # timm's head is an nn.Linear with a bias (zeros in the OpenCLIP
             # checkpoints it converts): its count includes it.
             head_bias=True)
# timm runs its SigLIP towers (and their MAP head's MLP) with exact GELU.
_SIGLIP = dict(pooling="map", class_token=False, posemb_covers_class_token=False,
               gelu="exact")
TIMM_MODELS = {
    "vit_giant_patch14_clip_224": (1024, 1_012_646_656, dict(
        _CLIP, width=1408, depth=40, mlp_dim=6144, num_heads=16, num_classes=1024)),
    "vit_gigantic_patch14_clip_224": (1280, 1_844_908_544, dict(
        _CLIP, width=1664, depth=48, mlp_dim=8192, num_heads=16, num_classes=1280)),
    "vit_so400m_patch14_siglip_224": (0, 427_680_704, dict(
        _SIGLIP, width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14,
        image_size=224, num_classes=0)),
    "vit_so400m_patch14_siglip_378": (1000, 429_378_600, dict(
        _SIGLIP, width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14,
        image_size=378, num_classes=1000)),
    "vit_base_patch16_siglip_224": (0, 92_884_224, dict(
        _SIGLIP, width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16,
        image_size=224, num_classes=0)),
    "vit_giant_patch14_reg4_dinov2": (0, 1_136_483_840, dict(
        width=1536, depth=40, mlp_dim=4096, num_heads=24, patch_size=14, image_size=518,
        num_classes=0, pooling="tok", class_token=True, num_register_tokens=4,
        posemb_covers_class_token=False, layer_scale=1e-5, mlp_type="swiglu")),
    "vit_huge_patch14_224": (0, 630_764_800, dict(
        width=1280, depth=32, mlp_dim=5120, num_heads=16, patch_size=14, image_size=224,
        num_classes=0, pooling="tok", class_token=True, posemb_covers_class_token=True,
        gelu="exact")),
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_count_equals_timm_on_meta_device(name):
    num_classes, count, fields = TIMM_MODELS[name]
    cfg = ViTConfig(**fields)
    assert cfg.count_params() == count
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == count
    # The tensors one by one, shapes only: as many of each size as the config has.
    timm_sizes = sorted(p.numel() for p in model.parameters())
    ours = sorted(math.prod(s) for s in cfg.parameter_shapes().values())
    assert timm_sizes == ours
