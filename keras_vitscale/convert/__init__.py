"""Importers that turn checkpoints of other libraries into `kvs.ViT` models.

One module per source holds its names and layouts (timm_layout.py for timm's
state dicts, with timm.py's `from_timm` and timm_module.py for a live timm
model; big_vision.py; transformers.py); common.py builds the model and copies
the arrays with named shape checks, files.py reads checkpoint files,
verify.py compares outputs with the source. timm_layout, common and files
never import model.py, so the pretrained-weights loader (which model.py
imports) can use them.

Example:
```python
import timm
from keras_vitscale import convert
model = convert.from_timm(timm.create_model("vit_small_patch16_224"))
model = convert.from_big_vision("vit_b16.npz:params/img", variant="B/16")
model = convert.from_transformers("path/to/saved_vit")   # ViTForImageClassification
```
"""

from keras_vitscale.convert.big_vision import from_big_vision
from keras_vitscale.convert.timm import from_timm
from keras_vitscale.convert.transformers import from_transformers
