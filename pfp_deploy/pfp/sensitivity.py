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
the exact maximum, not an approximation: `tests/test_sensitivity.py` checks it against loops.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CalibrationError, PruningError

EPS32 = float(torch.finfo(torch.float32).eps)  # |Z| <= EPS32 contributes 0 (PFP.md §1.3)
# Upper bound by a q-norm (see LayerSensitivity._upper_bound). q = 16 keeps float32 safe and the
# bound within P^(1/16) (<= 1.8 for 112x112 maps) of the truth: few pairs are left to check.
Q_NORM = 16  # a power of two: _power_q squares four times
UNDERFLOW_ROOT = torch.finfo(torch.float32).tiny ** (1.0 / Q_NORM)  # below it x^q underflows
BOUND_SLACK = 1.001  # covers float32 rounding of the bound (sum of P positive terms, powers)


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
        """P == 1: s[c] = max_b U[b, r] * max_f |W[f, r]| V^sign[b, f], in filter chunks."""
        batch, rows = u.shape
        filters = self.out_features
        w_pos, w_neg = self.w_signed[:filters].t(), self.w_signed[filters:].abs().t()  # [R, F]
        best = torch.zeros(batch, rows, device=u.device)
        chunk = max(1, self.budget // max(1, 2 * batch * rows))
        for f0 in range(0, filters, chunk):
            f1 = min(filters, f0 + chunk)
            best = torch.maximum(best, (v[:, None, f0:f1] * w_pos[:, f0:f1]).amax(dim=-1))
            best = torch.maximum(best, (v[:, None, filters + f0:filters + f1] * w_neg[:, f0:f1]).amax(dim=-1))
        return self._per_channel((best * u).amax(dim=0))

    def _upper_bound(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """U[b,r,f] >= g via the q-norm: max_p x_p <= (sum_p x_p^q)^(1/q) <= P^(1/q) max_p x_p.

        The sum is a matrix product (BLAS); rows are scaled to max 1 first so nothing overflows,
        and a product that underflows is bounded by UNDERFLOW_ROOT instead.
        """
        u_max = u.amax(dim=-1, keepdim=True)  # [B, R, 1]
        v_max = v.amax(dim=-1, keepdim=True)  # [B, 2F, 1]
        tiny = torch.finfo(torch.float32).tiny
        u_pow = _power_q(u / u_max.clamp_min(tiny))
        v_pow = _power_q(v / v_max.clamp_min(tiny))
        root = torch.matmul(v_pow, u_pow.transpose(1, 2)).pow_(1.0 / Q_NORM)  # [B, 2F, R]
        del u_pow, v_pow
        bound_m = root.clamp_min_(UNDERFLOW_ROOT).mul_(v_max).mul_(u_max.transpose(1, 2)).mul_(BOUND_SLACK)
        # Weight (f, r) reads row v_row[r, f] of the sign-split bound.
        index = self.v_row.unsqueeze(0).expand(bound_m.shape[0], -1, -1)
        return torch.gather(bound_m.transpose(1, 2), 2, index).mul_(self.w_abs_t)

    def _exact(self, u, v, best, b, r, f):
        """best[c] max= |W[f, r]| * max_p U[b, r, p] V[b, v_row, p] for the listed triples."""
        if b.numel() == 0:
            return best
        j = self.v_row[r, f]
        value = torch.empty(b.numel(), device=u.device)
        chunk = max(1, self.budget // (2 * u.shape[-1]))
        for s in range(0, b.numel(), chunk):
            sl = slice(s, s + chunk)
            value[sl] = (u[b[sl], r[sl]] * v[b[sl], j[sl]]).amax(dim=1)
        value *= self.w_abs_t[r, f]
        channel = torch.div(r, self.kk, rounding_mode="floor")
        return best.scatter_reduce(0, channel, value, reduce="amax")

    def _per_row(self, best: torch.Tensor) -> torch.Tensor:
        return best.repeat_interleave(self.kk).view(1, -1, 1)

    def _per_channel(self, per_row: torch.Tensor) -> torch.Tensor:
        return per_row.view(self.in_channels, self.kk).amax(dim=1)


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


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() for BN running statistics; the caller's train/eval flags come back even on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


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
        with _eval_mode(model), torch.no_grad():
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
