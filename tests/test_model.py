"""kvs.ViT on the active backend: shapes, options, numerics, saving, errors."""

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from conftest import compiled_gradient_hlo, random_images
from reference_vit import forward as reference_forward


def randomize(model, seed=0, scale=0.2):
    """Random weights everywhere (zero heads and LN ones would hide bugs)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        base = 1.0 if v.path.endswith("gamma") else 0.0
        v.assign((base + scale * rng.standard_normal(v.shape)).astype("float32"))
    return model


TINY = dict(variant="mu/8", image_size=32, num_classes=5)
OPTIONS = {
    "tok": dict(),
    "gap_sincos": dict(pooling="gap", posemb="sincos2d"),
    "map_nonsquare": dict(pooling="map", image_size=(32, 16)),
    "none": dict(pooling="none", class_token=False),
    "posemb_after_cls_exact_gelu": dict(posemb_covers_class_token=True, gelu="exact"),
    "qk_norm_no_biases": dict(qk_norm=True, qkv_bias=False, attn_out_bias=False,
                              mlp_bias=False, norm_bias=False),
    "parallel_22b_style": dict(block="parallel", qk_norm=True, qkv_bias=False,
                               norm_bias=False, pooling="map"),
    "parallel_biases": dict(block="parallel", pooling="gap"),
    "fc_norm_repr": dict(pooling="gap", norm_position="after_pool", representation_size=12),
    "features": dict(num_classes=0, pooling="map"),
    "two_blocks": dict(variant="mu/4", depth=2, image_size=16),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_matches_numpy_reference_and_config(name):
    fields = {**TINY, **OPTIONS[name]}
    model = randomize(kvs.ViT(**fields))
    cfg = model.config
    # The config's analytic shapes are exactly the built variables.
    assert {v.path: tuple(v.shape) for v in model.weights} == cfg.parameter_shapes()
    assert model.count_params() == cfg.count_params()
    images = random_images(cfg)
    got = keras.ops.convert_to_numpy(model(images))
    want = reference_forward(model, images)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_output_shapes_per_pooling():
    shapes = {
        "tok": (2, 5), "gap": (2, 5), "map": (2, 5),
        "none": (2, 16, 5),
    }
    for pooling, shape in shapes.items():
        model = kvs.ViT(**TINY, pooling=pooling)
        assert tuple(model(random_images(model.config)).shape) == shape
    features = kvs.ViT(**{**TINY, "num_classes": 0})
    assert tuple(features(random_images(features.config)).shape) == (2, 32)


def test_head_zero_init_and_bias_init():
    model = kvs.ViT(**TINY, head_bias_init=-10.0)
    logits = keras.ops.convert_to_numpy(model(random_images(model.config)))
    np.testing.assert_allclose(logits, -10.0)
    model = kvs.ViT(**TINY, head_zero_init=False)
    assert np.abs(keras.ops.convert_to_numpy(model.get_layer("head").kernel)).max() > 0


def test_big_vision_init_statistics():
    model = kvs.ViT(variant="S/16", image_size=64, num_classes=10)
    w = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    # Learned posemb ~ normal(1/sqrt(D)); class token zeros; attention bias zeros.
    assert np.std(w["position_embedding/embedding"]) == pytest.approx(384**-0.5, rel=0.1)
    assert not w["class_token/token"].any()
    assert not w["encoder_block_0/attention/qkv/bias"].any()
    # Fused QKV: xavier of a (D, D) block, limit sqrt(6 / 2D).
    limit = np.sqrt(6 / (2 * 384))
    qkv = w["encoder_block_0/attention/qkv/kernel"]
    assert qkv.max() <= limit and qkv.max() > 0.95 * limit
    mlp_bias = w["encoder_block_0/mlp/dense_1/bias"]
    assert 0 < np.std(mlp_bias) < 1e-5
    # Every MLP bias draws its own values (one shared seeded initializer gave
    # them all the same ones, seeded at import rather than by the run's seed).
    assert not np.array_equal(mlp_bias[:384], w["encoder_block_0/mlp/dense_2/bias"])
    assert not np.array_equal(mlp_bias, w["encoder_block_1/mlp/dense_1/bias"])


def test_same_seed_same_weights():
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        model = kvs.ViT(**TINY, head_zero_init=False)
        weights.append([keras.ops.convert_to_numpy(v) for v in model.weights])
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dropout_only_in_training():
    model = kvs.ViT(**TINY, dropout_rate=0.5, head_zero_init=False)
    x = random_images(model.config)
    a = keras.ops.convert_to_numpy(model(x, training=False))
    b = keras.ops.convert_to_numpy(model(x, training=False))
    c = keras.ops.convert_to_numpy(model(x, training=True))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_mixed_bfloat16_policy():
    model = randomize(kvs.ViT(**TINY, pooling="map", dtype="mixed_bfloat16"))
    assert all(v.dtype == "float32" for v in model.weights)
    assert model.get_layer("encoder_block_0").compute_dtype == "bfloat16"
    x = random_images(model.config)
    y = model(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    ref = reference_forward(model, x)
    # bfloat16 has an 8-bit mantissa: agreement to a few percent of the scale.
    assert np.abs(keras.ops.convert_to_numpy(y) - ref).max() < 0.05 * np.abs(ref).max() + 0.05


def _one_train_step(remat):
    keras.utils.set_random_seed(1)
    model = randomize(kvs.ViT(**TINY, depth=2, remat=remat), seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = random_images(model.config, batch=4)
    y = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def test_remat_gives_the_same_training_step():
    plain, remat = _one_train_step(False), _one_train_step(True)
    for path in plain:
        np.testing.assert_allclose(remat[path], plain[path], atol=1e-5, err_msg=path)
    assert np.abs(plain["head/kernel"]).max() > 0  # the step did change weights


def test_keras_file_round_trip_safe_mode(tmp_path):
    model = randomize(kvs.ViT(**TINY, pooling="map", qk_norm=True))
    path = tmp_path / "vit.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, kvs.ViT) and loaded.config == model.config
    x = random_images(model.config)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


@pytest.mark.parametrize("shape,words", [
    ((32, 32, 3), ["rank 3", "images[None]"]),
    ((2, 3, 32, 32), ["channels-first"]),
    ((2, 48, 48, 3), ["(48, 48, 3)", "image_size=(48, 48)"]),
    ((2, 32, 32, 1), ["(32, 32, 1)"]),
])
def test_bad_images_at_call_time(shape, words):
    model = kvs.ViT(**TINY)
    with pytest.raises(ValueError) as err:
        model(np.zeros(shape, "float32"))
    for word in words:
        assert word in str(err.value)


def test_bad_images_at_predict_time_then_predict_still_works():
    # Keras's predict skips __call__; on JAX a failure inside it used to leave
    # the model's variables taken out, breaking every later predict.
    model = kvs.ViT(**TINY)
    good = np.zeros((2, 32, 32, 3), "float32")
    for predict in (lambda x: model.predict(x, verbose=0), model.predict_on_batch):
        with pytest.raises(ValueError, match=r"got \(48, 48, 3\).*image_size=\(48, 48\)"):
            predict(np.zeros((2, 48, 48, 3), "float32"))
        assert np.asarray(predict(good)).shape == (2, 5)
    expected = keras.ops.convert_to_numpy(model(good))
    np.testing.assert_allclose(model.predict(good, verbose=0), expected, atol=1e-5)


def test_builds_from_explicit_sizes_and_config():
    model = kvs.ViT(width=48, depth=2, mlp_dim=96, num_heads=3, patch_size=(4, 8),
                    image_size=(16, 32), num_classes=2)
    assert model.config.grid_size == (4, 4)
    again = kvs.ViT(config=model.config, num_classes=7)
    assert again.config.num_classes == 7 and again.config.width == 48
    with pytest.raises(ValueError, match="either variant= or config="):
        kvs.ViT(variant="mu/8", config=model.config)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="inspects XLA's compiled HLO")
@pytest.mark.parametrize("fields", [dict(), dict(block="parallel", qk_norm=True, pooling="map")])
def test_training_step_has_only_rank2_weight_gradient_dots(fields):
    # Projections are rank-2 matmuls (layers/dense.py): a dot contracting two
    # axes at once (batch, tokens) is a slow transposing copy in XLA's backward.
    import re

    hlo = compiled_gradient_hlo(kvs.ViT(**TINY, depth=2, **fields))
    contractions = re.findall(r"lhs_contracting_dims=\{([0-9,]*)\}", hlo)
    assert contractions, "no dot found: the check would pass vacuously"
    assert all("," not in dims for dims in contractions), sorted(set(contractions))
