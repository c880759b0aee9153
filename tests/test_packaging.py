"""The wheel: a non-editable install, run from elsewhere, has every preset."""

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECK = r"""
import json, math, sys
import keras_vitscale as kvs
from keras_vitscale import presets
assert "site" in kvs.__file__, kvs.__file__
where = presets.builtin_dir()
assert where.name == "builtin" and "site" in str(where), where
names = sorted(kvs.ViT.presets)
built = []
for name in names:
    cfg = presets.builtin_config(name)
    assert cfg.count_params() == kvs.ViT.presets[name]["metadata"]["params"], name
    if cfg.count_params() < 100e6:
        model = kvs.ViT.from_preset(name, load_weights=False)
        assert model.count_params() == cfg.count_params()
    elif cfg.replace(depth=1).count_params() < 200e6:
        # Too large for a CI machine: build a one-block slice, full width.
        model = kvs.ViT(config=cfg.replace(depth=1))
        assert model.count_params() == cfg.replace(depth=1).count_params()
    else:  # ViT-22B: even one block is 0.45B parameters; shapes only.
        assert cfg.replace(depth=1).count_params() < cfg.count_params()
    built.append(name)
# The class names ship as package data.
assert len(kvs.imagenet_labels("imagenet-21k")) == 21843
assert kvs.imagenet_labels("imagenet-1k")[0][0] == "n01440764"
print(json.dumps(built))
"""


@pytest.mark.integration  # packaging is backend-independent: checked once
def test_wheel_ships_presets_and_builds_them(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheel_dir), str(REPO)], check=True)
    wheels = list(wheel_dir.glob("keras_vitscale-*.whl"))
    assert len(wheels) == 1
    # Every tool is a console script pointing at an existing cli module's main.
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = configparser.ConfigParser()
        scripts.read_string(wheel.read(entry_points).decode())
    tools = sorted(p.stem for p in (REPO / "tools").glob("*.py"))
    assert sorted(scripts["console_scripts"]) == sorted(
        f"kvs-{t.replace('_', '-')}" for t in tools)
    for script, target in scripts["console_scripts"].items():
        module, function = target.split(":")
        assert function == "main" and module == f"keras_vitscale.cli.{script[4:].replace('-', '_')}"
        assert module.replace(".", "/") + ".py" in names, target
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheels[0])], check=True)
    # The JSON files sit beside the presets package's modules, not over them.
    package = site / "keras_vitscale" / "presets"
    shipped = sorted(p.name for p in (package / "builtin").glob("*.json"))
    assert shipped == sorted(p.name for p in (REPO / "presets").glob("*.json"))
    assert (package / "__init__.py").exists() and (package / "registry.py").exists()
    assert not list(package.glob("*.json"))
    env = {**os.environ, "PYTHONPATH": str(site), "KERAS_BACKEND": "jax"}
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    built = out.stdout.strip().splitlines()[-1]
    for name in ["vit_ti16", "vit_g14", "vit_bigG14", "vit_22b14"]:
        assert name in built
