"""keras_vitscale: scaled Vision Transformers for Keras 3 (JAX, TensorFlow, PyTorch).

Example:
```python
import keras_vitscale as kvs
model = kvs.ViT.from_preset("vit_s16", num_classes=10)
```
"""

__version__ = "0.1.0"

from keras_vitscale import config, layers
from keras_vitscale.config import ViTConfig
from keras_vitscale.model import ViT

__all__ = ["ViT", "ViTConfig", "config", "layers", "__version__"]
