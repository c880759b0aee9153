"""ViT.forward_intermediates against timm's, on the same weights.

timm (PyTorch, eval mode) is the outside judge: its `forward_intermediates`
(NCHW grids transposed to our NHWC) for the features, and its `forward_head`
applied to its final tokens for the final output. Parameters are redrawn at
random so that zero-initialised heads, biases and tokens hide nothing.
"""

import functools

import keras
import numpy as np
import pytest

# conftest imports timm before Keras (timm's import chain segfaults after TF's).
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from timm.models.vision_transformer import ParallelScalingBlock  # noqa: E402

import keras_vitscale as kvs  # noqa: E402
from keras_vitscale import convert, intermediates  # noqa: E402

from timm_models import images_for, small_timm as small_timm_2_blocks  # noqa: E402

TOL = 1e-4  # float32, max |difference|
DEPTH = 4


def small_timm(**kwargs):
    """Four blocks, so that indices such as -2 or [0, 2] pick inner blocks."""
    return small_timm_2_blocks(**{"depth": DEPTH, **kwargs})


# name -> timm VisionTransformer arguments; each model is converted once.
TIMM_MODELS = {
    # class token, token pooling, a non-square grid (4 x 3) to catch h/w swaps
    "tok": dict(img_size=(64, 48)),
    # average pooling with timm's fc_norm (our norm_position="after_pool")
    "avg_fc_norm": dict(global_pool="avg"),
    # SigLIP-style tower: MAP head, no class token, no classifier
    "map_siglip": dict(global_pool="map", class_token=False, num_classes=0),
    # ViT-22B-style parallel blocks with qk-norm
    "parallel": dict(block_fn=ParallelScalingBlock, qk_norm=True),
    # DINOv2-style: class + 4 register tokens, LayerScale, packed SwiGLU, a
    # position embedding over the patches only, features (no head)
    "dinov2_reg": dict(img_size=56, patch_size=14, reg_tokens=4, init_values=1e-5,
                       mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
                       no_embed_class=True, num_classes=0),
    # OpenCLIP-style tower: LayerNorm before the encoder, bias-free patch
    # embedding, eps 1e-5, the head a 32-d projection
    "clip_pre_norm": dict(pre_norm=True, num_classes=32,
                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)),
}


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for name, kwargs in TIMM_MODELS.items():
        source = small_timm(**kwargs)
        out[name] = (source, convert.from_timm(source))
    return out


def test_converted_models_have_the_options(pairs):
    # The parity tests below run through each option named in TIMM_MODELS.
    config = {name: model.config for name, (_, model) in pairs.items()}
    assert config["avg_fc_norm"].norm_position == "after_pool"
    assert config["map_siglip"].pooling == "map" and not config["map_siglip"].class_token
    assert config["parallel"].block == "parallel"
    dinov2 = config["dinov2_reg"]
    assert (dinov2.num_prefix_tokens, dinov2.mlp_type, dinov2.layer_scale) == (5, "swiglu", 1e-5)
    assert not dinov2.posemb_covers_class_token
    assert config["clip_pre_norm"].pre_norm and not config["clip_pre_norm"].patch_bias


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def timm_reference(source, images, pre_logits=False, **kwargs):
    """timm's (final, features) with the features channels last, as numpy."""
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    nchw = kwargs.get("output_fmt", "NHWC") == "NHWC"
    kwargs["output_fmt"] = "NCHW" if nchw else "NLC"

    def layout(y):
        y = y.numpy()
        return y.transpose(0, 2, 3, 1) if nchw and y.ndim == 4 else y

    with torch.no_grad():
        out = source.forward_intermediates(x, **kwargs)
        if kwargs.get("intermediates_only"):
            final, features = None, out
        else:
            final, features = out
            final = source.forward_head(final, pre_logits=pre_logits).numpy()
    features = [tuple(layout(t) for t in f) if isinstance(f, tuple) else layout(f)
                for f in features]
    return final, features


def assert_close(ours, theirs):
    ours = to_numpy(ours)
    assert ours.shape == theirs.shape
    diff = float(np.max(np.abs(ours - theirs)))
    # Some outputs (a MAP head's) are ~0.1, where TOL alone is loose: the
    # difference must also be tiny relative to the values.
    assert diff <= TOL and diff <= 1e-3 * float(np.max(np.abs(theirs)))


def assert_features_match(ours, theirs):
    assert isinstance(ours, list) and len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        if isinstance(reference, tuple):
            assert isinstance(mine, tuple) and len(mine) == len(reference)
            for a, b in zip(mine, reference):
                assert_close(a, b)
        else:
            assert not isinstance(mine, tuple)
            assert_close(mine, reference)


# Argument sets: each is run on every model, on ours and on timm's.
CASES = {
    "all_blocks": dict(),
    "last_n_norm": dict(indices=2, norm=True),
    "list_negative_nlc": dict(indices=[0, -1], output_fmt="NLC"),
    # unsorted, repeated (-4 is block 0): features come in block order, once each
    "unsorted_repeated_prefix": dict(indices=[2, -4, 2], return_prefix_tokens=True),
    "prefix_nlc_norm": dict(indices=[1], return_prefix_tokens=True, norm=True,
                            output_fmt="NLC"),
    "stop_early_only": dict(indices=[1], stop_early=True, intermediates_only=True),
    "stop_early_final": dict(indices=[0, 1], stop_early=True, norm=True),
    "pre_logits": dict(indices=1, pre_logits=True),
    "stop_early_pre_logits": dict(indices=[-3], stop_early=True, pre_logits=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_matches_timm(name, case, pairs):
    source, model = pairs[name]
    kwargs = CASES[case]
    images = images_for(model.config)
    final, features = timm_reference(source, images, **kwargs)
    out = model.forward_intermediates(images, **kwargs)
    if kwargs.get("intermediates_only"):
        assert_features_match(out, features)
        return
    ours_final, ours_features = out
    assert_close(ours_final, final)
    assert_features_match(ours_features, features)


def test_shapes_and_final_outputs(pairs):
    _, model = pairs["tok"]
    images = images_for(model.config)
    logits, grids = model.forward_intermediates(images, indices=[-1])
    assert [tuple(g.shape) for g in grids] == [(2, 4, 3, 64)]
    # The final output is the model's own output, and pre_logits what its head reads.
    np.testing.assert_allclose(to_numpy(logits), to_numpy(model(images)), atol=1e-6)
    pooled, _ = model.forward_intermediates(images, indices=[-1], pre_logits=True)
    head = model.get_layer("head")
    np.testing.assert_allclose(to_numpy(head(pooled)), to_numpy(logits), atol=1e-5)
    # With norm=True the last feature is the normalised patch tokens whose
    # class token the "tok" pooling reads.
    [(grid, prefix)] = model.forward_intermediates(
        images, indices=[-1], norm=True, return_prefix_tokens=True, intermediates_only=True)
    assert tuple(prefix.shape) == (2, 1, 64)
    np.testing.assert_allclose(to_numpy(prefix)[:, 0], to_numpy(pooled), atol=1e-5)


def test_fc_norm_model_leaves_tokens_unnormalised(pairs):
    # timm's fc_norm models have no token norm (their `norm` is Identity), so
    # norm=True is the same as norm=False, as there.
    _, model = pairs["avg_fc_norm"]
    images = images_for(model.config)
    plain = model.forward_intermediates(images, indices=1, intermediates_only=True)
    normed = model.forward_intermediates(images, indices=1, norm=True,
                                         intermediates_only=True)
    np.testing.assert_array_equal(to_numpy(plain[0]), to_numpy(normed[0]))


def test_stop_early_runs_no_later_block(pairs):
    _, model = pairs["tok"]

    def blocks_in(sub):
        names = {layer.name for layer in sub._flatten_layers(include_self=False)}
        return sorted(n for n in names if n.startswith("encoder_block_"))

    only = intermediates.intermediates_model(model, indices=[1], stop_early=True,
                                             intermediates_only=True)
    assert blocks_in(only) == ["encoder_block_0", "encoder_block_1"]
    with_final = intermediates.intermediates_model(model, indices=[1], stop_early=True)
    assert blocks_in(with_final) == ["encoder_block_0", "encoder_block_1"]
    # Without stop_early the final output needs every block.
    full = intermediates.intermediates_model(model, indices=[1], intermediates_only=False)
    assert blocks_in(full) == [f"encoder_block_{i}" for i in range(DEPTH)]


def test_sub_models_are_cached_and_leave_the_model_alone(pairs):
    _, model = pairs["avg_fc_norm"]
    images = images_for(model.config)
    before = to_numpy(model(images))
    weights = [v.path for v in model.weights]
    first = intermediates.intermediates_model(model, indices=[0, 3], output_fmt="NLC")
    # The same blocks by other spellings are the same sub-model.
    assert intermediates.intermediates_model(model, indices=[-1, 0, 0],
                                             output_fmt="NLC") is first
    assert intermediates.intermediates_model(model, indices=[0, 3]) is not first
    model.forward_intermediates(images, indices=[0, 1], stop_early=True)
    # The ViT's own graph and variables are unchanged; the sub-model shares them.
    assert [v.path for v in model.weights] == weights
    np.testing.assert_allclose(to_numpy(model(images)), before, atol=1e-6)
    assert {id(v) for v in first.weights} <= {id(v) for v in model.weights}


def test_sub_model_predicts_like_the_eager_call(pairs):
    # Compiled (predict: jit on JAX, tf.function on TF) and eager runs agree.
    _, model = pairs["map_siglip"]
    images = images_for(model.config)
    sub = intermediates.intermediates_model(model, indices=[0, -1], output_fmt="NLC")
    final, features = sub.predict(images, verbose=0)
    eager_final, eager_features = model.forward_intermediates(images, indices=[0, -1],
                                                              output_fmt="NLC")
    np.testing.assert_allclose(final, to_numpy(eager_final), atol=1e-5)
    for a, b in zip(features, eager_features):
        np.testing.assert_allclose(a, to_numpy(b), atol=1e-5)


def test_headless_model_without_prefix_tokens(pairs):
    # No class token: return_prefix_tokens changes nothing (as timm's), and the
    # final output of a model without a head is its pooled features.
    _, model = pairs["map_siglip"]
    images = images_for(model.config)
    final, features = model.forward_intermediates(images, indices=1, output_fmt="NLC",
                                                  return_prefix_tokens=True)
    assert tuple(features[0].shape) == (2, 16, 64)
    pooled, _ = model.forward_intermediates(images, indices=1, pre_logits=True)
    np.testing.assert_allclose(to_numpy(final), to_numpy(pooled), atol=1e-6)


def test_vanilla_model():
    # SimplEsT-ViT: no LayerNorm, gap pooling, so the model's output is the
    # mean of the last block's tokens, and stopped early, of the taken block's.
    # depth 7: TAT's activations need at least that many blocks to reach C_f(0) = 0.9.
    model = kvs.ViT(block="vanilla", pooling="gap", variant="mu", depth=7, patch_size=8,
                    image_size=(16, 24), num_classes=0)
    images = images_for(model.config)
    final, [grid] = model.forward_intermediates(images, indices=[1])
    assert tuple(grid.shape) == (2, 2, 3, 32)
    np.testing.assert_allclose(to_numpy(final), to_numpy(model(images)), atol=1e-6)
    early, [tokens] = model.forward_intermediates(images, indices=[1], stop_early=True,
                                                  output_fmt="NLC")
    np.testing.assert_allclose(to_numpy(early), to_numpy(tokens).mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(to_numpy(tokens).reshape(2, 2, 3, 32), to_numpy(grid),
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"norm=True .*'vanilla'.* norm=False"):
        model.forward_intermediates(images, norm=True)


def test_register_tokens_are_prefix_tokens():
    # [class, 4 registers, patches]: the 5 prefix tokens are split off, and a
    # gap model's output is the mean of the normalised last block's patches.
    model = kvs.ViT(variant="mu", depth=2, patch_size=8, image_size=(16, 24), num_classes=0,
                    pooling="gap", class_token=True, num_register_tokens=4)
    images = images_for(model.config)
    final, [(grid, prefix)] = model.forward_intermediates(
        images, indices=[-1], norm=True, return_prefix_tokens=True)
    assert tuple(grid.shape) == (2, 2, 3, 32) and tuple(prefix.shape) == (2, 5, 32)
    np.testing.assert_allclose(to_numpy(final), to_numpy(grid).mean(axis=(1, 2)), atol=1e-5)


# ---- indices and errors ------------------------------------------------------------
@pytest.mark.parametrize("indices", [None, 1, 3, 4, [0], [3, 0], [-1], [-4, 3, 1], (2, -2)])
def test_take_indices_matches_timm(indices):
    from timm.models._features import feature_take_indices

    theirs, _ = feature_take_indices(DEPTH, list(indices) if isinstance(indices, tuple)
                                     else indices)
    assert intermediates.take_indices(DEPTH, indices) == tuple(sorted(set(theirs)))


@pytest.mark.parametrize("indices, match", [
    (0, r"indices=0 .* 1 to 4"),
    (5, r"indices=5 .* the model has 4.* 1 to 4"),
    ([4], r"Block index 4 .* from -4 to 3"),
    ([1, -5], r"Block index -5 in indices=\[1, -5\] .* from -4 to 3"),
    ([], r"indices=\[\] selects no block"),
])
def test_bad_indices_are_refused(indices, match, pairs):
    _, model = pairs["tok"]
    with pytest.raises(ValueError, match=match):
        model.forward_intermediates(images_for(model.config), indices=indices)


@pytest.mark.parametrize("indices", [True, "2", [1.0], 2.5])
def test_indices_of_other_types_are_refused(indices):
    with pytest.raises(TypeError, match="indices"):
        intermediates.take_indices(DEPTH, indices)


def test_numpy_integers_are_indices():
    assert intermediates.take_indices(DEPTH, np.int64(2)) == (2, 3)
    assert intermediates.take_indices(DEPTH, np.array([0, -1])) == (0, 3)


def test_bad_arguments_are_refused(pairs):
    _, model = pairs["tok"]
    images = images_for(model.config)
    with pytest.raises(ValueError, match=r"'NCHW'.*channels-last.*NHWC.*\(0, 3, 1, 2\)"):
        model.forward_intermediates(images, output_fmt="NCHW")
    with pytest.raises(ValueError, match=r"output_fmt must be one of \['NHWC', 'NLC'\]"):
        model.forward_intermediates(images, output_fmt="nhwc")
    with pytest.raises(ValueError, match=r"pre_logits=True .* intermediates_only=True"):
        model.forward_intermediates(images, pre_logits=True, intermediates_only=True)
    # Images are checked as for the model's own call.
    with pytest.raises(ValueError, match=r"channels-first"):
        model.forward_intermediates(images.transpose(0, 3, 1, 2))
