"""Linear probe: multinomial logistic regression on pooled features, fitted in MLX with L-BFGS.

The objective is scikit-learn's `LogisticRegression(C)`: 0.5·‖W‖² + C·Σᵢ CE(xᵢ) with an
unpenalised bias, here divided by C·N (same minimiser, better scaled in float32). L-BFGS on a
convex problem converges in a few hundred full-batch steps, so the result does not depend on a
learning rate. The regularisation is picked by a log-grid sweep on the validation split, then
the head is refitted on train + validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import numpy as np

from ..vectors import l2_normalize, softmax

# 1e-2 … 1e5 (normalised features want large C)
DEFAULT_C_GRID = tuple(10.0**e for e in range(-2, 6))


@dataclass
class LinearHead:
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)
    C: float
    normalize: bool

    name: ClassVar[str] = "linear"
    pooled: ClassVar[bool] = True

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Class logits (N, C)."""
        x = l2_normalize(features) if self.normalize else features
        return x @ self.weight + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.scores(features))

    @classmethod
    def fit(cls, train, val, num_classes: int, settings, progress=None) -> tuple[LinearHead, dict]:
        return train_linear(train, val, num_classes, settings.c_grid, settings.normalize, progress)

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"weight": self.weight, "bias": self.bias}
        return arrays, {"C": self.C, "normalize": self.normalize}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], settings: dict, num_classes: int
    ) -> LinearHead:
        return cls(arrays["weight"], arrays["bias"], settings["C"], settings["normalize"])


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    C: float = 1.0,
    normalize: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-7,
    init: LinearHead | None = None,
) -> LinearHead:
    """Fit W, b for `LogisticRegression(C)` (multinomial) on (N, D) features."""
    x = mx.array(l2_normalize(features) if normalize else features, dtype=mx.float32)
    y = mx.array(labels.astype(np.int32))
    n, d = x.shape
    penalty = 1.0 / (2.0 * C * n)

    def loss(params):
        w = params[: d * num_classes].reshape(d, num_classes)
        logits = x @ w + params[d * num_classes :]
        ce = mx.logsumexp(logits, axis=1) - mx.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return ce.mean() + penalty * (w * w).sum()

    start = (
        np.concatenate([init.weight.ravel(), init.bias])
        if init is not None
        else np.zeros(d * num_classes + num_classes)
    )
    params = lbfgs(mx.value_and_grad(loss), mx.array(start, dtype=mx.float32), max_iter, tol)
    flat = np.array(params)
    return LinearHead(
        flat[: d * num_classes].reshape(d, num_classes), flat[d * num_classes :], C, normalize
    )


def lbfgs(
    value_and_grad, x: mx.array, max_iter: int = 1000, tol: float = 1e-7, history: int = 10
) -> mx.array:
    """Minimise a smooth function with L-BFGS and a backtracking (Armijo) line search."""
    f, g = value_and_grad(x)
    pairs: list[tuple[mx.array, mx.array, mx.array]] = []  # (s, y, 1 / s·y)
    for _ in range(max_iter):
        q, alphas = g, []
        for s, y, rho in reversed(pairs):
            alpha = rho * (s * q).sum()
            q = q - alpha * y
            alphas.append(alpha)
        if pairs:
            s, y, _ = pairs[-1]
            q = q * ((s * y).sum() / (y * y).sum())
        else:
            q = q / mx.maximum(mx.abs(g).max(), 1.0)
        for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            q = q + s * (alpha - rho * (y * q).sum())
        direction = -q
        slope = (g * direction).sum().item()
        if slope >= 0:  # not a descent direction: restart from the gradient
            pairs, direction, slope = [], -g, -(g * g).sum().item()
        step, f_value = 1.0, f.item()
        while True:
            candidate = x + step * direction
            f_new, g_new = value_and_grad(candidate)
            mx.eval(f_new, g_new)
            if f_new.item() <= f_value + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y = candidate - x, g_new - g
        sy = (s * y).sum()
        if sy.item() > 1e-12:
            pairs = (pairs + [(s, y, 1.0 / sy)])[-history:]
        converged = abs(f_value - f_new.item()) <= tol * max(1.0, abs(f_value)) or step < 1e-10
        x, f, g = candidate, f_new, g_new
        mx.eval(x, *[t for pair in pairs for t in pair])
        if converged:
            break
    return x


def sweep_C(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    grid=DEFAULT_C_GRID,
    normalize: bool = False,
    progress=None,
) -> tuple[float, dict[float, float]]:
    """The C with the best validation accuracy (ties: the stronger regularisation), and all scores.

    `progress(done, total)` follows the fits (the sweep and the refit after it)."""
    scores, head = {}, None
    # warm start each fit from the previous ... solution
    for done, C in enumerate(sorted(grid), start=1):
        head = fit_logistic(*train, num_classes, C=C, normalize=normalize, init=head)
        scores[C] = float((head.scores(val[0]).argmax(1) == val[1]).mean())
        if progress:
            progress(done, len(grid) + 1)
    best = max(scores.values())
    return min(C for C, acc in scores.items() if acc == best), scores


def train_linear(
    train, val, num_classes: int, grid=DEFAULT_C_GRID, normalize: bool = False, progress=None
) -> tuple[LinearHead, dict]:
    """Sweep C on validation, then refit on train + validation with the chosen C."""
    C, scores = sweep_C(train, val, num_classes, grid, normalize, progress)
    both = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    head = fit_logistic(*both, num_classes, C=C, normalize=normalize)
    if progress:
        progress(len(grid) + 1, len(grid) + 1)
    return head, {"C": C, "val_accuracy_by_C": {f"{c:g}": a for c, a in scores.items()}}
