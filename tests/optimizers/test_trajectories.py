"""Step-by-step parameter trajectories against optax, the outside reference.

Both sides see the same random gradient sequence (STEPS steps) on tensors of
rank 1, 2 (factored, with either axis the largest, and not factored) and 4
(conv kernels, factored and not). The optax references are built from its
public transforms:
- ScalingAdafactor vs optax.scale_by_factored_rms(min_dim_size_to_factor=32,
  epsilon=1e-30, decay_rate_fn = min(0.999, 1 - (i + 1) ** -0.8)) ->
  optax.ema(0.9, debias=False, accumulator_dtype=bfloat16) ->
  optax.add_decayed_weights(wd * mult, mask) per multiplier ->
  optax.scale_by_learning_rate(lr): big_vision's `scale_by_adafactor` chain.
- BF16Adam vs optax.adam(lr, mu_dtype=bfloat16) with the same decoupled
  decay transforms inserted before the learning rate.

Tolerances. Everything is float32 except the stored first moment, rounded to
bfloat16 (8 significant bits: neighbouring values of m are at most
2**-7 * |m| apart). Both sides round the same float32 number, so they agree
until float32 noise (~1e-7 relative) pushes one of them across a rounding
boundary; the stored m then differs by one bf16 spacing, 2**-7 |m|. That
difference decays by beta1 = 0.9 per step, so it moves the parameter by at
most lr * 2**-7 * max|m| * sum_k 0.9**k = 10 * lr * 2**-7 * max|m|. The max
tolerance allows FLIPS such flips per element; the mean error must stay at
float32 level (most elements never flip), which a wrong formula (beta2,
factoring axis, debiasing, decay) would break by orders of magnitude.
"""

import contextlib
import re

import numpy as np
import pytest

import keras
from keras_vitscale.optimizers import BF16Adam, ScalingAdafactor

optax = pytest.importorskip("optax")
jax = pytest.importorskip("jax")
jnp = jax.numpy

STEPS = 100
LR = 0.01
FLIPS = 4
SHAPES = {
    "block/bias": (7,),
    "block/dense/kernel": (40, 64),  # factored, largest axis last
    "block/proj/kernel": (64, 40),  # factored, largest axis first
    "patch/conv/kernel": (3, 3, 16, 48),  # rank 4, not factored
    "block/conv/kernel": (2, 2, 32, 48),  # rank 4, factored over (2, 3)
    "head/kernel": (8, 50),  # second largest dim < 32: full second moment
}
# One run covers decayed and undecayed tensors of every rank: the conv
# kernels and the bias get multiplier 0 (the latter by matching nothing).
MULTIPLIERS = {r".*head/kernel": 3.0, r".*conv/kernel": 0.0, r".*kernel": 1.0}
WEIGHT_DECAY = 0.5
# Below the default 0.999 so that the cap binds within the run (from t = 43).
BETA2_CAP = 0.95


def _data():
    rng = np.random.default_rng(0)
    init = {k: rng.normal(size=s).astype("float32") for k, s in SHAPES.items()}
    grads = [
        {k: rng.normal(size=s).astype("float32") for k, s in SHAPES.items()}
        for _ in range(STEPS)
    ]
    return init, grads


def make_variable(path, value):
    """A keras.Variable whose `.path` is `path` (nested name scopes)."""
    *scopes, name = path.split("/")
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(keras.name_scope(scope))
        return keras.Variable(value, name=name)


def _keras_trajectory(optimizer, init, grads):
    variables = [make_variable(k, v) for k, v in init.items()]
    assert [v.path for v in variables] == list(init)
    optimizer.build(variables)
    trajectory = []
    for step_grads in grads:
        optimizer.apply([step_grads[k] for k in init], variables)
        trajectory.append({k: keras.ops.convert_to_numpy(v) for k, v in zip(init, variables)})
    return trajectory


def _optax_trajectory(base_chain, init, grads, weight_decay=WEIGHT_DECAY):
    """Runs `base_chain` (then decay and lr) with optax on the same grads.

    Float32-only transforms are jitted for speed; those holding a bfloat16
    state run eagerly, because under jit XLA may keep `0.9 * m_bf16` in
    float32 (excess precision), which is not what the eager op rounds.
    """
    decay = []
    if weight_decay:
        matched = set()
        for pattern, mult in MULTIPLIERS.items():
            mask = {}
            for k in init:
                mask[k] = k not in matched and re.fullmatch(pattern, k) is not None
                if mask[k]:
                    matched.add(k)
            decay.append(optax.add_decayed_weights(weight_decay * mult, mask))
    stages = [(tx, jit) for tx, jit in base_chain]
    stages += [(tx, False) for tx in decay]
    stages.append((optax.scale_by_learning_rate(LR), False))
    params = {k: jnp.asarray(v) for k, v in init.items()}
    states = [tx.init(params) for tx, _ in stages]
    updates_fns = [jax.jit(tx.update) if jit else tx.update for tx, jit in stages]
    trajectory = []
    for step_grads in grads:
        updates = {k: jnp.asarray(v) for k, v in step_grads.items()}
        for i, update in enumerate(updates_fns):
            updates, states[i] = update(updates, states[i], params)
        params = optax.apply_updates(params, updates)
        trajectory.append({k: np.asarray(v) for k, v in params.items()})
    return trajectory


def _compare(ours, ref, max_m):
    atol = FLIPS * 10 * LR * 2.0**-7 * max_m
    for step, (a, b) in enumerate(zip(ours, ref)):
        for k in a:
            err = np.abs(a[k] - b[k])
            assert err.max() <= atol, (step, k, err.max(), atol)
            assert err.mean() <= 2e-5, (step, k, err.mean())


def _adafactor_chain():
    def beta2(i, exponent):
        t = jnp.asarray(i, jnp.float32) + 1.0
        return jnp.minimum(BETA2_CAP, 1.0 - t ** (-exponent))

    rms = optax.scale_by_factored_rms(
        factored=True,
        decay_rate=0.8,
        min_dim_size_to_factor=32,
        epsilon=1e-30,
        decay_rate_fn=beta2,
    )
    ema = optax.ema(0.9, debias=False, accumulator_dtype=jnp.bfloat16)
    return [(rms, True), (ema, False)]


def test_scaling_adafactor_matches_optax():
    init, grads = _data()
    optimizer = ScalingAdafactor(
        LR,
        beta2_cap=BETA2_CAP,
        weight_decay=WEIGHT_DECAY,
        weight_decay_multipliers=MULTIPLIERS,
    )
    ours = _keras_trajectory(optimizer, init, grads)
    ref = _optax_trajectory(_adafactor_chain(), init, grads)
    # Adafactor's pre-momentum update is g / rms(g) per factor: elements of a
    # few units at most for normal gradients; 4 bounds them comfortably.
    _compare(ours, ref, max_m=4.0)
    # The reference really moved, by far more than the tolerance.
    moved = np.abs(ref[-1]["block/dense/kernel"] - init["block/dense/kernel"])
    assert moved.mean() > 0.1


def test_bf16_adam_matches_optax():
    # optax.adam(lr, mu_dtype=bf16) is chain(scale_by_adam(mu_dtype=bf16),
    # scale_by_learning_rate(lr)); the decay transforms go between the two.
    init, grads = _data()
    optimizer = BF16Adam(
        LR, weight_decay=WEIGHT_DECAY, weight_decay_multipliers=MULTIPLIERS
    )
    ours = _keras_trajectory(optimizer, init, grads)
    ref_chain = [(optax.scale_by_adam(mu_dtype=jnp.bfloat16), False)]
    ref = _optax_trajectory(ref_chain, init, grads)
    # Adam's m is a running mean of N(0, 1) gradients: |m| < 5 always.
    _compare(ours, ref, max_m=5.0)
    moved = np.abs(ref[-1]["block/dense/kernel"] - init["block/dense/kernel"])
    assert moved.mean() > 0.05


def test_adafactor_state_is_small():
    optimizer = ScalingAdafactor(LR)
    init, grads = _data()
    _keras_trajectory(optimizer, init, grads[:1])
    full = {v.path.split("/")[-1] for v in optimizer.variables if v.shape == (40, 64)}
    # The only full-size slot of a factored parameter is its bf16 momentum.
    assert full == {"block_dense_kernel_momentum"}
    by_name = {v.path.split("/")[-1]: v for v in optimizer.variables}
    assert by_name["block_dense_kernel_momentum"].dtype == "bfloat16"
    assert by_name["block_dense_kernel_v_row"].shape == (40,)
    assert by_name["block_dense_kernel_v_col"].shape == (64,)
    assert by_name["block_conv_kernel_v_row"].shape == (2, 2, 32)
    assert by_name["block_conv_kernel_v_col"].shape == (2, 2, 48)
    assert by_name["head_kernel_v"].shape == (8, 50)
    assert by_name["block_bias_v"].shape == (7,)
    assert by_name["patch_conv_kernel_v"].shape == (3, 3, 16, 48)


def test_adafactor_block_rms_clipping_without_momentum_matches_optax():
    # All float32 here (no momentum), so the match is at float32 precision:
    # the factored update is exercised with update clipping on and the
    # momentum off, the two non-default switches.
    init, grads = _data()
    grads = [{k: g * (1 + 5 * (i % 2)) for k, g in step.items()} for i, step in enumerate(grads[:20])]
    optimizer = ScalingAdafactor(
        LR,
        beta2_cap=BETA2_CAP,
        clipping_threshold=0.5,
        momentum=None,
        weight_decay=WEIGHT_DECAY,
        weight_decay_multipliers=MULTIPLIERS,
    )
    ours = _keras_trajectory(optimizer, init, grads)
    rms, _ = _adafactor_chain()[0]
    chain = [(rms, True), (optax.clip_by_block_rms(0.5), True)]
    ref = _optax_trajectory(chain, init, grads)
    for a, b in zip(ours, ref):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not any(v.path.endswith("momentum") for v in optimizer.variables)
