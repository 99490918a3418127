"""Checks at the public boundary: every bad input becomes a ValueError/TypeError that says what
is wrong, before any kernel sees it."""

import numbers

import numpy as np


def first_non_finite_row(X, chunk_rows=65536):
    """Index of the first row holding NaN or inf, or None (checked chunk by chunk)."""
    for start in range(0, X.shape[0], chunk_rows):
        chunk = X[start : start + chunk_rows]
        if np.isfinite(chunk.sum()):  # NaN and inf reach the sum: one read, no mask (an overflow falls through)
            continue
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def check_finite(X, name="X"):
    row = first_non_finite_row(X)
    if row is not None:
        raise ValueError(f"Input {name} contains NaN or infinity (first at row {row}).")


def check_scalar(value, name, *, kind=numbers.Real, low=None, low_inclusive=True, high=None):
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if kind is numbers.Integral else 'a number'}, "
                        f"got {value!r} of type {type(value).__name__}")
    if low is not None and (value < low if low_inclusive else value <= low):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    if kind is numbers.Real and not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
