"""big_vision .npz -> kvs.ViT: same logits as timm's own npz loader, clear errors.

The checkpoints are written here from big_vision's names and shapes with
random values; timm's `_load_weights` (its reader for Google's ViT .npz
files) loads the same file into a timm model of matching settings, and that
model is the outside judge.
"""

import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() == "tensorflow" and "triton" not in sys.modules:
    # timm imports torchvision -> torch._dynamo -> triton, whose LLVM clashes
    # with TensorFlow's (already loaded by conftest) and segfaults; triton is
    # GPU-only and unused here.
    sys.modules["triton"] = None

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer, _load_weights  # noqa: E402

from keras_vitscale.convert import big_vision  # noqa: E402

TOL = 1e-4  # float32, max |logit difference|
# ViT-mu/8 (width 32, 2 heads, MLP 128) with two blocks on a 4x4 grid.
WIDTH, DEPTH, HEADS, MLP, PATCH, GRID, CLASSES = 32, 2, 2, 128, 8, 4, 5


def bv_params(rng, *, cls=True, map_head=False, scanned=False, original=False,
              pre_logits=False, classes=CLASSES):
    """A random big_vision ViT parameter dict, named and shaped as flax saves it.

    Args:
        original: the original ViT repository's names (posemb inside the
            Transformer, covering the class token; blocks LayerNorm_0,
            MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3).
    """
    d, dh = WIDTH, WIDTH // HEADS

    def w(*shape):
        return rng.normal(0.0, 0.1, shape).astype("float32")

    def norm():  # scales near 1 so that no LayerNorm shrinks the signal away
        return {"scale": 1.0 + w(d), "bias": w(d)}

    def dense(fan_in, fan_out):
        return {"kernel": w(fan_in, fan_out), "bias": w(fan_out)}

    def mha():
        out = {n: {"kernel": w(d, HEADS, dh), "bias": w(HEADS, dh)}
               for n in ("query", "key", "value")}
        out["out"] = {"kernel": w(HEADS, dh, d), "bias": w(d)}
        return out

    def mlp():
        return {"Dense_0": dense(d, MLP), "Dense_1": dense(MLP, d)}

    names = (("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
             if original else
             ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    tree = {"embedding": {"kernel": w(PATCH, PATCH, 3, d), "bias": w(d)},
            "Transformer": {"encoder_norm": norm()}}
    blocks = [dict(zip(names, (norm(), mha(), norm(), mlp()))) for _ in range(DEPTH)]
    if scanned:
        tree["Transformer"]["encoderblock"] = _stack(blocks)
    else:
        tree["Transformer"].update({f"encoderblock_{i}": b for i, b in enumerate(blocks)})
    posemb = w(1, GRID * GRID + (cls and original), d)
    if original:
        tree["Transformer"]["posembed_input"] = {"pos_embedding": posemb}
    else:
        tree["pos_embedding"] = posemb
    if cls:
        tree["cls"] = w(1, 1, d)
    if map_head:
        tree["MAPHead_0"] = {"probe": w(1, 1, d), "MultiHeadDotProductAttention_0": mha(),
                             "LayerNorm_0": norm(), "MlpBlock_0": mlp()}
    if pre_logits:
        tree["pre_logits"] = dense(d, d)
    if classes:
        tree["head"] = dense(d, classes)
    return dict(_flatten(tree))


def _stack(blocks):
    if isinstance(blocks[0], dict):
        return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
    return np.stack(blocks)


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def save(tmp_path, params, name="ckpt.npz"):
    """Writes `params` as big_vision's save_checkpoint does: np.savez of flat names."""
    path = tmp_path / name
    np.savez(path, **params)
    return str(path)


def timm_model(**kwargs):
    args = dict(img_size=PATCH * GRID, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                num_heads=HEADS, mlp_ratio=MLP / WIDTH, num_classes=CLASSES,
                act_layer="gelu_tanh", weight_init="skip")
    args.update(kwargs)
    return VisionTransformer(**args).eval()


def images(batch=2, seed=0):
    size = PATCH * GRID
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype("float32")


def ours(model, x):
    if keras.backend.backend() == "jax":
        # One XLA compile of the whole graph costs less than compiling every
        # op of an eager call.
        return keras.ops.convert_to_numpy(model.predict_on_batch(x))
    return keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(x), training=False))


def theirs(module, x, pre_logits=False):
    with torch.no_grad():
        t = torch.from_numpy(x.transpose(0, 3, 1, 2))
        if pre_logits:
            return module.forward_head(module.forward_features(t), pre_logits=True).numpy()
        return module(t).numpy()


def test_class_token_tower_of_a_two_tower_checkpoint_matches_timm(tmp_path, rng):
    params = bv_params(rng)
    # A SigLIP-like file: the image tower under params/img, other arrays beside it.
    path = save(tmp_path, {"params/img/" + k: v for k, v in params.items()}
                | {"params/txt/Embed_0/embedding": np.zeros((7, 3), "float32"),
                   "opt/0/mu/embedding/kernel": np.zeros(3, "float32")})
    model = big_vision.from_big_vision(path + ":params/img")
    c = model.config
    assert (c.width, c.depth, c.num_heads, c.mlp_dim, c.pooling, c.num_classes) == (
        WIDTH, DEPTH, HEADS, MLP, "tok", CLASSES)
    assert not c.posemb_covers_class_token and c.gelu == "tanh"
    reference = timm_model(class_token=True, no_embed_class=True, global_pool="token")
    _load_weights(reference, path, prefix="params/img/")
    x = images()
    assert np.max(np.abs(ours(model, x) - theirs(reference, x))) <= TOL


def test_scanned_map_head_checkpoint_matches_timm(tmp_path, rng):
    path = save(tmp_path, bv_params(rng, cls=False, map_head=True, scanned=True))
    model = big_vision.from_big_vision(path, variant="mu/8", depth=DEPTH)
    assert model.config.pooling == "map" and not model.config.class_token
    reference = timm_model(class_token=False, global_pool="map")
    _load_weights(reference, path)
    x = images()
    assert np.max(np.abs(ours(model, x) - theirs(reference, x))) <= TOL


def test_original_vit_layout_with_pre_logits(tmp_path, rng):
    params = bv_params(rng, original=True, pre_logits=True)
    path = save(tmp_path, params)
    model = big_vision.from_big_vision(path)
    c = model.config
    assert c.posemb_covers_class_token and c.representation_size == WIDTH
    # timm dropped the pre-logits layer, so it judges the features and the
    # tanh dense and head are applied here by hand.
    reference = timm_model(class_token=True, no_embed_class=False, num_classes=0)
    _load_weights(reference, path)
    x = images()
    features = theirs(reference, x, pre_logits=True)
    hidden = np.tanh(features @ params["pre_logits/kernel"] + params["pre_logits/bias"])
    expected = hidden @ params["head/kernel"] + params["head/bias"]
    assert np.max(np.abs(ours(model, x) - expected)) <= TOL


def test_bfloat16_npz_reads_as_its_float32_values(tmp_path, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    params = bv_params(rng)
    rounded = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    as_void = big_vision.load_npz(save(tmp_path, rounded, "void.npz"))  # np.savez -> |V2
    assert as_void["cls"].dtype.kind == "V"
    as_bits = big_vision.load_npz(save(tmp_path, {k: v.view(np.uint16) for k, v in rounded.items()},
                                       "bits.npz"))
    as_f32 = big_vision.load_npz(save(tmp_path, {k: v.astype("float32")
                                                 for k, v in rounded.items()}, "f32.npz"))
    config = big_vision.config_from_params(as_f32)
    want = big_vision.convert_params(as_f32, config)
    for got in (big_vision.convert_params(as_void, config),
                big_vision.convert_params(as_bits, config)):
        assert set(got) == set(want)
        for path in want:
            np.testing.assert_array_equal(got[path], want[path])


def test_inline_map_head_and_scanned_layouts_convert_like_per_layer(tmp_path, rng):
    params = bv_params(rng, cls=False, map_head=True)
    per_layer = big_vision.load_npz(save(tmp_path, params, "a.npz"))
    config = big_vision.config_from_params(per_layer)
    want = big_vision.convert_params(per_layer, config)
    # ViT-G development checkpoints kept the MAP head's modules at the top.
    inline = {k.replace("MAPHead_0/", ""): v for k, v in params.items()}
    # A scanned encoder: block arrays stacked on a leading depth axis.
    scanned = {k: v for k, v in params.items() if not k.startswith("Transformer/encoderblock_")}
    for k in [k for k in params if k.startswith("Transformer/encoderblock_0/")]:
        rest = k[len("Transformer/encoderblock_0/"):]
        scanned[f"Transformer/encoderblock/{rest}"] = np.stack(
            [params[f"Transformer/encoderblock_{i}/{rest}"] for i in range(DEPTH)])
    for other, name in ((inline, "b.npz"), (scanned, "c.npz")):
        got = big_vision.convert_params(big_vision.load_npz(save(tmp_path, other, name)), config)
        assert set(got) == set(want)
        for path in want:
            np.testing.assert_array_equal(got[path], want[path])


def test_wrong_variant_lists_the_mismatching_shapes(tmp_path, rng):
    path = save(tmp_path, bv_params(rng))
    with pytest.raises(ValueError, match="shape mismatch") as info:
        big_vision.from_big_vision(path, variant="S/8")
    message = str(info.value)
    assert "embedding/kernel (8, 8, 3, 32), needs (8, 8, 3, 384)" in message
    assert "pos_embedding (1, 16, 32), needs (1, 16, 384)" in message
    assert "encoderblock_2" in message  # S has 12 blocks; the file has 2


def test_unknown_keys_are_reported_not_dropped(tmp_path, rng):
    params = bv_params(rng)
    params["Transformer/encoderblock_0/LayerScale_0/scale"] = np.ones(WIDTH, "float32")
    with pytest.raises(ValueError, match="LayerScale_0/scale"):
        big_vision.from_big_vision(save(tmp_path, params))


def test_truncated_npz_is_a_clear_error(tmp_path, rng):
    path = tmp_path / "ckpt.npz"
    data = open(save(tmp_path, bv_params(rng)), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        big_vision.from_big_vision(str(path))


def test_missing_facts_name_the_fix(tmp_path, rng):
    params = bv_params(rng, cls=False)
    del params["pos_embedding"]  # big_vision's sincos2d posemb is not stored
    path = save(tmp_path, params)
    with pytest.raises(ValueError, match="image_size"):
        big_vision.from_big_vision(path)
    config = big_vision.config_from_params(big_vision.load_npz(path), image_size=32)
    assert config.posemb == "sincos2d" and config.pooling == "gap"
    # No model at the file's root: the error names the tower to choose.
    tower = {"params/img/" + k: v for k, v in params.items()}
    with pytest.raises(ValueError, match="params/img"):
        big_vision.from_big_vision(save(tmp_path, tower, "two.npz"))


def test_num_classes_drops_or_replaces_the_head(tmp_path, rng):
    path = save(tmp_path, bv_params(rng))
    features = big_vision.from_big_vision(path, num_classes=0)
    assert features.config.num_classes == 0
    assert not [w for w in features.weights if w.path.startswith("head/")]
    fresh = big_vision.from_big_vision(path, num_classes=7)
    kernel = [w for w in fresh.weights if w.path == "head/kernel"][0]
    assert kernel.shape == (WIDTH, 7)
    assert not np.any(keras.ops.convert_to_numpy(kernel))  # a fresh zero-initialised head
