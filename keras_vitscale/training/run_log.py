"""A run's workdir files: metrics.jsonl rows and atomically written JSON.

The one place that writes, reads and trims `metrics.jsonl` (one JSON object
per line, each with a "step") and writes JSON files whole or not at all.
Plain Python, no backend: the trainer, branches, fine-tuning, the scaling
study, the plots and the Hub model card all go through it.
"""

import json
import logging
import os
from pathlib import Path

from keras_vitscale.training.errors import IncompatibleWorkdirError

logger = logging.getLogger("keras_vitscale")

METRICS_FILE = "metrics.jsonl"


def write_json_atomic(path, value):
    """Writes `value` as JSON to `path` through a temporary file and a rename,
    so a reader (or a run killed mid-write) never sees half a file.

    Non-finite floats are refused: JSON has no NaN, and a file other tools
    cannot parse is worse than an error.
    """
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=False))


def write_text_atomic(path, text):
    """Writes `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path):
    """The JSON object in `path`."""
    with open(path) as f:
        return json.load(f)


def read_metrics(path):
    """The rows of a metrics.jsonl file ([] if it does not exist).

    A line that is not JSON (the partial last line of a run killed
    mid-write) is skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("Skipping unreadable line %d of %s.", number, path)
    return rows


def append_metrics(path, row):
    """Appends one row (a dict with a "step") to a metrics.jsonl file."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_metrics(path, rows):
    """Writes `rows` as the whole metrics.jsonl file, atomically."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def trim_metrics(path, step):
    """Drops the rows logged after `step` (a run that died after its last
    checkpoint logged steps it will train again)."""
    path = Path(path)
    if path.exists():
        write_metrics(path, [row for row in read_metrics(path) if row["step"] <= step])


def check_workdir(workdir, record, differences, held, foreign):
    """Whether `workdir` holds this run (resume) or nothing yet (a new run).

    The one workdir check of the trainer and the scaling study: a workdir is
    resumed only when its record file (config.json, study.json) has no
    differences from this run's settings, and a directory holding something
    else is never written into.

    Args:
        workdir: the run's directory (it need not exist).
        record: the record file's name inside it.
        differences: function of the stored record -> list of difference
            lines (empty: the same run).
        held: what a differing record holds, for the error ("a run with a
            different config").
        foreign: function of the workdir (with no record) -> a description
            of what is there that makes it unusable, or None.

    Returns:
        True to resume, False for a new run.

    Raises:
        IncompatibleWorkdirError: the record differs (each difference is
            named), or the directory holds something else.

    Example:
    ```python
    resuming = check_workdir(Path("runs/x"), "config.json",
                             lambda old: settings.differences(old, config),
                             "a run with a different config", lambda w: None)
    ```
    """
    workdir = Path(workdir)
    path = workdir / record
    if not path.exists():
        found = foreign(workdir)
        if found:
            raise IncompatibleWorkdirError(f"--workdir {workdir} {found}; use a new --workdir.")
        return False
    diffs = differences(read_json(path))
    if diffs:
        raise IncompatibleWorkdirError(
            f"--workdir {workdir} holds {held}; refusing to overwrite it. Differences:\n  "
            + "\n  ".join(diffs)
            + "\nRerun with the same settings to resume it, or choose a new --workdir.")
    return True
