"""Importers that turn checkpoints of other libraries into `kvs.ViT` models.

One module per source holds its names and layouts (timm_layout.py for timm's
state dicts, with timm.py's `from_timm` and timm_module.py for a live timm
model; timm_hub_config.py for a timm repo's config.json; open_clip_layout.py
for OpenCLIP files; big_vision.py; transformers.py); common.py checks the
shapes and streams the converted arrays into the model, files.py and
safetensors_reader.py read checkpoint files tensor by tensor, verify.py
compares outputs with the source. Only timm.py, big_vision.py,
transformers.py and verify.py import model.py (inside their functions), so
the pretrained-weights loader, which model.py imports, can use the rest.

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
