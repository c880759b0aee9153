"""Shampoo: roots against float64 numpy, grafting against optax Adam, fit.

Outside references: numpy float64 eigendecompositions for the inverse roots
(of the factor matrices rebuilt from the gradients), optax.adam for the
grafted step, and optax.adam tuned over a learning-rate grid as the
baseline on an ill-conditioned quadratic.
"""

import math

import keras
import numpy as np
import optax
import pytest
from keras import ops

from keras_vitscale.optimizers.shampoo import Shampoo, block_layout, matrix_inverse_root

BETA2 = 0.999


class Stepper:
    """Applies one gradient step at a time; a jit-compiled stateless step on
    JAX (an eager `apply` there re-traces `ops.cond` at every call)."""

    def __init__(self, optimizer, variables):
        self.optimizer, self.variables = optimizer, variables
        optimizer.build(variables)
        self._jit = None
        if keras.backend.backend() == "jax":
            import jax

            self._jit = jax.jit(optimizer.stateless_apply)

    def __call__(self, grads):
        grads = [ops.convert_to_tensor(np.asarray(g, "float32")) for g in grads]
        if self._jit is None:
            self.optimizer.apply(grads, self.variables)
            return
        opt_vars = self.optimizer.variables
        new_values, new_opt = self._jit([v.value for v in opt_vars], grads,
                                        [v.value for v in self.variables])
        for v, value in zip(self.variables, new_values):
            v.assign(value)
        for v, value in zip(opt_vars, new_opt):
            v.assign(value)


def numpy_inverse_root(matrix, root, epsilon=1e-12):
    eigvals, eigvecs = np.linalg.eigh(np.asarray(matrix, "float64"))
    return (eigvecs * (eigvals + epsilon) ** (-1.0 / root)) @ eigvecs.T


def slot(optimizer, name, index=0):
    return ops.convert_to_numpy(optimizer._slots[index][name]).astype("float64")


def test_matrix_inverse_root_matches_float64_numpy(rng):
    # Batched PSD matrices with condition numbers ~1e3, roots 2 and 4.
    q = np.linalg.qr(rng.normal(size=(3, 6, 6)))[0]
    eigvals = np.logspace(0, -3, 6)[None] * rng.uniform(0.5, 2.0, (3, 1))
    matrices = (q * eigvals[:, None, :]) @ np.swapaxes(q, 1, 2)
    for root in (2, 4):
        got = ops.convert_to_numpy(matrix_inverse_root(
            ops.convert_to_tensor(matrices.astype("float32")), root, 1e-12))
        for m, g in zip(matrices, got):
            want = numpy_inverse_root(m, root)
            assert np.linalg.norm(g - want) / np.linalg.norm(want) < 2e-4


@pytest.mark.parametrize("max_dim", [8192, 4], ids=["whole", "blocked_padded"])
def test_roots_after_first_refresh_match_numpy(rng, max_dim):
    """After 25 steps the stored roots are (EMA of G G^T / bias corr.)^-1/4."""
    shape = (6, 10)
    var = keras.Variable(np.zeros(shape, "float32"), name="kernel")
    opt = Shampoo(0.01, max_preconditioner_dim=max_dim, merge_small_dims=False)
    step = Stepper(opt, [var])
    grads = [rng.normal(size=shape) for _ in range(25)]
    for g in grads:
        step([g])
    correction = 1 - BETA2**25
    _, counts, sizes = block_layout(shape, max_dim, merge=False)
    for p in range(math.prod(counts)):
        bi, bj = divmod(p, counts[1])
        rows = slice(bi * sizes[0], min((bi + 1) * sizes[0], shape[0]))
        cols = slice(bj * sizes[1], min((bj + 1) * sizes[1], shape[1]))
        blocks = [g[rows, cols] for g in grads]
        left = sum((1 - BETA2) * BETA2 ** (24 - t) * b @ b.T for t, b in enumerate(blocks))
        right = sum((1 - BETA2) * BETA2 ** (24 - t) * b.T @ b for t, b in enumerate(blocks))
        for j, factor in enumerate((left, right)):
            want = numpy_inverse_root(factor / correction, 4)
            n = want.shape[0]  # the padded tail of a block is not compared
            got = slot(opt, f"inverse_root_{j}")[p][:n, :n]
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4, (p, j)


@pytest.mark.parametrize("shape,max_dim,merge", [
    ((6, 10), 8192, False), ((6, 10), 4, False), ((3, 1, 5, 2), 8, True), ((7,), 8192, True),
], ids=["matrix", "blocked", "order3_merged", "vector"])
def test_grafted_step_has_adams_norm(rng, shape, max_dim, merge):
    """Steps 1-25 are Adam's (optax) exactly; afterwards each block's step
    has the norm of Adam's step on that block but another direction."""
    lr = 0.01
    w0 = rng.normal(size=shape).astype("float32")
    var = keras.Variable(w0, name="kernel")
    opt = Shampoo(lr, max_preconditioner_dim=max_dim, merge_small_dims=merge)
    step = Stepper(opt, [var])
    adam = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    state = adam.init(w0)
    for t in range(1, 31):
        g = rng.normal(size=shape).astype("float32")
        before = ops.convert_to_numpy(var).copy()
        step([g])
        ours = ops.convert_to_numpy(var) - before
        theirs, state = adam.update(g, state, w0)
        theirs = np.asarray(theirs)
        if t <= 25:
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)
            continue
        np.testing.assert_allclose(np.linalg.norm(ours), np.linalg.norm(theirs), rtol=1e-4)
        cosine = np.sum(ours * theirs) / np.linalg.norm(ours) / np.linalg.norm(theirs)
        assert cosine < 0.999, "the preconditioner is not being applied"
    if shape == (6, 10) and max_dim == 4:  # per block too, not only in total
        blocks = [(slice(0, 3), slice(0, 4)), (slice(3, 6), slice(8, 10))]
        for rows, cols in blocks:
            np.testing.assert_allclose(np.linalg.norm(ours[rows, cols]),
                                       np.linalg.norm(theirs[rows, cols]), rtol=1e-4)


def _quadratic(rng, dim=8, samples=64):
    """0.5 * mean ||(x W - y) C||^2, Hessian (X^T X / n) kron (C C^T): both
    factors rotated and ill-conditioned (1e3 and 1e2)."""
    def rotation():
        return np.linalg.qr(rng.normal(size=(dim, dim)))[0]

    x = rng.normal(size=(samples, dim)) * np.sqrt(np.logspace(0, -3, dim)) @ rotation().T
    x /= np.sqrt(np.mean(x**2))
    c = rotation() * np.sqrt(np.logspace(0, -2, dim))
    y = x @ rng.normal(size=(dim, dim))

    def loss(w):
        return 0.5 * np.mean(np.sum(((x @ w - y) @ c) ** 2, axis=-1))

    def grad(w):
        return x.T @ (x @ w - y) @ c @ c.T / samples

    return loss, grad


def test_shampoo_beats_tuned_adam_on_ill_conditioned_quadratic(rng):
    loss, grad = _quadratic(rng)
    steps, dim = 150, 8
    adam_best = np.inf
    for lr in (0.03, 0.1, 0.3, 1.0, 3.0):
        adam = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
        w = np.zeros((dim, dim))
        state = adam.init(w)
        for _ in range(steps):
            update, state = adam.update(grad(w), state, w)
            w = w + np.asarray(update, "float64")
        adam_best = min(adam_best, loss(w))
    # Kronecker form (an 8x8 kernel would otherwise be merged into one
    # 64-vector, as distributed_shampoo does; the ViT's kernels are not).
    var = keras.Variable(np.zeros((dim, dim), "float32"), name="kernel")
    step = Stepper(Shampoo(1.0, merge_small_dims=False), [var])
    for _ in range(steps):
        step([grad(ops.convert_to_numpy(var).astype("float64"))])
    shampoo_loss = loss(ops.convert_to_numpy(var).astype("float64"))
    assert shampoo_loss < 0.01 * adam_best, (shampoo_loss, adam_best)


def test_decoupled_weight_decay_and_multipliers():
    """With a zero gradient the step is exactly lr * wd * mult * param."""
    kernel = keras.Variable(np.full((3, 4), 2.0, "float32"), name="kernel")
    head = keras.Variable(np.full((4, 2), 2.0, "float32"), name="head_kernel")
    bias = keras.Variable(np.full((4,), 2.0, "float32"), name="bias")
    opt = Shampoo(0.1, weight_decay=0.5,
                  weight_decay_multipliers={r".*head_kernel": 3.0, r".*kernel": 1.0})
    step = Stepper(opt, [kernel, head, bias])
    step([np.zeros((3, 4)), np.zeros((4, 2)), np.zeros((4,))])
    np.testing.assert_allclose(ops.convert_to_numpy(kernel), 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(head), 2.0 - 0.1 * 0.5 * 3.0 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(bias), 2.0)


def test_config_round_trip():
    opt = Shampoo(3e-3, beta_2=0.99, precondition_frequency=10, max_preconditioner_dim=512,
                  merge_small_dims=False, weight_decay=0.1,
                  weight_decay_multipliers={r".*head/kernel": 10.0})
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, Shampoo)
    assert again.get_config() == opt.get_config()


@pytest.mark.parametrize("bad", [
    dict(precondition_frequency=0), dict(max_preconditioner_dim=2.5), dict(beta_2=1.0),
    dict(epsilon=-1.0), dict(learning_rate=1),
])
def test_bad_arguments_name_the_value(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        Shampoo(**{"learning_rate": 0.01, **bad})


def test_fit_runs_through_refreshes_on_active_backend(rng):
    """model.fit (jit-compiled on JAX/TF) with conv, blocked, padded and
    bias parameters; roots refreshed inside the train step (every 5 steps
    here, to keep the test short)."""
    x = rng.normal(size=(120, 8, 8, 3)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
    y += (x[..., 0].mean(axis=(1, 2)) > 0).astype("int32")
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(40, activation="relu", name="hidden"),
        keras.layers.Dense(3),
    ])
    opt = Shampoo(1e-2, precondition_frequency=5, max_preconditioner_dim=32, weight_decay=1e-4)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = model.evaluate(x, y, batch_size=120, verbose=0)
    model.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)  # 20 steps
    last = model.evaluate(x, y, batch_size=120, verbose=0)
    assert int(ops.convert_to_numpy(opt.iterations)) == 20
    assert np.isfinite(last) and last < 0.9 * first, (first, last)
    paths = [v.path for v in model.trainable_variables]
    dense_index = next(i for i, p in enumerate(paths) if p.endswith("hidden/kernel"))
    # (144, 40) with max dim 32: 5 x 2 blocks of 29 x 20 (one padded row).
    assert tuple(opt._slots[dense_index]["inverse_root_0"].shape) == (10, 29, 29)
    for name in ("inverse_root_0", "inverse_root_1"):
        roots = slot(opt, name, dense_index)
        assert np.all(np.isfinite(roots)) and np.abs(roots).max() > 0
