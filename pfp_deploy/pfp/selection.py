"""Which channels a group keeps (PFP.md §4): deterministic, randomized, hybrid.

randomized and hybrid draw channels with probability p ∝ score and reweight every kept channel
by gamma_c = n_c / (m' p_c) (n_c = times drawn), which makes the consumers' pre-activations
unbiased; the pruner folds gamma into the consumers' input weights. To hit the allocated width
exactly, draws continue until `keep` distinct channels are in hand: m' is the number of draws
that took, whose expected distinct count is `keep` (the m' of PFP.md §4). This stopping rule
makes m' random, which biases gamma slightly for rare channels of narrow groups; the bias fades
as groups widen (tests/test_pruning.py measures < 3 % on a 64-channel group).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VARIANTS = ("deterministic", "randomized", "hybrid")


@dataclass
class Selection:
    kept: np.ndarray  # sorted channel indices
    gamma: np.ndarray | None  # reweighting per kept channel (None: all ones)


def top_channels(scores: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` highest scores; ties go to the lower index (stable, reproducible)."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])


def expected_draws(p: np.ndarray, keep: int) -> float:
    """m' with sum_c 1 - (1 - p_c)^m' = keep (bisection; p > 0 entries only)."""
    p = p[p > 0]
    if keep >= p.size:
        return float("inf")
    lo, hi = 0.0, 1.0
    log_miss = np.log1p(-np.minimum(p, 1 - 1e-16))
    distinct = lambda m: float(np.sum(1.0 - np.exp(m * log_miss)))  # noqa: E731
    while distinct(hi) < keep:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if distinct(mid) < keep else (lo, mid)
    return hi


def _draw_until(p: np.ndarray, keep: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw i.i.d. from p until `keep` distinct channels appear; (channels, counts, draws)."""
    counts = np.zeros(p.size, dtype=np.int64)
    draws = 0
    batch = max(16, 2 * keep)
    while np.count_nonzero(counts) < keep:
        picks = rng.choice(p.size, size=batch, p=p)
        for c in picks:  # stop at exactly the draw that completes the set
            counts[c] += 1
            draws += 1
            if np.count_nonzero(counts) == keep:
                break
    chosen = np.flatnonzero(counts)
    return chosen, counts[chosen], draws


def select(scores: np.ndarray, keep: int, variant: str, rng: np.random.Generator) -> Selection:
    """Choose `keep` of the group's channels by `variant`."""
    width = scores.size
    if keep >= width:
        return Selection(np.arange(width), None)
    live = int(np.count_nonzero(scores > 0))
    if variant == "deterministic" or live <= keep:
        # With no more live channels than slots every live channel is kept: nothing to sample.
        return Selection(top_channels(scores, keep), None)
    p = scores / scores.sum()
    gamma = np.ones(width)
    if variant == "randomized":
        chosen, counts, draws = _draw_until(p, keep, rng)
        gamma[chosen] = counts / (draws * p[chosen])
        return Selection(np.sort(chosen), gamma[np.sort(chosen)])
    if variant == "hybrid":
        m = expected_draws(p, keep)
        certain = np.flatnonzero(p >= 1.0 / m)
        if certain.size >= keep:
            return Selection(top_channels(scores, keep), None)
        rest = np.setdiff1d(np.arange(width), certain)
        p_rest = p[rest] / p[rest].sum()
        chosen, counts, draws = _draw_until(p_rest, keep - certain.size, rng)
        gamma[rest[chosen]] = counts / (draws * p_rest[chosen])
        kept = np.sort(np.concatenate([certain, rest[chosen]]))
        return Selection(kept, gamma[kept])
    raise ValueError(f"unknown variant {variant!r}")  # validated by the caller
