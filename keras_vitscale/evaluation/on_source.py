"""Few-shot evaluation of a classifier on a data source's own splits.

The few-shot train examples come from the source's training split, the test
examples from its held-out split; the features are the pre-logits (the
head's input). Used by the trainer at the end of a run and by
tools/fewshot.py. Needs the data pipelines (TensorFlow), so the package's
`__init__` does not import it.
"""

import keras

from keras_vitscale import data
from keras_vitscale.evaluation.features import extract_features
from keras_vitscale.evaluation.fewshot import fewshot


def check_shots(shots, flag="--shots"):
    """The shots as a list of positive ints; a clear error, naming `flag`,
    otherwise.

    Example:
    ```python
    check_shots("1,5,10")  # [1, 5, 10]
    ```
    """
    if isinstance(shots, str):
        try:
            shots = [int(s) for s in shots.split(",")]
        except ValueError:
            shots = []
    shots = list(shots)
    if not shots or any(not isinstance(s, int) or s < 1 for s in shots):
        raise ValueError(f"{flag} {shots!r}: give positive shots such as '1,5,10' "
                         "(k examples per class; 0 shots has nothing to fit).")
    return shots


def fewshot_on_source(model, source, image_size, shots=(1, 5, 10), seeds=3, l2_reg=2.0**10,
                      progress=False):
    """Few-shot linear evaluation of a classifier's pre-logits features.

    Args:
        model: a `kvs.ViT` (its head's input is the feature).
        source: a `kvs.data.Source`.
        image_size: (h, w) of the model.
        shots, seeds, l2_reg: see `kvs.evaluation.fewshot`.
        progress: progress bars over feature extraction.

    Returns:
        A `FewShotResult`.

    Example:
    ```python
    source = kvs.data.load_source("digits", image_size=(32, 32))
    result = fewshot_on_source(model, source, (32, 32), shots=(1, 5))
    print(result.table())
    ```
    """
    shots = check_shots(shots)
    features = model
    if model.config.num_classes:
        features = keras.Model(model.inputs, model.get_layer("head").input)
    train = data.eval_dataset(source, 256, image_size, one_hot=False, split=source.train)
    test = data.eval_dataset(source, 256, image_size, one_hot=False)
    x_train, y_train = extract_features(features, train, progress=progress)
    x_test, y_test = extract_features(features, test, progress=progress)
    return fewshot(x_train, y_train, x_test, y_test, shots=shots, seeds=seeds,
                   l2_reg=l2_reg, num_classes=source.num_classes)
