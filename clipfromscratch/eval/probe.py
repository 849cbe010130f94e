"""Linear probes on frozen features: logistic regression with C picked on a validation split, and a linear SVM."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

C_GRID = np.logspace(-3, 3, 7)  # inverse regularisation strengths tried on the validation split
VALIDATION_FRACTION = 0.2
TEST_FRACTION = 0.3  # held out when the data has no training split of its own


def split(features: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """(train x, test x, train y, test y), stratified when every class has at least two samples."""
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    return train_test_split(features, labels, test_size=fraction, random_state=seed, stratify=stratify)


def _logistic(c: float) -> object:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))


def logistic_regression_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                              seed: int = 0) -> dict[str, float]:
    """Pick C on a validation split of the training set, refit on all of it, score on the test set."""
    fit_x, val_x, fit_y, val_y = split(train_x, train_y, VALIDATION_FRACTION, seed)
    best_c = max(C_GRID, key=lambda c: _logistic(c).fit(fit_x, fit_y).score(val_x, val_y))
    return {"logreg_acc1": _logistic(best_c).fit(train_x, train_y).score(test_x, test_y), "logreg_C": float(best_c)}


def svm_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of a linear SVM (C=1) on standardised features, as in the class-agnostic study (Benedetto's thesis).

    LinearSVC rather than SVC(kernel="linear"): the same linear model family, but it scales to CIFAR's 50k
    training images (kernel SVC is quadratic in the number of samples).
    """
    return make_pipeline(StandardScaler(), LinearSVC(C=1.0)).fit(train_x, train_y).score(test_x, test_y)
