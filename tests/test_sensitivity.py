"""PFP sensitivity against a slow, obviously-correct loop version of PFP.md §1."""
import math

import pytest
import torch
import torch.nn as nn

from pfp_deploy.errors import CalibrationError, PruningError
from pfp_deploy.pfp import sensitivity

EPS32 = 1.1920929e-07


def loop_sensitivity_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Explicit loops over data points, filters, positions, channels and kernel offsets (float64)."""
    w = conv.weight.detach().double()
    f_out, c_in, kh, kw = w.shape
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    s = torch.zeros(c_in, dtype=torch.float64)
    for a in x.double():
        points = [a] if bool((a >= 0).all()) else [a.clamp_min(0), (-a).clamp_min(0)]
        for a in points:
            h, wd = a.shape[1:]
            padded = torch.zeros(c_in, h + 2 * ph, wd + 2 * pw, dtype=torch.float64)
            padded[:, ph:ph + h, pw:pw + wd] = a
            h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w_out = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            for f in range(f_out):
                for oy in range(h_out):
                    for ox in range(w_out):
                        def patch(c, i, j):
                            return padded[c, oy * sh + i * dh, ox * sw + j * dw]
                        z_pos = z_neg = 0.0
                        for c in range(c_in):
                            for i in range(kh):
                                for j in range(kw):
                                    term = w[f, c, i, j] * patch(c, i, j)
                                    if w[f, c, i, j] > 0:
                                        z_pos += term
                                    elif w[f, c, i, j] < 0:
                                        z_neg += term
                        for c in range(c_in):
                            for i in range(kh):
                                for j in range(kw):
                                    wt = w[f, c, i, j]
                                    z = z_pos if wt > 0 else z_neg
                                    if wt == 0 or abs(z) <= EPS32:
                                        continue
                                    g = abs(wt) * patch(c, i, j) / abs(z)
                                    s[c] = max(s[c], float(g))
    return s


def loop_sensitivity_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Every leading index of a data point is a position (float64 loops)."""
    w = lin.weight.detach().double()
    s = torch.zeros(w.shape[1], dtype=torch.float64)
    for a in x.double():
        points = [a] if bool((a >= 0).all()) else [a.clamp_min(0), (-a).clamp_min(0)]
        for a in points:
            for row in a.reshape(-1, w.shape[1]):
                for f in range(w.shape[0]):
                    z_pos = sum(float(w[f, r] * row[r]) for r in range(w.shape[1]) if w[f, r] > 0)
                    z_neg = sum(float(w[f, r] * row[r]) for r in range(w.shape[1]) if w[f, r] < 0)
                    for r in range(w.shape[1]):
                        z = z_pos if w[f, r] > 0 else z_neg
                        if w[f, r] == 0 or abs(z) <= EPS32:
                            continue
                        s[r] = max(s[r], float(abs(w[f, r]) * row[r] / abs(z)))
    return s


def ours(layer, x, **kw):
    return sensitivity(nn.Sequential(layer), [x], **kw)["0"].double()


def assert_close(got, want):
    rel = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert rel <= 1e-5, f"max relative difference {rel}"


CONV_CASES = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=0, bias=False),
    dict(in_channels=2, out_channels=7, kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(in_channels=5, out_channels=3, kernel_size=1),
    dict(in_channels=4, out_channels=5, kernel_size=1, stride=2, bias=False),
    dict(in_channels=3, out_channels=4, kernel_size=5, padding=2, stride=3),
]


@pytest.mark.parametrize("cfg", CONV_CASES)
@pytest.mark.parametrize("signed", [True, False])
def test_conv_matches_loop(cfg, signed):
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg)
    x = torch.randn(2, cfg["in_channels"], 8, 7)
    if not signed:
        x = x.relu()
    want = loop_sensitivity_conv(conv, x)
    assert_close(ours(conv, x), want)
    # a tiny memory budget forces every chunking path and must not change the values
    assert_close(ours(conv, x, max_memory_mb=0.001), want)


def test_conv_vanishing_denominators():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[0] = conv.weight[0].abs()  # filter 0 has no negative weights: Z- == 0
        conv.weight[1, :, 1, 1] = 0  # zero weights go to neither sign
    x = torch.rand(2, 3, 6, 6)
    x[0, :, :3, :] = 0  # dead region: Z == 0 on many positions
    x[1] = 0  # an all-zero data point
    want = loop_sensitivity_conv(conv, x)
    got = ours(conv, x)
    assert_close(got, want)
    assert torch.isfinite(got).all()


def test_linear_2d_and_3d_inputs():
    torch.manual_seed(2)
    lin = nn.Linear(6, 5)
    for x in (torch.randn(4, 6), torch.rand(3, 4, 6), torch.randn(2, 3, 2, 6)):
        assert_close(ours(lin, x), loop_sensitivity_linear(lin, x))


def test_values_in_unit_interval_and_batch_invariant():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(12, 3, 16, 16)
    whole = sensitivity(model, [x])
    split = sensitivity(model, [x[:5], x[5:7], (x[7:], torch.zeros(5))])
    for name, s in whole.items():
        assert s.dtype == torch.float32
        assert float(s.min()) >= 0 and float(s.max()) <= 1 + 1e-6, name
        assert torch.allclose(s, split[name], rtol=1e-6, atol=0)


def test_mode_and_hooks_restored_on_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    model.train()
    bad = torch.full((1, 1, 8, 8), float("nan"))
    with pytest.raises(CalibrationError, match="non-finite"):
        sensitivity(model, [bad])
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_inputs():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with pytest.raises(CalibrationError, match="empty"):
        sensitivity(model, [])
    with pytest.raises(PruningError, match="no dense"):
        sensitivity(nn.Sequential(nn.ReLU()), [torch.zeros(1, 3)])
    with pytest.raises(PruningError, match="Did you mean"):
        sensitivity(model, [torch.rand(1, 1, 8, 8)], layers=["01"])


def test_float32_under_autocast():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 7, 7)
    want = ours(conv, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(conv, x)
    assert_close(got, want)
