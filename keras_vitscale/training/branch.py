"""Cooldown branches: continue a run from one of its checkpoints and cool
the learning rate down to zero (Scaling ViT, figure 7).

A long run on a schedule whose value does not depend on the run's length
(rsqrt or constant) keeps checkpoints along the way. A branch at step S with
cooldown N restores the parent's checkpoint S (weights, optimizer state and
step; the data stream is positioned by the step) and trains N more steps.
Its config is the parent's with steps = S + N and cooldown_steps = N, so its
learning rate is the parent's times a linear ramp from 1 to 0 over steps
S..S+N, and it equals an uninterrupted run of S + N steps with that cooldown.
The parent's directory is only ever read.

Example:
```python
from keras_vitscale.training import branch, trainer
trainer.train({"workdir": "runs/long", "schedule": "rsqrt", "steps": 10_000,
               "cooldown_steps": 0, "checkpoint_every": 1000, "keep_checkpoints": 10})
branch.train({"workdir": "runs/long_c2k", "branch_from": "runs/long",
              "branch_step": 4000, "cooldown_steps": 2000})
```
"""

from pathlib import Path

from keras_vitscale.config import ViTConfig
from keras_vitscale.training import distill
from keras_vitscale.training import run_log
from keras_vitscale.training import settings as settings_lib
from keras_vitscale.training import trainer
from keras_vitscale.training.checkpoint import PREFIX
from keras_vitscale.training.checkpoint import CheckpointManager

# The schedules a cooldown can be branched from: their value at a step does
# not depend on the total number of steps (cosine and linear do).
LENGTH_FREE_SCHEDULES = ("rsqrt", "constant")
# Settings a branch may give differently from its parent.
BRANCH_CHANGES = settings_lib.RESUMABLE_CHANGES + (
    "branch_from", "branch_step", "cooldown_steps", "steps")


def locate(branch_from, branch_step=None):
    """The parent run directory and the branch step.

    Args:
        branch_from: a run directory (its newest checkpoint unless
            `branch_step` is given) or one checkpoint directory
            (WORKDIR/checkpoints/ckpt_00001000).
        branch_step: the parent checkpoint's step to branch from.

    Returns:
        (parent workdir Path, step).

    Raises:
        ValueError: not a run, no such checkpoint, or a step beyond the
            parent's last checkpoint (the checkpoints present are named).
    """
    path = Path(branch_from).expanduser()
    step = None
    name = path.name
    if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and path.parent.name == "checkpoints":
        step, path = int(name[len(PREFIX):]), path.parent.parent
        if branch_step is not None and branch_step != step:
            raise ValueError(f"--branch-from {branch_from} is the checkpoint of step {step} "
                             f"but --branch-step is {branch_step}; give one of them.")
    if not (path / "config.json").is_file():
        raise ValueError(f"--branch-from {branch_from}: {path} is not a run directory "
                         "(no config.json); give a pretrain --workdir or one of its "
                         "checkpoints/ckpt_* directories.")
    steps = CheckpointManager(path).steps()
    if not steps:
        raise ValueError(f"--branch-from {branch_from}: the parent run has no checkpoint "
                         "yet; wait for its first --checkpoint-every step.")
    step = step if step is not None else branch_step if branch_step is not None else steps[-1]
    if step > steps[-1]:
        raise ValueError(f"--branch-step {step} is beyond the parent's last checkpoint "
                         f"(step {steps[-1]}); checkpoints present: {steps}.")
    if step not in steps:
        raise ValueError(f"The parent {path} has no checkpoint at step {step}; checkpoints "
                         f"present: {steps} (it keeps --keep-checkpoints of them: give the "
                         "parent a larger --keep-checkpoints to branch from older steps).")
    return path, step


def resolve(settings):
    """A branch's config: the parent's, with its new length and cooldown.

    Args:
        settings: explicit settings (None = not given) with "branch_from",
            "cooldown_steps", "workdir" and optionally "branch_step". Any
            other explicit setting must equal the parent's.

    Returns:
        (config, explicit keys) as `config.resolve`, with config["branch"] =
        {"parent": parent workdir, "step": S}.

    Raises:
        ValueError: bad branch point, a schedule that depends on the run's
            length, or explicit settings that differ from the parent's (each
            difference is named).
    """
    given = {k: v for k, v in settings.items() if v is not None}
    parent, step = locate(given["branch_from"], given.get("branch_step"))
    parent_config = run_log.read_json(parent / "config.json")
    cooldown = given.get("cooldown_steps")
    if not isinstance(cooldown, int) or cooldown < 1:
        raise ValueError("--branch-from needs --cooldown-steps N (N >= 1): the number of "
                         "steps over which the branch cools the learning rate down to 0.")
    if cooldown % parent_config["log_every"]:
        raise ValueError(f"--cooldown-steps {cooldown} is not a multiple of the parent's "
                         f"--log-every {parent_config['log_every']}; use e.g. "
                         f"{parent_config['log_every'] * max(1, round(cooldown / parent_config['log_every']))}.")
    if parent_config["schedule"] not in LENGTH_FREE_SCHEDULES:
        raise ValueError(
            f"The parent {parent} uses --schedule {parent_config['schedule']}, whose value "
            "depends on the run's length, so a branch cannot continue it unchanged; "
            f"branch from runs with --schedule {' or '.join(LENGTH_FREE_SCHEDULES)}.")
    parent_cooldown_start = parent_config["steps"] - parent_config["cooldown_steps"]
    if parent_config["cooldown_steps"] and step > parent_cooldown_start:
        raise ValueError(f"Step {step} is inside the parent's own cooldown (steps "
                         f"{parent_cooldown_start}..{parent_config['steps']}); branch from "
                         f"a checkpoint at or before step {parent_cooldown_start}.")
    diffs = [f"{k}: parent has {parent_config.get(k)!r}, this branch has {v!r}"
             for k, v in sorted(given.items())
             if k not in BRANCH_CHANGES and parent_config.get(k) != v]
    if "steps" in given and given["steps"] != step + cooldown:
        diffs.append(f"steps: a branch at step {step} with --cooldown-steps {cooldown} "
                     f"runs {step + cooldown} steps, not {given['steps']} (drop --steps)")
    if diffs:
        raise ValueError(f"--branch-from {given['branch_from']}: the flags differ from the "
                         "parent run's config:\n  " + "\n  ".join(diffs)
                         + "\nA branch continues its parent unchanged; drop these flags.")
    if Path(given["workdir"]).expanduser().resolve() == parent.resolve():
        raise ValueError(f"--workdir {given['workdir']} is the parent run itself; a branch "
                         "writes to a new --workdir and never modifies its parent.")
    inherited = {k: v for k, v in parent_config.items()
                 if k not in ("branch", "model", "num_classes")}
    config, explicit = settings_lib.resolve({**inherited, **given, "steps": step + cooldown,
                                           "cooldown_steps": cooldown})
    config["branch"] = {"parent": str(parent.resolve()), "step": step}
    config["model"] = parent_config["model"]
    return config, explicit


def _parent_model(config, explicit):
    """The parent's model, whatever flags made it."""
    return ViTConfig.from_dict(config["model"])


def _start_from_parent(config, model, optimizer, log):
    """Restores the parent's checkpoint at the branch step (the branch has
    none of its own yet)."""
    parent, step = config["branch"]["parent"], config["branch"]["step"]
    CheckpointManager(parent).restore_latest(model, optimizer, step=step)
    log(f"Branching from {parent} at step {step}: cooldown to 0 over "
        f"{config['cooldown_steps']} steps, ending at step {config['steps']}.")
    return step


def parent_metrics(config):
    """The parent's metrics.jsonl rows up to the branch step: the first rows
    of the branch's own, so its curves show the whole history."""
    parent, step = Path(config["branch"]["parent"]), config["branch"]["step"]
    return [row for row in run_log.read_metrics(parent / run_log.METRICS_FILE)
            if row["step"] <= step]


RUN_SPEC = trainer.RunSpec(resolve=resolve, model_config=_parent_model,
                           start=_start_from_parent, history=parent_metrics)


def train(settings, log=None, progress=True):
    """Runs (or resumes) a cooldown branch; see the module docstring.

    A branch of a distillation run distils too, from its parent's teacher.

    Args:
        settings: as `resolve`'s.
        log, progress: as `trainer.train`'s.

    Returns:
        `trainer.train`'s summary.

    Example:
    ```python
    branch.train({"workdir": "runs/long_c2k", "branch_from": "runs/long",
                  "cooldown_steps": 2000})
    ```
    """
    spec = RUN_SPEC
    parent, _ = locate(settings["branch_from"], settings.get("branch_step"))
    if run_log.read_json(parent / "config.json").get("teacher"):
        spec = distill.with_teacher(spec)
    return trainer.train(settings, log=log, progress=progress, spec=spec)
