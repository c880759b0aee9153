"""The tool end to end: SIGKILL at a random step, rerun the same command,
and the run ends with the same weights as an uninterrupted one."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
# Inception crop, flips and dropout: every source of randomness is in play.
ARGS = ["--variant", "mu", "--patch-size", "4", "--image-size", "16", "--batch-size", "16",
        "--steps", str(STEPS), "--log-every", "1", "--checkpoint-every", "4",
        "--keep-checkpoints", "2", "--eval-every", "20", "--train-crop", "inception",
        "--flip", "--dropout", "0.1", "--fewshot", "none", "--no-progress", "--seed", "7"]


def _start(workdir):
    # PYTHONPATH: this checkout's keras_vitscale, as `python tools/...` from its root.
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "pretrain.py"),
                             "--workdir", str(workdir), *ARGS], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_step(workdir):
    try:
        lines = (workdir / "metrics.jsonl").read_text().strip().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def _final_state(workdir):
    """[(variable path, dtype, value)] of the final checkpoint."""
    ckpt = workdir / "checkpoints" / f"ckpt_{STEPS:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    with np.load(ckpt / "state.npz") as f:
        values = [f[f"v{i}"] for i in range(len(meta["paths"]))]
    return list(zip(meta["paths"], meta["dtypes"], values))


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _start(whole)  # runs alongside the killed one
    kill_at = random.Random().randint(6, STEPS - 8)
    victim = _start(killed)
    deadline = time.time() + 300
    while _logged_step(killed) < kill_at and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()[-2000:]
    reached = _logged_step(killed)
    assert kill_at <= reached < STEPS
    resumed = _start(killed)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "Resuming from" in out
    out_ref, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out_ref[-3000:]

    # The bound: every value of the final state (weights, optimizer
    # slots, step, RNG state) within 1e-6 of the uninterrupted run's. A wrong
    # data position, RNG state or optimizer state after the resume gives
    # differences of order 1e-2.
    for (path, _, a), (_, _, b) in zip(_final_state(whole), _final_state(killed), strict=True):
        assert a.shape == b.shape, path
        diff = float(np.max(np.abs(a.astype("float64") - b.astype("float64")), initial=0.0))
        assert diff <= 1e-6, f"{path}: max abs difference {diff:.3g} after the resume"
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows],
                               rtol=1e-6)
    # the rest of the outputs
    config = json.loads((whole / "config.json").read_text())
    assert config["steps"] == STEPS and config["model"]["width"] == 32
    assert {"step", "loss", "learning_rate", "images_per_s", "accuracy"} <= set(ref_rows[0])
    assert "val_accuracy" in ref_rows[19] and "val_accuracy" in ref_rows[-1]
    assert (whole / "curves.png").stat().st_size > 1000
    assert len(list((whole / "checkpoints").iterdir())) == 2  # keep 2
    import keras_vitscale as kvs

    model = kvs.ViT.from_preset(str(whole / "model"))
    assert model.config.num_classes == 6  # the default run's classes: digits 0-5
