"""keras_vitscale: scaled Vision Transformers for Keras 3 (JAX, TensorFlow, PyTorch).

Example:
```python
import keras_vitscale as kvs
model = kvs.ViT.from_preset("vit_s16", num_classes=10)
```
"""

__version__ = "0.1.0"

from keras_vitscale import (
    config,
    convert,
    evaluation,
    hub,
    layers,
    optimizers,
    planning,
    scaling,
    schedules,
)
from keras_vitscale.config import ViTConfig
from keras_vitscale.model import ViT

# kvs.memory: the planner's former name, kept for existing callers.
memory = planning.memory_estimate

__all__ = [
    "ViT", "ViTConfig", "config", "convert", "evaluation", "hub", "layers", "memory",
    "optimizers", "planning", "scaling", "schedules", "__version__",
]
