"""The model card (README.md) of a preset published on the Hugging Face Hub.

YAML front matter for the Hub (library, licence, pipeline tag), the
architecture table, and, given a training run's workdir, its recipe and
results; `hub.push_to_hub` writes it.
"""

from pathlib import Path

from keras_vitscale.presets.directory import (CONFIG_FILE, METADATA_FILE,
                                              SHARDED_WEIGHTS_FILE, WEIGHTS_FILE)


def _read_workdir(workdir):
    """(training settings, {metric: (value, step)}) from a run's workdir."""
    from keras_vitscale.training.run_log import METRICS_FILE, read_json, read_metrics

    workdir = Path(workdir)
    config_path, metrics_path = workdir / "config.json", workdir / METRICS_FILE
    if not config_path.exists() and not metrics_path.exists():
        raise FileNotFoundError(
            f"Workdir {str(workdir)!r} has neither config.json nor {METRICS_FILE}; pass "
            "the directory a training run wrote, or workdir=None.")
    settings = read_json(config_path) if config_path.exists() else {}
    results = {}
    for row in read_metrics(metrics_path):  # later rows replace earlier values
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                results[key] = (value, row.get("step"))
    return settings, results


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(config, repo_id, metadata=None, workdir=None, revision=None,
               license="apache-2.0"):
    """The README.md text of a published preset: YAML front matter and body.

    Args:
        config: the model's `ViTConfig`.
        repo_id: "org/repo", for the title and the usage snippet.
        metadata: the preset's metadata.json contents.
        workdir: a training run directory; its config.json gives the recipe
            and its metrics.jsonl the results (last value of each metric).
        revision: the branch the card is pushed to, for the usage snippet.
        license: a Hub licence id, e.g. "apache-2.0" or "cc-by-nc-4.0".

    Example:
    ```python
    text = model_card(model.config, "my-org/vit-mu8", workdir="runs/digits")
    ```
    """
    from huggingface_hub import ModelCardData

    card_data = ModelCardData(
        library_name="keras-vitscale", license=license,
        pipeline_tag="image-classification" if config.num_classes else "image-feature-extraction",
        tags=["vision-transformer", "keras", "keras-vitscale"])
    params = config.count_params()
    gflops = config.flops_per_image() / 1e9
    handle = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    name = config.variant or f"{config.width}w x {config.depth}d"
    output = (f"logits of shape (batch, {config.num_classes})" if config.num_classes
              else f"features of shape (batch, {config.feature_dim})")
    parts = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# {repo_id.split('/')[-1]}",
        f"A Vision Transformer (ViT {name}) for keras_vitscale (`pip install "
        "keras-vitscale`), Keras 3 on JAX, TensorFlow or PyTorch. The repo is a "
        "keras_vitscale preset: "
        f"`{CONFIG_FILE}`, the weights (`{WEIGHTS_FILE}`, or "
        f"`{SHARDED_WEIGHTS_FILE}` plus shards) and `{METADATA_FILE}`.",
        "## Architecture",
        _table(("field", "value"), sorted(config.to_dict().items())),
        f"Parameters: {params:,}. Forward pass: {gflops:.3g} GFLOPs per image.",
    ]
    if workdir is not None:
        settings, results = _read_workdir(workdir)
        scalars = sorted((k, v) for k, v in settings.items()
                         if isinstance(v, (str, int, float, bool)) or v is None)
        parts += ["## Training recipe",
                  _table(("setting", "value"), scalars) if scalars else "Not recorded."]
        parts += ["## Results",
                  _table(("metric", "value", "step"),
                         [(k, f"{v:.6g}", s) for k, (v, s) in sorted(results.items())])
                  if results else "No metrics recorded."]
    shown = ("parameter_count", "gflops")  # given above, unrounded
    extra = {k: v for k, v in (metadata or {}).items()
             if isinstance(v, (str, int, float)) and k not in shown}
    if extra:
        parts += ["## Metadata", _table(("key", "value"), sorted(extra.items()))]
    h, w = config.image_size
    parts += ["## Usage", (
        "```python\n"
        "import numpy as np\n"
        "import keras_vitscale as kvs\n\n"
        f'model = kvs.ViT.from_preset("{handle}")\n'
        f"images = np.zeros((1, {h}, {w}, {config.in_channels}), \"float32\")"
        "  # channels last, preprocessed as in training\n"
        f"outputs = model(images)  # {output}\n"
        "```\n"
        "Fine-tune at another resolution or head size with "
        f'`kvs.ViT.from_preset("{handle}", image_size=384, num_classes=10)`.')]
    return "\n\n".join(parts) + "\n"


# ---- upload -----------------------------------------------------------------
