"""The checkpoint manager picks the format to write by process count and
the format to read by what each checkpoint directory holds. (Saving,
pruning and skipping corrupt one-process checkpoints: test_safety.py; Orbax
checkpoints and resuming across formats: test_multiprocess.py.)"""

import keras
import pytest

from keras_vitscale.training import checkpoint
from keras_vitscale.training import npz_checkpoint
from keras_vitscale.training import orbax_checkpoint
from keras_vitscale.training.checkpoint import PREFIX, CheckpointManager
from keras_vitscale.training.errors import CheckpointError


def _tiny_model_and_optimizer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def test_the_process_count_picks_the_format_written(tmp_path):
    assert CheckpointManager(tmp_path).format is npz_checkpoint
    assert CheckpointManager.for_run(tmp_path, 3, 1).format is npz_checkpoint
    manager = CheckpointManager.for_run(tmp_path, 2, 2)
    assert manager.format is orbax_checkpoint and manager.keep == 2
    assert checkpoint.manager_for(tmp_path, process_count=4).format is orbax_checkpoint
    assert manager.path(1000).name == f"{PREFIX}00001000"


def test_each_checkpoint_is_read_in_the_format_it_holds(tmp_path):
    model, optimizer = _tiny_model_and_optimizer()
    logs = []
    manager = CheckpointManager(tmp_path, keep=5, log=logs.append)
    manager.save(1, model, optimizer, extra={"data_position": 8})
    # A step-2 directory in Orbax's layout with nothing readable in it.
    (manager.path(2) / "state").mkdir(parents=True)
    assert manager.steps() == [1, 2]
    if keras.backend.backend() == "jax":  # read with Orbax, found broken, skipped
        meta = manager.restore_latest(model, optimizer)
        assert meta["step"] == 1 and meta["data_position"] == 8
        assert "ckpt_00000002 is corrupt (meta unreadable" in logs[-1]
    else:  # not taken for a corrupt checkpoint: the backend is the problem
        with pytest.raises(CheckpointError, match="need the JAX backend"):
            manager.restore_latest(model, optimizer)
    assert manager.restore_latest(model, optimizer, step=1)["step"] == 1
