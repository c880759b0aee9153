"""Shampoo with Adam grafting, as SimplEsT-ViT trains it.

The settings are those of facebookresearch's distributed_shampoo used by the
SimplEsT-ViT repository: betas (0.9, 0.999), epsilon 1e-12, root inverses by
symmetric eigendecomposition (coupled Newton iteration did not converge
reliably there) refreshed every 25 steps starting at step 25, dimensions
above 8192 blocked, and Adam grafting (beta2 0.999, eps 1e-8) for the step
size of each block.

How a parameter is preconditioned (all decided from its static shape):
1. size-1 dimensions are dropped and neighbouring small dimensions merged
   while their product stays <= max_preconditioner_dim (a (16, 16, 3, 384)
   patch kernel becomes (768, 384); a (384, 10) head becomes one 3840-long
   vector with a full 3840 x 3840 preconditioner), as distributed_shampoo's
   `use_merge_dims` does. A merged (a, b) kernel costs (ab)^2 floats and an
   eigendecomposition of size ab instead of a^2 + b^2: harmless for ViT-S
   (only the head merges) but heavy for narrow models (width <= 64), where
   `merge_small_dims=False` keeps the Kronecker form;
2. every merged dimension n > max_preconditioner_dim is cut into
   k = ceil(n / max) blocks of equal size ceil(n / k), zero-padding the
   last one. Padding is exact: a zero row of G adds a zero row and column to
   G G^T, so the padded block of the factor is decoupled from the real one
   and only ever multiplies zeros;
3. each block of order k keeps one factor matrix per dimension and uses
   inverse 2k-th roots (a matrix: L^(-1/4) G R^(-1/4); a vector: F^(-1/2)).
A scalar parameter has no preconditioner and takes the grafted (Adam) step.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_vitscale.optimizers import weight_decay as wd_lib

_LETTERS = "abcdefghijklmno"


def merge_dims(shape, max_dim, merge=True):
    """Drops size-1 dims and merges neighbours while the product <= max_dim.

    Args:
        shape: parameter shape.
        max_dim: max_preconditioner_dim.
        merge: False only drops the size-1 dims.

    Returns:
        tuple of merged dimensions (empty for a scalar).
    """
    merged = []
    for dim in (int(d) for d in shape if int(d) != 1):
        if merge and merged and merged[-1] * dim <= max_dim:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return tuple(merged)


def block_layout(shape, max_dim, merge=True):
    """(merged dims, blocks per dim, block size per dim) of a parameter."""
    merged = merge_dims(shape, max_dim, merge)
    counts = tuple(math.ceil(n / max_dim) for n in merged)
    sizes = tuple(math.ceil(n / k) for n, k in zip(merged, counts))
    return merged, counts, sizes


def matrix_inverse_root(matrix, root, epsilon):
    """(A + epsilon I)^(-1/root) of symmetric PSD matrices (batched).

    Eigendecomposition as distributed_shampoo: eigenvalues are shifted up
    by the most negative one when rounding made them negative, epsilon is
    added, and Q diag(lambda^(-1/root)) Q^T is returned.

    Args:
        matrix: (..., n, n) symmetric positive semi-definite.
        root: the root (4 for a matrix parameter).
        epsilon: added to the eigenvalues.

    Returns:
        (..., n, n) tensor of the same dtype.

    Example:
    ```python
    matrix_inverse_root(4.0 * keras.ops.eye(3), 2, 0.0)  # 0.5 * eye(3)
    ```
    """
    eigvals, eigvecs = ops.eigh(matrix)
    shift = ops.minimum(ops.min(eigvals, axis=-1, keepdims=True), 0.0)
    eigvals = eigvals - shift + epsilon
    powered = ops.power(eigvals, -1.0 / root)
    return ops.matmul(eigvecs * ops.expand_dims(powered, -2), ops.swapaxes(eigvecs, -1, -2))


@keras.saving.register_keras_serializable(package="keras_vitscale")
class Shampoo(wd_lib.DecoupledWeightDecay, keras.optimizers.Optimizer):
    """Blocked Shampoo with Adam grafting (distributed_shampoo's defaults).

    With t = step + 1, g the gradient of one block and k its order:

        m = beta_1 m + (1 - beta_1) g;   m_hat = m / (1 - beta_1^t)
        F_j = beta_2 F_j + (1 - beta_2) g_(j) g_(j)^T     (one per dim j)
        every `precondition_frequency` steps from `start_preconditioning_step`:
            X_j = (F_j / (1 - beta_2^t) + epsilon I)^(-1/(2k))
        v = gb2 v + (1 - gb2) g^2
        graft = m_hat / (sqrt(v / (1 - gb2^t)) + grafting_epsilon)   (Adam)
        s = m_hat x_1 X_1 ... x_k X_k            (a matrix: X_1 m_hat X_2)
        u = s * ||graft|| / ||s||   per block, once a root exists; else graft
        param = param - lr(t) * (u + weight_decay * mult * param)

    The first root inverse is computed at step `start_preconditioning_step`
    (25) and used from the next step on, as in distributed_shampoo; before
    that the update is exactly Adam. Factor matrices and roots are float32
    (float64 for float64 parameters); the refresh runs under `ops.cond`, so
    it costs nothing on the other 24 steps, also in a jit-compiled step.

    Args:
        learning_rate: float, `LearningRateSchedule` or callable.
        beta_1: EMA of the gradient (shared by Shampoo and the graft).
            Defaults to 0.9.
        beta_2: EMA of the factor matrices. Defaults to 0.999.
        epsilon: added to the factors' eigenvalues. Defaults to 1e-12.
        precondition_frequency: steps between root refreshes. Defaults to 25.
        start_preconditioning_step: first step that may compute roots;
            None (default) means `precondition_frequency`.
        max_preconditioner_dim: larger dimensions are blocked. Defaults to
            8192.
        merge_small_dims: merge neighbouring dimensions while their product
            is <= max_preconditioner_dim (distributed_shampoo's default).
            Defaults to True.
        grafting_beta_2: Adam graft's second-moment decay. Defaults to 0.999.
        grafting_epsilon: Adam graft's epsilon. Defaults to 1e-8.
        weight_decay: decoupled weight decay rate (times the current
            learning rate). Defaults to 0.0.
        weight_decay_multipliers: dict `{regex on variable.path: mult}`,
            first full match wins. Defaults to `{r".*kernel$": 1.0}`.
        **kwargs: the Keras base optimizer arguments (`global_clipnorm`,
            `gradient_accumulation_steps`, `use_ema`, `name`, ...).

    Example:

    ```python
    optimizer = kvs.optimizers.Shampoo(1e-3, weight_decay=0.05)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    ```
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-12,
        precondition_frequency=25,
        start_preconditioning_step=None,
        max_preconditioner_dim=8192,
        merge_small_dims=True,
        grafting_beta_2=0.999,
        grafting_epsilon=1e-8,
        weight_decay=0.0,
        weight_decay_multipliers=None,
        name="shampoo",
        **kwargs,
    ):
        self._init_optimizer(learning_rate, name, weight_decay, weight_decay_multipliers,
                             **kwargs)
        self._init_moments(beta_1, beta_2, epsilon)
        check = wd_lib.check_hyperparameter
        self.grafting_beta_2 = check("grafting_beta_2", grafting_beta_2, high=1.0, open_high=True)
        self.grafting_epsilon = check("grafting_epsilon", grafting_epsilon)
        self.precondition_frequency = _positive_int(
            "precondition_frequency", precondition_frequency, "25 in SimplEsT-ViT")
        if start_preconditioning_step is None:
            start_preconditioning_step = self.precondition_frequency
        self.start_preconditioning_step = _positive_int(
            "start_preconditioning_step", start_preconditioning_step,
            "None to start at precondition_frequency")
        self.max_preconditioner_dim = _positive_int(
            "max_preconditioner_dim", max_preconditioner_dim, "8192 in distributed_shampoo")
        self.merge_small_dims = bool(merge_small_dims)
        # Roots exist from the first refresh step on; before it, graft only.
        freq = self.precondition_frequency
        self._first_root_step = freq * math.ceil(self.start_preconditioning_step / freq)

    # ---- state ------------------------------------------------------------
    def state_specs(self, shape, dtype="float32"):
        """Slots for a parameter: list of (name, shape, dtype, dropped axis).

        The one description of the optimizer's memory: `build` creates
        exactly these. Factor and root slots have shape (blocks, b, b).
        """
        shape = tuple(shape)
        stat = "float64" if str(dtype) == "float64" else "float32"
        specs = [("momentum", shape, stat, None), ("grafting_velocity", shape, stat, None)]
        _, counts, sizes = self._layout(shape)
        blocks = math.prod(counts)
        for j, size in enumerate(sizes):
            specs.append((f"factor_{j}", (blocks, size, size), stat, None))
            specs.append((f"inverse_root_{j}", (blocks, size, size), stat, None))
        return specs

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._slots = wd_lib.build_slots(self, var_list)

    def _layout(self, shape):
        return block_layout(shape, self.max_preconditioner_dim, self.merge_small_dims)

    def _to_blocks(self, x, shape):
        """Parameter-shaped x -> (blocks, b_1, ..., b_k), zero padded."""
        merged, counts, sizes = self._layout(shape)
        x = ops.reshape(x, merged)
        padding = [(0, k * b - n) for n, k, b in zip(merged, counts, sizes)]
        if any(p for _, p in padding):
            x = ops.pad(x, padding)
        split = [d for k, b in zip(counts, sizes) for d in (k, b)]
        order = len(merged)
        x = ops.reshape(x, split)
        x = ops.transpose(x, [2 * i for i in range(order)] + [2 * i + 1 for i in range(order)])
        return ops.reshape(x, (math.prod(counts),) + sizes)

    def _from_blocks(self, x, shape):
        merged, counts, sizes = self._layout(shape)
        order = len(merged)
        x = ops.reshape(x, counts + sizes)
        x = ops.transpose(x, [i for pair in zip(range(order), range(order, 2 * order))
                              for i in pair])
        x = ops.reshape(x, [k * b for k, b in zip(counts, sizes)])
        if any(k * b != n for n, k, b in zip(merged, counts, sizes)):
            x = x[tuple(slice(0, n) for n in merged)]
        return ops.reshape(x, shape)

    # ---- the step -------------------------------------------------------------
    def update_step(self, gradient, variable, learning_rate):
        slots = self._slots[self._get_variable_index(variable)]
        shape = tuple(variable.shape)
        compute = slots["momentum"].dtype
        g = ops.cast(gradient, compute)
        step = self.iterations + 1
        t = ops.cast(step, compute)

        m = self.beta_1 * slots["momentum"] + (1.0 - self.beta_1) * g
        v = self.grafting_beta_2 * slots["grafting_velocity"] + (
            1.0 - self.grafting_beta_2) * ops.square(g)
        self.assign(slots["momentum"], m)
        self.assign(slots["grafting_velocity"], v)
        m_hat = m / (1.0 - ops.power(self.beta_1, t))
        v_hat = v / (1.0 - ops.power(self.grafting_beta_2, t))
        graft = m_hat / (ops.sqrt(v_hat) + self.grafting_epsilon)

        order = len(self._layout(shape)[0])
        if order == 0:
            self._apply_decayed_step(variable, graft, learning_rate)
            return

        letters = _LETTERS[:order]
        g_blocks = self._to_blocks(g, shape)
        refresh = ops.logical_and(
            ops.equal(step % self.precondition_frequency, 0),
            step >= self.start_preconditioning_step)
        correction = 1.0 - ops.power(self.beta_2, t)
        roots = []
        for j in range(order):
            # F_j += g_(j) g_(j)^T: contract every block axis except j.
            other = letters.replace(letters[j], "z")
            outer = ops.einsum(f"p{letters},p{other}->p{letters[j]}z", g_blocks, g_blocks)
            factor = self.beta_2 * slots[f"factor_{j}"] + (1.0 - self.beta_2) * outer
            self.assign(slots[f"factor_{j}"], factor)
            old_root = slots[f"inverse_root_{j}"]
            root = ops.cond(
                refresh,
                lambda f=factor: matrix_inverse_root(f / correction, 2 * order, self.epsilon),
                lambda r=old_root: ops.convert_to_tensor(r),
            )
            self.assign(old_root, root)
            roots.append(root)

        s = self._to_blocks(m_hat, shape)
        for j, root in enumerate(roots):
            moved = letters.replace(letters[j], "z")
            s = ops.einsum(f"p{letters},p{letters[j]}z->p{moved}", s, root)
        block_axes = tuple(range(1, order + 1))
        graft_norm = ops.sqrt(ops.sum(ops.square(self._to_blocks(graft, shape)), axis=block_axes))
        shampoo_norm = ops.sqrt(ops.sum(ops.square(s), axis=block_axes))
        scale = graft_norm / (shampoo_norm + 1e-16)
        s = s * ops.reshape(scale, (-1,) + (1,) * order)
        direction = ops.where(step > self._first_root_step, self._from_blocks(s, shape), graft)
        self._apply_decayed_step(variable, direction, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "precondition_frequency": self.precondition_frequency,
                "start_preconditioning_step": self.start_preconditioning_step,
                "max_preconditioner_dim": self.max_preconditioner_dim,
                "merge_small_dims": self.merge_small_dims,
                "grafting_beta_2": self.grafting_beta_2,
                "grafting_epsilon": self.grafting_epsilon,
            }
        )
        return config


def _positive_int(name, value, hint):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1 ({hint}).")
    return int(value)
