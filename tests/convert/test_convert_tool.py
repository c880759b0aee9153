"""kvs-convert (keras_vitscale/cli/convert.py) end to end, in-process: timm, big_vision, transformers, --push, errors.

The sources are the tiny random checkpoints of test_timm.py,
test_big_vision.py and test_transformers.py; the tool's printed difference
is checked, and the written preset is judged again here against the source
framework.
"""

import json
import re
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

if keras.backend.backend() == "tensorflow" and "triton" not in sys.modules:
    # As in test_big_vision.py: triton after TensorFlow segfaults; GPU-only.
    sys.modules["triton"] = None

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.integration  # the tool's orchestration: once, on JAX

# The loopback Hub and its fixture live beside test_hub.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))

from timm.models.vision_transformer import _load_weights  # noqa: E402

import keras_vitscale as kvs  # noqa: E402
from keras_vitscale.convert import timm_layout  # noqa: E402
from test_big_vision import bv_params, save, theirs, timm_model  # noqa: E402
from hub_server import server  # noqa: E402, F401  (pytest fixture: HF_ENDPOINT -> HubServer)
from test_timm import CUSTOM, run, small_timm  # noqa: E402
from test_transformers import TINY, classifier, randomize  # noqa: E402

TOL = 1e-4  # float32, max |logit difference|
DIFFERENCE = re.compile(r"max \|(logit|feature) difference\| vs [^:]+: (\S+)")


def load_tool():
    from keras_vitscale.cli import convert as convert_tool

    return convert_tool


def run_tool(capsys, *argv):
    """(printed difference kind, value) after running kvs-convert in-process."""
    load_tool().main([str(a) for a in argv])
    out = capsys.readouterr().out
    match = DIFFERENCE.search(out)
    assert match, out
    return match.group(1), float(match.group(2))


def images(size, batch=2):
    return np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype("float32")


def test_timm_state_dict_to_checked_preset(tmp_path, capsys):
    from safetensors.torch import save_file

    tool = load_tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0 and "--pretrained" in capsys.readouterr().out

    source = small_timm(**CUSTOM["map"][0])
    checkpoint = tmp_path / "tiny_map.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(checkpoint))
    tool.main(["--from", "timm", str(checkpoint), "--num-heads", "4",
               "--to", str(tmp_path / "preset")])
    out = capsys.readouterr().out
    assert "random weights" not in out
    diff = float(out.split("max |logit difference| vs timm: ")[1].split()[0])
    assert diff <= TOL
    model = kvs.ViT.from_preset(str(tmp_path / "preset"))
    assert model.config.pooling == "map" and model.config.num_heads == 4
    # The preset holds the timm weights (the tool checked the logits above).
    expected = timm_layout.convert_state_dict(source.state_dict(), model.config)
    for variable in model.weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable),
                                      expected[variable.path], err_msg=variable.path)


def test_timm_name_without_pretrained_says_random_weights(tmp_path, capsys):
    # A model name alone is timm's random initialisation, not a checkpoint:
    # the tool says so where it copies, and the preset's metadata records it.
    load_tool().main(["--from", "timm", "vit_tiny_patch16_224", "--verify-batch", "1",
                      "--to", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert ("Copying weights from timm:vit_tiny_patch16_224: random weights (pass "
            "--pretrained for the checkpoint)") in out
    assert float(DIFFERENCE.search(out).group(2)) <= TOL
    metadata = json.loads((tmp_path / "p" / "metadata.json").read_text())
    assert "random" in json.dumps(metadata)


@pytest.fixture(scope="module")
def tower_npz(tmp_path_factory):
    """A SigLIP-like file: the ViT under params/img, another tower beside it."""
    params = bv_params(np.random.default_rng(0))
    extra = {"params/txt/Embed_0/embedding": np.zeros((7, 3), "float32")}
    path = save(tmp_path_factory.mktemp("bv"),
                {"params/img/" + k: v for k, v in params.items()} | extra)
    reference = timm_model(class_token=True, no_embed_class=True, global_pool="token")
    _load_weights(reference, path, prefix="params/img/")
    return path + ":params/img", reference


def test_big_vision_subtree_to_checked_preset(tower_npz, tmp_path, capsys):
    source, reference = tower_npz
    kind, diff = run_tool(capsys, "--from", "big_vision", source, "--image-size", 32,
                          "--to", tmp_path / "preset")
    assert kind == "logit" and diff <= TOL
    model = kvs.ViT.from_preset(str(tmp_path / "preset"))
    x = images(32)
    assert np.max(np.abs(run(model, x) - theirs(reference, x))) <= TOL


def test_big_vision_without_a_timm_equivalent_says_why_unchecked(tmp_path, capsys):
    # A pre-logits layer: timm's VisionTransformer has none, so no check.
    path = save(tmp_path, bv_params(np.random.default_rng(0), pre_logits=True))
    load_tool().main(["--from", "big_vision", path, "--to", str(tmp_path / "preset")])
    out = capsys.readouterr().out
    assert "skipped: timm's VisionTransformer cannot express" in out
    assert "representation_size 32" in out and not DIFFERENCE.search(out)


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    model = classifier()
    directory = tmp_path_factory.mktemp("hf_cls")
    model.save_pretrained(directory)
    return model, directory


def test_transformers_directory_to_checked_preset(hf_classifier, tmp_path, capsys):
    hf_model, directory = hf_classifier
    kind, diff = run_tool(capsys, "--from", "transformers", directory, "--to", tmp_path / "p")
    assert kind == "logit" and diff <= TOL
    model = kvs.ViT.from_preset(str(tmp_path / "p"))
    x = images(TINY["image_size"])
    with torch.no_grad():
        expected = hf_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits
    assert np.max(np.abs(run(model, x) - expected.numpy())) <= TOL


def test_transformers_pooler_features_are_checked(tmp_path, capsys):
    hf_model = randomize(transformers.ViTModel(transformers.ViTConfig(**TINY)))
    hf_model.save_pretrained(tmp_path / "hf")
    kind, diff = run_tool(capsys, "--from", "transformers", tmp_path / "hf", "--use-pooler",
                          "--to", tmp_path / "p")
    assert kind == "feature" and diff <= TOL
    assert kvs.ViT.from_preset(str(tmp_path / "p")).config.representation_size == 64


def test_push_uploads_the_preset(server, tower_npz, tmp_path, capsys):
    source, _ = tower_npz
    kind, diff = run_tool(capsys, "--from", "big_vision", source, "--num-classes", 0,
                          "--to", tmp_path / "preset", "--push", "org/bv-tower")
    assert kind == "feature" and diff <= TOL
    assert {"config.json", "model.weights.h5"} <= set(server.files("org/bv-tower"))
    x = images(32)
    local = run(kvs.ViT.from_preset(str(tmp_path / "preset")), x)
    np.testing.assert_array_equal(run(kvs.ViT.from_preset("hf://org/bv-tower"), x), local)


def test_bad_format_source_and_options_are_errors(tower_npz, hf_classifier, tmp_path, capsys):
    tool = load_tool()
    with pytest.raises(SystemExit) as info:
        tool.main(["--from", "onnx", "model.onnx", "--to", str(tmp_path / "p")])
    assert info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        tool.main(["--from", "big_vision", "x.npz", "--use-pooler", "--to", str(tmp_path)])
    assert "--use-pooler applies to --from transformers" in capsys.readouterr().err
    cases = [
        (["big_vision", str(tmp_path / "missing.npz")], "No .npz checkpoint at"),
        (["big_vision", tower_npz[0] + "x"], "has no ViT under 'params/imgx'"),
        (["big_vision", tower_npz[0], "--variant", "S/8"], "shape mismatch"),
        (["transformers", str(tmp_path / "nowhere")], "No transformers checkpoint directory"),
        (["transformers", str(hf_classifier[1]), "--use-pooler"], "has no pooler"),
    ]
    for args, message in cases:
        assert tool.main(["--from", *args, "--to", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
