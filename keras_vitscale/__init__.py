"""keras_vitscale: scaled Vision Transformers for Keras 3 (JAX, TensorFlow, PyTorch).

Example:
```python
import keras_vitscale as kvs
model = kvs.ViT.from_preset("vit_b16")                      # ImageNet-1k checkpoint
images = kvs.ImagePreprocessor.from_preset("vit_b16")(photo)  # resize, crop, normalise
kvs.decode_predictions(model(images), "vit_b16", top=5)
```
"""

__version__ = "0.1.0"

from keras_vitscale import (
    config,
    convert,
    evaluation,
    hub,
    intermediates,
    labels,
    layers,
    optimizers,
    planning,
    pretrained,
    scaling,
    schedules,
)
from keras_vitscale.config import ViTConfig
from keras_vitscale.labels import decode_predictions, imagenet_labels
from keras_vitscale.model import ViT
from keras_vitscale.preprocessing import ImagePreprocessor

# kvs.memory: the planner's former name, kept for existing callers.
memory = planning.memory_estimate

__all__ = [
    "ImagePreprocessor", "ViT", "ViTConfig", "config", "convert", "decode_predictions",
    "evaluation", "hub", "imagenet_labels", "intermediates", "labels", "layers", "memory",
    "optimizers", "planning", "pretrained", "scaling", "schedules", "__version__",
]
