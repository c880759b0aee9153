"""Checking a converted model against its source library, on random images.

The source framework is the outside judge: timm for timm checkpoints and for
big_vision .npz files (through timm's own npz reader), transformers for its
directories. Each `verify_*` returns the largest |output difference| in
float32, or raises ValueError saying why no comparison is possible (a fresh
head of another size, a config timm cannot express).

This lives apart from `common.py` because it needs torch and the source
library, while converting needs only numpy: the converters never import it.

Example:
```python
from keras_vitscale.convert import from_timm, verify
model = from_timm(timm_model)
assert verify.verify_timm(model, timm_model) < 1e-4
```
"""

import collections.abc

import numpy as np

from keras_vitscale.convert.common import as_float32
from keras_vitscale.convert.files import read_npz, read_transformers_config
from keras_vitscale.convert.files import transformers_directory
from keras_vitscale.convert.timm_module import to_timm


def max_logit_difference(model, reference, batch_size=2, seed=0):
    """max |model(x) - reference(x)| over random normal images, in float32.

    A timm reference with a head, compared with a model converted with
    `num_classes=0`, gives its pre-logits.

    Args:
        model: a converted `kvs.ViT`.
        reference: a torch module taking NCHW images (put in eval mode here).
        batch_size: images compared.
        seed: numpy seed of the images.

    Example:
    ```python
    max_logit_difference(from_timm(timm_model), timm_model)
    ```
    """
    import keras
    import torch

    c = model.config
    images = np.random.default_rng(seed).standard_normal(
        (batch_size, *c.image_size, c.in_channels)).astype("float32")
    reference.eval()
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2))
        if c.num_classes == 0 and getattr(reference, "num_classes", 0):  # head dropped
            expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        else:
            expected = reference(x)
        expected = expected.float().numpy()
    got = keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(images), training=False))
    return float(np.max(np.abs(got.astype("float32") - expected)))


def _check_head(model, source_classes):
    if model.config.num_classes not in (0, source_classes):
        raise ValueError(f"the model has a fresh {model.config.num_classes}-class head "
                         f"and the source a {source_classes}-class one; nothing to compare")


def verify_timm(model, source, batch_size=2, seed=0):
    """max |output difference| between a converted model and its timm source.

    Args:
        model: the `kvs.ViT` from `from_timm(source)`; with `num_classes=0`
            its features are compared with timm's pre-logits.
        source: the timm module, or the state dict, which is then loaded
            into a timm VisionTransformer of the model's config (`to_timm`).
        batch_size, seed: the random images compared.

    Example:
    ```python
    verify_timm(from_timm(state_dict, num_heads=4), state_dict)
    ```
    """
    if not isinstance(source, collections.abc.Mapping):
        _check_head(model, getattr(source, "num_classes", 0))
        return max_logit_difference(model, source, batch_size=batch_size, seed=seed)
    import torch

    classes = int(source["head.weight"].shape[0]) if "head.weight" in source else 0
    _check_head(model, classes)
    module = to_timm(model.config.replace(num_classes=classes),
                     fuse_out_proj="blocks.0.attn_out_proj.weight" not in source)
    module.load_state_dict({k: torch.from_numpy(as_float32(v)) for k, v in source.items()},
                           strict=True)
    return max_logit_difference(model, module, batch_size=batch_size, seed=seed)


def verify_big_vision(model, spec, batch_size=2, seed=0):
    """max |output difference| against timm reading the same .npz with its own loader.

    Args:
        model: the `kvs.ViT` from `from_big_vision(spec)`.
        spec: "file.npz" or "file.npz:sub/tree", as given to the converter.
        batch_size, seed: the random images compared.

    Raises:
        ValueError: a fresh head, or a config timm's ViT cannot express
            (e.g. a pre-logits layer).
    """
    from timm.models.vision_transformer import _load_weights

    head = read_npz(spec, names=("head/kernel",))
    classes = head.arrays["head/kernel"].shape[-1] if head.arrays else 0
    _check_head(model, classes)
    reference = to_timm(model.config)
    _load_weights(reference, head.path, prefix=head.root)
    return max_logit_difference(model, reference, batch_size=batch_size, seed=seed)


def verify_transformers(model, source, use_pooler=False, batch_size=2, seed=0):
    """max |output difference| against transformers loading the same directory.

    Args:
        model: the `kvs.ViT` from `from_transformers(source, ...)`.
        source: the `save_pretrained` directory (or a file in it).
        use_pooler: as given to the converter; a model without a head is
            then compared with `pooler_output`, else with the class token.
        batch_size, seed: the random images compared.
    """
    import torch
    import transformers

    directory = transformers_directory(source)
    hf_config = read_transformers_config(directory)
    classes = (len(hf_config.get("id2label") or {}) or hf_config.get("num_labels", 2)
               if "ViTForImageClassification" in hf_config.get("architectures", []) else 0)
    _check_head(model, classes)
    if model.config.num_classes:
        reference = transformers.ViTForImageClassification.from_pretrained(
            directory, local_files_only=True)
        pick = lambda out: out.logits  # noqa: E731
    else:
        reference = transformers.ViTModel.from_pretrained(
            directory, local_files_only=True, add_pooling_layer=use_pooler)
        pick = lambda out: (out.pooler_output if use_pooler  # noqa: E731
                            else out.last_hidden_state[:, 0])

    class Outputs(torch.nn.Module):  # the tensor max_logit_difference compares
        def __init__(self):
            super().__init__()
            self.inner = reference

        def forward(self, x):
            return pick(self.inner(pixel_values=x))

    return max_logit_difference(model, Outputs(), batch_size=batch_size, seed=seed)
