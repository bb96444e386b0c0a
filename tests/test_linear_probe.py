"""The linear probe against scikit-learn on fixed features: the torch solver's optimum, the
choice of C on validation slides, the refit and the test predictions."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from clusiam.linear_probe import C_GRID, DEFAULT_C, fit, train_linear_probe


def problem(seed, classes=("normal", "tumor"), slides=8, per_slide=40, dim=16, signal=0.6):
    """Gaussian features whose class shifts the first four dimensions, with a per-slide offset
    (stain) on all of them; scales differ per dimension, so standardising matters."""
    rng = np.random.default_rng(seed)
    features, labels, names = [], [], []
    for slide in range(slides):
        offset = rng.normal(0, 0.5, dim)
        label = rng.integers(0, len(classes), per_slide)
        x = rng.normal(0, 1, (per_slide, dim)) + offset
        x[:, :4] += signal * label[:, None]
        features.append(x * np.linspace(0.1, 10, dim))
        labels += [classes[i] for i in label]
        names += [f"slide_{slide}"] * per_slide
    return np.concatenate(features).astype(np.float32), labels, names


@pytest.mark.parametrize("classes", [("normal", "tumor"), ("a", "b", "c")])
@pytest.mark.parametrize("c", [0.01, 1.0])
def test_the_torch_solver_reaches_scikit_learns_optimum(classes, c):
    x, labels, _ = problem(0, classes)
    ours = fit(x, labels, c, "torch", torch.device("cpu"))
    scaled = StandardScaler().fit_transform(x)
    reference = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(scaled, labels)
    np.testing.assert_allclose(ours.weight, reference.coef_, atol=1e-3)
    np.testing.assert_allclose(ours.bias, reference.intercept_, atol=1e-3)
    assert ours.predict(x) == list(reference.predict(scaled))
    assert fit(x, labels, c, "sklearn").predict(x) == ours.predict(x)


def test_c_is_chosen_on_validation_slides_and_the_refit_predicts_as_scikit_learn(tmp_path):
    x, labels, slides = problem(1)
    test_x, test_labels, _ = problem(2)
    probe = train_linear_probe(x, labels, slides, "sklearn")

    # The same protocol written out with scikit-learn: a quarter of the slides validate each C.
    fit_rows, val_rows = next(StratifiedGroupKFold(4, shuffle=True, random_state=0).split(x, labels, slides))
    assert not {slides[i] for i in fit_rows} & {slides[i] for i in val_rows}
    scores = {}
    for c in C_GRID:
        scaler = StandardScaler().fit(x[fit_rows])
        model = LogisticRegression(C=c, max_iter=1000, tol=1e-6).fit(scaler.transform(x[fit_rows]),
                                                                      [labels[i] for i in fit_rows])
        predicted = model.predict(scaler.transform(x[val_rows]))
        scores[c] = f1_score([labels[i] for i in val_rows], predicted, average="macro")
    best = max(C_GRID, key=lambda c: (scores[c], -c))
    assert probe.c == best and probe.validation_macro_f1 == pytest.approx({f"{c:g}": s for c, s in scores.items()})
    assert len(set(scores.values())) > 1  # C matters on this problem, so the choice is a real one
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=best, max_iter=1000, tol=1e-6).fit(scaler.transform(x), labels)
    assert probe.predict(test_x) == list(reference.predict(scaler.transform(test_x)))
    assert 0.6 < f1_score(test_labels, probe.predict(test_x), pos_label="tumor") < 1.0


def test_one_training_slide_or_one_class_leaves_nothing_to_choose():
    x, labels, slides = problem(3, slides=1)
    one_slide = train_linear_probe(x, labels, slides, "sklearn")
    assert one_slide.c == DEFAULT_C and one_slide.validation_macro_f1 == {}
    assert one_slide.warnings == ["the training set has one slide, so C could not be chosen on validation slides: "
                                  "C = 1"]
    one_class = train_linear_probe(x, ["normal"] * len(x), slides, "torch")
    assert one_class.predict(x[:5]) == ["normal"] * 5 and one_class.warnings == []
