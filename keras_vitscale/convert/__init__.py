"""Importers that turn checkpoints of other libraries into `kvs.ViT` models.

Example:
```python
import timm
from keras_vitscale import convert
model = convert.from_timm(timm.create_model("vit_small_patch16_224"))
```
"""

from keras_vitscale.convert.timm import from_timm
