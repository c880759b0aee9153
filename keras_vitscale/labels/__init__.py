"""Class names of pretrained heads, and decoding logits into them.

`imagenet_labels(label_set)` gives the (WordNet synset, lemma names) of each
output of an ImageNet-1k, -12k or -21k head, in order; `decode_predictions`
turns logits into the top classes with probabilities, softmax or sigmoid as
the head was trained. The names ship as package data (one gzip text file per
label set, beside these modules).

Example:
```python
from keras_vitscale import labels
labels.imagenet_labels("imagenet-21k")[:2]
labels.decode_predictions(logits, "imagenet-1k", top=3)
```
"""

from keras_vitscale.labels.decode import ACTIVATIONS, decode_predictions
from keras_vitscale.labels.imagenet import (ALIASES, LABEL_SETS, imagenet_labels,
                                            label_set_for_num_classes, resolve_label_set)

__all__ = ["ACTIVATIONS", "ALIASES", "LABEL_SETS", "decode_predictions", "imagenet_labels",
           "label_set_for_num_classes", "resolve_label_set"]
