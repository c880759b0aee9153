"""Memory-efficient optimizers of "Scaling Vision Transformers".

Every optimizer here takes `weight_decay` (decoupled, times the current
learning rate) and `weight_decay_multipliers` ({regex on variable.path:
multiplier}, first full match wins); see `weight_decay.py`.
"""

from keras_vitscale.optimizers.bf16_adam import BF16Adam
from keras_vitscale.optimizers.scaling_adafactor import ScalingAdafactor
from keras_vitscale.optimizers.shampoo import Shampoo
from keras_vitscale.optimizers.weight_decay import DEFAULT_MULTIPLIERS
from keras_vitscale.optimizers.weight_decay import DecoupledWeightDecay

__all__ = [
    "BF16Adam",
    "DEFAULT_MULTIPLIERS",
    "DecoupledWeightDecay",
    "ScalingAdafactor",
    "Shampoo",
]
