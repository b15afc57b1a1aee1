"""Cost-aware width allocations: `uniform` and the least-squares error allocation `cost_aware`.

The paper's allocation (allocation.allocate, PFP.md §3) is cost-blind: one global eps sets every
group's width from its sensitivities alone, whatever a channel costs. The allocations here spend
the MACs (or parameter) budget instead:

* ``uniform``: one keep ratio r for every group (width = constrain(ceil(r * C_g))), r found by
  bisection so that the cost hits the target, then closed with the paper's greedy fill.
* ``cost_aware``: the error each group's width causes is measured from calibration statistics
  and the budget goes where the error per unit of cost saved is lowest.

Error model (``cost_aware``). For every dense consumer l (Conv2d groups=1, Linear) the input Gram
G = X^T X of its calibration patches (float64, rows as reconstruction builds them: r = c*kk + k,
plus a ones column when it has a bias) is accumulated in one pass of the dense model. Removing
the input columns R of l and refitting the rest by least squares (what reconstruction does) leaves
the residual, per output f,

    r_f(R) = w_R^T (G_RR - G_RS G_SS^-1 G_SR) w_R = w_R^T ((G^-1)_RR)^-1 w_R

(the Schur complement: no forward pass needed). Channels leave a group in the criterion's order
(lowest score first), so the removed sets are nested prefixes; with L = chol((G^-1)_PP) for the
group's columns P in that order and Z = L^-1 W_P^T, r(first m columns) is the sum of the first m
squared rows of Z. L^-1 is read off one Cholesky of G itself (consumer_curve), so one
factorisation and one matrix product give the whole error(width) curve. Each
output's residual is divided by that output's dense (centred) energy, so the error is a mean
relative squared error over output channels, invariant to the per-channel scale BatchNorm applies
next; a group's curve is the sum over its consumers (a consumer reading several groups is counted
once per group, the other groups' columns kept). ``cost_aware_norefit`` uses the residual without
the refit, w_R^T G_RR w_R (for prune-only pipelines).

Spending: start with every group at full width and repeatedly lower the group (by 1, 2, 4, ...
round_to steps) whose error increase per unit of cost saved is the smallest, until the cost
model reaches the target; the cost of lowering one group is exact (the cost model is bilinear in
the widths, so a one-group change is a quadratic in its step, see CostModel.one_group_terms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..errors import UsageError
from .allocation import EPS_RANGE, CostModel, GroupBudget, constrain, group_keep

ALLOCATIONS = ("cost_aware", "paper", "uniform", "cost_aware_norefit")
DEFAULT_ALLOCATION = "cost_aware"
GRAM_ALLOCATIONS = ("cost_aware", "cost_aware_norefit")
MAX_GRAM_COLUMNS = 8192  # wider consumers use their Gram's diagonal only (a 8192^2 float64 Gram is 512 MB)
JUMPS = np.array([1, 2, 4, 8, 16, 32])  # lookahead in valid-width steps (non-convex error curves)


def check_allocation(name) -> str:
    from ..errors import did_you_mean

    if name not in ALLOCATIONS:
        raise UsageError(f"allocation must be one of {ALLOCATIONS}, got {name!r}.{did_you_mean(str(name), ALLOCATIONS)}")
    return name


# ----------------------------------------------------------------------------- statistics

@dataclass
class ConsumerStats:
    """One dense consumer's calibration statistics and its weights.

    With fewer calibration rows than input columns (an underdetermined layer, which reconstruction
    leaves unrefit) the rows themselves are kept instead of their Gram: every no-refit quantity
    is then O(rows x columns x outputs) instead of O(columns^2 x outputs), e.g. 8 rows against
    3600 columns in a small-image ResNet-18's last stage. `patches` set means underdetermined; its
    Gram is then formed only on demand (full_gram)."""

    name: str
    gram: np.ndarray | None  # [R(+1), R(+1)] float64 (or [R(+1)] diagonal when too wide)
    weight: np.ndarray     # [F, R(+1)] float64, bias as the last column when there is one
    kernel: int            # columns per input channel (kh*kw; 1 for Linear)
    rows: float            # calibration rows accumulated
    has_bias: bool
    energy: np.ndarray | None = None  # _output_energy's cache
    patches: np.ndarray | None = None  # [rows, R(+1)] float64: the rows, when fewer than the columns

    @property
    def diagonal(self) -> bool:
        return self.gram is not None and self.gram.ndim == 1

    def full_gram(self) -> np.ndarray:
        """G = X^T X (formed from the kept rows on first use when only those are held)."""
        if self.gram is None:
            self.gram = self.patches.T @ self.patches
        return self.gram

    def trace(self) -> float:
        if self.gram is None:
            return float((self.patches * self.patches).sum())
        return float(self.gram.sum() if self.diagonal else np.trace(self.gram))


def gram_statistics(model: nn.Module, calibration, names: list[str], max_memory_mb: float = 1024.0
                    ) -> dict[str, ConsumerStats]:
    """Input Grams of the named dense layers over `calibration`, in as few dense passes as fit.

    Runs the model in eval mode without gradients; summed across ranks under torchrun."""
    from .sensitivity import _first_tensor, _patches

    modules = dict(model.named_modules())
    budget = max(1.0, max_memory_mb) * 2**20
    sizes = {}
    for n in names:
        w = modules[n].weight
        cols = w[0].numel() + int(modules[n].bias is not None)
        sizes[n] = 8.0 * (cols if cols > MAX_GRAM_COLUMNS else cols * cols)
    passes, current, used = [], [], 0.0
    for n in names:
        if current and used + sizes[n] > budget:
            passes.append(current)
            current, used = [], 0.0
        current.append(n)
        used += sizes[n]
    if current:
        passes.append(current)
    stats = {}
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for chunk in passes:
            acc = {n: _RowsOrGram(modules[n].weight[0].numel() + int(modules[n].bias is not None), device)
                   for n in chunk}

            def hook_for(name):
                layer = modules[name]

                def hook(module, inputs, output):
                    a = inputs[0].detach().float()
                    u, _ = _patches(layer, a)  # [B, R, P]
                    x = u.transpose(1, 2).reshape(-1, u.shape[1])
                    step = max(1, int(64 * 2**20 // (8 * max(1, x.shape[1]))))
                    for s in range(0, x.shape[0], step):
                        xs = x[s:s + step].double()
                        if layer.bias is not None:
                            xs = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype, device=xs.device)], 1)
                        acc[name].add(xs)
                return hook

            handles = [modules[n].register_forward_hook(hook_for(n)) for n in chunk]
            try:
                with torch.no_grad():
                    for batch in calibration:
                        x = _first_tensor(batch)
                        if x.shape[0]:
                            model(x.to(device))
            finally:
                for h in handles:
                    h.remove()
            for n in chunk:
                gram, patches, rows = acc[n].reduce()
                m = modules[n]
                w = m.weight.detach().double().reshape(m.weight.shape[0], -1)
                if m.bias is not None:
                    w = torch.cat([w, m.bias.detach().double()[:, None]], 1)
                kernel = 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1]
                stats[n] = ConsumerStats(n, None if gram is None else gram.cpu().numpy(), w.cpu().numpy(), kernel,
                                         rows, m.bias is not None,
                                         patches=None if patches is None else patches.cpu().numpy())
    finally:
        for m, flag in training:
            m.training = flag
    return stats


class _RowsOrGram:
    """One consumer's accumulator: its calibration rows while they are fewer than its columns, then
    their Gram (the rows are folded in and dropped), so memory stays within one Gram's size; only
    the Gram's diagonal for a consumer wider than MAX_GRAM_COLUMNS."""

    def __init__(self, cols: int, device: torch.device):
        self.cols, self.device = cols, device
        self.rows = 0
        self.blocks: list[torch.Tensor] | None = []
        self.gram = torch.zeros(cols, dtype=torch.float64, device=device) if cols > MAX_GRAM_COLUMNS else None

    def add(self, xs: torch.Tensor) -> None:
        self.rows += xs.shape[0]
        if self.gram is not None and self.gram.ndim == 1:
            self.gram += (xs * xs).sum(0)
        elif self.blocks is not None:
            self.blocks.append(xs)
            if self.rows >= self.cols:
                self._fold()
        else:
            self.gram.addmm_(xs.t(), xs)

    def _fold(self) -> None:
        x = torch.cat(self.blocks) if self.blocks else torch.zeros(0, self.cols, dtype=torch.float64, device=self.device)
        self.gram = x.t() @ x
        self.blocks = None

    def reduce(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(gram, rows_matrix, row count) summed over ranks: the rows of every rank, in rank order,
        when there are fewer in all than columns; the summed Gram otherwise."""
        from ..distributed import all_reduce_sum, is_active

        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if is_active() else (1, 0)
        counts = torch.zeros(world, dtype=torch.float64, device=self.device)
        counts[rank] = self.rows
        counts = all_reduce_sum(counts).long().cpu()
        total = int(counts.sum())
        if self.gram is not None and self.gram.ndim == 1:
            return all_reduce_sum(self.gram), None, float(total)
        if total < self.cols:  # every rank still holds its rows
            rows = torch.zeros(total, self.cols, dtype=torch.float64, device=self.device)
            start = int(counts[:rank].sum())
            if self.blocks:
                rows[start:start + self.rows] = torch.cat(self.blocks)
            return None, all_reduce_sum(rows), float(total)
        if self.blocks is not None:
            self._fold()
        return all_reduce_sum(self.gram), None, float(total)


def removal_order(scores: np.ndarray, ch_groups: int = 1) -> np.ndarray:
    """Group channels in the order the criterion drops them (lowest score first; ties: the higher
    index first, the reverse of selection.top_channels). Grouped convs drop tied positions together."""
    if ch_groups == 1:
        keep_order = np.argsort(-scores, kind="stable")
        return keep_order[::-1].copy()
    per = scores.size // ch_groups
    tied = scores.reshape(ch_groups, per).max(axis=0)
    positions = np.argsort(-tied, kind="stable")[::-1]
    return (positions[:, None] + per * np.arange(ch_groups)[None, :]).reshape(-1)


def _output_energy(stats: ConsumerStats) -> np.ndarray:
    """Per output: centred dense energy w_f^T (G - s s^T / n) w_f (the variance BatchNorm divides by).
    Cached on `stats` (F x R^2 work: the curves and the greedy selection both need it)."""
    if stats.energy is None:
        stats.energy = _compute_output_energy(stats)
    return stats.energy


def _compute_output_energy(stats: ConsumerStats) -> np.ndarray:
    w = stats.weight
    if stats.patches is not None:
        y = stats.patches @ w.T
        energy = (y * y).sum(0)
        if stats.has_bias and stats.rows > 0:
            mean = y.sum(0) / stats.rows
            energy = energy - stats.rows * mean * mean
    elif stats.diagonal:
        energy = (w * w * stats.gram[None, :]).sum(1)
    else:
        g = stats.gram
        energy = ((w @ g) * w).sum(1)  # BLAS; a 3-operand einsum without a path loops naively (20x slower)
        if stats.has_bias and stats.rows > 0:  # the bias column is all ones: its row of G holds the sums
            mean = g[-1] @ w.T / stats.rows
            energy = energy - stats.rows * mean * mean
    scale = float(energy.max()) if energy.size else 0.0
    return np.maximum(energy, 1e-12 * scale + 1e-300)


def _normalised_weight(stats: ConsumerStats) -> np.ndarray:
    """Weights with each output divided by its dense energy's square root: errors become relative."""
    return stats.weight / np.sqrt(_output_energy(stats))[:, None]


def _ridge(gram: np.ndarray, ridge: float) -> float:
    """The absolute ridge: `ridge` (at least 1e-6) times the Gram's mean diagonal, as reconstruction."""
    return max(ridge, 1e-6) * float(np.trace(gram)) / max(1, gram.shape[0])


def _removed_energy(stats: ConsumerStats, wp: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """No refit: w_R^T G_RR w_R (summed over outputs) for every prefix R of `cols`. With
    M = G_PP o (W_P^T W_P), prefix k adds M_kk + 2 sum_{j<k} M_kj (the diagonal of M's 2-D
    cumulative sum, without forming it). From the rows X (G = X^T X) the sum over j < k is
    x_k^T S w_k with S = sum_{j<k} x_j w_j^T, so blocks of columns take it from the running S."""
    wt = torch.from_numpy(np.ascontiguousarray(wp))
    if stats.patches is None:
        m = torch.from_numpy(stats.gram)[torch.from_numpy(cols)][:, torch.from_numpy(cols)]
        m *= wt.T @ wt
        added = 2 * torch.tril(m, -1).sum(1) + torch.diagonal(m)
    else:
        x = torch.from_numpy(stats.patches)[:, torch.from_numpy(cols)]  # [rows, P]
        running = torch.zeros(x.shape[0], wt.shape[0], dtype=torch.float64)  # S: [rows, F]
        parts = []
        for start in range(0, cols.size, 512):
            xb, wb = x[:, start:start + 512], wt[:, start:start + 512]
            m = (xb.T @ xb) * (wb.T @ wb)
            parts.append(2 * torch.tril(m, -1).sum(1) + torch.diagonal(m) + 2 * ((xb.T @ running) * wb.T).sum(1))
            running += xb @ wb.T
        added = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return np.concatenate([[0.0], torch.cumsum(added, 0).numpy()])


def consumer_curve(stats: ConsumerStats, in_idxs: np.ndarray, root_idxs: np.ndarray, order: np.ndarray,
                   ridge: float, refit: bool = True) -> np.ndarray:
    """err[j] for j = 0..width: the consumer's mean relative squared output error when the group's
    first j channels of `order` are removed (its other input columns kept).

    With refit, a width whose kept columns (+ bias) outnumber the calibration rows takes the
    no-refit error: reconstruction leaves such an underdetermined layer unchanged (e.g. VGG's
    flatten -> Linear at the paper's calibration size), so assuming a refit there would let the
    allocation cut channels that nothing repairs."""
    width = order.size
    rank = np.empty(width, dtype=np.int64)
    rank[order] = np.arange(width)
    entries = np.argsort(rank[root_idxs], kind="stable")  # consumer inputs, in removal order
    kk = stats.kernel
    cols = (in_idxs[entries][:, None] * kk + np.arange(kk)[None, :]).reshape(-1)
    # columns removed after j channels: kk x (number of mapped inputs whose root rank is < j)
    per_channel = np.bincount(rank[root_idxs], minlength=width)
    ncols = np.concatenate([[0], np.cumsum(per_channel) * kk])
    w = _normalised_weight(stats)
    wp = w[:, cols]
    total = w.shape[1]
    if stats.diagonal:  # too wide for a full Gram: columns treated as uncorrelated (no refit gain)
        per_col = (wp * wp * stats.gram[cols][None, :]).sum(0)
        cum = np.concatenate([[0.0], np.cumsum(per_col)])
    elif stats.trace() <= 0.0:  # the consumer never sees a non-zero input: nothing to lose
        cum = np.zeros(cols.size + 1)
    elif refit and stats.rows < total - ncols[-2]:  # underdetermined while a channel is left: never refit
        cum = _removed_energy(stats, wp, cols)
    elif refit:
        # (G^-1)_PP's Cholesky in removal order without forming G^-1: order G as [others, reversed P]
        # and factor it once, G = L L^T. The trailing block L_22 belongs to reversed P, and with J
        # the reversal chol((G^-1)_PP) = J L_22^-T J, so Z = J L_22^T J W_P^T: one Cholesky and
        # one product (3-4x less work than inverting G and factoring the inverse's block).
        g = stats.full_gram()
        lam = _ridge(g, ridge)
        others = np.setdiff1d(np.arange(total), cols, assume_unique=True)
        perm = torch.from_numpy(np.concatenate([others, cols[::-1]]))
        gt = torch.from_numpy(g)[perm][:, perm]
        gt.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(gt)
        if int(info):  # numerically semi-definite despite the ridge: a little more ridge
            gt.diagonal().add_(1e-9 * float(np.trace(g)) / max(1, total))
            chol = torch.linalg.cholesky(gt)
        tail = chol[others.size:, others.size:]
        z = (tail.T @ torch.from_numpy(np.ascontiguousarray(wp.T[::-1]))).numpy()[::-1]
        refit_err = np.concatenate([[0.0], np.cumsum((z * z).sum(1))])[ncols]
        underdetermined = stats.rows < total - ncols  # kept unknowns per output at each width
        if underdetermined.any():
            refit_err = np.where(underdetermined, _removed_energy(stats, wp, cols)[ncols], refit_err)
        return refit_err / w.shape[0]
    else:
        cum = _removed_energy(stats, wp, cols)
    return cum[ncols] / w.shape[0]


# ----------------------------------------------------------------------------- greedy selection

GREEDY_STEP = 0.05  # channels dropped per elimination step: this fraction of those left (at least 1)


def _channel_columns(stats: ConsumerStats, in_idxs: np.ndarray, root_idxs: np.ndarray,
                     width: int) -> np.ndarray | None:
    """[width, m] Gram columns of each group channel in this consumer (-1 padding for a channel it
    does not read), or None when the channels it reads have different column counts."""
    kk = stats.kernel
    counts = np.bincount(root_idxs, minlength=width)
    m = int(counts.max()) if counts.size else 0
    if m == 0 or np.any((counts != 0) & (counts != m)):
        return None
    order = np.argsort(root_idxs, kind="stable")
    per_channel = (in_idxs[order][:, None] * kk + np.arange(kk)[None, :]).reshape(-1, m * kk)  # m inputs each
    out = np.full((width, m * kk), -1, dtype=np.int64)
    out[counts > 0] = per_channel
    return out


class _Elimination:
    """One consumer's least-squares state while a group's channels leave it: Q = (G_KK + lam I)^-1
    over the kept columns K and V, its weights refit to those columns (per-output normalised).
    Removing a column block R raises the residual by tr(V_R^T (Q_RR)^-1 V_R) and leaves
    V -= Q_:R Q_RR^-1 V_R, Q -= Q_:R Q_RR^-1 Q_R: (block elimination, no refactoring; the rows and
    columns of R become zero, so Q and V keep their full size and need no re-indexing).
    An underdetermined consumer (fewer calibration rows than columns; its rows X are held) is left
    unrefit by reconstruction, so there the raise is the no-refit error: with S = X_R W_R^T the
    removed part of its output, removing channel c adds ||X_c W_c^T||^2 + 2 <S, X_c W_c^T>."""

    def __init__(self, stats: ConsumerStats, chan_cols: np.ndarray, ridge: float):
        w = _normalised_weight(stats)
        self.scale = 1.0 / w.shape[0]
        total = w.shape[1]
        self.refit = stats.patches is None
        self.chan_cols = torch.from_numpy(chan_cols)
        wt = torch.from_numpy(np.ascontiguousarray(w.T))  # [columns, F]
        if self.refit:
            g = torch.from_numpy(stats.gram)
            lam = _ridge(stats.gram, ridge)
            self.q = torch.cholesky_inverse(torch.linalg.cholesky(g + lam * torch.eye(total, dtype=g.dtype)))
            self.v = wt
        else:
            self.x, self.wt = torch.from_numpy(stats.patches), wt
            self.removed_output = torch.zeros(self.x.shape[0], wt.shape[1], dtype=torch.float64)  # S
            present = self.chan_cols[:, 0] >= 0
            cols = self.chan_cols[present]  # [c, m]
            xc, wc = self.x[:, cols], wt[cols]  # [rows, c, m], [c, m, F]
            own = torch.zeros(chan_cols.shape[0], dtype=torch.float64)  # ||X_c W_c^T||^2 per channel
            own[present] = (torch.einsum("rcm,rcn->cmn", xc, xc) * torch.einsum("cmf,cnf->cmn", wc, wc)).sum((1, 2))
            self.own = own

    def raises(self, channels: torch.Tensor) -> torch.Tensor:
        """The residual added by removing each of `channels` alone (0 for channels it does not read)."""
        cols = self.chan_cols[channels]
        present = cols[:, 0] >= 0
        out = torch.zeros(channels.numel(), dtype=torch.float64)
        if not present.any():
            return out
        cols = cols[present]  # [c, m]
        if self.refit:
            qcc = self.q[cols[:, :, None], cols[:, None, :]]
            vc = self.v[cols]  # [c, m, F]
            out[present] = (vc * torch.linalg.solve(qcc, vc)).sum((1, 2)) * self.scale
        else:
            flat = cols.reshape(-1)
            cross = ((self.x[:, flat].T @ self.removed_output) * self.wt[flat]).sum(1)  # x_j^T S w_j
            out[present] = (self.own[channels[present]] + 2 * cross.reshape(cols.shape).sum(1)) * self.scale
        return out

    def remove(self, channels: torch.Tensor) -> None:
        cols = self.chan_cols[channels].reshape(-1)
        cols = cols[cols >= 0]
        if cols.numel() == 0:
            return
        if not self.refit:
            self.removed_output += self.x[:, cols] @ self.wt[cols]
            return
        q_r = self.q[cols]  # [R, n]
        gain = torch.linalg.solve(q_r[:, cols], q_r).T  # Q_:R Q_RR^-1 (Q is symmetric)
        self.v = self.v - gain @ self.v[cols]
        self.q = self.q - gain @ q_r
        self.q[cols] = 0.0
        self.q[:, cols] = 0.0
        self.v[cols] = 0.0


def greedy_order(group, stats: dict[str, ConsumerStats], ridge: float) -> np.ndarray | None:
    """The order in which greedy least-squares elimination removes the group's channels (first
    removed first), or None when a consumer lacks the statistics it needs (no Gram, too wide, or
    channels with unequal column counts) or the group is grouped. At each step the channels whose
    removal raises the summed (refit) residual of the group's consumers least leave together
    (GREEDY_STEP of those left), so the kept set at every width is nested, as the allocation assumes."""
    if group.ch_groups != 1:
        return None
    states = []
    for consumer in group.consumers:
        s = stats.get(consumer.name)
        if s is None or s.diagonal:
            return None
        cols = _channel_columns(s, consumer.in_idxs.numpy(), consumer.root_idxs.numpy(), group.width)
        if cols is None:
            return None
        states.append(_Elimination(s, cols, ridge))
    if not states:
        return None
    left = torch.arange(group.width)
    order = []
    while left.numel():
        raise_ = sum(state.raises(left) for state in states)
        count = max(1, int(GREEDY_STEP * left.numel()))
        drop = left[torch.argsort(raise_, stable=True)[:count]]
        for state in states:
            state.remove(drop)
        order.append(drop)
        left = left[~torch.isin(left, drop)]
    return torch.cat(order).numpy()


def greedy_scores(groups, stats: dict[str, ConsumerStats], fallback: list[np.ndarray],
                  ridge: float) -> tuple[list[np.ndarray], list[str]]:
    """Per group, scores whose top-k is greedy elimination's kept set at every k (the later a channel
    leaves, the higher); `fallback` where greedy_order cannot run. Also the groups that fell back."""
    scores, fell_back = [], []
    for group, other in zip(groups, fallback):
        order = greedy_order(group, stats, ridge)
        if order is None:
            scores.append(other)
            fell_back.append(group.root_name)
            continue
        rank = np.empty(group.width)
        rank[order] = np.arange(1, group.width + 1)
        scores.append(rank)
    return scores, fell_back


# ----------------------------------------------------------------------------- spending

def _valid_widths(budget: GroupBudget) -> np.ndarray:
    """Every width the constraints allow, descending (the full width first)."""
    if budget.fixed:
        return np.array([budget.width])
    return np.array(sorted({constrain(k, budget) for k in range(1, budget.width + 1)}, reverse=True))


def allocate_by_error(budgets: list[GroupBudget], cost: CostModel, target: float, tolerance: float,
                      curves: list[np.ndarray]) -> list[int]:
    """Widths with cost within `tolerance` of `target` (when reachable), lowering the group with the
    least error added per unit of cost saved at each step. curves[g][j]: error with j channels removed."""
    levels = [_valid_widths(b) for b in budgets]
    count = len(budgets)
    depth = max(len(v) for v in levels)
    widths_pad = np.zeros((count, depth))
    err_pad = np.full((count, depth), np.inf)
    for g, (v, b) in enumerate(zip(levels, budgets)):
        widths_pad[g, :len(v)] = v
        widths_pad[g, len(v):] = v[-1]
        err_pad[g, :len(v)] = np.asarray(curves[g], float)[b.width - v]
    last = np.array([len(v) - 1 for v in levels])
    pos = np.zeros(count, dtype=np.int64)
    rows = np.arange(count)[:, None]
    while True:
        widths = widths_pad[np.arange(count), pos]
        current = cost(widths)
        if current <= target + 0.5 * tolerance:
            break
        cand = np.minimum(pos[:, None] + JUMPS[None, :], last[:, None])
        valid = cand > pos[:, None]
        step = widths[:, None] - widths_pad[rows, cand]  # channels removed by each candidate
        base, lin, quad = cost.one_group_terms(widths)
        saved = lin[:, None] * step - quad[:, None] * step * step  # cost(widths) - cost(candidate)
        added = err_pad[rows, cand] - err_pad[np.arange(count), pos][:, None]
        ok = valid & (saved > 0)
        if not ok.any():
            break
        after = current - saved
        landing = after >= target - 0.5 * tolerance  # does not overshoot the target band
        use = ok & landing if (ok & landing).any() else ok
        ratio = np.where(use, np.maximum(added, 0.0) / np.where(saved > 0, saved, 1.0), np.inf)
        if not (ok & landing).any():  # every move overshoots: the smallest overshoot
            ratio = np.where(use, -after, np.inf)
        g, j = np.unravel_index(np.argmin(ratio), ratio.shape)
        pos[g] = cand[g, j]
    widths = [int(w) for w in widths_pad[np.arange(count), pos]]
    return _fill_by_error(widths, budgets, levels, cost, target, tolerance, curves)


def _fill_by_error(widths, budgets, levels, cost, target, tolerance, curves):
    """Add channels back (one valid step at a time) while below the target band: the step removing
    the most error per unit of cost first."""
    widths = list(widths)
    while cost(widths) < target - 0.25 * tolerance:
        current = cost(widths)
        best, best_gain = None, -1.0
        for g, (v, b) in enumerate(zip(levels, budgets)):
            above = v[v > widths[g]]
            if above.size == 0:
                continue
            nxt = int(above.min())
            trial = widths.copy()
            trial[g] = nxt
            delta = cost(trial) - current
            if current + delta > target + 0.5 * tolerance:
                continue
            gain = (curves[g][b.width - widths[g]] - curves[g][b.width - nxt]) / delta if delta > 0 else math.inf
            if gain > best_gain:
                best, best_gain = (g, nxt), gain
        if best is None:
            break
        widths[best[0]] = best[1]
    return widths


def allocate_uniform(budgets: list[GroupBudget], cost: CostModel, target: float, tolerance: float) -> list[int]:
    """One keep ratio r for every group (then the constraints), r by bisection so the cost fits the
    target; the gap the rounding leaves is closed one round_to step at a time, always on the group
    whose kept fraction is the lowest, so the ratios stay as equal as the rounding allows."""
    def widths_at(r: float) -> list[int]:
        return [constrain(int(math.ceil(r * b.width - 1e-9)), b) for b in budgets]

    lo, hi = 0.0, 1.0
    if cost(widths_at(hi)) > target:
        for _ in range(60):  # cost is non-decreasing in r: cost(lo) <= target < cost(hi)
            mid = 0.5 * (lo + hi)
            if cost(widths_at(mid)) <= target + 0.5 * tolerance:
                lo = mid
            else:
                hi = mid
        widths = widths_at(lo)
    else:
        widths = widths_at(hi)
    levels = [_valid_widths(b) for b in budgets]
    blocked: set[int] = set()
    while cost(widths) < target - 0.25 * tolerance:
        open_groups = [g for g, b in enumerate(budgets) if g not in blocked and (levels[g] > widths[g]).any()]
        if not open_groups:
            break
        g = min(open_groups, key=lambda i: (widths[i] / budgets[i].width, i))
        trial = widths.copy()
        trial[g] = int(levels[g][levels[g] > widths[g]].min())
        if cost(trial) > target + 0.5 * tolerance:
            blocked.add(g)
            continue
        widths = trial
    return widths


def group_curves(groups, stats: dict[str, ConsumerStats], orders: list[np.ndarray], ridge: float,
                 refit: bool) -> list[np.ndarray]:
    """Per group, err[j] summed over its dense consumers (j channels removed in `orders`' order)."""
    curves = []
    for group, order in zip(groups, orders):
        curve = np.zeros(group.width + 1)
        for consumer in group.consumers:
            s = stats.get(consumer.name)
            if s is None:
                continue
            curve += consumer_curve(s, consumer.in_idxs.numpy(), consumer.root_idxs.numpy(), order, ridge, refit)
        curves.append(np.maximum.accumulate(curve))  # removing more never helps
    return curves


def certified_epsilon(budgets: list[GroupBudget], widths: list[int]) -> float | None:
    """The paper's eps for given widths: the smallest eps at which every group's §3 keep fits in its
    width (the bound those widths carry). None when even the largest eps keeps more than a width."""
    lo_all, hi_all = math.log(EPS_RANGE[0]), math.log(EPS_RANGE[1])
    worst = lo_all
    for b, w in zip(budgets, widths):
        if b.fixed or w >= b.width or not b.terms:
            continue
        if group_keep(math.exp(hi_all), b) > w:
            return None
        if group_keep(math.exp(worst), b) <= w:
            continue
        lo, hi = worst, hi_all  # keep(lo) > w >= keep(hi)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if group_keep(math.exp(mid), b) <= w:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-9:
                break
        worst = hi
    return math.exp(worst)
