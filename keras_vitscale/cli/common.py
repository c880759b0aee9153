"""What every command-line tool shares: the help formatter, the parser
factory, error reporting with the tools' exit statuses, and the conversion
of parsed flags into run settings.

Exit statuses: 0 done, 2 bad settings (as argparse), 3 a non-finite loss,
130 interrupted (Ctrl-C, the shell's convention for SIGINT).
"""

import argparse
import sys

BAD_SETTINGS = 2
NON_FINITE = 3
INTERRUPTED = 130

# Flags that say how this process runs, not what it computes: kept out of
# the settings a run records (config.json, study.json).
PROCESS_FLAGS = ("no_progress",)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written; appends "(default: X)" to
    an option's help when the option has a default its text does not name.

    Example:
    ```python
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="SGD steps")
    # --help: "--steps STEPS  SGD steps (default: 500)"
    ```
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or "default" in text):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL,
                                                              argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)"


def parser(tool, description, epilog=None):
    """An `ArgumentParser` for `kvs-<tool>`, with the shared formatter.

    Args:
        tool: the tool's name as in its console script (`pretrain`,
            `fit-scaling-law`).
        description: the text under the usage line.
        epilog: the text after the flags, kept as written.

    Example:
    ```python
    p = parser("pretrain", "Pretrain a ViT.")
    p.prog  # 'kvs-pretrain'
    ```
    """
    return argparse.ArgumentParser(prog=f"kvs-{tool}", description=description,
                                   epilog=epilog, formatter_class=HelpFormatter)


def add_model_and_data(parser, workdir_flag):
    """The flags that say which trained model to load and on which data:
    --preset or a kvs-pretrain workdir (one of them required), --dataset,
    --data-dir, --image-size (default: the model's).

    Args:
        parser: the tool's `ArgumentParser`.
        workdir_flag: the workdir option's name, e.g. "--from-workdir".
    """
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a built-in preset name, a preset directory or "
                                        "hf://org/repo")
    which.add_argument(workdir_flag, help="a kvs-pretrain workdir (uses WORKDIR/model)")
    parser.add_argument("--dataset", default="digits",
                        help="digits | digits:CLASSES (e.g. digits:6-9) | synthetic | "
                             "folder:PATH | tfds:NAME[:SPLIT] (default: digits)")
    parser.add_argument("--data-dir", default=None,
                        help="TFDS data directory (never downloads)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input resolution (default: the model's)")


def workdir_setting(workdir, key):
    """A setting recorded in a kvs-pretrain workdir's config.json, or None
    (no workdir, no config.json, or no such key).

    Args:
        workdir: a run directory (or None).
        key: the setting, e.g. "fewshot_dataset".
    """
    import os

    from keras_vitscale.training import run_log

    path = os.path.join(str(workdir), "config.json") if workdir else None
    if path is None or not os.path.isfile(path):
        return None
    return run_log.read_json(path).get(key)


def fail(message, prog=None):
    """Prints a bad-settings error (one line, no traceback); returns 2.

    Args:
        message: what is wrong and the fix.
        prog: the tool's name, printed first as argparse does.
    """
    print(f"{prog}: error: {message}" if prog else f"ERROR: {message}", file=sys.stderr,
          flush=True)
    return BAD_SETTINGS


def report(err):
    """Prints an error that stopped a tool's run; returns the exit status:
    3 for a non-finite loss, 2 for bad settings and other stops.

    It lives here, not beside the errors in `training.errors`: choosing exit
    statuses and printing to stderr is the command line's job, and the
    library only raises.

    Args:
        err: the exception (a `TrainingError`, `ValueError`, ...).
    """
    from keras_vitscale.training.errors import NonFiniteLossError

    print(f"\nERROR: {err}", file=sys.stderr, flush=True)
    return NON_FINITE if isinstance(err, NonFiniteLossError) else BAD_SETTINGS


def interrupted(err, resumable=True):
    """Prints where a Ctrl-C stopped a run; returns 130.

    Args:
        err: the KeyboardInterrupt; a `RunInterrupted` names the last step
            the run reached and its last checkpoint.
        resumable: whether rerunning the command resumes (False for a tool
            that writes no checkpoints).
    """
    from keras_vitscale.training.errors import RunInterrupted

    if isinstance(err, RunInterrupted):
        kept = (f"the last checkpoint is {err.checkpoint}" if err.checkpoint
                else "no checkpoint had been written yet")
        where = f"interrupted at step {err.step} ({kept})"
    else:
        where = "interrupted before training started"
    fix = ("rerun the same command to resume" if resumable
           else "rerun the same command to start again")
    print(f"\n{where}; {fix}", file=sys.stderr, flush=True)
    return INTERRUPTED


def run_guarded(call, resumable=True):
    """Runs `call()` (a training run, a study); returns (its result, None),
    or (None, exit status) after reporting bad settings, a stop or Ctrl-C.

    Args:
        call: a function of no arguments.
        resumable: passed to `interrupted`.

    Example:
    ```python
    summary, status = run_guarded(lambda: trainer.train(settings))
    if status is not None:
        return status
    ```
    """
    from keras_vitscale.training.errors import TrainingError

    try:
        return call(), None
    except (ValueError, FileNotFoundError, TrainingError) as err:
        return None, report(err)
    except KeyboardInterrupt as err:
        return None, interrupted(err, resumable)


def run_settings(args):
    """The parsed flags that define a run (as recorded in config.json or
    study.json), without those that only say how this process runs.

    Args:
        args: an `argparse.Namespace`.
    """
    return {k: v for k, v in vars(args).items() if k not in PROCESS_FLAGS}
