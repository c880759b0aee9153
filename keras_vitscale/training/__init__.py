"""Pretraining around `model.fit`: recipes, resumable checkpoints, meshes.

Example:
```python
from keras_vitscale.training import train
summary = train({"workdir": "runs/digits"})               # digits default
summary = train({"workdir": "runs/s16", "recipe": "scaling_vit",
                 "variant": "S/16", "dataset": "tfds:imagenet2012",
                 "image_size": 224, "batch_size": 4096, "steps": 90_000})
```
"""

from keras_vitscale.training.checkpoint import CheckpointManager
from keras_vitscale.training.errors import CheckpointError
from keras_vitscale.training.errors import IncompatibleWorkdirError
from keras_vitscale.training.errors import NonFiniteLossError
from keras_vitscale.training.errors import TrainingError
from keras_vitscale.training.runs import train
from keras_vitscale.training.settings import RECIPES
from keras_vitscale.training.settings import resolve

__all__ = ["CheckpointError", "CheckpointManager", "IncompatibleWorkdirError",
           "NonFiniteLossError", "RECIPES", "TrainingError", "resolve", "train"]
