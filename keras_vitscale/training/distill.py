"""Knowledge distillation: a student ViT trained on a frozen teacher's logits.

The student is trained on the teacher's softened predictions (Hinton et al.
2015): the loss is

    (1 - w) * T^2 * KL(teacher_T || student_T)  +  w * label_loss(y, student)

where `teacher_T` and `student_T` are the class distributions at
temperature T (logits / T) and `label_loss` is the run's compiled loss
(softmax or sigmoid cross-entropy, with its label smoothing). The T^2 keeps
the soft term's gradient the same size whatever T is, so T and w can be
tuned separately. The defaults, T = 1 and w = 0 (pure KL, no labels), are
the "function matching" of Beyer et al. 2022 ("Knowledge distillation: A
good teacher is patient and consistent"), which distils ViT-scale models
best when the teacher sees the very same augmented images as the student,
as it does here.

With `--loss sigmoid` the teacher's logits are read as independent per-class
sigmoids, as that loss trains them: the soft term is the KL between the
per-class Bernoulli distributions at temperature T, summed over classes (the
way the sigmoid loss sums its per-class terms). With `--loss softmax` it is
the KL between the softmax distributions.

`train(settings)` runs the trainer with this module's `RunSpec`
(`with_teacher`): the teacher is checked before the workdir is touched, and
`fit` trains `wrap_for_training`'s `DistillationModel`, while checkpoints, the
final preset and few-shot use the student itself. The teacher is frozen: not
trainable (so not in the optimizer and never checkpointed), run in inference
mode (no dropout), its logits behind `stop_gradient`. Its variables are made
under the name scope "teacher" so their paths ("teacher/head/kernel") never
collide with the student's in a sharding layout map.

The teacher sees the student's batch: when its image size differs from the
run's `--image-size`, the images are resized (bilinear, antialiased when
shrinking) to the size the teacher was trained at, each step, rather than
changing the teacher (resampling its position embedding would change its
predictions without any fine-tuning). Backend-neutral: `keras.ops` only.
"""

import dataclasses
import math
from pathlib import Path

import keras
from keras import ops

from keras_vitscale import presets, pretrained
from keras_vitscale.config import ViTConfig
from keras_vitscale.model import ViT
from keras_vitscale.training import trainer

LOSS_KINDS = ("softmax", "sigmoid")


@keras.saving.register_keras_serializable(package="keras_vitscale")
class DistillationLoss(keras.losses.Loss):
    """T^2-scaled KL divergence from the teacher's to the student's logits.

    Called as `loss(teacher_logits, student_logits, sample_weight)`, like any
    Keras loss with the teacher's logits in place of the labels; the batch
    reduction and sample weights are Keras' own.

    Args:
        temperature: T > 0; both sets of logits are divided by it.
        kind: "softmax" (KL between the class distributions) or "sigmoid"
            (KL between per-class Bernoulli distributions, summed over
            classes).
        name: loss name.

    Example:
    ```python
    loss = DistillationLoss(temperature=2.0)
    loss(keras.ops.array([[2.0, 0.0]]), keras.ops.array([[2.0, 0.0]]))  # 0.0
    ```
    """

    def __init__(self, temperature=1.0, kind="softmax", name="distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"--temperature {temperature} must be a positive number; "
                             "1 (the default) uses the teacher's own distribution, "
                             "2-4 softens it.")
        if kind not in LOSS_KINDS:
            raise ValueError(f"Unknown distillation kind {kind!r}; use softmax or sigmoid.")
        self.temperature = temperature
        self.kind = kind

    def call(self, teacher_logits, student_logits):
        t = ops.cast(teacher_logits, "float32") / self.temperature
        s = ops.cast(student_logits, "float32") / self.temperature
        if self.kind == "softmax":
            log_p, log_q = ops.log_softmax(t, axis=-1), ops.log_softmax(s, axis=-1)
            kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        else:
            # KL(Ber(p) || Ber(q)) per class, p = sigmoid(t); log-sigmoids keep
            # it finite for large logits of either sign.
            kl = ops.sum(ops.sigmoid(t) * (ops.log_sigmoid(t) - ops.log_sigmoid(s))
                         + ops.sigmoid(-t) * (ops.log_sigmoid(-t) - ops.log_sigmoid(-s)),
                         axis=-1)
        return self.temperature ** 2 * kl

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "kind": self.kind}


class DistillationModel(keras.Model):
    """What `fit` trains in a distillation run: the student plus a frozen teacher.

    `call` returns the student's logits (so compiled metrics measure the
    student); `compute_loss` runs the teacher on the same images and returns
    `(1 - w) * DistillationLoss + w * compiled label loss`. Only the student's
    variables are trainable.

    Args:
        student: the `kvs.ViT` being trained.
        teacher: a trained `kvs.ViT` with the same number of classes; it is
            frozen here (`trainable = False`).
        temperature: the distillation temperature T.
        label_weight: w in [0, 1], the weight of the compiled label loss.
        kind: "softmax" or "sigmoid": how the logits are read (the run's
            `--loss`).

    Example:
    ```python
    teacher = load_teacher("runs/digits")
    student = kvs.ViT(variant="mu/8", width=32, depth=2, num_classes=10, image_size=32)
    model = DistillationModel(student, teacher, temperature=2.0)
    model.compile(optimizer="adam",
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(images, one_hot_labels)   # trains the student only
    ```
    """

    def __init__(self, student, teacher, temperature=1.0, label_weight=0.0, kind="softmax",
                 name="distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        _check_pair(teacher.config, student.config)
        label_weight = float(label_weight)
        if not 0.0 <= label_weight <= 1.0:
            raise ValueError(f"--label-weight {label_weight} must be in [0, 1]: 0 trains on "
                             "the teacher alone, 1 on the labels alone.")
        # The student is tracked first, so `trainable_variables` lists its
        # variables in the student's own order (the optimizer slots and
        # checkpoints line up with a plain run's).
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.distillation_loss = DistillationLoss(temperature, kind)
        self.label_weight = label_weight
        self.teacher_size = tuple(teacher.config.image_size)
        self.resize = self.teacher_size != tuple(student.config.image_size)
        self.shrink = self.resize and (self.teacher_size[0] * self.teacher_size[1]
                                       < student.config.image_size[0]
                                       * student.config.image_size[1])
        self.built = True  # both models are built functional graphs

    def call(self, images, training=None):
        return self.student(images, training=training)

    def teacher_logits(self, images):
        """The frozen teacher's logits (float32, no gradient) for a batch."""
        if self.resize:
            images = ops.image.resize(images, self.teacher_size, interpolation="bilinear",
                                      antialias=self.shrink)
        return ops.stop_gradient(ops.cast(self.teacher(images, training=False), "float32"))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # Keras passes the batch's images as `x` on every backend (JAX,
        # TensorFlow and torch train steps all call compute_loss(x=x, ...)).
        w = self.label_weight
        loss = 0.0
        if w < 1.0:
            loss = (1.0 - w) * self.distillation_loss(self.teacher_logits(x), y_pred,
                                                      sample_weight)
        if w > 0.0:
            loss = loss + w * self._compile_loss(y, y_pred, sample_weight)
        for extra in self.losses:  # regularisers, as Keras' own compute_loss adds them
            loss = loss + ops.sum(ops.cast(extra, "float32"))
        return loss


def _teacher_handle(teacher):
    """The preset handle of --teacher; a pretraining WORKDIR means WORKDIR/model."""
    path = Path(str(teacher)).expanduser()
    if (path / "model" / presets.CONFIG_FILE).is_file():
        return str(path / "model")
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        raise ValueError(
            f"--teacher {teacher} is a pretraining workdir without a final model "
            f"({path / 'model'} is missing): finish its run first (rerun the same "
            "tools/pretrain.py command to resume it), or pass a preset directory.")
    return str(teacher)


def teacher_config(teacher):
    """The teacher's `ViTConfig`, read without loading any weights.

    Args:
        teacher: a built-in preset name (it must have published weights), a
            preset directory, "hf://org/repo", or a `tools/pretrain.py`
            workdir (its final model, WORKDIR/model).

    Returns:
        (preset handle to load, `ViTConfig`).

    Example:
    ```python
    handle, config = teacher_config("runs/digits")  # "runs/digits/model", ...
    ```
    """
    handle = _teacher_handle(teacher)
    parsed = None if Path(handle).is_dir() else presets.parse_handle(handle)
    if parsed is not None:
        entry = presets.weights_entry(parsed.name, parsed.tag)
        if entry is None:
            raise ValueError(
                f"--teacher {teacher!r} is a built-in preset without published weights: "
                "a randomly initialised teacher has nothing to teach. Pass a trained "
                "model: a preset directory, hf://org/repo, or a tools/pretrain.py workdir.")
        return handle, presets.builtin_config(parsed.name, tag=entry["tag"])
    try:
        return handle, presets.read_directory_config(
            pretrained.resolve_directory(handle, model_class=ViT))
    except FileNotFoundError as err:  # an incomplete directory: a bad setting too
        raise ValueError(f"--teacher {teacher}: {err}") from None


def _check_pair(teacher, student, num_classes=None, dataset=None, name="the teacher"):
    """Fails unless the teacher's classes and channels match the student's."""
    if not teacher.num_classes:
        raise ValueError(f"{name} has no classifier head (num_classes 0): distillation "
                         "matches logits; use a teacher with a head.")
    counts = {"the data" + (f" ({dataset})" if dataset else ""): num_classes,
              "the student": student.num_classes}
    for what, count in counts.items():
        if count is not None and count != teacher.num_classes:
            raise ValueError(
                f"{name} predicts {teacher.num_classes} classes but {what} has {count}: "
                "distillation matches the two models' outputs class by class. Use a "
                f"teacher trained on this data's {count} classes (tools/finetune.py can "
                "train a new head onto a pretrained model first).")
    if teacher.in_channels != student.in_channels:
        raise ValueError(f"{name} takes {teacher.in_channels}-channel images but the student "
                         f"takes {student.in_channels}; use a teacher for the same images.")


def check_teacher(config):
    """Checks a run's --teacher against its data and student before any work.

    Reads only the teacher's config (no weights). Also checks the temperature
    and label weight.

    Args:
        config: the resolved run config: "teacher", "num_classes" (the
            data's), "model" (the student's `ViTConfig` as a dict),
            "dataset", "distill_temperature", "distill_label_weight".

    Returns:
        (preset handle to load, the teacher's `ViTConfig`).

    Raises:
        ValueError: the teacher cannot be found or has no weights, its number
            of classes differs from the data's or the student's, or a bad
            temperature or label weight.

    Example:
    ```python
    check_teacher({**config, "teacher": "runs/digits"})
    ```
    """
    DistillationLoss(config["distill_temperature"])  # raises on a bad temperature
    w = float(config["distill_label_weight"])
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"--label-weight {w} must be in [0, 1]: 0 trains on the teacher "
                         "alone, 1 on the labels alone.")
    handle, teacher = teacher_config(config["teacher"])
    student = ViTConfig.from_dict(config["model"])
    _check_pair(teacher, student, config.get("num_classes"), config.get("dataset"),
                name=f"--teacher {config['teacher']}")
    return handle, teacher


def load_teacher(teacher, dtype=None):
    """Loads a trained teacher, frozen, with its variables under "teacher/".

    Args:
        teacher: a preset handle or pretraining workdir (see `teacher_config`).
        dtype: dtype policy to run it in, e.g. "mixed_bfloat16".

    Returns:
        A `kvs.ViT` with `trainable = False`.

    Example:
    ```python
    teacher = load_teacher("runs/digits")
    teacher.config.num_classes  # 10
    ```
    """
    handle, _ = teacher_config(teacher)
    with keras.name_scope("teacher"):
        model = ViT.from_preset(handle, dtype=dtype)
    model.trainable = False
    return model


def wrap_for_training(student, config, log=None):
    """The model that `fit` trains in a distillation run (see `train`).

    Args:
        student: the run's `kvs.ViT`.
        config: the resolved run config ("teacher", "distill_temperature",
            "distill_label_weight", "loss", "num_classes", "dtype_policy",
            "model", "dataset").
        log: a function taking a message (default: silent).

    Returns:
        A `DistillationModel`; compile and fit it as the student.

    Raises:
        ValueError: see `check_teacher`; raised before any weights load.

    Example:
    ```python
    fit_model = wrap_for_training(student, {**config, "teacher": "runs/digits"})
    fit_model.compile(optimizer=optimizer, loss=losses.get(config["loss"]))
    ```
    """
    log = log or (lambda msg: None)
    check_teacher({**config, "model": student.config.to_dict()})
    teacher = load_teacher(config["teacher"], dtype=config.get("dtype_policy"))
    model = DistillationModel(student, teacher, temperature=config["distill_temperature"],
                              label_weight=config["distill_label_weight"], kind=config["loss"])
    log(f"Distilling from --teacher {config['teacher']} "
        f"({teacher.config.count_params():,} params): temperature "
        f"{model.distillation_loss.temperature}, label weight {model.label_weight}, "
        f"{config['loss']} KL.")
    if model.resize:
        log(f"The teacher was trained at {model.teacher_size}; each batch is resized "
            f"from {tuple(student.config.image_size)} to that size for it.")
    return model


def with_teacher(spec=None):
    """`spec` (default: a plain run's) that distils from the config's --teacher.

    Example:
    ```python
    trainer.train({**settings, "teacher": "runs/digits"}, spec=with_teacher())
    ```
    """
    return dataclasses.replace(spec or trainer.RunSpec(), check=check_teacher,
                               wrap=wrap_for_training)


def train(settings, log=None, progress=True):
    """Runs (or resumes) a distillation run: `trainer.train` with a teacher.

    Args:
        settings: the pretraining settings plus "teacher" (required),
            "distill_temperature" and "distill_label_weight".
        log, progress: as `trainer.train`'s.

    Returns:
        `trainer.train`'s summary (the student's).

    Raises:
        ValueError: no teacher, or a bad one (see `check_teacher`), before
            the workdir is touched.

    Example:
    ```python
    train({"workdir": "runs/distilled", "teacher": "runs/digits", "variant": "mu/8",
           "width": 32, "depth": 2})
    ```
    """
    if not settings.get("teacher"):
        raise ValueError("A distillation needs --teacher: a tools/pretrain.py workdir, a "
                         "preset directory, hf://org/repo or a built-in preset with weights.")
    return trainer.train(settings, log=log, progress=progress, spec=with_teacher())
