"""kvs-fewshot (keras_vitscale/cli/fewshot.py) on a saved preset: the table equals the library's result."""

import re

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale import data
from keras_vitscale.cli import fewshot

# Orchestration (training runs, tools): run once, on JAX.
pytestmark = pytest.mark.integration


def _tool():
    return fewshot


def test_tool_prints_the_library_result(tmp_path, capsys):
    model = kvs.ViT(variant="mu/8", image_size=16, num_classes=10, head_zero_init=False)
    model.save_to_preset(tmp_path / "preset")
    assert _tool().main(["--preset", str(tmp_path / "preset"), "--shots", "1,3",
                         "--seeds", "2"]) == 0
    table = capsys.readouterr().out

    # The same evaluation by hand: pre-logits features of both digits splits.
    source = data.load_source("digits", image_size=(16, 16))
    features = keras.Model(model.inputs, model.get_layer("head").input)
    splits = [data.eval_dataset(source, 256, (16, 16), one_hot=False, split=split)
              for split in (source.train, source.held_out)]
    (x_train, y_train), (x_test, y_test) = [
        kvs.evaluation.extract_features(features, ds, progress=False) for ds in splits]
    want = kvs.evaluation.fewshot(x_train, y_train, x_test, y_test, shots=(1, 3), seeds=2)
    # Table rows: "shot mean std ..."; progress bars share stdout.
    rows = {int(shot): float(mean) for shot, mean in
            re.findall(r"^\s*(\d+)\s+([01]\.\d+)\s", table.replace("\r", "\n"), re.M)}
    assert sorted(rows) == [1, 3]
    for shot in (1, 3):
        mean = np.mean([want.accuracy[(shot, seed)] for seed in range(2)])
        assert abs(rows[shot] - mean) < 1e-4
    # Random features of 10 digit classes are far from perfect but above chance.
    assert 0.1 < rows[3] < 0.99


def test_missing_workdir_and_zero_shots_are_bad_settings(tmp_path, capsys):
    assert _tool().main(["--workdir", str(tmp_path / "nowhere")]) == 2
    assert "has no final model" in capsys.readouterr().err
    model = kvs.ViT(variant="mu/8", image_size=16, num_classes=10)
    model.save_to_preset(tmp_path / "preset")
    assert _tool().main(["--preset", str(tmp_path / "preset"), "--shots", "0"]) == 2
    assert "--shots [0]" in capsys.readouterr().err
    assert _tool().main(["--preset", str(tmp_path / "preset"), "--shots", "1,x"]) == 2


def test_workdir_default_is_its_downstream_source(tmp_path, capsys):
    # A kvs-pretrain workdir records --fewshot-dataset; without --dataset the
    # tool evaluates there (the default run's digits 6-9), and says so.
    model = kvs.ViT(variant="mu/8", image_size=16, num_classes=6, head_zero_init=False)
    model.save_to_preset(tmp_path / "model")
    (tmp_path / "config.json").write_text('{"fewshot_dataset": "digits:6-9"}')
    assert _tool().main(["--workdir", str(tmp_path), "--shots", "1", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "few-shot on digits:6-9:" in out
    assert _tool().main(["--workdir", str(tmp_path), "--shots", "1", "--seeds", "1",
                         "--dataset", "digits:0,1"]) == 0
    assert "few-shot on digits:0,1:" in capsys.readouterr().out
    assert _tool().main(["--workdir", str(tmp_path), "--dataset", "digits:7-11"]) == 2
    assert "'7-11' is not within the digits 0-9" in capsys.readouterr().err
