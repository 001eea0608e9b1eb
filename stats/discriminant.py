"""Fisher's linear discriminant of one layer's keys, forget probes against retain prompts, in closed form.

    w = (S + c I)^-1 (mu_forget - mu_retain)      S: pooled within-class covariance, shrunk towards c I
    b = -w . (mu_forget + mu_retain) / 2           then both divided by the spread of the projected keys

Only first and second moments of the keys: nothing is trained, there is no step size and no epoch, and the same
keys always give the same direction. The shrinkage (Ledoit-Wolf's target, a share SHRINKAGE of the average
variance) keeps the direction stable with fewer prompts than key dimensions. With n prompts and F dimensions the
solve goes through the n x n system (Woodbury) when F > n, so an 8B model's 14,336-wide keys cost O(n^2 F), not F^3.

runtime/ksd.py `LinearRegion` scores keys with the result; stats/calibrate.py sets its thresholds.
"""

from __future__ import annotations

import numpy as np

SHRINKAGE = 0.1   # share of the average variance added to every direction (docs/guard.md: 0.03-0.3 all hold)


def fit(forget: np.ndarray, retain: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, float]:
    """forget (n, F), retain (m, F) keys of one layer -> (weight (F,) float32, bias): forget-like keys score
    w . v + b > 0, and w . v has unit standard deviation over both sets."""
    forget, retain = forget.astype(np.float64), retain.astype(np.float64)
    mu_forget, mu_retain = forget.mean(axis=0), retain.mean(axis=0)
    centred = np.concatenate([forget - mu_forget, retain - mu_retain])   # pooled within-class deviations
    rows = centred.shape[0] - 2
    scale = (1 - shrinkage) / rows                          # S = scale * X^T X
    ridge = shrinkage * np.einsum("nf,nf->", centred, centred) / rows / centred.shape[1]   # c = share x mean variance
    weight = _solve(centred, scale, max(ridge, 1e-12), mu_forget - mu_retain)
    bias = -weight @ (mu_forget + mu_retain) / 2
    spread = np.concatenate([forget, retain]) @ weight
    spread = float(spread.std()) or 1.0
    return (weight / spread).astype(np.float32), float(bias / spread)


def _solve(centred: np.ndarray, scale: float, ridge: float, target: np.ndarray) -> np.ndarray:
    """(scale X^T X + ridge I)^-1 target, in the cheaper of the F x F or the n x n form."""
    rows, width = centred.shape
    if width <= rows:
        matrix = scale * centred.T @ centred
        matrix[np.diag_indices(width)] += ridge
        return np.linalg.solve(matrix, target)
    # Woodbury: (c I + a X^T X)^-1 t = (t - a X^T (c I + a X X^T)^-1 X t) / c
    gram = scale * centred @ centred.T
    gram[np.diag_indices(rows)] += ridge
    return (target - scale * centred.T @ np.linalg.solve(gram, centred @ target)) / ridge

