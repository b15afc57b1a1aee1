"""PFP sensitivity against a slow, obviously-correct loop version of PFP.md §1."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pfp_deploy.errors import CalibrationError, PruningError
from pfp_deploy.pfp import sensitivity
from pfp_deploy.pfp.sensitivity import LayerSensitivity, dense_layers

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


# --- Whole torchvision networks against a float64 transcription of PFP.md §1 -----------------


def float64_sensitivity(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PFP.md §1 in float64, written down directly; vectorised over filters only, for whole nets.

    Per data point (split into relu(a), relu(-a) if it has a negative entry), per filter f and
    input row r = c*kk + k:  g[f, r] = |W[f, r]| * max_p U[r, p] / |Z^{sign W[f, r]}[f, p]|,
    where Z± = W± U (bias-free) and a term with W[f, r] == 0 or |Z| <= eps32 counts 0, i.e.
    g = W+ * M+ + |W-| * M- with M±[f, r] = max_p U[r, p] * V±[f, p], V± = 1/|Z±| (0 if <= eps32);
    s[c] = max over data points, filters and kernel offsets of g[f, c*kk + k].
    """
    w = layer.weight.detach().double()
    w = w.reshape(w.shape[0], -1)  # [F, R], channel-major rows like the unfolded patches
    linear = isinstance(layer, nn.Linear)
    channels = layer.in_features if linear else layer.in_channels
    kk = w.shape[1] // channels
    s = torch.zeros(channels, dtype=torch.float64)
    for a in x.double():
        for point in ([a] if bool((a >= 0).all()) else [a.clamp_min(0), (-a).clamp_min(0)]):
            if linear:
                u = point.reshape(-1, channels).t()  # [R, P]: every leading index is a position
            else:
                assert layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
                u = F.unfold(point[None], layer.kernel_size, dilation=layer.dilation,
                             padding=layer.padding, stride=layer.stride)[0]
            g = torch.zeros_like(w)  # [F, R]
            for w_sign in (w.clamp_min(0), w.clamp_max(0)):  # zero weights go to neither
                z = (w_sign @ u).abs()  # [F, P]
                v = torch.where(z > EPS32, 1 / z, torch.zeros((), dtype=z.dtype))
                chunk = max(1, 4_000_000 // u.numel())
                for f0 in range(0, w.shape[0], chunk):
                    m = (u[None] * v[f0:f0 + chunk, None, :]).amax(dim=-1)  # M[f, r]
                    g[f0:f0 + chunk] += w_sign[f0:f0 + chunk].abs() * m
            s = torch.maximum(s, g.amax(dim=0).view(channels, kk).amax(dim=1))
    return s


def layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensor entering every dense layer, captured with forward hooks, batches concatenated.

    Use the same batches as the call under test: float32 convolutions round differently for
    another batch size (another kernel), and near-dead channels feel it (see below).
    """
    inputs = {}

    def hook(module, args, output, name):
        inputs.setdefault(name, []).append(args[0])

    handles = [m.register_forward_hook(lambda mod, args, out, name=name: hook(mod, args, out, name))
               for name, m in dense_layers(model).items()]
    try:
        with torch.no_grad():
            for x in batches:
                model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(xs) for name, xs in inputs.items()}


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / want.abs().clamp_min(1e-30)).max().item()


def torchvision_net(arch: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


def check_network_against_float64(arch: str, images: int, size: int, float64_copy: bool) -> None:
    """Every dense layer of a torchvision net (random init, seeded) against float64_sensitivity.

    Not sensitivity(float32 model) against the float64 *model*: the float32 forward pass itself is
    ill-conditioned for near-dead channels. A channel whose only non-zero entry is a ReLU of a
    small BN output (6.1e-5 next to values of 7) carries that entry with ~2 % relative error in
    float32 (resnet18 layer4.0.conv2, seed 1, 3 images of 64 px), so its score differs from the
    float64 model's by as much, whatever computes the score; even the float32 model run with
    another batch size moves such scores by ~1e-3. The score is exact given its input:
    (a) the public API on the float32 model vs float64 arithmetic on the same layer inputs
        (same batches);
    (b) float64_copy: the float64 model's layer inputs, rounded to float32 and fed to the kernel,
        vs float64 arithmetic on them unrounded.
    """
    model = torchvision_net(arch)
    x = torch.randn(images, 3, size, size)
    half = max(1, images // 2)
    batches = [x[:half], x[half:]] if images > 1 else [x]  # also the running max over batches
    got = sensitivity(model, batches)
    inputs = layer_inputs(model, batches)
    layers = dense_layers(model)
    assert set(got) == set(layers) == set(inputs)
    worst = max((max_rel(got[n], float64_sensitivity(m, inputs[n])), n) for n, m in layers.items())
    assert worst[0] <= 1e-5, f"(a) {arch}: max relative difference {worst[0]:.3g} in {worst[1]}"
    if not float64_copy:
        return
    model64 = copy.deepcopy(model).double()
    inputs64 = layer_inputs(model64, [x.double()])
    layers64 = dense_layers(model64)
    diffs = []
    for name, layer in layers.items():
        tracker = LayerSensitivity(layer)
        tracker.update(inputs64[name].float())
        diffs.append((max_rel(tracker.values, float64_sensitivity(layers64[name], inputs64[name])), name))
    worst = max(diffs)
    assert worst[0] <= 1e-5, f"(b) {arch}: max relative difference {worst[0]:.3g} in {worst[1]}"


# 40 px keeps every resnet18 stage at >= 2x2 positions (so the q-norm path runs everywhere).
@pytest.mark.parametrize("arch,float64_copy", [("resnet18", False), ("mobilenet_v2", True)])
def test_whole_torchvision_network_matches_float64(arch, float64_copy):
    check_network_against_float64(arch, images=2, size=40, float64_copy=float64_copy)


@pytest.mark.slow
@pytest.mark.parametrize("arch,float64_copy", [
    ("resnet18", True), ("mobilenet_v2", True), ("resnet50", False), ("vgg11_bn", False),
    ("densenet121", False), ("efficientnet_b0", False),
])
def test_whole_torchvision_network_matches_float64_64px(arch, float64_copy):
    check_network_against_float64(arch, images=3, size=64, float64_copy=float64_copy)


def test_subnormal_activations_keep_the_winning_pair():
    """Regression: a channel whose activations are subnormal (< 1.2e-38) but matter (huge weights).

    The q-norm bound used to divide each row by max(row max, tiny): for a subnormal row the scaled
    ratios were ~1e-3 instead of <= 1 with max 1, their 16th powers underflowed, and the underflow
    fallback bounded every pair of the channel far below its true value. Filter 1's pair, the
    winner (1e-3 / 1.1e-2 = 0.0909), was discarded and s[1] came out as filter 0's 1e-3.
    """
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 1e38], [1e-2, 1e38]]).view(2, 2, 1, 1))
    x = torch.tensor([[1.0, 1e-6], [1e-41, 0.0]]).view(1, 2, 1, 2)  # channel 1: one subnormal entry
    assert 0 < float(x[0, 1, 0, 0]) < torch.finfo(torch.float32).tiny
    want = loop_sensitivity_conv(conv, x)
    assert want[1] == pytest.approx(1e-3 / (1e-2 + 1e-3), rel=1e-4)  # 1e-41 is rounded in float32
    assert_close(ours(conv, x), want)


def test_subnormal_channels_random_layers():
    """Random layers where some channels are subnormal and their weights scale them back up."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        conv = nn.Conv2d(5, 4, 3, padding=1)
        w = torch.randn(conv.weight.shape, generator=g)
        x = torch.rand(2, 5, 6, 6, generator=g) * (torch.rand(2, 5, 6, 6, generator=g) > 0.3)
        x[:, 1:3] *= 1e-41
        w[:, 1:3] *= 1e37
        with torch.no_grad():
            conv.weight.copy_(w)
        assert_close(ours(conv, x), float64_sensitivity(conv, x))


def test_independent_of_float32_matmul_precision():
    """TF32 (CUDA) / bf16 (CPU) matmuls must not leak into Z = W± U; the setting is restored."""
    torch.manual_seed(5)
    conv = nn.Conv2d(64, 32, 3, padding=1)
    x = torch.rand(2, 64, 12, 12)
    want = ours(conv, x)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = ours(conv, x)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(got, want)
    assert_close(want, float64_sensitivity(conv, x))


@pytest.mark.gpu
def test_cuda_tf32_matches_float64():
    torch.manual_seed(6)
    conv = nn.Conv2d(64, 32, 3, padding=1)
    x = torch.rand(2, 64, 12, 12)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
        got = sensitivity(nn.Sequential(conv).cuda(), [x.cuda()])["0"].double()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_close(got, float64_sensitivity(conv, x))
