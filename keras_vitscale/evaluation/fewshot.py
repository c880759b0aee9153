"""Few-shot linear evaluation: closed-form ridge regression on frozen features.

This is big_vision's few-shot evaluator (`evaluators/fewshot_lsr.py`), the
number the Scaling ViT papers report as "ImageNet 10-shot":

- sample k examples per class: per seed one `np.random.default_rng(seed)`
  permutes each class's indices in class order, the first k are kept (so the
  5-shot set of a seed contains its 1-shot set);
- standardise every feature dimension with the few-shot train set's mean and
  std (+1e-5, so a constant dimension, e.g. any dimension at 1-shot with one
  class, does not divide by zero);
- append a constant feature of 100: a bias that the ridge penalty barely
  touches, because its weight needs to be 100x smaller than a unit feature's;
- targets are one-hot vectors mapped to {-1, +1};
- solve min_W |XW - Y|^2 + l2 |W|^2 in closed form from one eigendecomposition
  of X^T X when N >= D, of X X^T otherwise (the smaller Gram matrix);
- predict the argmax of the test scores.

The maths is plain numpy in float64: it is tiny (N <= 25 * classes) and has
nothing backend-specific, and float64 keeps the N ~ D case well conditioned.

Beyond big_vision, `l2_reg="auto"` tunes lambda per (shot, seed) by
leave-one-out on the few-shot train set: every example is held out in turn,
and one eigendecomposition answers every lambda of a log grid in closed form.
"""

import dataclasses
import math

import numpy as np

BIAS_CONSTANT = 100.0
STD_EPSILON = 1e-5
# big_vision's lambda. The auto grid reaches 2^-10 because strongly
# correlated features (one direction of tiny variance) want almost no penalty.
DEFAULT_L2_REG = 2.0**10
AUTO_L2_GRID = tuple(2.0**p for p in range(-10, 21))


@dataclasses.dataclass
class RidgeFit:
    """A fitted few-shot ridge classifier.

    Attributes:
        weights: (D + 1, C) float64; the last row multiplies the bias feature.
        mean: (D,) feature means of the train set.
        std: (D,) feature standard deviations of the train set, plus 1e-5.
        l2_reg: the lambda used.

    Example:
    >>> fit = fit_ridge(x, y, num_classes=10)
    >>> predictions = fit.predict(x_test)
    """

    weights: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    l2_reg: float

    def transform(self, features):
        """Standardised features with the bias column appended, (N, D + 1)."""
        return _design(features, self.mean, self.std)

    def decision_function(self, features):
        """Class scores, (N, C)."""
        return self.transform(features) @ self.weights

    def predict(self, features):
        """Predicted class indices, (N,)."""
        return np.argmax(self.decision_function(features), axis=1)


@dataclasses.dataclass
class FewShotResult:
    """Accuracies of a few-shot evaluation.

    Attributes:
        accuracy: {(shot, seed): test accuracy in [0, 1]}.
        l2_reg: {(shot, seed): lambda used}; differs per entry with "auto".
        shots: the shots evaluated, in order.
        seeds: the seeds evaluated, in order.

    Example:
    >>> result = fewshot(xtr, ytr, xte, yte, shots=(1, 5), seeds=3)
    >>> result.mean[5]          # mean accuracy over seeds at 5 shots
    >>> print(result)           # a table, one row per shot
    """

    accuracy: dict
    l2_reg: dict
    shots: tuple
    seeds: tuple

    @property
    def mean(self):
        """{shot: mean accuracy over seeds}."""
        return {
            s: float(np.mean([self.accuracy[(s, seed)] for seed in self.seeds]))
            for s in self.shots
        }

    @property
    def std(self):
        """{shot: standard deviation of the accuracy over seeds}."""
        return {
            s: float(np.std([self.accuracy[(s, seed)] for seed in self.seeds]))
            for s in self.shots
        }

    def table(self):
        """A plain-text table: shots, mean, std, one column per seed, lambda."""
        header = ["shots", "mean", "std"] + [f"seed {s}" for s in self.seeds]
        header.append("log2(l2)")
        rows = []
        for shot in self.shots:
            lambdas = sorted({self.l2_reg[(shot, s)] for s in self.seeds})
            row = [str(shot), f"{self.mean[shot]:.4f}", f"{self.std[shot]:.4f}"]
            row += [f"{self.accuracy[(shot, s)]:.4f}" for s in self.seeds]
            row.append(",".join(f"{math.log2(v):g}" for v in lambdas))
            rows.append(row)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
        return "\n".join([fmt(header)] + [fmt(r) for r in rows])

    def __str__(self):
        return self.table()


def fewshot(
    train_features,
    train_labels,
    test_features,
    test_labels,
    shots=(1, 5, 10, 25),
    seeds=3,
    l2_reg=DEFAULT_L2_REG,
    num_classes=None,
):
    """Few-shot linear evaluation exactly as big_vision's evaluator.

    For every seed and shot k, k examples per class are drawn from the train
    features, a ridge regression onto {-1, +1} one-hot targets is solved in
    closed form, and the accuracy of its argmax on all test features is
    recorded.

    Args:
        train_features: (N, D) array the few-shot examples are drawn from.
        train_labels: (N,) integer class labels in [0, num_classes).
        test_features: (M, D) array, all of it is evaluated.
        test_labels: (M,) integer class labels.
        shots: examples per class, e.g. (1, 5, 10, 25).
        seeds: number of seeds (seeds 0..n-1, as big_vision) or a sequence
            of seeds.
        l2_reg: ridge lambda (big_vision: 2**10), or "auto" to choose it per
            (shot, seed) from the log grid 2^-10..2^20 by leave-one-out
            accuracy on the few-shot train set (closed form, one
            eigendecomposition for the whole grid); at 1 shot nothing can be
            held out, so "auto" uses 2**10 there.
        num_classes: number of classes; defaults to 1 + the largest label.

    Returns:
        A `FewShotResult` (accuracy per (shot, seed), `.mean`, `.table()`).

    Example:
    >>> result = kvs.evaluation.fewshot(xtr, ytr, xte, yte, shots=(1, 10))
    >>> print(result)
    >>> result.mean[10]
    """
    train_features, train_labels = _check_inputs(train_features, train_labels, "train")
    test_features, test_labels = _check_inputs(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have {train_features.shape[1]} dimensions but "
            f"test_features have {test_features.shape[1]}; extract both with "
            "the same model and layer."
        )
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    elif max(train_labels.max(), test_labels.max()) >= num_classes:
        raise ValueError(
            f"labels go up to {max(train_labels.max(), test_labels.max())} but "
            f"num_classes={num_classes}; pass num_classes=None to infer it."
        )
    shots = tuple(int(k) for k in shots)
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    if isinstance(l2_reg, str) and l2_reg != "auto":
        raise ValueError(f'l2_reg={l2_reg!r}: use a positive number or "auto".')
    if not isinstance(l2_reg, str) and not l2_reg > 0:
        raise ValueError(f"l2_reg={l2_reg!r} must be > 0 (big_vision uses 2**10).")

    class_indices = [np.flatnonzero(train_labels == c) for c in range(num_classes)]
    counts = [len(i) for i in class_indices]
    for k in sorted(shots, reverse=True):
        short = [c for c in range(num_classes) if counts[c] < k]
        if short:
            c = short[0]
            others = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
            raise ValueError(
                f"class {c} has {counts[c]} training examples, fewer than "
                f"shots={k}{others}; drop {k} from shots (every class has at "
                f"least {min(counts)}) or pass more training examples."
            )

    accuracy, lambdas = {}, {}
    for seed in seeds:
        # One generator per seed, consumed class by class: the same draw as
        # big_vision, and the k-shot set is a prefix of every larger one.
        rng = np.random.default_rng(seed)
        permuted = [rng.permutation(idx) for idx in class_indices]
        for k in shots:
            idx = np.concatenate([p[:k] for p in permuted])
            x, y = train_features[idx], train_labels[idx]
            lam = l2_reg
            if l2_reg == "auto":
                # Nothing can be held out at 1 shot (a held-out example's
                # class would have no training example left).
                lam = _select_l2(x, y, num_classes) if k > 1 else DEFAULT_L2_REG
            fit = fit_ridge(x, y, num_classes, lam)
            accuracy[(k, seed)] = float(np.mean(fit.predict(test_features) == test_labels))
            lambdas[(k, seed)] = float(lam)
    return FewShotResult(accuracy=accuracy, l2_reg=lambdas, shots=shots, seeds=seeds)


def fit_ridge(features, labels, num_classes, l2_reg=DEFAULT_L2_REG):
    """Fits big_vision's few-shot ridge classifier on (features, labels).

    Args:
        features: (N, D) array.
        labels: (N,) integers in [0, num_classes).
        num_classes: number of target columns C.
        l2_reg: ridge lambda, > 0.

    Returns:
        A `RidgeFit` whose weights solve (X^T X + l2 I) W = X^T Y with X the
        standardised features plus the bias column and Y in {-1, +1}.

    Example:
    >>> fit = fit_ridge(x, y, num_classes=10, l2_reg=2**10)
    >>> accuracy = np.mean(fit.predict(x_test) == y_test)
    """
    features = np.asarray(features, np.float64)
    mean, std = _moments(features)
    cache = _eig_cache(_design(features, mean, std), _targets(labels, num_classes))
    (weights,) = _weights(cache, [l2_reg])
    return RidgeFit(weights=weights, mean=mean, std=std, l2_reg=float(l2_reg))


def _moments(x):
    # Population std (ddof=0), as jnp.std in big_vision.
    return x.mean(axis=0), x.std(axis=0) + STD_EPSILON


def _design(x, mean, std):
    x = (np.asarray(x, np.float64) - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def _targets(labels, num_classes):
    return 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0


def _eig_cache(x, y):
    """Writes W(l2) = lhs diag(1 / (eigs + l2)) rhs for every l2 at once.

    N >= D: W = (X^T X + l2 I)^-1 X^T Y, eigh(X^T X) = Q diag(e) Q^T, so
            lhs = Q, rhs = Q^T X^T Y.
    N < D:  W = X^T (X X^T + l2 I)^-1 Y (the push-through identity), with
            eigh(X X^T) = Q diag(e) Q^T: lhs = X^T Q, rhs = Q^T Y.
    """
    n, d = x.shape
    if n >= d:
        eigs, q = np.linalg.eigh(x.T @ x)
        return eigs, q, q.T @ (x.T @ y)
    eigs, q = np.linalg.eigh(x @ x.T)
    return eigs, x.T @ q, q.T @ y


def _weights(cache, l2_regs):
    eigs, lhs, rhs = cache
    return [(lhs / (eigs + lam)) @ rhs for lam in l2_regs]


def _select_l2(x, y, num_classes, grid=AUTO_L2_GRID):
    """Chooses lambda by leave-one-out accuracy over the k-shot set.

    Every example is held out in turn, and for ridge regression the
    held-out prediction has a closed form from the full fit:
    f_-i(x_i) = (f(x_i) - h_i y_i) / (1 - h_i), h_i the i-th diagonal entry
    of the hat matrix X (X^T X + l2 I)^-1 X^T. With the eigendecomposition
    both f and h are a rescaling per lambda, so the whole grid costs one
    eigendecomposition. (The standardisation statistics include the held-out
    point; that leak is of order 1/N and the same for every lambda.)
    Accuracy decides; ties, common with few examples, go to the lowest
    held-out squared error on the {-1, +1} targets, a smooth proxy.
    """
    mean, std = _moments(x)
    design = _design(x, mean, std)
    targets = _targets(y, num_classes)
    n, d = design.shape
    if n >= d:
        eigs, q = np.linalg.eigh(design.T @ design)
        proj = design @ q  # H = P diag(1 / (e + l)) P^T
        rhs = proj.T @ targets
        gain = lambda lam: 1.0 / (eigs + lam)  # noqa: E731
    else:
        eigs, q = np.linalg.eigh(design @ design.T)
        proj = q  # H = Q diag(e / (e + l)) Q^T
        rhs = q.T @ targets
        gain = lambda lam: eigs / (eigs + lam)  # noqa: E731
    best = None
    for lam in grid:
        g = gain(lam)
        fitted = (proj * g) @ rhs
        hat = np.einsum("ik,k,ik->i", proj, g, proj)
        # 1 - h_i -> 0 only for an interpolating fit; keep the ratio finite.
        held_out = (fitted - hat[:, None] * targets) / np.maximum(1.0 - hat, 1e-12)[:, None]
        acc = np.mean(np.argmax(held_out, axis=1) == y)
        mse = np.mean((held_out - targets) ** 2)
        if best is None or (acc, -mse) > best[0]:
            best = ((acc, -mse), lam)
    return best[1]


def _check_inputs(features, labels, split):
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(
            f"{split}_features has shape {features.shape}; expected (examples, "
            "dimensions). Flatten or pool the representation first."
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"{split}_labels has shape {labels.shape}; expected one integer "
            "class per example (for one-hot labels pass labels.argmax(-1))."
        )
    if len(labels) != len(features):
        raise ValueError(
            f"{split}_labels has {len(labels)} entries but {split}_features has "
            f"{len(features)} rows; pass exactly one label per feature row."
        )
    if len(labels) == 0:
        raise ValueError(f"{split}_features is empty; pass at least one example.")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(
                f"{split}_labels has dtype {labels.dtype} with non-integer values "
                f"such as {labels[np.mod(labels, 1) != 0][0]!r}; pass integer class ids."
            )
        labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(
            f"{split}_labels contains {labels.min()}; class ids must be >= 0."
        )
    if not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"{split}_features has dtype {features.dtype}; expected numbers.")
    finite = np.isfinite(features)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"{split}_features has {np.size(finite) - finite.sum()} non-finite "
            f"values (first: {features[row, col]} at row {row}, column {col}); "
            "check the model for overflow (e.g. float16 activations) or drop "
            "those rows before the few-shot evaluation."
        )
    return features.astype(np.float64), labels
