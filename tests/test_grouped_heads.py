"""grouped_heads: every backend against the fp64 reference (forward and backward), plus gradcheck,
opcheck, torch.compile and argument errors. Triton runs on CPU only under TRITON_INTERPRET=1 (set
before Python starts); without it the Triton cases are not collected."""
from __future__ import annotations

import pytest
import torch

import ued_fast
from ued_fast.ops.grouped_heads import (
    GroupedHeads, _flat_cover, _grouped_heads_op, cover_tables, grouped_heads,
)
from ued_fast.reference import grouped_heads_reference

DEVICE_BACKENDS = [("cpu", b) for b in ued_fast.available_backends("cpu")]
if torch.cuda.is_available():
    DEVICE_BACKENDS += [("cuda", b) for b in ued_fast.available_backends("cuda")]
NATIVE = [(dev, b) for dev, b in DEVICE_BACKENDS if b != "reference"]
IDS = [f"{d}-{b}" for d, b in DEVICE_BACKENDS]

# Covers: odd K, uneven subset sizes, overlap counts from 1 to K (a class in every head).
COVERS = {
    "K1_C2": [[1, 0]],
    "K3_C10": [[0, 1, 2, 9], [2, 3, 4, 5, 9], [5, 6, 7, 8, 9, 2]],
    "K5_C10": [[0, 1, 9], [1, 2, 3, 9], [3, 4, 5, 9], [6, 7, 9], [8, 9]],
    "K7_C100": [],
}
# K=7, C=100: overlapping windows of uneven length; class 0 in all 7 heads, class 50 in 4 or 5;
# odd heads list their classes in descending order (slot order must not matter).
for _k, (_lo, _hi) in enumerate(zip([0, 14, 28, 42, 57, 71, 85], [16, 30, 45, 60, 72, 90, 100])):
    _s = sorted(set(range(_lo, _hi)) | {0} | ({50} if _k < 4 else set()))
    COVERS["K7_C100"].append(_s[::-1] if _k % 2 else _s)
# (cover, D): together D in {1, 7, 64} and C in {2, 10, 100}.
CASES = [("K1_C2", 7), ("K3_C10", 1), ("K5_C10", 64), ("K7_C100", 7)]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
GARBAGE = 1e3  # padding columns hold large values; none may reach the output or the gradients


def _covers_all(cover):
    c = 1 + max(max(s) for s in cover)
    assert set().union(*map(set, cover)) == set(range(c))
    return cover


for _name in COVERS:
    _covers_all(COVERS[_name])
assert sum(0 in s for s in COVERS["K7_C100"]) == 7


def make_inputs(cover, d, mode, layout, n=11, dtype=torch.float32, device="cpu", seed=0, logit_scale=1.0):
    """Random fp64 master inputs (padding columns = garbage), cast to dtype, on device."""
    g = torch.Generator().manual_seed(seed)
    k = len(cover)
    width = max(len(s) for s in cover) + (1 if mode == "prob_mean" else 0) + 2  # 2 extra padding columns
    features = torch.randn(n, k * d, generator=g, dtype=torch.float64)
    if layout == "KND":
        features = features.view(n, k, d).transpose(0, 1).contiguous()
    weight = torch.randn(k, d, width, generator=g, dtype=torch.float64) * (logit_scale / d ** 0.5)
    bias = torch.randn(k, width, generator=g, dtype=torch.float64) * logit_scale
    for j, s in enumerate(cover):
        real = len(s) + (1 if mode == "prob_mean" else 0)
        weight[j, :, real:] = GARBAGE * torch.randn(d, width - real, generator=g, dtype=torch.float64).sign()
        bias[j, real:] = GARBAGE
    return [t.to(device=device, dtype=dtype) for t in (features, weight, bias)]


def run_fwd_bwd(fn, inputs, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    return out, [t.grad for t in leaves], grad_out


def assert_close_scaled(actual, expected, tol, what):
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    scale = max(expected.abs().max().item(), 1.0)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def check_against_reference(device, backend, cover, d, mode, layout, dtype, n=11, logit_scale=1.0, tol=None):
    inputs = make_inputs(cover, d, mode, layout, n=n, dtype=dtype, device=device, logit_scale=logit_scale)
    out, grads, grad_out = run_fwd_bwd(
        lambda f, w, b: grouped_heads(f, w, b, cover, mode=mode, backend=backend), inputs)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (n, 1 + max(max(s) for s in cover))
    ref_out, ref_grads, _ = run_fwd_bwd(
        lambda f, w, b: grouped_heads_reference(f, w, b, cover, mode=mode),
        [t.detach().cpu().double() for t in inputs], grad_out)
    tol = tol if tol is not None else TOL[dtype]
    assert_close_scaled(out, ref_out, tol, "output")
    for name, got, want, inp in zip(("features", "weight", "bias"), grads, ref_grads, inputs):
        assert got.dtype == dtype and got.shape == inp.shape, name
        assert_close_scaled(got, want, tol, f"grad {name}")
    # Padding columns get exactly zero gradient.
    for j, s in enumerate(cover):
        real = len(s) + (1 if mode == "prob_mean" else 0)
        assert (grads[1][j, :, real:] == 0).all() and (grads[2][j, real:] == 0).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
@pytest.mark.parametrize("layout", ["NKD", "KND"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c}_D{d}" for c, d in CASES])
def test_matches_reference_fp32(device, backend, mode, layout, case):
    name, d = case
    check_against_reference(device, backend, COVERS[name], d, mode, layout, torch.float32)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference_half(device, backend, mode, dtype):
    layout = "NKD" if dtype == torch.bfloat16 else "KND"
    check_against_reference(device, backend, COVERS["K5_C10"], 64, mode, layout, dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
@pytest.mark.parametrize("layout", ["NKD", "KND"])
def test_prob_mean_extreme_logits(device, backend, layout):
    # Head logits in the thousands: probabilities underflow; the log-space assembly must not. float32
    # head outputs near 1e4 carry rounding ~1e-3 into every exp, hence a looser (scaled) tolerance.
    check_against_reference(device, backend, COVERS["K5_C10"], 7, "prob_mean", layout, torch.float32,
                            logit_scale=3e3, tol=2e-4)


TRITON_CPU = [(d, b) for d, b in DEVICE_BACKENDS if b == "triton"]


@pytest.mark.parametrize("device,backend", TRITON_CPU, ids=[f"{d}-{b}" for d, b in TRITON_CPU])
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
def test_triton_row_kernels_across_tiles(device, backend, mode, monkeypatch):
    """Small row tiles, so that heads, head outputs, classes and a class's holders each take several
    tiles (the online log-sum-exps across tiles); W = 48 > the 32-wide output tile, class 0 held by
    all 5 heads > the 2 holders read per step."""
    from ued_fast.kernels import grouped_heads as triton_heads

    monkeypatch.setattr(triton_heads, "ROW_TILE_ELEMS", 64)
    monkeypatch.setattr(triton_heads, "MAX_BLOCK_E", 2)
    cover = [list(range(0, 45)), [0, *range(40, 60)], [0, *range(55, 70)], [0, 1, 2, 69], [0, 33, 66]]
    blocks = triton_heads.row_blocks(len(cover), 48, 70, 5)
    assert {k: v for k, v in blocks.items() if k != "num_warps"} == dict(BLOCK_K=2, BLOCK_W=32, BLOCK_C=32, BLOCK_E=2)
    check_against_reference(device, backend, _covers_all(cover), 3, mode, "NKD", torch.float32, n=3)


@pytest.mark.parametrize("device,backend", NATIVE, ids=[f"{d}-{b}" for d, b in NATIVE])
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
def test_nan_padding_never_leaks(device, backend, mode):
    cover = COVERS["K3_C10"]
    f, w, b = make_inputs(cover, 7, mode, "NKD", device=device)
    clean_w, clean_b = w.clone(), b.clone()
    for j, s in enumerate(cover):
        real = len(s) + (1 if mode == "prob_mean" else 0)
        w[j, :, real:], b[j, real:] = float("nan"), float("nan")
        clean_w[j, :, real:], clean_b[j, real:] = 0.0, 0.0
    fn = lambda f_, w_, b_: grouped_heads(f_, w_, b_, cover, mode=mode, backend=backend)  # noqa: E731
    out, grads, g = run_fwd_bwd(fn, [f, w, b])
    clean_out, clean_grads, _ = run_fwd_bwd(fn, [f, clean_w, clean_b], g)
    torch.testing.assert_close(out, clean_out, atol=0, rtol=0)
    for got, want in zip(grads, clean_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=IDS)
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
def test_non_contiguous_inputs(device, backend, mode):
    cover = COVERS["K5_C10"]
    k, d, n = len(cover), 7, 9
    f, w, b = make_inputs(cover, d, mode, "NKD", n=n, device=device)
    width = w.shape[2]
    # features: every other row of a wider buffer; weight stored [K, W, D] and transposed;
    # bias a column slice of a wider tensor; [K, N, D] features as a transposed view.
    f_wide = torch.zeros(2 * n, k * d + 3, device=device)
    f_wide[::2, : k * d] = f
    f_nc = f_wide[::2, : k * d]
    w_nc = w.transpose(1, 2).contiguous().transpose(1, 2)
    b_nc = torch.cat([b, b], dim=1)[:, :width]
    assert not (f_nc.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous())
    fn = lambda f_, w_, b_: grouped_heads(f_, w_, b_, cover, mode=mode, backend=backend)  # noqa: E731
    ref = lambda f_, w_, b_: grouped_heads_reference(f_, w_, b_, cover, mode=mode)  # noqa: E731
    out, grads, g = run_fwd_bwd(fn, [f_nc, w_nc, b_nc])
    ref_out, ref_grads, _ = run_fwd_bwd(ref, [t.detach().cpu().double() for t in (f, w, b)], g)
    assert_close_scaled(out, ref_out, 2e-5, "output")
    for got, want in zip(grads, ref_grads):
        assert_close_scaled(got, want, 2e-5, "grad")
    # [K, N, D] with a non-unit stride along D (a transposed [K, D, N] buffer).
    f3 = f.view(n, k, d).permute(1, 2, 0).contiguous().transpose(1, 2)
    assert f3.shape == (k, n, d) and f3.stride(-1) != 1
    out3 = grouped_heads(f3, w_nc, b_nc, cover, mode=mode, backend=backend)
    assert_close_scaled(out3, ref_out, 2e-5, "output [K, N, D] strided")


@pytest.mark.parametrize("device,backend", NATIVE, ids=[f"{d}-{b}" for d, b in NATIVE])
def test_partial_requires_grad(device, backend):
    cover = COVERS["K3_C10"]
    for mode in ("logit_mean", "prob_mean"):
        f, w, b = make_inputs(cover, 7, mode, "NKD", device=device)
        ref_f, ref_w, ref_b = (t.detach().cpu().double().requires_grad_() for t in (f, w, b))
        grouped_heads_reference(ref_f, ref_w, ref_b, cover, mode=mode).sum().backward()
        w.requires_grad_()  # frozen features, trained weight only
        grouped_heads(f, w, b, cover, mode=mode, backend=backend).sum().backward()
        assert f.grad is None and b.grad is None
        assert_close_scaled(w.grad, ref_w.grad, 2e-5, "grad weight")
        w.grad = None
        f.requires_grad_()
        w.requires_grad_(False)
        grouped_heads(f, w, b, cover, mode=mode, backend=backend).sum().backward()
        assert w.grad is None
        assert_close_scaled(f.grad, ref_f.grad, 2e-5, "grad features")
        with torch.no_grad():  # frozen-teacher use
            out = grouped_heads(f, w, b, cover, mode=mode, backend=backend)
        assert not out.requires_grad


@pytest.mark.skipif("cpp" not in ued_fast.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
@pytest.mark.parametrize("layout", ["NKD", "KND"])
def test_gradcheck_cpp_fp64(mode, layout):
    cover = COVERS["K3_C10"]
    inputs = [t.requires_grad_() for t in make_inputs(cover, 3, mode, layout, n=5, dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda f, w, b: grouped_heads(f, w, b, cover, mode=mode, backend="cpp"), inputs)


def _op_args(cover, mode, backend, device="cpu", requires_grad=True):
    f, w, b = make_inputs(cover, 5, mode, "NKD", n=6, device=device)
    flat, sizes = _flat_cover(ued_fast.covers.validate_cover(cover))
    return (f.requires_grad_(requires_grad), w.requires_grad_(requires_grad), b.requires_grad_(requires_grad),
            flat, sizes, 1 + max(flat), mode, backend)


@pytest.mark.parametrize("device,backend", NATIVE, ids=[f"{d}-{b}" for d, b in NATIVE])
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
def test_opcheck(device, backend, mode):
    args = _op_args(COVERS["K3_C10"], mode, backend, device)
    torch.library.opcheck(_grouped_heads_op, args)


@pytest.mark.skipif("cpp" not in ued_fast.available_backends("cpu"), reason="C++ extension not built")
def test_torch_compile_fullgraph_cpu(monkeypatch):
    torch._dynamo.reset()
    # Inductor's on-disk caches key on the graph, not on the custom op's fake: a cache written by an
    # older build of this package could replay stale output layouts. Compile fresh.
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    cover = COVERS["K5_C10"]
    for mode in ("logit_mean", "prob_mean"):
        inputs = make_inputs(cover, 7, mode, "NKD")

        def step(f, w, b):
            z = grouped_heads(f, w, b, cover, mode=mode)
            return torch.logsumexp(z, dim=-1).sum()

        compiled = torch.compile(step, fullgraph=True)
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = compiled(*leaves)
        loss.backward()
        ref_leaves = [t.clone().double().requires_grad_() for t in inputs]
        ref_loss = torch.logsumexp(grouped_heads_reference(*ref_leaves, cover, mode=mode), dim=-1).sum()
        ref_loss.backward()
        assert_close_scaled(loss.detach(), ref_loss.detach(), 2e-5, "loss")
        for got, want in zip(leaves, ref_leaves):
            assert_close_scaled(got.grad, want.grad, 2e-5, "grad")


def test_default_backend_is_best_available():
    cover = COVERS["K3_C10"]
    f, w, b = make_inputs(cover, 7, "prob_mean", "NKD")
    best = ued_fast.available_backends("cpu")[0]
    torch.testing.assert_close(grouped_heads(f, w, b, cover, mode="prob_mean"),
                               grouped_heads(f, w, b, cover, mode="prob_mean", backend=best), atol=0, rtol=0)


def test_cover_tables_cached_and_correct():
    cover = ued_fast.covers.validate_cover(COVERS["K3_C10"])
    t = cover_tables(cover, 8, torch.device("cpu"))
    assert t is cover_tables(cover, 8, torch.device("cpu"))
    for c in range(t.num_classes):
        held = t.class_entries[t.class_ptr[c]:t.class_ptr[c + 1]].tolist()
        assert sorted(held) == sorted(k * 8 + s.index(c) for k, s in enumerate(cover) if c in s)
    for k, s in enumerate(cover):
        assert t.cover_index[k, : len(s)].tolist() == list(s) and (t.cover_index[k, len(s):] == -1).all()
        assert t.sizes[k] == len(s)
        for j, c in enumerate(s):
            assert t.slot_of[k, c] == j
    assert t.max_count == 3


def test_module_matches_function():
    cover = COVERS["K5_C10"]
    for mode in ("logit_mean", "prob_mean"):
        m = GroupedHeads(cover, 6, mode=mode)
        for j, s in enumerate(cover):
            real = len(s) + (1 if mode == "prob_mean" else 0)
            assert (m.weight[j, :, real:] == 0).all() and (m.bias[j, real:] == 0).all()
        x = torch.randn(4, len(cover) * 6)
        ref = grouped_heads_reference(x, m.weight, m.bias, cover, mode=mode)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def _bad(**kw):
    cover = kw.pop("cover", [[0, 1], [1, 2]])
    mode = kw.pop("mode", "logit_mean")
    f = kw.pop("features", torch.randn(3, 8))
    w = kw.pop("weight", torch.randn(2, 4, 3))
    b = kw.pop("bias", torch.randn(2, 3))
    return grouped_heads(f, w, b, cover, mode=mode, **kw)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(mode="geo_mean"), ValueError, "mode"),
    (dict(cover=[[0, 1], []]), ValueError, "cover"),
    (dict(cover=[[0, 1], [3]]), ValueError, "cover"),  # class 2 in no subset
    (dict(cover=[[0, 1], [1, 1]]), ValueError, "cover"),
    (dict(cover=[[0, 1], [1, 2.0]]), TypeError, "cover"),
    (dict(cover=[[0, 1], [1, True]]), TypeError, "cover"),
    (dict(cover="01"), TypeError, "cover"),
    (dict(cover=[[0, 1], [2, 3], [4, 5]]), ValueError, "weight"),
    (dict(weight=torch.randn(2, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(2, 4, 1)), ValueError, "weight"),
    (dict(mode="prob_mean", weight=torch.randn(2, 4, 2), bias=torch.randn(2, 2)), ValueError, "weight"),
    (dict(bias=torch.randn(2, 4)), ValueError, "bias"),
    (dict(bias=torch.randn(3)), ValueError, "bias"),
    (dict(features=torch.randn(3, 9)), ValueError, "features"),
    (dict(features=torch.randn(3, 3, 4)), ValueError, "features"),
    (dict(features=torch.randn(2, 3, 5)), ValueError, "features"),
    (dict(features=torch.randn(3, 2, 2, 2)), ValueError, "features"),
    (dict(features=torch.randn(0, 8)), ValueError, "features"),
    (dict(features=torch.randn(3, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(features=torch.randint(0, 3, (3, 8))), TypeError, "features"),
    (dict(features=[[0.0] * 8]), TypeError, "features"),
    (dict(backend="numpy"), ValueError, "backend"),
])
def test_bad_inputs_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        _bad(**kwargs)


def test_cover_cache_does_not_hide_invalid_covers():
    _bad(cover=[[0, 1], [1, 2]])  # valid, now cached
    with pytest.raises(TypeError, match="cover"):
        _bad(cover=[[0, 1], [1, 2.0]])  # equal as a tuple to the cached valid cover


@pytest.mark.skipif("triton" not in ued_fast.available_backends("cpu"), reason="Triton interpreter off")
def test_triton_rejects_float64():
    f, w, b = make_inputs(COVERS["K3_C10"], 3, "logit_mean", "NKD", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        grouped_heads(f, w, b, COVERS["K3_C10"], backend="triton")
