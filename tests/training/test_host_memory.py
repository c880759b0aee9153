"""The retaining glibc malloc settings: when they apply, that a relaunch
installs them, and that they stop the per-step page faults they are for."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from keras_vitscale.training import host_memory

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "keras_vitscale" / "training" / "host_memory.py"
needs_glibc = pytest.mark.skipif(not host_memory.has_glibc(), reason="needs Linux with glibc")

# Both scripts load host_memory.py by path (it needs only the standard
# library, and the package would import Keras twice: before and after the
# relaunch) and relaunch when their second argument says so.
LOAD_AND_RELAUNCH = r"""
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[1])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
if sys.argv[2] == "relaunch":
    host_memory.relaunch_with_retaining_malloc()
"""

# Reports its arguments, the settings and the minor page faults of
# re-allocating and touching a block freed just before, in a second thread
# (a thread's own arena is where glibc falls back to mmap).
FAULTS_SCRIPT = LOAD_AND_RELAUNCH + r"""
import ctypes, os, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 << 20, []

def touch_and_free():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)

for _ in range(2):
    thread = threading.Thread(target=touch_and_free)
    thread.start()
    thread.join()
print(sys.argv[1:], os.environ.get("MALLOC_ARENA_MAX"), os.environ.get("MALLOC_MMAP_MAX_"),
      faults[0], faults[1], os.getpid())
"""


def _run(script, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_modes_decide_by_host_and_flags(monkeypatch):
    assert host_memory.wants_retaining_malloc("system") is False
    with pytest.raises(ValueError, match="'sometimes' is not one of auto, retain, system"):
        host_memory.wants_retaining_malloc("sometimes")
    monkeypatch.setattr(host_memory, "has_glibc", lambda: True)
    monkeypatch.setattr(host_memory, "accelerator_visible", lambda: False)
    assert host_memory.wants_retaining_malloc("auto") is True
    assert host_memory.wants_retaining_malloc("retain", tpu="my-tpu") is True
    # A TPU run or a GPU host keeps glibc's defaults under auto.
    assert host_memory.wants_retaining_malloc("auto", tpu="my-tpu") is False
    monkeypatch.setattr(host_memory, "accelerator_visible", lambda: True)
    assert host_memory.wants_retaining_malloc("auto") is False
    # Without glibc: auto quietly does nothing, an explicit retain is an error.
    monkeypatch.setattr(host_memory, "has_glibc", lambda: False)
    monkeypatch.setattr(host_memory, "accelerator_visible", lambda: False)
    assert host_memory.wants_retaining_malloc("auto") is False
    with pytest.raises(ValueError, match="--host-malloc system"):
        host_memory.wants_retaining_malloc("retain")


def test_env_keeps_what_the_user_set():
    env = host_memory.retaining_malloc_env({"MALLOC_ARENA_MAX": "4", "PATH": "/bin"})
    assert env["MALLOC_ARENA_MAX"] == "4" and env["PATH"] == "/bin"
    assert env["MALLOC_MMAP_MAX_"] == "0" and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 2**40


@needs_glibc
def test_relaunch_installs_settings_and_stops_refaulting_freed_blocks():
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    args, arena, mmap_max, first, second, _ = _run(
        FAULTS_SCRIPT, str(MODULE), "relaunch", "--x", "1").rsplit(" ", 5)
    assert args == f"[{str(MODULE)!r}, 'relaunch', '--x', '1']"  # arguments survive
    assert (arena, mmap_max) == ("1", "0")
    assert int(first) >= pages // 2  # the first touch faults the block in
    assert int(second) < pages // 20  # the freed block is reused, not faulted in again
    # Control: a user's own MALLOC_ARENA_MAX means no relaunch, and glibc's
    # defaults fault the whole block in again.
    *_, second_default, _ = _run(FAULTS_SCRIPT, str(MODULE), "relaunch",
                                 env_extra={"MALLOC_ARENA_MAX": "8"}).rsplit(" ", 2)
    assert int(second_default) >= pages // 2


# A jitted program whose 4096 x 4096 intermediates (192 MiB in all: a matmul
# output, read twice, and its transposes) live in XLA's per-run temporary
# buffer. Prints how many of 12 runs after the first faulted in fewer than a
# tenth of 64 MiB. Without the settings every run faults the buffer in; with
# them the heap still grows by a fresh buffer now and then in the first few
# dozen runs (see host_memory's docstring; at most 7 of the first 12 runs in
# the 12 processes tried), so at least 3 runs must reuse it.
XLA_SCRIPT = LOAD_AND_RELAUNCH + r"""
import os
import jax, jax.numpy as jnp
step = jax.jit(lambda x: (lambda b: jnp.sum(b[::-1] * b.T))(jnp.sin(x) @ jnp.cos(x).T))
x = jnp.ones((4096, 256), jnp.float32)
step(x).block_until_ready()
few, small = 0, (64 << 20) // os.sysconf("SC_PAGE_SIZE") // 10
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    few += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < small
print(few)
"""


@needs_glibc
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's CPU buffers, via JAX")
def test_xla_temporary_buffer_is_not_faulted_in_every_run():
    assert int(_run(XLA_SCRIPT, str(MODULE), "plain")) == 0
    assert int(_run(XLA_SCRIPT, str(MODULE), "relaunch")) >= 3


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_tools_keep_host_malloc_out_of_the_run_settings(tmp_path):
    # How the process runs is not what it trains: resuming a run with another
    # --host-malloc must not look like an incompatible config.
    pretrain = _load_tool("pretrain")
    args = pretrain.parse_args(["--workdir", str(tmp_path), "--host-malloc", "system"])
    assert args.host_malloc == "system"
    settings = pretrain.run_settings(args)
    assert "host_malloc" not in settings and settings["workdir"] == str(tmp_path)
    # The other training tools take the same flag.
    assert _load_tool("finetune").parse_args(
        ["--preset", "p", "--workdir", "w", "--host-malloc", "retain"]).host_malloc == "retain"
    assert _load_tool("scaling_study").build_parser().parse_args([]).host_malloc == "auto"


def test_relaunch_if_wanted_stops_on_a_bad_mode(monkeypatch, capsys):
    monkeypatch.setattr(host_memory, "has_glibc", lambda: False)
    with pytest.raises(SystemExit) as stop:
        host_memory.relaunch_if_wanted("retain")
    assert stop.value.code == 2 and "--host-malloc system" in capsys.readouterr().err
    # "system" never relaunches: the call returns.
    assert host_memory.relaunch_if_wanted("system") is None


# The tools' first step: reads --host-malloc/--tpu and relaunches before any
# package import. Prints the setting seen after it and whether Keras or the
# package had been imported.
EARLY_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import early_relaunch
early_relaunch.relaunch_if_wanted(sys.argv[2:])
print(os.environ.get("MALLOC_ARENA_MAX"), "keras" in sys.modules, "keras_vitscale" in sys.modules)
"""


@needs_glibc
def test_early_relaunch_happens_before_the_package_import():
    tools = str(ROOT / "tools")
    assert _run(EARLY_SCRIPT, tools, "--workdir", "w", "--host-malloc", "retain") == "1 False False"
    auto = "1" if host_memory.wants_retaining_malloc("auto") else "None"
    assert _run(EARLY_SCRIPT, tools, "--steps", "3") == f"{auto} False False"
    # A TPU run under auto, an explicit "system" and --help never relaunch.
    assert _run(EARLY_SCRIPT, tools, "--tpu", "local") == "None False False"
    assert _run(EARLY_SCRIPT, tools, "--host-malloc", "system") == "None False False"
    assert _run(EARLY_SCRIPT, tools, "--host-malloc", "retain", "--help") == "None False False"
