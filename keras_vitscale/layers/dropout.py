"""Dropout whose random state lives in the model's variables on every backend."""

import keras
import numpy as np


def seeded_dropout(rate, **kwargs):
    """`keras.layers.Dropout` with an explicit seed.

    Why: on the torch backend an unseeded Keras Dropout draws its masks from
    torch's global generator, which no checkpoint holds, so a resumed run
    would not repeat the masks of an uninterrupted one. With a seed, the
    masks come from the layer's SeedGenerator, whose state is a variable that
    checkpoints save. The seed is drawn from numpy's global generator, which
    `keras.utils.set_random_seed` seeds, so models stay reproducible.

    Args:
        rate: the dropout rate.
        **kwargs: other `keras.layers.Dropout` arguments (name, dtype).
    """
    return keras.layers.Dropout(rate, seed=int(np.random.randint(0, 2**31 - 1)), **kwargs)
