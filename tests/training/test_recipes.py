"""Every recipe trains end to end, and builds what it promises."""

import json

import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale import optimizers
from keras_vitscale.training import RECIPES, train

TINY = dict(variant="mu", patch_size=4, image_size=16, batch_size=16, steps=4,
            log_every=2, checkpoint_every=4, eval_every=4, fewshot="none")


@pytest.mark.integration
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_and_builds_its_model(recipe, tmp_path):
    summary = train({"workdir": str(tmp_path), "recipe": recipe, **TINY}, progress=False,
                    log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    config = json.loads((tmp_path / "config.json").read_text())
    model = kvs.ViT.from_preset(str(tmp_path / "model"))
    names = [layer.name for layer in model.layers]
    if recipe == "scaling_vit":
        assert config["model"]["pooling"] == "map" and "map_head" in " ".join(names)
        # sigmoid loss: the head bias starts at -log(10) (the class prior)
        bias = model.get_layer("head").bias
        assert config["loss"] == "sigmoid" and bias is not None
        assert config["optimizer"] == "adafactor"
    if recipe == "tat":
        assert config["model"]["block"] == "vanilla" and config["label_smoothing"] == 0.1
        assert config["model"]["depth"] == 8  # TAT needs >= 7 blocks
    if recipe == "simplevit":
        assert config["augment"] == "randaugment:10,mixup:0.2"
        assert config["model"]["posemb"] == "sincos2d"


def test_scaling_vit_recipe_uses_scaling_adafactor_with_decoupled_head_decay():
    from keras_vitscale.training import resolve
    from keras_vitscale.training.trainer import build_optimizer, build_schedule

    config, _ = resolve({"recipe": "scaling_vit", "steps": 100})
    optimizer = build_optimizer(config, build_schedule(config))
    assert isinstance(optimizer, optimizers.ScalingAdafactor)
    config = optimizer.get_config()
    assert config["weight_decay"] == pytest.approx(0.03)
    # head decay 3.0 = body rate 0.03 x multiplier 100, on the head kernel only
    multipliers = config["weight_decay_multipliers"]
    assert multipliers["head/kernel"] * 0.03 == pytest.approx(3.0)
    assert list(multipliers) == ["head/kernel", ".*kernel"]
    assert config["global_clipnorm"] == pytest.approx(1.0)
