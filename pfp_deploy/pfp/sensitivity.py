"""Empirical sensitivity of input channels (PFP.md §1), exact and vectorised.

For a dense layer l with input patches U [R = C*kk, P] (R rows channel-major) and sign-split,
bias-free pre-activations Z± [F, P], PFP defines

    g[f, r] = |W[f, r]| * max_p U[r, p] / |Z^{sign W[f, r]}[f, p]|,   s[c] = max_x max_f max_k g[f, c*kk+k].

The inner max over patches is a max-times product: no BLAS shortcut, as many operations as the
layer has MACs. We never loop over filters, and we skip almost all of that work *exactly*: with
V = 1/|Z| (0 where |Z| <= eps32), a q-norm turns the max into a matrix product that bounds it,

    max_p U[r,p] V[f,p]  <=  (sum_p U[r,p]^q V[f,p]^q)^(1/q)  <=  P^(1/q) * max_p U[r,p] V[f,p],

so one BLAS call bounds every (filter, row) pair within a factor P^(1/q). The pair with the best
bound of each channel is computed exactly; every pair whose bound cannot beat that value cannot
change s[c]; the few remaining pairs (typically < 0.1 %) are computed exactly too. The result is
the exact maximum, not an approximation: `tests/test_sensitivity.py` checks it against loops and,
on every dense layer of whole torchvision networks, against float64 arithmetic on the same layer
inputs (<= 1e-5 relative; measured ~1e-6). Exact *given the float32 activations*: a float64 copy
of the model gives different activations, and near-dead channels (one tiny non-zero entry left by
BN + ReLU cancellation) can then differ by 1e-3..1e-2 relative, whatever computes the score.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CalibrationError, PruningError
from ..modes import eval_mode

EPS32 = float(torch.finfo(torch.float32).eps)  # |Z| <= EPS32 contributes 0 (PFP.md §1.3)
# Upper bound by a q-norm (see LayerSensitivity._upper_bound). q = 16 keeps float32 safe and the
# bound within P^(1/16) (<= 1.8 for 112x112 maps) of the truth: few pairs are left to check.
Q_NORM = 16  # a power of two: _power_q squares four times
TINY32 = torch.finfo(torch.float32).tiny  # smallest normal float32
UNDERFLOW_ROOT = TINY32 ** (1.0 / Q_NORM)  # a scaled product below it may underflow in x^q


def bound_slack(positions: int) -> float:
    """Factor that makes the float32 q-norm bound a true upper bound of the float32 exact values.

    Relative rounding errors (unit roundoff u = EPS32 / 2), all covered with room to spare:
    the sum of P positive terms in any order (BLAS blocking, FMA) <= (P - 1) u / (1 - (P - 1) u)
    <= P*EPS32 (P < 2^22); the two scaled ratios and their four squarings <= 31 u each side;
    the 1/q root divides all of that by q and adds a few ulp; the four rescaling products
    (v_max * slack, root *, * |W|, * u_max) and the two roundings of an exact value
    (U * |W|) * V add 6 u. So (1 + (P + 64) EPS32)^(1/q) * (1 + 16 EPS32) bounds them all, for
    values in float32's normal range (a pair worth < ~1e-30 may be rounded on either side).
    Exact IEEE float32 matmuls are assumed: LayerSensitivity.update switches TF32/bf16 off.
    """
    return (1.0 + (positions + 64) * EPS32) ** (1.0 / Q_NORM) * (1.0 + 16 * EPS32)


def is_dense_layer(module: nn.Module) -> bool:
    """Layers PFP scores: Conv2d with groups == 1, and Linear."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _patches(layer: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Input patches U [B, R, P] with rows r = c*kk + k, and kk (kernel positions per channel)."""
    if isinstance(layer, nn.Linear):
        batch, features = a.shape[0], a.shape[-1]
        return a.reshape(batch, -1, features).transpose(1, 2), 1
    if layer.kernel_size == (1, 1) and not any(layer._reversed_padding_repeated_twice):
        sh, sw = layer.stride  # a 1x1 conv's patches are the (strided) pixels: no unfold copy
        return a[:, :, ::sh, ::sw].reshape(a.shape[0], a.shape[1], -1), 1
    # Pad exactly as the layer does (zeros, reflect, circular, or 'same'), then unfold unpadded.
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    if any(layer._reversed_padding_repeated_twice):
        a = F.pad(a, layer._reversed_padding_repeated_twice, mode=mode)
    u = F.unfold(a, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    return u, layer.kernel_size[0] * layer.kernel_size[1]


def split_signed(a: torch.Tensor) -> torch.Tensor:
    """PFP.md §1.1: a data point with a negative entry becomes two, relu(a) and relu(-a)."""
    signed = (a < 0).flatten(1).any(dim=1)
    if not bool(signed.any()):
        return a
    return torch.cat([a.clamp_min(0), (-a[signed]).clamp_min(0)])


class LayerSensitivity:
    """Running max of one dense layer's input-channel sensitivity over the data points seen."""

    def __init__(self, layer: nn.Module, max_memory_mb: float = 1024.0):
        weight = layer.weight.detach().float()
        self.out_features = weight.shape[0]
        flat = weight.reshape(self.out_features, -1)  # [F, R], same row order as the patches
        # Rows of V: first the F positive-weight filters, then the F negative ones.
        self.w_signed = torch.cat([flat.clamp_min(0), flat.clamp_max(0)])  # [2F, R]
        self.w_abs_t = flat.abs().t().contiguous()  # [R, F]
        filters = torch.arange(self.out_features, device=weight.device)
        # Weight (f, r) reads row v_row[r, f] of V: f for positive weights, F + f for negative ones.
        self.v_row = (filters.unsqueeze(1) + self.out_features * (flat < 0).long()).t().contiguous()
        in_channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        self.in_channels = in_channels
        self.kk = flat.shape[1] // in_channels
        self.values = torch.zeros(in_channels, device=weight.device)
        self.layer = layer
        self.budget = max(1, int(max_memory_mb * 2**20 / 4))  # floats per temporary
        self.data_points = 0

    def update(self, a: torch.Tensor) -> None:
        """Fold one batch of layer inputs (the tensor entering the layer) into the running max."""
        a = split_signed(a.detach().float())
        self.data_points += a.shape[0]
        u, _ = _patches(self.layer, a)
        batch, rows, positions = u.shape
        filters = self.out_features
        per_sample = 2 * rows * positions + 6 * filters * positions + 4 * filters * rows
        chunk = max(1, self.budget // max(1, per_sample))
        with _ieee_float32_matmul():  # Z is exact float32, and bound_slack assumes IEEE sums
            for start in range(0, batch, chunk):
                self._update_chunk(u[start:start + chunk].contiguous())

    def _update_chunk(self, u: torch.Tensor) -> None:
        z = torch.matmul(self.w_signed, u).abs()  # [B, 2F, P]
        v = torch.where(z > EPS32, z.reciprocal(), torch.zeros((), device=z.device))
        del z
        if u.shape[-1] == 1:  # one position (Linear on 2-D input): the max is a single product
            self.values = torch.maximum(self.values, self._single_position(u[..., 0], v[..., 0]))
            return
        upper = self._upper_bound(u, v)  # [B, R, F], >= g for every (sample, row, filter)
        batch, rows, filters = upper.shape
        # Exact value of the most promising pair of every channel: a lower bound of s[c].
        per_channel = upper.view(batch, self.in_channels, self.kk, filters).permute(1, 0, 2, 3)
        flat_best = per_channel.reshape(self.in_channels, -1).argmax(dim=1)
        b, k, f = torch.unravel_index(flat_best, (batch, self.kk, filters))
        r = torch.arange(self.in_channels, device=u.device) * self.kk + k
        best = self._exact(u, v, self.values, b, r, f)
        # Only pairs whose bound beats the channel's best can change it: compute those exactly.
        b, r, f = torch.nonzero(upper > self._per_row(best), as_tuple=True)
        self.values = self._exact(u, v, best, b, r, f)

    def _single_position(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """P == 1: s[c] = max_b max_f (U[b, r] |W[f, r]|) V^sign[b, f], in filter chunks.

        |W| * V first (one product per weight); where it overflows (weights > ~4e31), the chunk is
        redone as (U * |W|) * V, the order _exact uses, which stays finite.
        """
        batch, rows = u.shape
        filters = self.out_features
        w_pos, w_neg = self.w_signed[:filters].t(), self.w_signed[filters:].abs().t()  # [R, F]
        best = torch.zeros(batch, rows, device=u.device)
        chunk = max(1, self.budget // max(1, 2 * batch * rows))
        for f0 in range(0, filters, chunk):
            f1 = min(filters, f0 + chunk)
            for w, v_rows in ((w_pos, v[:, f0:f1]), (w_neg, v[:, filters + f0:filters + f1])):
                wv = (v_rows[:, None] * w[:, f0:f1]).amax(dim=-1)  # [B, R]
                if bool(torch.isinf(wv).any()):
                    g = (u[:, :, None] * w[:, f0:f1]).mul_(v_rows[:, None]).amax(dim=-1)
                else:
                    g = wv.mul_(u)
                best = torch.maximum(best, g)
        return self._per_channel(best.amax(dim=0))

    def _upper_bound(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """U[b,r,f] >= g via the q-norm: max_p x_p <= (sum_p x_p^q)^(1/q) <= P^(1/q) max_p x_p.

        The sum is a matrix product (BLAS); every row is divided by its own max first, so the
        scaled ratios lie in [0, 1] with max exactly 1: nothing overflows, and a scaled product
        small enough to underflow in x^q (below UNDERFLOW_ROOT) is bounded by UNDERFLOW_ROOT.
        The divisor is the row max itself, never a clamped one: dividing by max(u_max, tiny) made
        the ratios of a row whose max is subnormal (< tiny) far smaller than 1, their powers
        underflowed, and the UNDERFLOW_ROOT fallback then bounded them below their true value,
        discarding winning pairs. bound_slack(P) covers float32 rounding.
        """
        u_max = u.amax(dim=-1, keepdim=True)  # [B, R, 1]
        v_max = v.amax(dim=-1, keepdim=True)  # [B, 2F, 1]
        one = torch.ones((), device=u.device)
        u_pow = _power_q(u / torch.where(u_max > 0, u_max, one))  # all-zero rows stay 0
        v_pow = _power_q(v / torch.where(v_max > 0, v_max, one))
        root = torch.matmul(v_pow, u_pow.transpose(1, 2)).pow_(1.0 / Q_NORM)  # [B, 2F, R]
        del u_pow, v_pow
        bound_v = root.clamp_min_(UNDERFLOW_ROOT).mul_(v_max * bound_slack(u.shape[-1]))
        # Weight (f, r) reads row v_row[r, f] of the sign-split bound. |W| before U_max: like
        # _exact's U * |W| (a summand of Z), it keeps tiny activations out of subnormal products.
        index = self.v_row.unsqueeze(0).expand(bound_v.shape[0], -1, -1)
        return torch.gather(bound_v.transpose(1, 2), 2, index).mul_(self.w_abs_t).mul_(u_max)

    def _exact(self, u, v, best, b, r, f):
        """best[c] max= max_p (U[b, r, p] |W[f, r]|) V[b, v_row, p] for the listed triples.

        U * |W| first: it is a summand of Z, so it stays in float32's normal range whenever the
        ratio is worth representing (U * V alone can be subnormal for tiny activations).
        """
        if b.numel() == 0:
            return best
        j = self.v_row[r, f]
        w = self.w_abs_t[r, f]
        value = torch.empty(b.numel(), device=u.device)
        chunk = max(1, self.budget // (2 * u.shape[-1]))
        for s in range(0, b.numel(), chunk):
            sl = slice(s, s + chunk)
            value[sl] = u[b[sl], r[sl]].mul_(w[sl, None]).mul_(v[b[sl], j[sl]]).amax(dim=1)  # gathers are copies
        channel = torch.div(r, self.kk, rounding_mode="floor")
        return best.scatter_reduce(0, channel, value, reduce="amax")

    def _per_row(self, best: torch.Tensor) -> torch.Tensor:
        return best.repeat_interleave(self.kk).view(1, -1, 1)

    def _per_channel(self, per_row: torch.Tensor) -> torch.Tensor:
        return per_row.view(self.in_channels, self.kk).amax(dim=1)


@contextlib.contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Full-precision float32 matmuls inside, whatever the caller set (TF32 on CUDA, bf16 on CPU).

    torch.set_float32_matmul_precision("high"/"medium") would otherwise compute Z = W± U with a
    10- or 8-bit mantissa (~1e-3 relative): no longer the float32 formula. Restored on exit.
    """
    backends = [b for b in (getattr(torch.backends.cuda, "matmul", None),
                            getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    if not backends:  # torch < 2.9: only the legacy global switch exists
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    previous = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            if b.fp32_precision != "ieee":
                b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, previous):
            if b.fp32_precision != value:
                b.fp32_precision = value


def _power_q(x: torch.Tensor) -> torch.Tensor:
    """x ** Q_NORM in place by repeated squaring (Q_NORM = 16: four multiplies, no exp/log)."""
    for _ in range(4):
        x.mul_(x)
    return x


def _first_tensor(batch) -> torch.Tensor:
    """Calibration batches may be tensors, (inputs, labels) pairs, or dicts with 'input'."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "image", "images", "x"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise CalibrationError(
        f"calibration batches must be tensors or (inputs, labels) pairs; got {type(batch).__name__}"
    )


def dense_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Name -> module for every dense layer (or the named subset, checked)."""
    found = {name: m for name, m in model.named_modules() if is_dense_layer(m)}
    if layers is None:
        if not found:
            raise PruningError(
                "the model has no dense Conv2d (groups == 1) or Linear layer: PFP has nothing to score"
            )
        return found
    from ..errors import did_you_mean

    selected = {}
    for name in layers:
        if name not in found:
            raise PruningError(
                f'layer "{name}" is not a dense Conv2d/Linear of this model.{did_you_mean(name, found)}'
            )
        selected[name] = found[name]
    return selected


def sensitivity(
    model: nn.Module,
    batches: Iterable,
    *,
    layers: Iterable[str] | None = None,
    max_memory_mb: float = 1024.0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """PFP input-channel sensitivity (PFP.md §1) of every dense layer, over all batches.

    Returns {layer name: float32 tensor [in_channels]} with values in [0, 1]. The model is run in
    eval mode without gradients; its mode is restored and every hook removed, even on error.
    """
    targets = dense_layers(model, layers)
    trackers = {name: LayerSensitivity(m, max_memory_mb) for name, m in targets.items()}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            a = inputs[0]
            if not torch.isfinite(a).all():
                raise CalibrationError(
                    f'non-finite (NaN/inf) activations enter layer "{name}": check the model weights '
                    "and the calibration data normalisation"
                )
            device_type = a.device.type
            with torch.autocast(device_type=device_type, enabled=False):  # float32 even under autocast
                trackers[name].update(a)
        return hook

    device = next(model.parameters()).device
    seen = 0
    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="PFP sensitivity", unit="batch")
        with eval_mode(model), torch.no_grad():
            for batch in iterator:
                x = _first_tensor(batch).to(device)
                if x.shape[0] == 0:
                    continue
                model(x)
                seen += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise CalibrationError("the calibration data is empty: give at least one batch of inputs")
    unreached = [name for name, t in trackers.items() if t.data_points == 0]
    if unreached:
        raise CalibrationError(
            f"{len(unreached)} dense layer(s) never ran during calibration (e.g. {unreached[:3]}); "
            "PFP cannot score layers the forward pass does not use: list them in ignored_layers"
        )
    return {name: t.values.cpu() for name, t in trackers.items()}
