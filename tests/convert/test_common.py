"""The converters' shared helpers: named shape checks, variant fields, grid inference."""

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale.convert import common, shape_inference

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
    fresh = common.build_model(kvs.ViT, CONFIG, 7, weights_for, source_name="test")
    assert fresh.config.num_classes == 7


def test_variant_fields_fix_the_shape_only():
    fields = shape_inference.variant_fields("B/16")
    assert fields == {"width": 768, "depth": 12, "mlp_dim": 3072, "num_heads": 12,
                      "patch_size": (16, 16), "variant": "B/16"}
    assert "patch_size" not in shape_inference.variant_fields("B")


def test_infer_grid_reads_a_class_token_position():
    assert shape_inference.infer_grid(197, True, (16, 16)) == ((224, 224), True)
    assert shape_inference.infer_grid(196, True, (16, 16)) == ((224, 224), False)
    with pytest.raises(ValueError, match="pass image_size="):
        shape_inference.infer_grid(31, False, (8, 16))
    # DINOv2 with 4 registers: the class token and registers own no position.
    assert shape_inference.infer_grid(1369, 5, (14, 14)) == ((518, 518), False)
    assert shape_inference.infer_grid(201, 5, (16, 16)) == ((224, 224), True)


def test_the_loader_side_of_convert_never_reaches_the_model():
    # The pretrained-weights loader, which model.py imports, uses these three;
    # an import of model.py anywhere below them (even inside a function)
    # would be a cycle. Transitive, so a new helper module cannot hide one.
    from test_import_graph import import_graph

    graph = import_graph()
    roots = [f"keras_vitscale.convert.{m}" for m in (
        "timm_layout", "timm_hub_config", "common", "files", "safetensors_reader",
        "open_clip_layout", "shape_inference")]
    reached, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert set(roots) <= reached
    assert not reached & {"keras_vitscale.model", "keras_vitscale.hub",
                          "keras_vitscale.convert.timm"}, sorted(reached)


class CountingSource(common.collections.abc.Mapping):
    """A mapping's values as fresh float64 copies, one per lookup, counting
    how many earlier ones are still alive at each lookup.

    float64, so that whoever takes one converts it: JAX on CPU may keep a
    float32 numpy array as a variable's own buffer, which is the model's
    memory, not an array held over.
    """

    def __init__(self, inner):
        self.inner, self.alive, self.most_alive, self.lookups = inner, [], 0, 0
        self.shapes = common.shapes_of(inner)

    def __getitem__(self, key):
        import weakref

        self.alive = [ref for ref in self.alive if ref() is not None]
        self.most_alive = max(self.most_alive, len(self.alive))
        array = np.array(self.inner[key], dtype="float64")
        self.lookups += 1
        self.alive.append(weakref.ref(array))
        return array

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def test_conversion_holds_one_tensor_at_a_time(rng):
    # Source keys are our paths; kernels stored transposed, as torch does.
    shapes = CONFIG.parameter_shapes()
    arrays = {p: rng.standard_normal(s[::-1] if p.endswith("/kernel") else s)
              for p, s in shapes.items()}
    source = CountingSource(arrays)
    recipe = lambda path, shape: common.Source(  # noqa: E731
        (path,), (shape[::-1] if path.endswith("/kernel") else shape,),
        (lambda w: w.T) if path.endswith("/kernel") else (lambda w: w))
    weights = common.gather_weights(CONFIG, source, recipe, source_name="test")
    assert isinstance(weights, common.ConvertedWeights) and source.lookups == 0
    assert weights.nbytes == 4 * CONFIG.count_params()
    converted = CountingSource(weights)  # what assign_weights is handed, counted
    model = kvs.ViT(config=CONFIG)
    common.assign_weights(model, converted, verbose=True)
    # Each source tensor read once, and neither it nor its converted array
    # outlives its own assignment.
    assert source.lookups == converted.lookups == len(shapes)
    assert source.most_alive == converted.most_alive == 0
    for variable in model.weights:
        want = arrays[variable.path].astype("float32")
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable),
                                      want.T if variable.path.endswith("/kernel") else want)
