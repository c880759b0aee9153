"""tf.data input pipelines for training and evaluation.

TensorFlow is used for tf.data only; the model runs on whichever Keras
backend is active.

Example:
```python
from keras_vitscale import data
source = data.load_source("digits")        # or "synthetic", "folder:PATH", "tfds:NAME"
train = data.train_dataset(source, batch_size=64, image_size=(32, 32), seed=0)
held_out = data.eval_dataset(source, batch_size=128, image_size=(32, 32))
```
"""

from keras_vitscale.data.augment import parse_spec as parse_augment
from keras_vitscale.data.pipeline import eval_dataset
from keras_vitscale.data.pipeline import train_dataset
from keras_vitscale.data.sources import Source
from keras_vitscale.data.sources import load_source

__all__ = ["Source", "eval_dataset", "load_source", "parse_augment", "train_dataset"]
