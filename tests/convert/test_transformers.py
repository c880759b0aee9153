"""Hugging Face transformers ViT -> kvs.ViT: same logits and features, clear errors.

A tiny randomly initialised transformers model (eval mode) is the outside
judge. Its parameters are redrawn at random, since its zero biases and unit
LayerNorm scales could hide a wrong mapping.
"""

import json
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() == "tensorflow" and "triton" not in sys.modules:
    # transformers imports torch._dynamo -> triton, whose LLVM clashes with
    # TensorFlow's (already loaded by conftest) and segfaults; triton is
    # GPU-only and unused here.
    sys.modules["triton"] = None

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from keras_vitscale.convert import transformers as hf_convert  # noqa: E402

from timm_models import randomize as _randomize  # noqa: E402

TOL = 1e-4  # float32, max |logit difference|


def randomize(model, seed=0):
    return _randomize(model, seed, scale=0.05)


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, image_size=32, patch_size=8)


def classifier(num_labels=5, **kwargs):
    config = transformers.ViTConfig(**TINY, num_labels=num_labels, **kwargs)
    return randomize(transformers.ViTForImageClassification(config))


def images(batch=2, seed=0):
    size = TINY["image_size"]
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype("float32")


def ours(model, x):
    if keras.backend.backend() == "jax":
        # One XLA compile of the whole graph costs less than compiling every
        # op of an eager call.
        return keras.ops.convert_to_numpy(model.predict_on_batch(x))
    return keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(x), training=False))


def theirs(module, x):
    with torch.no_grad():
        return module(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ViTForImageClassification (tanh GELU) and its sharded save."""
    model = classifier(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    directory = tmp_path_factory.mktemp("hf_vit")
    # Small shards so that the sharded index is read too.
    model.save_pretrained(directory, max_shard_size="40KB")
    return model, directory


def test_saved_directory_and_model_object_match_transformers(saved):
    hf_model, directory = saved
    assert (directory / "model.safetensors.index.json").exists()
    x = images()
    model = hf_convert.from_transformers(str(directory))
    c = model.config
    assert (c.gelu, c.layer_norm_epsilon, c.num_classes) == ("tanh", 1e-6, 5)
    assert np.max(np.abs(ours(model, x) - theirs(hf_model, x).logits.numpy())) <= TOL
    # The live object names its weights differently (transformers 5); the
    # same config and identical weights give the same logits without a
    # second forward pass.
    from_object = hf_convert.from_transformers(hf_model)
    assert from_object.config == c
    for a, b in zip(model.weights, from_object.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    features = hf_convert.from_transformers(directory, num_classes=0)
    assert features.config.num_classes == 0
    assert not [w for w in features.weights if w.path.startswith("head/")]


def test_vit_model_features_with_and_without_pooler():
    hf_model = randomize(transformers.ViTModel(transformers.ViTConfig(**TINY)))
    x = images()
    out = theirs(hf_model, x)
    features = hf_convert.from_transformers(hf_model)  # pooler left out
    c = features.config
    assert (c.num_classes, c.representation_size, c.gelu, c.layer_norm_epsilon) == (
        0, None, "exact", 1e-12)
    assert np.max(np.abs(ours(features, x) - out.last_hidden_state[:, 0].numpy())) <= TOL
    pooled = hf_convert.from_transformers(hf_model, use_pooler=True)
    assert pooled.config.representation_size == TINY["hidden_size"]
    assert np.max(np.abs(ours(pooled, x) - out.pooler_output.numpy())) <= TOL


def test_wrong_variant_lists_the_mismatching_shapes(saved):
    _, directory = saved
    with pytest.raises(ValueError, match="shape mismatch") as info:
        hf_convert.from_transformers(directory, variant="Ti/8")
    message = str(info.value)
    assert ("embeddings.patch_embeddings.projection.weight (64, 3, 8, 8), "
            "needs (192, 3, 8, 8)") in message
    assert "encoder.layer.2" in message  # Ti has 12 layers; the checkpoint has 2


def test_unknown_keys_are_reported_not_dropped(tmp_path):
    hf_model = classifier()
    hf_model.save_pretrained(tmp_path)
    weights = safetensors_numpy.load_file(tmp_path / "model.safetensors")
    weights["vit.encoder.layer.0.layer_scale.lambda1"] = np.ones(64, "float32")
    safetensors_numpy.save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layer_scale.lambda1"):
        hf_convert.from_transformers(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ValueError, match="model_type 'deit'"):
        hf_convert.from_transformers(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    classifier().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hf_convert.from_transformers(tmp_path)


def test_bfloat16_safetensors_read_as_their_float32_values(tmp_path):
    hf_model = classifier().to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)  # numpy cannot hold bfloat16: read via torch
    hf_config, state = hf_convert.load_checkpoint(tmp_path)
    config = hf_convert.config_from_hf(hf_config, state)
    weights = hf_convert.convert_state(state, config)
    kernel = hf_model.vit.embeddings.patch_embeddings.projection.weight.float().detach().numpy()
    np.testing.assert_array_equal(weights["patch_embedding/kernel"], kernel.transpose(2, 3, 1, 0))
    assert all(w.dtype == np.float32 for w in weights.values())
