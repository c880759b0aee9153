"""Few-shot ridge against scikit-learn and numpy, and feature extraction."""

import keras
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from keras_vitscale.evaluation import extract_features
from keras_vitscale.evaluation import fewshot
from keras_vitscale.evaluation import fit_ridge


def _clusters(num_classes, per_class, dim, spread, seed, test_per_class=0):
    """Gaussian clusters (unit noise) around centers of scale `spread`.

    Returns (x, y) or, with test_per_class, (x, y, x_test, y_test) drawn
    around the same centers.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * spread
    out = []
    for n in (per_class, test_per_class) if test_per_class else (per_class,):
        y = np.repeat(np.arange(num_classes), n)
        out += [centers[y] + rng.normal(size=(len(y), dim)), y]
    return tuple(out)


def _big_vision_design(x, x_train):
    # big_vision's few-shot design matrix (standardised features plus a bias
    # column of 100), written independently of the package.
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])


@pytest.mark.parametrize("n,d", [(60, 8), (12, 40)], ids=["N>=D", "N<D"])
def test_matches_sklearn_ridge(n, d):
    x, y, x_test, _ = _clusters(4, n // 4, d, spread=1.0, seed=0, test_per_class=25)
    lam = 2.0**3
    fit = fit_ridge(x, y, num_classes=4, l2_reg=lam)
    design = _big_vision_design(x, x)
    targets = 2.0 * np.eye(4)[y] - 1.0
    ref = Ridge(alpha=lam, fit_intercept=False, solver="cholesky").fit(design, targets)
    np.testing.assert_allclose(fit.weights, ref.coef_.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(
        fit.predict(x_test), ref.predict(_big_vision_design(x_test, x)).argmax(1)
    )


@pytest.mark.parametrize("dim,spread", [(6, 1.0), (300, 0.3)], ids=["N>=D", "N<D"])
def test_fewshot_matches_numpy_solve(dim, spread):
    # The whole pipeline (big_vision's seeded per-class sampling, then the
    # closed-form solve) against a direct numpy solve of the normal equations
    # in the primal (N >= D) or dual (N < D) form.
    x, y, x_test, y_test = _clusters(5, 12, dim, spread, seed=2, test_per_class=40)
    lam, shots, seed = 2.0**10, 4, 7
    result = fewshot(x, y, x_test, y_test, shots=(shots,), seeds=(seed,), l2_reg=lam)

    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:shots] for c in range(5)]
    )
    design = _big_vision_design(x[idx], x[idx])
    targets = 2.0 * np.eye(5)[y[idx]] - 1.0
    n, d = design.shape
    if n >= d:
        w = np.linalg.solve(design.T @ design + lam * np.eye(d), design.T @ targets)
    else:
        w = design.T @ np.linalg.solve(design @ design.T + lam * np.eye(n), targets)
    # The same minimiser written as one least-squares problem on [X; sqrt(l) I].
    stacked = np.vstack([design, np.sqrt(lam) * np.eye(d)])
    w_lstsq = np.linalg.lstsq(stacked, np.vstack([targets, np.zeros((d, 5))]), rcond=None)[0]
    np.testing.assert_allclose(w, w_lstsq, rtol=1e-6, atol=1e-10)
    fit = fit_ridge(x[idx], y[idx], 5, lam)
    np.testing.assert_allclose(fit.weights, w, rtol=1e-7, atol=1e-12)
    expected = np.mean((_big_vision_design(x_test, x[idx]) @ w).argmax(1) == y_test)
    assert result.accuracy[(shots, seed)] == pytest.approx(expected)
    assert 0.3 < expected < 1.0  # a case where the answer is not trivial


def test_separated_clusters_are_perfect():
    x, y, x_test, y_test = _clusters(10, 30, 32, spread=3.0, seed=0, test_per_class=20)
    result = fewshot(x, y, x_test, y_test, shots=(1, 5, 25), seeds=3)
    assert result.mean == {1: 1.0, 5: 1.0, 25: 1.0}
    text = str(result)
    assert "shots" in text and "seed 2" in text and "1.0000" in text
    assert len(text.splitlines()) == 4


def test_random_labels_are_near_chance():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 32)), rng.integers(0, 10, 500)
    x_test, y_test = rng.normal(size=(3000, 32)), rng.integers(0, 10, 3000)
    result = fewshot(x, y, x_test, y_test, shots=(5, 25), seeds=2)
    # Chance is 0.1; one accuracy over 3000 examples has std ~0.0055.
    for acc in result.accuracy.values():
        assert abs(acc - 0.1) < 0.03


def test_deterministic_per_seed():
    x, y, x_test, y_test = _clusters(6, 20, 16, spread=0.4, seed=4, test_per_class=50)
    a = fewshot(x, y, x_test, y_test, shots=(2, 5), seeds=4)
    b = fewshot(x, y, x_test, y_test, shots=(2, 5), seeds=4)
    assert a.accuracy == b.accuracy
    # Different seeds draw different examples, so accuracies differ.
    assert len({a.accuracy[(2, s)] for s in range(4)}) > 1
    c = fewshot(x, y, x_test, y_test, shots=(2,), seeds=(3,))
    assert c.accuracy[(2, 3)] == a.accuracy[(2, 3)]


def test_auto_beats_a_too_small_lambda_near_interpolation():
    # 50 examples in 49 + 1 dimensions: with almost no penalty the fit
    # interpolates noise (the double-descent peak); big_vision's 2^10 is fine.
    x, y, x_test, y_test = _clusters(5, 40, 49, spread=0.4, seed=0, test_per_class=100)
    kw = dict(shots=(10,), seeds=3)
    tiny = fewshot(x, y, x_test, y_test, l2_reg=2.0**-10, **kw).mean[10]
    auto = fewshot(x, y, x_test, y_test, l2_reg="auto", **kw)
    assert auto.mean[10] > tiny + 0.2
    assert all(2.0**0 <= lam <= 2.0**14 for lam in auto.l2_reg.values())


def test_auto_beats_a_too_large_lambda_with_correlated_features():
    # Class signal lives in x0 - x1 while x0 and x1 share a large nuisance:
    # only an (almost) unpenalised fit can cancel it, a large lambda pulls the
    # weights toward the per-feature class means, which are nearly useless.
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 2, n)
        nuisance = 10.0 * rng.normal(size=n)
        signal = 2.0 * y - 1.0 + 0.3 * rng.normal(size=n)
        return np.column_stack([signal + nuisance, nuisance, rng.normal(size=(n, 6))]), y

    (x, y), (x_test, y_test) = make(400), make(1000)
    kw = dict(shots=(1, 25), seeds=3)
    default = fewshot(x, y, x_test, y_test, **kw).mean[25]
    auto = fewshot(x, y, x_test, y_test, l2_reg="auto", **kw)
    assert default < 0.6 and auto.mean[25] > 0.95
    assert all(auto.l2_reg[(25, s)] < 1.0 for s in range(3))
    assert all(auto.l2_reg[(1, s)] == 2.0**10 for s in range(3))  # 1 shot: default


def test_errors_name_the_value_and_fix():
    x, y = _clusters(4, 10, 8, spread=1.0, seed=0)
    short = y.copy()
    short[np.flatnonzero(y == 3)[2:]] = 2  # class 3 keeps 2 examples
    with pytest.raises(ValueError, match=r"class 3 has 2 training examples, fewer than shots=5"):
        fewshot(x, short, x, y, shots=(1, 5))
    with pytest.raises(ValueError, match=r"train_labels has 39 entries but train_features has 40 rows"):
        fewshot(x, y[:-1], x, y)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"test_features has 1 non-finite.*row 3, column 2"):
        fewshot(x, y, bad, y)
    with pytest.raises(ValueError, match=r"8 dimensions but test_features have 7"):
        fewshot(x, y, x[:, :7], y)
    with pytest.raises(ValueError, match=r"l2_reg='tuned'.*\"auto\""):
        fewshot(x, y, x, y, l2_reg="tuned")


def _tiny_model():
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs)


def test_extract_features_on_active_backend():
    model = _tiny_model()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(7, 4, 4, 3)).astype("float32")
    labels = np.arange(7)
    expected = keras.ops.convert_to_numpy(model(images))

    feats, labs = extract_features(model, (images, labels), batch_size=3, progress=False)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labs, labels)

    # An iterable of (images, labels) batches and one of TFDS-style dicts.
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    feats, labs = extract_features(model, iter(batches), progress=True)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labs, labels)
    dicts = [{"image": b[0], "label": b[1]} for b in batches]
    feats, labs = extract_features(model, dicts, progress=False)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)

    # A plain callable returning a dict: the output must be picked.
    fn = lambda x: {"pre_logits": model(x)}  # noqa: E731
    feats, labs = extract_features(fn, images, batch_size=5, progress=False, output="pre_logits")
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    assert labs is None
    with pytest.raises(ValueError, match=r"returned a dict \(keys \['pre_logits'\]\); pass output="):
        extract_features(fn, images, progress=False)


def test_extract_features_from_tf_data():
    tf = pytest.importorskip("tensorflow")
    model = _tiny_model()
    images = np.random.default_rng(1).normal(size=(6, 4, 4, 3)).astype("float32")
    labels = np.arange(6) % 2
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    feats, labs = extract_features(model, ds, progress=False)
    np.testing.assert_allclose(feats, keras.ops.convert_to_numpy(model(images)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labs, labels)
