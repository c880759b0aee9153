"""kvs.hub against the real huggingface_hub client and a loopback test Hub.

Every test points the client at `hub_server.HubServer` (HF_ENDPOINT) with a
temporary HF_HOME and a test token, so nothing reaches huggingface.co or the
user's cache or login.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_vitscale as kvs
from keras_vitscale import hub
from hub_server import TOKEN, server  # noqa: F401 (the loopback Hub fixture)

ROOT = Path(__file__).resolve().parents[2]


def _tiny_model(seed):
    model = kvs.ViT(variant="mu/8", image_size=16, num_classes=3)
    rng = np.random.default_rng(seed)
    # Random values everywhere (the head starts at zero), so equal outputs
    # mean every variable made the trip.
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype(variable.dtype))
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model with random weights, its preset directory and reference outputs."""
    model = _tiny_model(1)
    directory = tmp_path_factory.mktemp("preset") / "vit_mu8"
    model.save_to_preset(directory)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    return model, directory, images, _outputs(model, images)


def _outputs(model, images):
    # A plain call: predict() would compile a new function for every model.
    return keras.ops.convert_to_numpy(model(images))


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).iterdir())}


def _workdir(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(
        {"recipe": "default", "optimizer": "adam", "steps": 10, "model": {"width": 8}}))
    (path / "metrics.jsonl").write_text(
        '{"step": 5, "train/loss": 1.25}\n'
        '{"step": 10, "train/loss": 0.5, "val/accuracy": 0.75}\n'
        '{"step": 1')  # a run killed mid-write
    return path


def test_push_then_load_round_trip(server, source, tmp_path):
    model, _, images, expected = source
    workdir = _workdir(tmp_path / "run")
    hub.push_to_hub(model, "org/vit-mu8", workdir=workdir, safetensors=True)

    repo = server.repos["org/vit-mu8"]
    assert len(repo.commits) == 2  # the repo's initial commit, then exactly one push
    files = server.files("org/vit-mu8")
    assert {"config.json", "metadata.json", "model.weights.h5", "README.md",
            "model.safetensors"} <= set(files)
    card = files["README.md"].decode()
    front = card.split("---")[1]
    assert "library_name: keras-vitscale" in front
    assert "pipeline_tag: image-classification" in front
    for tag in ("vision-transformer", "keras", "keras-vitscale"):
        assert f"- {tag}" in front
    assert "license: apache-2.0" in front
    assert f"{model.config.count_params():,}" in card
    assert "| optimizer | adam |" in card and "| val/accuracy | 0.75 | 10 |" in card
    assert "| train/loss | 0.5 | 10 |" in card
    assert 'kvs.ViT.from_preset("hf://org/vit-mu8")' in card

    from safetensors.numpy import load

    flat = load(files["model.safetensors"])
    assert sorted(flat) == sorted(v.path for v in model.weights)
    for variable in model.weights:
        np.testing.assert_array_equal(flat[variable.path], np.asarray(variable.numpy()))

    server.requests.clear()
    loaded = kvs.ViT.from_preset("hf://org/vit-mu8")
    np.testing.assert_allclose(_outputs(loaded, images), expected, rtol=0, atol=1e-6)
    # Downloads land in the test's HF_HOME and skip what the loader never reads.
    cached = list((tmp_path / "hf_home" / "hub").rglob("model.weights.h5"))
    assert len(cached) == 1
    assert not server.requested("README.md")
    assert not server.requested("model.safetensors")


def test_revision_branch_and_stale_shards(server, source, tmp_path):
    model, directory, images, expected = source
    # First push: sharded weights on main.
    other = _tiny_model(2)
    hub.push_to_hub(other, "org/vit", max_shard_size_gb=3e-5)  # 30 kB of 77 kB
    assert "model.weights.json" in server.files("org/vit")
    # Second push: one unsharded file. The shards must go, or the loader
    # (which prefers model.weights.json) would read the old weights.
    hub.push_to_hub(directory, "org/vit", commit_message="single file")
    main_files = set(server.files("org/vit"))
    assert "model.weights.json" not in main_files
    assert not [name for name in main_files if name.startswith("model_")]
    np.testing.assert_allclose(_outputs(kvs.ViT.from_preset("hf://org/vit"), images),
                               expected, rtol=0, atol=1e-6)
    # A branch holds its own version; main is untouched by it.
    hub.push_to_hub(other, "org/vit", revision="v2")
    on_branch = kvs.ViT.from_preset("hf://org/vit@v2")
    np.testing.assert_allclose(_outputs(on_branch, images), _outputs(other, images),
                               rtol=0, atol=1e-6)
    assert set(server.files("org/vit")) == main_files
    assert "hf://org/vit@v2" in server.files("org/vit", "v2")["README.md"].decode()


def test_server_error_mid_upload_names_repo_and_keeps_preset(server, source):
    _, directory, _, _ = source
    before = _digests(directory)
    server.fail.add("commit")
    with pytest.raises(RuntimeError, match="'org/broken'") as info:
        hub.push_to_hub(directory, "org/broken")
    assert "500" in str(info.value)
    assert server.requested("/commit/main")  # it failed at the commit, not before
    assert len(server.repos["org/broken"].commits) == 1  # nothing committed
    assert _digests(directory) == before


def _preset_files(directory, config_text):
    files = {p.name: p.read_bytes() for p in Path(directory).iterdir()}
    files["config.json"] = config_text.encode()
    return files


@pytest.mark.parametrize("config_text, error", [
    ("{not json", "not valid JSON"),
    ('{"module": "keras_vitscale", "class_name": "ViT", "config": {"widht": 8}}',
     "widht"),
])
def test_malformed_config_rejected_before_weights(server, source, config_text, error):
    _, directory, _, _ = source
    server.add_repo("org/bad", _preset_files(directory, config_text))
    with pytest.raises(ValueError, match=error):
        kvs.ViT.from_preset("hf://org/bad")
    assert server.requested("/resolve/main/config.json")
    assert not server.requested("weights")  # neither the file nor its HEAD
    assert not server.requested("/tree/")


def test_foreign_class_is_refused_never_imported(server, source, tmp_path, monkeypatch):
    _, directory, _, _ = source
    marker = tmp_path / "imported"
    (tmp_path / "kvs_hub_canary.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"module": "kvs_hub_canary", "class_name": "Evil",
              "config": json.loads((directory / "config.json").read_text())["config"]}
    server.add_repo("org/evil", _preset_files(directory, json.dumps(config)))
    with pytest.raises(ValueError, match="kvs_hub_canary.Evil"):
        kvs.ViT.from_preset("hf://org/evil")
    assert not marker.exists() and "kvs_hub_canary" not in sys.modules
    assert not server.requested("weights")


def test_offline_uses_cache_and_explains_uncached(server, source, monkeypatch):
    _, directory, images, expected = source
    hub.push_to_hub(directory, "org/cached")
    kvs.ViT.from_preset("hf://org/cached")  # fills the cache
    server.add_repo("org/uncached", {"config.json": b"{}"})
    server.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = kvs.ViT.from_preset("hf://org/cached")
    np.testing.assert_allclose(_outputs(loaded, images), expected, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError) as info:
        kvs.ViT.from_preset("hf://org/uncached")
    message = str(info.value)
    assert "not cached" in message and "does not exist" not in message
    assert "hf download org/uncached" in message and "online" in message
    assert server.requests == []  # offline means no request at all


def test_missing_and_private_repos_name_the_repo(server, source, monkeypatch):
    _, directory, _, _ = source
    with pytest.raises(FileNotFoundError, match=r"'org/missing' does not exist.*HTTP 404"):
        kvs.ViT.from_preset("hf://org/missing")
    server.add_repo("org/secret", _preset_files(
        directory, (directory / "config.json").read_text()), private=True)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    with pytest.raises(FileNotFoundError, match=r"'org/secret'.*HTTP 401.*HF_TOKEN"):
        kvs.ViT.from_preset("hf://org/secret")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(FileNotFoundError, match=r"'org/secret' has no revision 'v9'"):
        kvs.ViT.from_preset("hf://org/secret@v9")


@pytest.mark.parametrize("handle", ["hf://org", "hf://org/repo/extra", "hf://org/repo@",
                                    "hf:///repo", "hf://org/re po"])
def test_bad_handles_are_refused_with_the_format(handle):
    with pytest.raises(ValueError, match=r"hf://org/repo@revision"):
        kvs.ViT.from_preset(handle)


def test_bad_repo_id_is_refused_before_any_request(server, source):
    _, directory, _, _ = source
    with pytest.raises(ValueError, match="'org/repo'"):
        hub.push_to_hub(directory, "just-a-name")
    assert server.requests == []


def test_safetensors_from_a_directory_needs_the_model(server, source):
    model, directory, _, _ = source
    with pytest.raises(ValueError, match="pass model=kvs.ViT.from_preset"):
        hub.push_to_hub(directory, "org/flat", safetensors=True)
    assert server.requests == []  # refused before any request
    hub.push_to_hub(directory, "org/flat", safetensors=True, model=model)
    files = server.files("org/flat")
    from safetensors.numpy import load

    assert sorted(load(files["model.safetensors"])) == sorted(v.path for v in model.weights)
    # The directory's own files go up as they are (no re-save).
    assert files["metadata.json"] == (directory / "metadata.json").read_bytes()


def test_resolve_directory_takes_local_paths_and_hub_handles(server, source):
    _, directory, _, _ = source
    assert hub.resolve_directory(str(directory)) == directory
    hub.push_to_hub(directory, "org/resolved")
    local = hub.resolve_directory("hf://org/resolved")
    assert (local / "config.json").read_bytes() == (directory / "config.json").read_bytes()


def test_model_card_for_a_feature_extractor(source):
    model, _, _, _ = source
    card = hub.model_card(model.config.replace(num_classes=0), "org/features",
                          license="cc-by-4.0")
    front = card.split("---")[1]
    assert "pipeline_tag: image-feature-extraction" in front
    assert "license: cc-by-4.0" in front
    assert "## Results" not in card  # no workdir, no invented results


def _tool():
    from keras_vitscale.cli import push_to_hub

    return push_to_hub


@pytest.mark.integration  # the hub tool: run once, on JAX
def test_cli_pushes_a_workdir(server, source, tmp_path, capsys):
    _, directory, images, expected = source
    workdir = _workdir(tmp_path / "run")
    # A workdir: the run's config.json and metrics.jsonl plus one exported preset.
    for path in directory.iterdir():
        (workdir / "final").mkdir(exist_ok=True)
        (workdir / "final" / path.name).write_bytes(path.read_bytes())
    assert _tool().main([str(workdir), "org/cli", "--revision", "dev", "--message",
                         "from the CLI", "--safetensors"]) == 0
    assert "org/cli" in capsys.readouterr().out
    files = server.files("org/cli", "dev")
    assert "model.safetensors" in files
    assert "| val/accuracy | 0.75 | 10 |" in files["README.md"].decode()
    assert server.repos["org/cli"].refs["main"] != server.repos["org/cli"].refs["dev"]
    np.testing.assert_allclose(_outputs(kvs.ViT.from_preset("hf://org/cli@dev"), images),
                               expected, rtol=0, atol=1e-6)


@pytest.mark.integration  # the hub tool: run once, on JAX
def test_cli_help():
    # PYTHONPATH: this checkout's keras_vitscale, as `python tools/...` from its root.
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "push_to_hub.py"), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0
    for flag in ("PRESET_DIR_OR_WORKDIR", "ORG/REPO", "--private", "--revision",
                 "--message", "--safetensors"):
        assert flag in result.stdout
