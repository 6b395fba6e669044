"""Linear probes of fixed features (both tasks): how much a representation knows about a label space."""
from __future__ import annotations

import numpy as np


def fit_probe(xtr: np.ndarray, ytr: np.ndarray, tests: dict[str, tuple[np.ndarray, np.ndarray]],
              c: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Accuracy (%) on each test set of a standardised multinomial logistic regression fitted on (xtr, ytr)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, random_state=seed))
    clf.fit(xtr, ytr)
    return {name: 100.0 * float((clf.predict(x) == y).mean()) for name, (x, y) in tests.items()}
