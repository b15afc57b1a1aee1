"""How many channels each group keeps: PFP's sample-complexity allocation (PFP.md §3).

One global eps is shared by the network. For a dense consumer l with channel probabilities
p_l = s_l / S_l, a relative error eps needs m_l(eps) = ceil(K (6 + 2 eps) alpha_l S_l / eps^2)
draws, and m draws hit u(p, m) = ceil(sum_c 1 - (1 - p_c)^m) distinct channels in expectation.
A group keeps the max over its consumers, clamped by the user's constraints. eps is found by
bisection in log space so the pruned network's cost (MACs or parameters, from `CostModel`) hits
the target, then single channels are added greedily (best score per unit of cost) to close the
gap left by the step function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import TargetUnattainableError

DELTA = 1e-16
C_CONST = 3.0
K_CONST = 3.0
EPS_RANGE = (1e-300, 1e150)


@dataclass
class ConsumerTerm:
    """What the allocation needs of one dense consumer of one group."""

    name: str
    alpha: float  # 2 c ln(8 (P + 1) k / delta)
    total: float  # S_l over all of the consumer's input channels
    p: np.ndarray  # s / S_l restricted to the group's channels (float64)
    k: float = K_CONST  # the K of m_l(eps)


@dataclass
class GroupBudget:
    """Per-group constraints and the data the allocation uses."""

    width: int
    scores: np.ndarray  # channel scores (max over consumers), float64
    terms: list[ConsumerTerm]
    min_keep: int  # from min_channels and max_prune_ratio
    round_to: int
    fixed: bool = False  # overrides may freeze a group at full width


def alpha(positions: int, kernel: int, delta: float = DELTA, c: float = C_CONST) -> float:
    """alpha_l = 2 c ln(8 (P_l + 1) k_l / delta)."""
    return 2.0 * c * math.log(8.0 * (positions + 1) * kernel / delta)


def sample_complexity(eps: float, term: ConsumerTerm) -> float:
    """m_l(eps) = ceil(K (6 + 2 eps) alpha S / eps^2), at least 1; +inf when it overflows."""
    if term.total <= 0:
        return 1.0
    log_m = math.log(term.k * (6.0 + 2.0 * eps) * term.alpha * term.total) - 2.0 * math.log(eps)
    if log_m > 700.0:  # beyond float64: every channel with p > 0 is drawn
        return math.inf
    return max(1.0, math.ceil(math.exp(log_m)))


def expected_distinct(p: np.ndarray, m: float) -> int:
    """u(p, m) = ceil(sum_c 1 - (1 - p_c)^m); m = inf keeps every channel with p > 0."""
    if math.isinf(m):
        return int(np.count_nonzero(p > 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        miss = np.exp(m * np.log1p(-np.minimum(p, 1.0)))
    hit = np.where(p > 0, 1.0 - miss, 0.0)
    return int(math.ceil(float(hit.sum()) - 1e-9))  # 1e-9: ceil must not round float noise up


def constrain(keep: int, budget: GroupBudget) -> int:
    """Clamp to [min_keep, width] and round up to a multiple of round_to (or the full width)."""
    if budget.fixed:
        return budget.width
    keep = min(budget.width, max(budget.min_keep, keep))
    if budget.round_to > 1:
        keep = min(budget.width, int(math.ceil(keep / budget.round_to) * budget.round_to))
    return keep


def group_keep(eps: float, budget: GroupBudget) -> int:
    """keep_g(eps) = max over consumers of u(p_l|g, m_l(eps)), then the constraints."""
    raw = max((expected_distinct(t.p, sample_complexity(eps, t)) for t in budget.terms), default=budget.width)
    return constrain(raw, budget)


class CostModel:
    """Cost (MACs or params) of the pruned network as a function of every group's width.

    Each conv/linear/BN layer's channel counts are affine in the groups' removed channels
    (out = out0 - A_out @ removed, likewise in), and its cost is b*out*in + l*out + const.
    `offset` absorbs what the model leaves out (activations, pooling), calibrated on the
    dense network, and `correct()` shifts it after a real measurement.
    """

    def __init__(self, out0, in0, a_out, a_in, bilinear, linear, widths, dense_cost, volume):
        self.out0, self.in0 = np.asarray(out0, float), np.asarray(in0, float)
        self.a_out, self.a_in = np.asarray(a_out, float), np.asarray(a_in, float)
        self.bilinear, self.linear = np.asarray(bilinear, float), np.asarray(linear, float)
        self.widths = np.asarray(widths, float)
        self.volume = np.asarray(volume, float)  # activation volume per layer output (out * positions)
        modelled = self._modelled(self.widths)
        self.rest = max(0.0, dense_cost - modelled)  # scaled with activation volume
        self.dense = float(dense_cost)
        self.offset = 0.0

    def _counts(self, widths):
        removed = self.widths - np.asarray(widths, float)
        return self.out0 - self.a_out @ removed, self.in0 - self.a_in @ removed

    def _modelled(self, widths) -> float:
        out, inp = self._counts(widths)
        return float(np.sum(self.bilinear * out * inp + self.linear * out))

    def __call__(self, widths) -> float:
        out, _ = self._counts(widths)
        dense_volume = float(np.sum(self.volume * self.out0)) or 1.0
        scale = float(np.sum(self.volume * out)) / dense_volume
        return self._modelled(widths) + self.rest * scale + self.offset

    def one_group_terms(self, widths) -> tuple[float, np.ndarray, np.ndarray]:
        """(base, lin, quad) with cost(widths - s e_g) = base - s lin[g] + s^2 quad[g] exactly, for
        every group g at once (the cost is bilinear in the widths): the cost of lowering one group."""
        out, inp = self._counts(widths)
        dense_volume = float(np.sum(self.volume * self.out0)) or 1.0
        lin = (self.a_out.T @ (self.bilinear * inp) + self.a_in.T @ (self.bilinear * out)
               + self.a_out.T @ self.linear + self.rest * (self.a_out.T @ self.volume) / dense_volume)
        quad = (self.a_out * self.a_in).T @ self.bilinear
        return self(widths), lin, quad

    def correct(self, predicted: float, measured: float) -> None:
        """Shift the model by a real measurement's residual (used between allocation passes)."""
        self.offset += measured - predicted


def allocate(budgets: list[GroupBudget], cost: CostModel, target: float, tolerance: float) -> tuple[list[int], float]:
    """Widths per group whose cost is within `tolerance` (absolute) of `target`, and eps.

    Raises TargetUnattainableError naming the reachable floor when the target is below it.
    """
    floor_widths = [constrain(b.min_keep, b) for b in budgets]
    floor = cost(floor_widths)
    if target < floor - tolerance:
        raise TargetUnattainableError(
            f"the target cost {target:.4g} ({target / cost.dense:.4g} of dense) is below the smallest "
            f"reachable {floor:.4g} ({floor / cost.dense:.4g} of dense) with these min_channels / "
            "max_prune_ratio / round_to / ignored_layers settings: raise keep or relax the constraints"
        )

    def widths_at(log_eps: float) -> list[int]:
        return [group_keep(math.exp(log_eps), b) for b in budgets]

    lo, hi = math.log(EPS_RANGE[0]), math.log(EPS_RANGE[1])
    if cost(widths_at(lo)) <= target:
        hi = lo  # even keeping every live channel fits: start from there and add
    elif cost(widths_at(hi)) > target:
        # Even the largest eps keeps more than the target allows: one draw (m = 1) still keeps a
        # channel for every consumer, above min_channels for groups read by several. Small keeps
        # (keep = 0.005) live below that, so start from every group's floor and add channels.
        return _greedy_fill(floor_widths, budgets, cost, target, tolerance), math.exp(hi)
    else:
        for _ in range(200):  # cost is non-increasing in eps: keep cost(hi) <= target < cost(lo)
            mid = 0.5 * (lo + hi)
            if cost(widths_at(mid)) <= target:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-9:
                break
    widths = widths_at(hi)
    widths = _greedy_fill(widths, budgets, cost, target, tolerance)
    return widths, math.exp(hi)


def _greedy_fill(widths, budgets, cost, target, tolerance):
    """Add channels (in round_to steps) with the best next-channel score per unit of cost."""
    widths = list(widths)
    sorted_scores = [np.sort(b.scores)[::-1] for b in budgets]
    current = cost(widths)
    blocked = set()
    while current < target - tolerance * 0.25:
        best, best_gain = None, -1.0
        for g, b in enumerate(budgets):
            if g in blocked or b.fixed or widths[g] >= b.width:
                continue
            step = min(max(1, b.round_to), b.width - widths[g])
            trial = widths.copy()
            trial[g] += step
            delta = cost(trial) - current
            score = float(sorted_scores[g][widths[g]:widths[g] + step].sum())
            gain = score / delta if delta > 0 else math.inf
            if current + delta > target + tolerance * 0.5:
                continue
            if gain > best_gain:
                best, best_gain = (g, step), gain
        if best is None:
            break
        widths[best[0]] += best[1]
        current = cost(widths)
    return widths


def consumer_terms(scores_by_consumer, consumer_info, k: float = K_CONST) -> list[ConsumerTerm]:
    """ConsumerTerms for one group from {consumer: mapped scores} and {consumer: (alpha, S_l)}."""
    terms = []
    for name, mapped in scores_by_consumer.items():
        alpha_l, total = consumer_info[name]
        p = mapped.double().numpy() / total if total > 0 else np.zeros(mapped.numel())
        terms.append(ConsumerTerm(name, alpha_l, total, p, k))
    return terms
