"""Learning-rate schedules of big_vision, as serialisable Keras schedules.

With p = clip((t - W) / (T - W), 0, 1), W warmup steps, T total steps:
- "linear" / "polynomial": end + (base - end) * (1 - p) ** power
- "cosine": base * 0.5 * (1 + cos(pi * p))
- "rsqrt": base / sqrt(1 + (t + shift - W) / timescale) for t >= W, and
  base / sqrt(1 + shift / timescale) during warmup
- "constant": base
then times min(1, t / W) (linear warmup from 0) and min(1, (T - t) / C)
(linear cooldown to 0 over the last C steps). `t` is the optimizer's step
counter, starting at 0, so the first update uses lr 0 when W > 0.

Durations may be given in steps, epochs, examples or as a fraction of the run
with `to_steps`.

Example:

```python
import keras_vitscale as kvs
total = kvs.schedules.to_steps(epochs=90, examples_per_epoch=1_281_167,
                               batch_size=4096)
schedule = kvs.schedules.create(
    "cosine", base_lr=1e-3, total_steps=total,
    warmup_steps=kvs.schedules.to_steps(fraction=0.05, total_steps=total))
optimizer = kvs.optimizers.BF16Adam(schedule)
```
"""

import math
import numbers

import keras
from keras import ops

DECAY_TYPES = ("rsqrt", "cosine", "linear", "polynomial", "constant")
# Extra keyword arguments each decay type accepts, with their defaults.
_DECAY_KWARGS = {
    "rsqrt": {"timescale": 10_000, "shift": 0},
    "cosine": {},
    "linear": {"end": 0.0, "power": 1.0},
    "polynomial": {"end": 0.0, "power": 1.0},
    "constant": {},
}


def _check_number(name, value, integer=False, positive=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a real number"
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}={value} must be finite and {bound}.")
    return int(value) if integer else float(value)


def to_steps(
    steps=None,
    *,
    epochs=None,
    examples=None,
    fraction=None,
    batch_size=None,
    examples_per_epoch=None,
    steps_per_epoch=None,
    total_steps=None,
):
    """Converts a duration to optimizer steps (rounded to nearest).

    Give exactly one of `steps`, `epochs`, `examples` or `fraction` (of
    `total_steps`, in [0, 1]). A non-zero duration is at least one step, as
    in big_vision.

    Args:
        steps: a number of steps, returned unchanged.
        epochs: needs `steps_per_epoch`, or `examples_per_epoch` and
            `batch_size`.
        examples: needs `batch_size`.
        fraction: needs `total_steps`.

    Example:

    ```python
    to_steps(epochs=2, examples_per_epoch=1000, batch_size=100)  # 20
    to_steps(fraction=0.1, total_steps=1000)                     # 100
    ```
    """
    given = {
        k: v
        for k, v in dict(
            steps=steps, epochs=epochs, examples=examples, fraction=fraction
        ).items()
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            "Give exactly one of steps, epochs, examples or fraction; got "
            f"{sorted(given) or 'none'}."
        )
    (unit, value), = given.items()
    value = _check_number(unit, value, integer=unit == "steps")
    if unit == "steps":
        return value
    if unit == "fraction":
        if total_steps is None:
            raise ValueError("fraction needs total_steps.")
        if value > 1:
            raise ValueError(
                f"fraction={value} is a fraction of the run, in [0, 1]; "
                f"for {value}% write fraction={value / 100}."
            )
        steps_float = value * _check_number("total_steps", total_steps, True)
    elif unit == "examples":
        if batch_size is None:
            raise ValueError("examples needs batch_size.")
        steps_float = value / _check_number(
            "batch_size", batch_size, True, positive=True
        )
    else:
        if steps_per_epoch is None:
            if examples_per_epoch is None or batch_size is None:
                raise ValueError(
                    "epochs needs steps_per_epoch, or examples_per_epoch and "
                    "batch_size."
                )
            steps_per_epoch = _check_number(
                "examples_per_epoch", examples_per_epoch, True
            ) / _check_number("batch_size", batch_size, True, positive=True)
        steps_float = value * _check_number("steps_per_epoch", steps_per_epoch)
    return max(1, round(steps_float)) if value else 0


@keras.saving.register_keras_serializable(package="keras_vitscale")
class ScalingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A big_vision learning-rate schedule; build it with `create`.

    Args:
        decay_type: one of "rsqrt", "cosine", "linear", "polynomial",
            "constant".
        base_lr: peak learning rate.
        total_steps: length of the run, T.
        warmup_steps: linear warmup from 0, W. Defaults to 0.
        cooldown_steps: linear cooldown to 0 over the last C steps. Defaults
            to 0.
        **kw: "rsqrt": `timescale` (10000), `shift` (0); "linear" and
            "polynomial": `end` (0.0), `power` (1.0).

    Example:

    ```python
    schedule = ScalingSchedule("rsqrt", 8e-4, total_steps=1_000_000,
                               warmup_steps=10_000, cooldown_steps=50_000,
                               timescale=10_000)
    float(schedule(20_000))
    ```
    """

    def __init__(
        self,
        decay_type,
        base_lr,
        total_steps,
        warmup_steps=0,
        cooldown_steps=0,
        **kw,
    ):
        if decay_type not in DECAY_TYPES:
            raise ValueError(
                f"Unknown decay_type {decay_type!r}; use one of "
                f"{', '.join(DECAY_TYPES)}."
            )
        unknown = set(kw) - set(_DECAY_KWARGS[decay_type])
        if unknown:
            accepted = sorted(_DECAY_KWARGS[decay_type]) or "none"
            raise ValueError(
                f"decay_type {decay_type!r} does not take {sorted(unknown)}; "
                f"it accepts {accepted}."
            )
        self.decay_type = decay_type
        self.base_lr = _check_number("base_lr", base_lr)
        self.total_steps = _check_number(
            "total_steps", total_steps, integer=True, positive=True
        )
        self.warmup_steps = _check_number("warmup_steps", warmup_steps, True)
        self.cooldown_steps = _check_number(
            "cooldown_steps", cooldown_steps, True
        )
        if self.warmup_steps + self.cooldown_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) + cooldown_steps "
                f"({self.cooldown_steps}) exceed total_steps "
                f"({self.total_steps}); shorten them or train longer."
            )
        self.kw = dict(_DECAY_KWARGS[decay_type])
        for key, value in kw.items():
            positive = key == "timescale"
            self.kw[key] = _check_number(key, value, positive=positive)

    def __call__(self, step):
        t = ops.cast(step, "float32")
        base = self.base_lr
        warmup, total = self.warmup_steps, self.total_steps
        progress = (t - warmup) / max(total - warmup, 1)
        progress = ops.clip(progress, 0.0, 1.0)
        if self.decay_type in ("linear", "polynomial"):
            end, power = self.kw["end"], self.kw["power"]
            lr = end + (base - end) * ops.power(1.0 - progress, power)
        elif self.decay_type == "cosine":
            lr = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.decay_type == "rsqrt":
            timescale, shift = self.kw["timescale"], self.kw["shift"]
            # Flat at base / sqrt(1 + shift / timescale) during warmup, which
            # is the decay formula frozen at t = W (and never a negative sqrt).
            since = ops.maximum(t, float(warmup)) - warmup
            lr = base / ops.sqrt(1.0 + (since + shift) / timescale)
        else:
            lr = base * ops.ones_like(t)
        if warmup:
            lr = lr * ops.minimum(1.0, t / warmup)
        if self.cooldown_steps:
            lr = lr * ops.minimum(1.0, (total - t) / self.cooldown_steps)
        return lr

    def get_config(self):
        return {
            "decay_type": self.decay_type,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "cooldown_steps": self.cooldown_steps,
            **self.kw,
        }


def create(
    decay_type, base_lr, total_steps, warmup_steps=0, cooldown_steps=0, **kw
):
    """Returns a serialisable `LearningRateSchedule` (see module docstring).

    Args:
        decay_type: "rsqrt", "cosine", "linear", "polynomial" or "constant".
        base_lr: peak learning rate (after warmup).
        total_steps: length of the run in steps.
        warmup_steps: linear warmup length; `to_steps` converts epochs,
            examples or a fraction of the run.
        cooldown_steps: linear cooldown length at the end of the run.
        **kw: `timescale`, `shift` for "rsqrt"; `end`, `power` for
            "linear"/"polynomial".

    Example:

    ```python
    schedule = kvs.schedules.create("rsqrt", base_lr=8e-4,
                                    total_steps=1_000_000,
                                    warmup_steps=10_000,
                                    cooldown_steps=50_000)
    ```
    """
    return ScalingSchedule(
        decay_type, base_lr, total_steps, warmup_steps, cooldown_steps, **kw
    )
