"""A scaling study in miniature: error against training compute for several
model sizes, from one long run per size and its cooldown branches.

For each variant the study trains one long "parent" run on a schedule whose
value does not depend on the run's length (rsqrt or constant), with a
checkpoint at every branch step S. A branch continues the parent from step S
and cools the learning rate down linearly to 0 over N more steps: it is the
run of S + N steps with that cooldown (Scaling ViT, figure 7; see
`training/branch.py`), at a fraction of the cost of training it alone. The
cooldown is a fixed fraction f of each branch's length, N = S f / (1 - f)
(f = 0.2: a branch at step 400 cools down over 100 steps and ends at 500).

Each branch gives one point:
- compute: training FLOPs = 3 x the config's analytic forward FLOPs per
  image (`ViTConfig.flops_per_image`; a backward pass costs about two
  forwards) x the images it has seen, (S + N) x batch size. The parent's
  first S steps count: they are the branch's own history. Evaluation is not
  counted.
- held-out error: 1 - accuracy on the dataset's held-out split;
- k-shot error (k = 10 by default): 1 - mean accuracy over 3 seeds of the
  few-shot ridge on the pre-logits features, tested on the held-out split.

For each error, the compute-optimal frontier (the points that no point of
less or equal compute beats) is fitted with E = a (C + d)^-b + c
(`kvs.scaling.fit_power_law`), as the paper fits its frontier; the plain
power law E = a C^-b is fitted alongside for contrast.

The study's workdir:
  study.json                 settings and plan; other settings are refused
  runs/VARIANT/parent/       the long run (a pretrain workdir)
  runs/VARIANT/branch_S/     its branch at step S (S zero-padded)
  study.csv                  one row per finished branch
  fit.json                   fitted parameters and frontier, per error
  study.png                  error against compute, log-log

Rerunning the same study resumes it: unfinished runs continue from their
newest checkpoint, finished branches are read back from their workdirs.

Example:
```python
from keras_vitscale.training import study
result = study.run({"workdir": "runs/scaling_study"})   # the default study
result["fits"]["heldout_error"]["fit"].b
```
The CSV, frontier, fits, plot and tables are in `training/study_report.py`;
this module plans and runs the study's training runs.

Example:
```python
from keras_vitscale.training import study_report
print(study_report.format_table(study_report.read_csv("runs/scaling_study/study.csv"), 10))
```
"""

import json
import math
import time
from pathlib import Path

from keras_vitscale.config import ViTConfig
from keras_vitscale.config import parse_variant
from keras_vitscale.training import run_log
from keras_vitscale.training import settings as settings_lib
from keras_vitscale.training.checkpoint import CheckpointManager
from keras_vitscale.training.errors import IncompatibleWorkdirError
from keras_vitscale.training.study_report import fit_record
from keras_vitscale.training.study_report import fit_study
from keras_vitscale.training.study_report import plot_study
from keras_vitscale.training.study_report import read_branch
from keras_vitscale.training.study_report import write_csv

KIND = "keras_vitscale scaling study"
# The parent checkpoints every gcd(branch steps) steps and keeps them all;
# more than this many means branch steps with a small common divisor.
MAX_PARENT_CHECKPOINTS = 64

# The default study: the widths, MLP sizes and heads of Scaling ViT's mu, Ti
# and S (Table 2), each at depth 2 (Ti and S have 12 blocks there, far too
# slow for a 2-core CPU), on 32x32 digits with 8x8 patches (16 tokens), as
# the digits default (recipes.BASE) is. Forward GFLOPs per image: 0.001,
# 0.030, 0.116. The branch steps give each size about a decade of compute,
# overlapping its neighbours': the smallest model runs the most steps.
DEFAULTS = dict(
    variants=("mu", "Ti", "S"),
    branch_steps=None,  # None: DEFAULT_BRANCH_STEPS of each variant
    depth=2,            # an int for every variant, or "variant" for their own
    patch_size=8, image_size=32, pooling="gap", posemb="sincos2d",
    dataset="digits", data_dir=None, batch_size=64,
    optimizer="adam", lr=1e-3, schedule="rsqrt",
    # Warmup, and the rsqrt timescale (as in the paper, where both are 10k
    # steps), as a fraction of the longest branch step, at most the first.
    warmup_fraction=0.05,
    cooldown_fraction=0.2,
    seed=0, shots=10,
)
DEFAULT_BRANCH_STEPS = {
    # mu has two more: cheap, they extend the frontier to low compute.
    "mu": (100, 200, 400, 800, 1600, 3200),
    "Ti": (40, 80, 160, 320),
    "S": (20, 40, 80, 160),
}
SCHEDULES = ("rsqrt", "constant")
# Settings that may differ when a study is resumed: where things are.
RESUMABLE = ("workdir", "data_dir")


def parse_branch_steps(text):
    """Parses the --branch-steps syntax.

    Args:
        text: "100,200,400" (every variant) or "mu=400,800 Ti=40,80"
            (per variant, separated by spaces).

    Returns:
        A list of ints, or {variant: list of ints}.

    Example:
    ```python
    parse_branch_steps("mu=400,800 Ti=40,80")  # {"mu": [400, 800], "Ti": [40, 80]}
    ```
    """
    parts = str(text).split()
    if len(parts) == 1 and "=" not in parts[0]:
        return _int_list(parts[0], "--branch-steps")
    steps = {}
    for part in parts:
        variant, sep, values = part.partition("=")
        if not sep or not variant or variant in steps:
            raise ValueError(
                f"--branch-steps {text!r}: {part!r} is not VARIANT=S1,S2,...; give "
                "one list for every variant ('100,200,400') or one VARIANT=list per "
                "variant ('mu=400,800 Ti=40,80').")
        steps[variant] = _int_list(values, f"--branch-steps {variant}")
    return steps


def _int_list(text, what):
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma-separated list of integers, "
                         "e.g. '100,200,400'.") from None
    if not values:
        raise ValueError(f"{what} is empty; give steps such as '100,200,400'.")
    return values


def resolve(settings):
    """The study's full settings and its per-variant plan, validated.

    Args:
        settings: explicit settings (None = not given); "workdir" is
            required, the rest default to `DEFAULTS`. "variants" may be a
            list or "mu,Ti,S"; "branch_steps" a list (every variant), a
            {variant: list} or the `parse_branch_steps` text.

    Returns:
        (settings dict, plan) with plan = {variant: {"branch_steps",
        "cooldown_steps", "steps", "warmup_steps", "log_every",
        "checkpoint_every", "keep_checkpoints"}}.

    Raises:
        ValueError: a bad setting, named with the fix, before any work.

    Example:
    ```python
    settings, plan = resolve({"workdir": "runs/study", "variants": "mu"})
    plan["mu"]["cooldown_steps"]  # [25, 50, 100, 200, 400, 800]
    ```
    """
    given = {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULTS) - {"workdir"})
    if unknown:
        raise ValueError(f"Unknown study setting(s) {unknown}; the settings are workdir "
                         f"and {', '.join(DEFAULTS)}.")
    study = {**DEFAULTS, **given}
    if not study.get("workdir"):
        raise ValueError("A study needs a workdir: every run, the CSV and the plot go there.")
    variants = study["variants"]
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    variants = list(variants)
    if not variants or len(set(variants)) != len(variants):
        raise ValueError(f"--variants {','.join(variants) or '(none)'}: give distinct "
                         "variant names, e.g. mu,Ti,S.")
    for variant in variants:
        name, patch = parse_variant(variant)  # unknown names list the known ones
        if patch is not None:
            raise ValueError(f"--variants: {variant!r} names a patch size; the study uses "
                             f"one --patch-size for every variant: write {name!r}.")
    study["variants"] = variants
    study["branch_steps"] = _branch_steps(study["branch_steps"], variants)
    if study["schedule"] not in SCHEDULES:
        raise ValueError(f"--schedule {study['schedule']!r}: a branch continues its parent's "
                         f"schedule, so it must not depend on the run's length; use "
                         f"{' or '.join(SCHEDULES)}.")
    if not 0.0 < study["cooldown_fraction"] < 1.0:
        raise ValueError(f"--cooldown-fraction {study['cooldown_fraction']} must be in "
                         "(0, 1); 0.2 cools down over the last 20% of each branch.")
    if not 0.0 <= study["warmup_fraction"] < 1.0:
        raise ValueError(f"--warmup-fraction {study['warmup_fraction']} must be in [0, 1).")
    if not isinstance(study["shots"], int) or study["shots"] < 1:
        raise ValueError(f"--shots {study['shots']!r} must be a positive integer, e.g. 10.")
    depth = study["depth"]
    if depth != "variant" and (not isinstance(depth, int) or depth < 1):
        raise ValueError(f"--depth {depth!r}: give a positive integer, or 'variant' to keep "
                         "each variant's own depth.")
    plan = {v: _plan(v, study["branch_steps"][v], study) for v in variants}
    for variant in variants:  # the model and training settings, checked now
        settings = _parent_settings(study, variant, plan[variant], Path(study["workdir"]))
        settings_lib.resolve(settings)
        ViTConfig.from_variant(variant, num_classes=10, **_model_fields(study))
    return json.loads(json.dumps(study)), plan


def _branch_steps(value, variants):
    if isinstance(value, str):
        value = parse_branch_steps(value)
    if value is None:
        missing = [v for v in variants if v not in DEFAULT_BRANCH_STEPS]
        if missing:
            example = " ".join(f"{v}=100,200,400" for v in variants)
            raise ValueError(f"No default branch steps for variant(s) {missing}; give them, "
                             f"e.g. --branch-steps {example}.")
        value = DEFAULT_BRANCH_STEPS
    if not isinstance(value, dict):
        value = {v: value for v in variants}
    extra = sorted(set(value) - set(variants))
    missing = [v for v in variants if v not in value]
    if extra or missing:
        raise ValueError(f"--branch-steps names {sorted(value)} but --variants are "
                         f"{variants}; give steps for exactly these variants (or one list "
                         "for all).")
    out = {}
    for variant in variants:
        steps = sorted({int(s) for s in value[variant]})
        if not steps or steps[0] < 1:
            raise ValueError(f"--branch-steps {variant}: {list(value[variant])} must be "
                             "positive steps, e.g. 100,200,400.")
        out[variant] = steps
    return out


def _plan(variant, steps, study):
    f = study["cooldown_fraction"]
    cooldowns = [max(1, round(s * f / (1 - f))) for s in steps]
    longest = steps[-1]
    checkpoint_every = math.gcd(*steps)
    keep = longest // checkpoint_every
    if keep > MAX_PARENT_CHECKPOINTS:
        raise ValueError(
            f"--branch-steps {variant}: {steps} have greatest common divisor "
            f"{checkpoint_every}, so the parent would keep {keep} checkpoints (one every "
            f"{checkpoint_every} steps up to {longest}); choose steps with a larger common "
            f"divisor, e.g. multiples of {max(1, longest // 8)}.")
    warmup = min(steps[0], round(study["warmup_fraction"] * longest))
    return {"branch_steps": steps, "cooldown_steps": cooldowns, "steps": longest,
            "warmup_steps": warmup,
            # metrics.jsonl lines fall on every branch start and end
            "log_every": math.gcd(*steps, *cooldowns),
            "checkpoint_every": checkpoint_every, "keep_checkpoints": keep}


def _model_fields(study):
    fields = {k: study[k] for k in ("patch_size", "image_size", "pooling", "posemb")}
    if study["depth"] != "variant":
        fields["depth"] = study["depth"]
    return fields


def _run_dir(workdir, variant, step=None):
    name = "parent" if step is None else f"branch_{step:08d}"
    return Path(workdir) / "runs" / variant / name


def _parent_settings(study, variant, plan, workdir):
    settings = dict(
        workdir=str(_run_dir(workdir, variant)), variant=variant, **_model_fields(study),
        dataset=study["dataset"], data_dir=study["data_dir"],
        batch_size=study["batch_size"], optimizer=study["optimizer"], lr=study["lr"],
        schedule=study["schedule"], steps=plan["steps"], warmup_steps=plan["warmup_steps"],
        cooldown_steps=0, log_every=plan["log_every"],
        checkpoint_every=plan["checkpoint_every"], keep_checkpoints=plan["keep_checkpoints"],
        # Only the branches are measured: the parent evaluates once, at its end.
        eval_every=plan["steps"], fewshot="none", seed=study["seed"])
    if study["schedule"] == "rsqrt":
        settings["rsqrt_timescale"] = max(1, round(study["warmup_fraction"] * plan["steps"]))
    return settings


def _branch_settings(study, parent, step, cooldown, workdir):
    return dict(
        workdir=str(workdir), branch_from=str(parent), branch_step=step,
        cooldown_steps=cooldown, fewshot=str(study["shots"]), data_dir=study["data_dir"],
        # The branch keeps only its final checkpoint (saved at its last step).
        checkpoint_every=cooldown, keep_checkpoints=1)


def _check_workdir(workdir, study):
    """Refuses a workdir holding another study, or anything but a study."""
    def differences(old):
        if old.get("kind") != KIND:
            raise IncompatibleWorkdirError(f"{workdir / 'study.json'} is not a scaling "
                                           "study's record; use a new --workdir.")
        new = {k: v for k, v in study.items() if k not in RESUMABLE}
        old_settings = {k: v for k, v in old["settings"].items() if k not in RESUMABLE}
        return [f"{k}: workdir has {old_settings.get(k)!r}, this study has {new.get(k)!r}"
                for k in sorted(set(new) | set(old_settings))
                if old_settings.get(k) != new.get(k)]

    def foreign(path):
        entries = sorted(p.name for p in path.iterdir()) if path.exists() else []
        if entries:
            return (f"is not empty ({', '.join(entries[:5])}"
                    f"{', ...' if len(entries) > 5 else ''}) and has no study.json, so it "
                    "is not a scaling study this one could resume")
        return None

    return run_log.check_workdir(workdir, "study.json", differences,
                                 "another scaling study (refusing to mix their runs)",
                                 foreign)


def run(settings, log=None, progress=True):
    """Runs (or resumes) a scaling study; see the module docstring.

    Args:
        settings: explicit settings (None = not given); "workdir" is
            required. See `DEFAULTS` and `tools/scaling_study.py --help`.
        log: a function taking a message (default: print to stdout).
        progress: progress bars over each run's steps.

    Returns:
        {"rows": the CSV rows, "fits": `fit_study`'s result, "plan",
        "settings", "workdir": Path, "trained": runs trained or resumed by
        this call, "seconds"}.

    Raises:
        ValueError: bad settings, named, before any work.
        IncompatibleWorkdirError: the workdir holds another study, or is a
            non-empty directory that is not a study.
        NonFiniteLossError: a run's loss became NaN/inf (the run and step
            are in the message); rerun to resume once fixed.

    Example:
    ```python
    from keras_vitscale.training import study
    result = study.run({"workdir": "runs/tiny", "variants": "mu",
                        "branch_steps": [100, 200, 400, 800]})
    print(study.format_table(result["rows"], 10))
    ```
    """
    import keras

    from keras_vitscale.training.runs import train

    log = log or (lambda msg: print(msg, flush=True))
    started = time.perf_counter()
    study, plan = resolve(settings)
    workdir = Path(study["workdir"]).expanduser()
    resuming = _check_workdir(workdir, study)
    workdir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        record = {"kind": KIND, "settings": study, "plan": plan,
                  "backend": keras.backend.backend()}
        run_log.write_json_atomic(workdir / "study.json", record)
    shots = study["shots"]
    total = sum(1 + len(p["branch_steps"]) for p in plan.values())
    count, trained, rows = 0, 0, []
    for variant, p in plan.items():
        parent = _run_dir(workdir, variant)
        count += 1
        if p["steps"] in CheckpointManager(parent).steps():
            log(f"[{count}/{total}] {variant}: parent run finished ({parent}).")
        else:
            log(f"[{count}/{total}] {variant}: parent run to step {p['steps']} "
                f"(branches at {p['branch_steps']}).")
            # A fresh Keras state per run: auto-generated names (and so
            # checkpoint variable paths) are then those of a new process.
            keras.backend.clear_session()
            train(_parent_settings(study, variant, p, workdir), log=log, progress=progress)
            trained += 1
        for step, cooldown in zip(p["branch_steps"], p["cooldown_steps"]):
            count += 1
            branch = _run_dir(workdir, variant, step)
            row = read_branch(branch, variant, shots)
            if row is not None:
                log(f"[{count}/{total}] {variant}: branch at step {step} finished; read "
                    f"from {branch}.")
            else:
                log(f"[{count}/{total}] {variant}: branch at step {step}, cooldown "
                    f"{cooldown} steps to step {step + cooldown}.")
                keras.backend.clear_session()
                train(_branch_settings(study, parent, step, cooldown, branch), log=log,
                      progress=progress)
                trained += 1
                row = read_branch(branch, variant, shots)
                if row is None:
                    raise RuntimeError(f"{branch} finished training but its results "
                                       "(metrics.jsonl, fewshot.json) are incomplete.")
            rows.append(row)
            write_csv(rows, workdir / "study.csv")
    fits = fit_study(rows, shots)
    record = {column: fit_record(result, rows, column) for column, result in fits.items()}
    run_log.write_json_atomic(workdir / "fit.json", record)
    plot_study(rows, fits, workdir / "study.png", shots)
    return {"rows": rows, "fits": fits, "plan": plan, "settings": study, "workdir": workdir,
            "trained": trained, "seconds": round(time.perf_counter() - started, 1)}
