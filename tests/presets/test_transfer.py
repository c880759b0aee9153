"""Weight transfer: another resolution (resampled) or head size (fresh)."""

import logging

import keras
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import keras_vitscale as kvs
from keras_vitscale.layers.embedding import resample_grid
from conftest import random_images
from test_model import randomize
from test_directory import _saved


@pytest.mark.parametrize("method", ["linear", "bicubic"])
def test_new_resolution_resamples_posemb(tmp_path, caplog, method):
    model, directory = _saved(tmp_path)
    with caplog.at_level(logging.WARNING, logger="keras_vitscale"):
        bigger = kvs.ViT.from_preset(directory, image_size=48, resample=method)
    assert any("Resampled the position embedding" in r.message for r in caplog.records)
    old = keras.ops.convert_to_numpy(model.get_layer("position_embedding").embedding)
    new = keras.ops.convert_to_numpy(bigger.get_layer("position_embedding").embedding)
    assert new.shape == (1, 36, 32)
    grid = old[0].reshape(4, 4, 32)
    if method == "linear":  # big_vision: scipy zoom, order 1
        want = scipy.ndimage.zoom(grid, (1.5, 1.5, 1), order=1)
    else:  # timm: torch bicubic with antialiasing
        t = torch.tensor(grid).permute(2, 0, 1)[None]
        want = F.interpolate(t, size=(6, 6), mode="bicubic", antialias=True,
                             align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(new[0], want.reshape(36, 32), atol=1e-5)
    # Every other weight is carried over unchanged.
    same = keras.ops.convert_to_numpy(bigger.get_layer("head").kernel)
    np.testing.assert_array_equal(same, keras.ops.convert_to_numpy(model.get_layer("head").kernel))
    assert bigger(random_images(bigger.config)).shape == (2, 4)


def test_load_weights_file_at_other_resolution(tmp_path):
    model = randomize(kvs.ViT(variant="mu/8", image_size=32, num_classes=4,
                              posemb_covers_class_token=True))
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    bigger = kvs.ViT(variant="mu/8", image_size=64, num_classes=4,
                     posemb_covers_class_token=True)
    bigger.load_weights(path)
    new = keras.ops.convert_to_numpy(bigger.get_layer("position_embedding").embedding)
    old = keras.ops.convert_to_numpy(model.get_layer("position_embedding").embedding)
    np.testing.assert_array_equal(new[:, :1], old[:, :1])  # class token's row kept
    np.testing.assert_allclose(new, resample_grid(old, (4, 4), (8, 8)), atol=1e-6)


def test_new_head_size_gets_fresh_head(tmp_path):
    model, directory = _saved(tmp_path)
    other = kvs.ViT.from_preset(directory, num_classes=7)
    assert not keras.ops.convert_to_numpy(other.get_layer("head").kernel).any()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(other.get_layer("encoder_norm").gamma),
        keras.ops.convert_to_numpy(model.get_layer("encoder_norm").gamma))


