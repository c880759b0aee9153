"""Real weights: timm checkpoints on a loopback Hub, loaded by preset handle or hf://.

The loopback Hub (`hub_server.HubServer`) serves repos in exactly timm's
layout, written by timm itself (`timm.models.save_for_hf`: config.json with
`architecture` and `pretrained_cfg`, model.safetensors), under the real repo
ids. ViT-Ti/16 is served at full size, so `kvs.ViT.from_preset("vit_ti16")`
runs exactly as it does against the real Hub; the other families (OpenCLIP,
SigLIP, DINOv2 with registers) are served at small depth and loaded by
`hf://timm/<name>.<tag>`. timm's own forward pass judges every conversion.
"""

import errno
import json
import os

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import keras_vitscale as kvs  # noqa: E402
from keras_vitscale.pretrained import cache  # noqa: E402
from hub_server import server  # noqa: E402, F401 (the loopback Hub fixture)
from timm_models import randomize, timm_outputs  # noqa: E402

TI16_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def timm_files(model, tmp_path):
    """{file name: bytes} of a timm model saved as timm publishes it on the Hub."""
    from timm.models import save_for_hf

    directory = tmp_path / f"timm_{id(model)}"
    save_for_hf(model, str(directory), safe_serialization=True)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def random_timm(name, seed=0, **kwargs):
    """timm's model `name` with random weights everywhere (zero-initialised ones too)."""
    return randomize(timm.create_model(name, pretrained=False, **kwargs), seed)


def images_at(size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def ti16_repo(tmp_path_factory):
    """Full-size ViT-Ti/16 (5.7M parameters) in timm's layout, with its pretrained_cfg."""
    model = random_timm("vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    files = timm_files(model, tmp_path_factory.mktemp("ti16"))
    return model, files


def test_builtin_preset_downloads_converts_and_caches(server, ti16_repo):
    timm_model, files = ti16_repo
    commit = server.add_repo(TI16_REPO, files)
    images = images_at(224)
    model = kvs.ViT.from_preset("vit_ti16")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)),
                               timm_outputs(timm_model, images), atol=1e-4, rtol=0)
    entry = cache.entry_dir(TI16_REPO, commit)
    meta = json.loads((entry / "metadata.json").read_text())
    assert meta["source"] == f"hf://{TI16_REPO}" and meta["source_commit"] == commit
    assert meta["tag"] == "augreg_in21k_ft_in1k" and meta["preprocessing"]["crop_pct"] == 0.9
    assert len(server.requested("model.safetensors")) >= 1
    weight_requests = len(server.requested("model.safetensors"))

    # The second load reads the cache: no weights requested, no conversion.
    again = kvs.ViT.from_preset("vit_ti16.augreg_in21k_ft_in1k", num_classes=5)
    assert len(server.requested("model.safetensors")) == weight_requests
    assert again.config.num_classes == 5 and again.config.gelu == "exact"
    np.testing.assert_array_equal(again.get_layer("patch_embedding").kernel.numpy(),
                                  model.get_layer("patch_embedding").kernel.numpy())


def test_offline_load_uses_the_cache_and_explains_when_empty(server, ti16_repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"offline mode.*hf download"):
        kvs.ViT.from_preset("vit_ti16")
    assert not any(cache.cache_dir().glob("*/*/metadata.json"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server.add_repo(TI16_REPO, ti16_repo[1])
    kvs.ViT.from_preset("vit_ti16")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(server.requests)
    model = kvs.ViT.from_preset("vit_ti16")
    assert len(server.requests) == before and model.config.width == 192


def test_revision_pins_the_source_commit(server, ti16_repo, tmp_path):
    first = server.add_repo(TI16_REPO, ti16_repo[1])
    other = random_timm("vit_tiny_patch16_224.augreg_in21k_ft_in1k", seed=1)
    server.add_repo(TI16_REPO, timm_files(other, tmp_path))
    images = images_at(224)
    pinned = kvs.ViT.from_preset(f"vit_ti16@{first}")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pinned(images)),
                               timm_outputs(ti16_repo[0], images), atol=1e-4, rtol=0)
    latest = kvs.ViT.from_preset("vit_ti16")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(latest(images)),
                               timm_outputs(other, images), atol=1e-4, rtol=0)


# ---- families at small depth, by hf://timm/<name>.<tag> --------------------------
FAMILIES = {
    # OpenCLIP tower: LayerNorm before the encoder, bias-free patch embedding and
    # projection, eps 1e-5.
    "clip": ("vit_giant_patch14_clip_224.laion2b",
             dict(depth=2, embed_dim=64, num_heads=4, img_size=28, num_classes=16), 28),
    # SigLIP: MAP head, no class token.
    "siglip": ("vit_so400m_patch14_siglip_224.webli",
               dict(depth=2, embed_dim=64, num_heads=4, img_size=28, mlp_ratio=3.0), 28),
    "siglip_classifier": ("vit_so400m_patch14_siglip_378.webli_ft_in1k",
                          dict(depth=2, embed_dim=64, num_heads=4, img_size=42, mlp_ratio=3.0,
                               num_classes=10), 42),
    # DINOv2 with registers: LayerScale, packed SwiGLU, posemb without prefix tokens.
    "dinov2": ("vit_giant_patch14_reg4_dinov2.lvd142m",
               dict(depth=2, embed_dim=48, num_heads=2, img_size=28), 28),
    # AugReg classifier with the 21k head's layout (small).
    "augreg": ("vit_base_patch16_224.augreg_in21k",
               dict(depth=2, embed_dim=48, num_heads=3, img_size=32, num_classes=21), 32),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_timm_families_load_by_hf_handle(server, family, tmp_path):
    name, kwargs, size = FAMILIES[family]
    timm_model = random_timm(name, **kwargs)
    server.add_repo(f"timm/{name}", timm_files(timm_model, tmp_path))
    model = kvs.ViT.from_preset(f"hf://timm/{name}")
    images = images_at(size)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)),
                               timm_outputs(timm_model, images), atol=1e-4, rtol=0)
    meta = json.loads((next(cache.repo_dir(f"timm/{name}").iterdir()) / "metadata.json")
                      .read_text())
    assert meta["timm_architecture"] == name.split(".")[0]


# ---- bad input: clear errors, nothing partial left in the cache --------------------
def _nothing_cached():
    return not any(cache.cache_dir().glob("*/*/metadata.json")) and \
        not any(p for p in cache.cache_dir().glob("*/.*"))


def test_unknown_tag_lists_the_tags():
    with pytest.raises(ValueError, match=r"no tag 'in1k'.*vit_b16\.augreg2_in21k_ft_in1k.*"
                                         r"vit_b16\.augreg_in21k"):
        kvs.ViT.from_preset("vit_b16.in1k")
    with pytest.raises(ValueError, match=r"no published checkpoint"):
        kvs.ViT.from_preset("vit_g14.laion2b")


def test_checkpoint_of_another_shape_is_refused_before_the_weights_download(server, tmp_path):
    small = random_timm("vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=3)
    server.add_repo(TI16_REPO, timm_files(small, tmp_path))
    with pytest.raises(ValueError, match=r"vit_ti16.*patch_embed\.proj\.weight|blocks\.2"):
        kvs.ViT.from_preset("vit_ti16")
    full_gets = [r for r in server.requested("model.safetensors") if r[0] == "GET"]
    # Only the header's ranged request reached the weights file.
    assert len(full_gets) <= 2 and not list(cache.cache_dir().glob("*/*/model.weights.h5"))
    hf_cache = list((tmp_path / "hf_home").rglob("model.safetensors"))
    assert not hf_cache


def test_unsupported_architecture_is_refused_naming_the_feature(server, tmp_path):
    deit = random_timm("deit_tiny_distilled_patch16_224", depth=2, embed_dim=48, num_heads=3)
    server.add_repo("timm/deit_tiny_distilled_patch16_224.fb_in1k", timm_files(deit, tmp_path))
    with pytest.raises(ValueError, match=r"distillation token"):
        kvs.ViT.from_preset("hf://timm/deit_tiny_distilled_patch16_224.fb_in1k")
    assert not list((tmp_path / "hf_home").rglob("model.safetensors"))


def test_truncated_download_names_the_file_and_keeps_nothing(server, ti16_repo):
    server.add_repo(TI16_REPO, ti16_repo[1])
    server.truncate["model.safetensors"] = 100_000
    with pytest.raises(OSError, match=r"model\.safetensors"):
        kvs.ViT.from_preset("vit_ti16")
    assert _nothing_cached()


def test_corrupt_checkpoint_names_the_file(server, ti16_repo):
    files = dict(ti16_repo[1])
    files["model.safetensors"] = files["model.safetensors"][:-1000]  # the repo's file is cut
    server.add_repo(TI16_REPO, files)
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        kvs.ViT.from_preset("vit_ti16")
    assert _nothing_cached()


def test_full_disk_while_writing_the_cache_leaves_nothing(server, ti16_repo, monkeypatch):
    server.add_repo(TI16_REPO, ti16_repo[1])

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kvs.ViT, "save_weights", no_space)
    with pytest.raises(OSError, match=r"No space left.*KVS_CACHE"):
        kvs.ViT.from_preset("vit_ti16")
    assert _nothing_cached()


def test_preset_without_weights_still_builds_fresh(server):
    model = kvs.ViT.from_preset("vit_g14", num_classes=3, image_size=28, depth=1)
    assert model.config.num_classes == 3 and not server.requests


def test_offline_load_needs_only_the_converted_cache(server, ti16_repo, tmp_path, monkeypatch):
    import shutil

    server.add_repo(TI16_REPO, ti16_repo[1])
    first = kvs.ViT.from_preset("vit_ti16")
    shutil.rmtree(tmp_path / "hf_home")  # the Hugging Face cache is gone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(server.requests)
    again = kvs.ViT.from_preset("vit_ti16")
    assert len(server.requests) == before
    np.testing.assert_array_equal(again.get_layer("head").kernel.numpy(),
                                  first.get_layer("head").kernel.numpy())


NO_TORCH = r"""
import sys

class NoTorch:  # any import of torch (or timm, which needs it) fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoTorch())
import keras_vitscale as kvs
first = kvs.ViT.from_preset("vit_ti16")       # download + conversion from safetensors
again = kvs.ViT.from_preset("vit_ti16")       # the cached preset
assert "torch" not in sys.modules
print("WIDTH", again.config.width)
"""


@pytest.mark.integration
def test_safetensors_conversion_and_cached_loads_need_no_torch(server, ti16_repo):
    import subprocess
    import sys

    server.add_repo(TI16_REPO, ti16_repo[1])
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WIDTH 192" in out.stdout


@pytest.mark.integration
def test_pretrain_tool_starts_from_a_timm_repo(server, tmp_path):
    from keras_vitscale.cli import pretrain

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    timm_model = random_timm(name, depth=1, embed_dim=32, num_heads=2, img_size=16,
                             patch_size=4, num_classes=4)
    server.add_repo(f"timm/{name}", timm_files(timm_model, tmp_path))
    workdir = tmp_path / "run"
    assert pretrain.main(["--preset", f"hf://timm/{name}", "--workdir", str(workdir),
                          "--image-size", "16", "--batch-size", "8", "--steps", "1",
                          "--lr", "0", "--log-every", "1", "--checkpoint-every", "1",
                          "--eval-every", "1", "--fewshot", "none", "--dataset", "synthetic",
                          "--num-classes", "4", "--no-progress"]) == 0
    # Learning rate 0: the trained model still computes what timm's does.
    trained = kvs.ViT.from_preset(str(workdir / "model"))
    images = images_at(16)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(trained(images)),
                               timm_outputs(timm_model, images), atol=1e-4, rtol=0)
