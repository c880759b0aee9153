"""The converters' shared helpers: named shape checks, variant fields, grid inference."""

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale.convert import common

CONFIG = kvs.ViTConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                       image_size=16, num_classes=3)


def zero_weights(config):
    return {p: np.zeros(s, "float32") for p, s in config.parameter_shapes().items()}


def test_assign_weights_copies_and_names_a_wrong_shape():
    model = kvs.ViT(config=CONFIG)
    weights = zero_weights(CONFIG)
    weights["head/bias"] = np.full((3,), 2.0, "float32")
    common.assign_weights(model, weights)
    bias = [v for v in model.weights if v.path == "head/bias"][0]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bias), [2.0, 2.0, 2.0])
    weights["encoder_block_0/mlp/dense_1/kernel"] = np.zeros((64, 32), "float32")
    with pytest.raises(ValueError, match=r"encoder_block_0/mlp/dense_1/kernel \(64, 32\), "
                                         r"the variable is \(32, 64\)"):
        common.assign_weights(model, weights)
    del weights["encoder_block_0/mlp/dense_1/kernel"]
    with pytest.raises(RuntimeError, match="encoder_block_0/mlp/dense_1/kernel"):
        common.assign_weights(model, weights)


def test_build_model_keeps_drops_or_replaces_the_head():
    def weights_for(config, drop_head):
        weights = zero_weights(config)
        return {p: w for p, w in weights.items() if not (drop_head and p.startswith("head/"))}

    kept = common.build_model(kvs.ViT, CONFIG, None, weights_for, source_name="test")
    assert kept.config.num_classes == 3
    features = common.build_model(kvs.ViT, CONFIG, 0, weights_for, source_name="test")
    assert not [v for v in features.weights if v.path.startswith("head/")]
    assert common.build_model(kvs.ViT, CONFIG, 7, weights_for, source_name="test").config.num_classes == 7


def test_variant_fields_fix_the_shape_only():
    fields = common.variant_fields("B/16")
    assert fields == {"width": 768, "depth": 12, "mlp_dim": 3072, "num_heads": 12,
                      "patch_size": (16, 16), "variant": "B/16"}
    assert "patch_size" not in common.variant_fields("B")


def test_infer_grid_reads_a_class_token_position():
    assert common.infer_grid(197, True, (16, 16)) == ((224, 224), True)
    assert common.infer_grid(196, True, (16, 16)) == ((224, 224), False)
    with pytest.raises(ValueError, match="pass image_size="):
        common.infer_grid(31, False, (8, 16))


def test_the_loader_side_of_convert_never_reaches_the_model():
    # The pretrained-weights loader, which model.py imports, uses these three;
    # an import of model.py anywhere below them (even inside a function)
    # would be a cycle. Transitive, so a new helper module cannot hide one.
    from test_import_graph import import_graph

    graph = import_graph()
    roots = ["keras_vitscale.convert.timm_layout", "keras_vitscale.convert.common",
             "keras_vitscale.convert.files"]
    reached, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert set(roots) <= reached
    assert not reached & {"keras_vitscale.model", "keras_vitscale.hub",
                          "keras_vitscale.convert.timm"}, sorted(reached)
