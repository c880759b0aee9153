"""ImagePreprocessor against timm's eval transform (PIL) on real photos."""

import keras
import numpy as np
import pytest
import timm
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import create_transform, resolve_data_config

from keras_vitscale.preprocessing import ImagePreprocessor, resized_size, resize_matrix
from keras_vitscale.presets import registry

BILINEAR = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# timm's own pretrained configs (part of timm's code: nothing downloads).
CONFIGS = {
    "imagenet": "vit_base_patch16_224.augreg2_in21k_ft_in1k",  # 224, 0.9, mean/std 0.5
    "clip": "vit_giant_patch14_clip_224.laion2b",               # 1.0, OpenAI mean/std
    "dinov2": "vit_giant_patch14_reg4_dinov2.lvd142m",          # 518, ImageNet mean/std
    "siglip_squash": "vit_so400m_patch14_siglip_378.webli_ft_in1k",
    "bilinear": BILINEAR,
    # Beyond the presets: PIL's other filters, timm's border mode, a non-square crop.
    "nearest": {**BILINEAR, "interpolation": "nearest"},
    "lanczos": {**BILINEAR, "interpolation": "lanczos", "crop_pct": 0.95},
    "box": {**BILINEAR, "interpolation": "box", "crop_pct": 0.95},
    "hamming": {**BILINEAR, "interpolation": "hamming", "crop_pct": 0.95},
    "border": {**BILINEAR, "interpolation": "bicubic", "crop_mode": "border", "crop_pct": 0.9},
    "rectangle": {**BILINEAR, "interpolation": "bicubic", "input_size": (3, 200, 256)},
}


def timm_config(key):
    config = CONFIGS[key]
    return timm.models.get_pretrained_cfg(config).to_dict() if isinstance(config, str) else config


def timm_eval(image, config):
    """timm's eval transform on a PIL image, as (H, W, 3) numpy."""
    transform = create_transform(**resolve_data_config(pretrained_cfg=config))
    return transform(Image.fromarray(image)).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photos():
    return np.stack(load_sample_images().images)  # china, flower: (2, 427, 640, 3) uint8


def numpy_out(x):
    return keras.ops.convert_to_numpy(x)


def assert_close_to_timm(ours, reference):
    assert ours.shape == reference.shape
    diff = np.abs(ours - reference)
    assert diff.mean() <= 0.005 and diff.max() <= 0.1, (diff.mean(), diff.max())
    # Stronger than the bound: PIL's uint8 arithmetic is reproduced, so all but
    # a few pixels on a rounding boundary are equal.
    assert np.mean(diff < 1e-4) > 0.999, np.mean(diff < 1e-4)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_batch_matches_timm_eval_transform(photos, key):
    config = timm_config(key)
    out = numpy_out(ImagePreprocessor.from_config_dict(config)(photos))
    height, width = config["input_size"][1:]
    assert out.shape == (2, height, width, 3) and out.dtype == np.float32
    for image, ours in zip(photos, out):
        assert_close_to_timm(ours, timm_eval(image, config))


@pytest.mark.parametrize("key", ["imagenet", "siglip_squash", "border", "rectangle"])
@pytest.mark.parametrize("crop", [(slice(0, 300), slice(100, 250)),   # portrait
                                  (slice(5, 40), slice(7, 30))],      # 35x23: upsampled
                         ids=["portrait", "tiny"])
def test_single_image_of_other_sizes_matches_timm(photos, key, crop):
    config = timm_config(key)
    image = np.ascontiguousarray(photos[0][crop])
    ours = numpy_out(ImagePreprocessor.from_config_dict(config)(image))
    assert ours.shape == (*config["input_size"][1:], 3)
    assert_close_to_timm(ours, timm_eval(image, config))


def test_single_image_equals_its_batch_entry(photos):
    prep = ImagePreprocessor(image_size=224, crop_pct=0.9)
    np.testing.assert_array_equal(numpy_out(prep(photos[1])), numpy_out(prep(photos))[1])


def pil_float_eval(image, config):
    """timm's resize and crop on PIL float ("F") images, one per channel."""
    transform = create_transform(**resolve_data_config(pretrained_cfg=config))
    resize_and_crop = transform.transforms[:-2]  # without ToTensor and Normalize
    channels = []
    for c in range(3):
        channel = Image.fromarray(image[..., c].astype(np.float32), mode="F")
        for step in resize_and_crop:
            channel = step(channel)
        channels.append(np.asarray(channel))
    return (np.stack(channels, -1) / 255 - np.asarray(config["mean"])) / np.asarray(config["std"])


@pytest.mark.parametrize("key", ["imagenet", "dinov2", "bilinear"])
def test_float_images_are_resized_without_rounding_like_pil_float_images(photos, key):
    config = timm_config(key)
    image = photos[0].astype(np.float32)
    reference = pil_float_eval(image, config)
    ours = numpy_out(ImagePreprocessor.from_config_dict(config)(image))
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    # input_scale=1.0: the same image on the 0..1 scale gives the same output.
    unit = ImagePreprocessor.from_config_dict(config, input_scale=1.0)(image / 255.0)
    np.testing.assert_allclose(numpy_out(unit), ours, atol=1e-5)
    # Without the uint8 rounding, still close to timm on the uint8 photo.
    diff = np.abs(ours - timm_eval(photos[0], config))
    assert diff.mean() <= 0.01, diff.mean()


def test_grayscale_is_repeated_to_rgb_like_pil(photos):
    gray = np.asarray(Image.fromarray(photos[1]).convert("L"))
    config = timm_config("imagenet")
    reference = timm_eval(np.asarray(Image.fromarray(gray).convert("RGB")), config)
    ours = numpy_out(ImagePreprocessor.from_config_dict(config)(gray[..., None]))
    assert_close_to_timm(ours, reference)


def test_resize_weights_follow_pil_geometry():
    # Each output pixel is a weighted average: weights sum to one.
    for method in ("bicubic", "bilinear", "lanczos", "box", "hamming", "nearest"):
        for n_in, n_out in [(640, 371), (23, 224), (10, 10)]:
            matrix = resize_matrix(n_in, n_out, method)
            np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(resize_matrix(10, 10, "bicubic"), np.eye(10))
    # torchvision's shorter-side rule truncates the longer side; timm's
    # ResizeKeepRatio (non-square crops) rounds it.
    assert resized_size(427, 640, (224, 224), 0.9, "center") == (248, 371)
    assert resized_size(640, 427, (224, 224), 0.9, "center") == (371, 248)
    assert resized_size(427, 640, (378, 378), 1.0, "squash") == (378, 378)
    assert resized_size(427, 640, (224, 224), 1.0, "border") == (149, 224)


def test_from_config_dict_takes_timms_defaults_and_ignores_other_keys():
    prep = ImagePreprocessor.from_config_dict({"num_classes": 1000, "hf_hub_id": "timm/x"})
    defaults = resolve_data_config(pretrained_cfg={"num_classes": 1000})
    assert prep.image_size == defaults["input_size"][1:]
    assert (prep.crop_pct, prep.crop_mode, prep.interpolation) == (
        defaults["crop_pct"], defaults["crop_mode"], defaults["interpolation"])
    assert prep.mean == defaults["mean"] and prep.std == defaults["std"]


def test_config_round_trip_and_model_with_fixed_input(photos):
    prep = ImagePreprocessor(image_size=(96, 128), crop_pct=0.9, crop_mode="squash",
                             interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(prep))
    assert again.get_config() == prep.get_config()
    eager = numpy_out(prep(photos))
    # Inside a model: traced and compiled (jit, tf.function) by predict.
    inputs = keras.Input((427, 640, 3), dtype="uint8")
    model = keras.Model(inputs, again(inputs))
    assert model.output_shape == (None, 96, 128, 3)
    np.testing.assert_allclose(model.predict(photos, verbose=0), eager, atol=1e-5)
    # A model for any image size: the weights follow each batch's size.
    inputs = keras.Input((None, None, 3), dtype="uint8")
    model = keras.Model(inputs, prep(inputs))
    assert model.output_shape == (None, 96, 128, 3)
    np.testing.assert_allclose(model.predict(photos, verbose=0), eager, atol=1e-5)
    portrait = photos[:, :400, 100:300]
    np.testing.assert_allclose(model.predict(portrait, verbose=0), numpy_out(prep(portrait)),
                               atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.data maps run on the TensorFlow backend")
def test_inside_a_tf_data_map_with_known_and_unknown_sizes(photos):
    import tensorflow as tf

    prep = ImagePreprocessor(image_size=224, crop_pct=0.9, interpolation="bicubic")
    eager = [numpy_out(prep(photos[0])), numpy_out(prep(photos[1][:300, :200]))]
    known = tf.data.Dataset.from_tensor_slices(photos).map(prep).batch(2)
    np.testing.assert_allclose(next(iter(known)).numpy()[0], eager[0], atol=1e-5)
    # Decoded JPEGs have no static size: the weights come from tf.numpy_function.
    images = [photos[0], photos[1][:300, :200]]
    unknown = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec((None, None, 3), tf.uint8))
    for ours, expected in zip(unknown.map(prep), eager):
        assert ours.shape == (224, 224, 3)
        np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)
    floats = unknown.map(lambda image: prep(tf.cast(image, tf.float32)))
    for ours, image in zip(floats, images):
        expected = numpy_out(prep(image.astype(np.float32)))
        np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("shape, words", [
    ((427, 640), ["(427, 640)", "image[..., None]"]),
    ((1, 1, 20, 20, 3), ["rank 5", "(B, H, W, C)"]),
    ((20, 20, 4), ["4 channels", "image[..., :3]"]),
    ((3, 20, 20), ["20 channels", "channels go last"]),
])
def test_bad_images_are_refused_naming_the_value_and_the_fix(shape, words):
    with pytest.raises(ValueError) as error:
        ImagePreprocessor()(np.zeros(shape, np.uint8))
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"crop_mode": "random"}, ["'random'", "squash"]),
    ({"interpolation": "area"}, ["'area'", "bicubic"]),
    ({"crop_pct": 0}, ["crop_pct=0", "0.875"]),
    ({"image_size": (224, 224, 3)}, ["(224, 224, 3)", "(height, width)"]),
    ({"mean": (0.5,)}, ["(0.5,)", "three values"]),
    ({"input_scale": 2.0}, ["input_scale=2.0", "1.0"]),
])
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError) as error:
        ImagePreprocessor(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_channels_first_timm_input_size_is_required():
    with pytest.raises(ValueError, match=r"\(224, 224, 3\).*\[3, height, width\]"):
        ImagePreprocessor.from_config_dict({"input_size": (224, 224, 3)})


def test_every_builtin_tags_preprocessing_is_supported_and_is_timms():
    for name in sorted(registry.REGISTRY):
        for entry in registry.tags(name):
            facts = entry["preprocessing"]
            prep = ImagePreprocessor.from_config_dict(facts)
            assert prep.image_size == tuple(facts["input_size"][1:])
            # The facts give the layer timm's pretrained config of the source gives.
            timm_cfg = timm.models.get_pretrained_cfg(entry["source"].removeprefix("timm/"))
            from_timm = ImagePreprocessor.from_config_dict(timm_cfg.to_dict(), name=prep.name)
            assert from_timm.get_config() == prep.get_config(), entry["source"]


# from_preset on built-in handles: their recorded facts, nothing downloads.
@pytest.mark.parametrize("handle, source", [
    ("vit_b16", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    ("vit_so400m14_siglip_378.webli_ft_in1k", "vit_so400m_patch14_siglip_378.webli_ft_in1k"),
    ("vit_g14_dinov2_reg4.lvd142m", "vit_giant_patch14_reg4_dinov2.lvd142m"),
])
def test_from_preset_matches_timm_on_the_source_checkpoints_config(photos, handle, source):
    config = timm.models.get_pretrained_cfg(source).to_dict()
    ours = numpy_out(ImagePreprocessor.from_preset(handle)(photos[0]))
    assert_close_to_timm(ours, timm_eval(photos[0], config))


def test_from_preset_without_recorded_preprocessing_says_what_to_do():
    with pytest.raises(ValueError, match=r"'vit_e14'.*ImagePreprocessor\(image_size="):
        ImagePreprocessor.from_preset("vit_e14")
