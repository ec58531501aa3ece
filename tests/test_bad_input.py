"""Bad input everywhere a user can pass it: every public op (on every backend here), covers, models,
data and the CLI reject it with a ValueError/TypeError (CLI: exit code 2, no traceback) whose
message names the argument or file. Also the NaN/inf policy of each op, pinned per backend.

NaN policy (docs/RELIABILITY.md): NaN or +inf anywhere in student or teacher logits, or an all -inf
teacher row, makes that row's loss and gradient non-finite, never a silent finite number; -inf
teacher logits elsewhere are legal (probability 0); values of weights and targets are checked only
for CPU tensors (reading them on a GPU would be a host synchronization).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ued_fast
from ued_fast import covers, data, models

from conftest import assert_one_line_cli_error, backend_cases

KD_CASES = [p for p in backend_cases("kd_loss") if p.values[1] == "cpu"]
ENS_CASES = [p for p in backend_cases("ensemble_kd_loss") if p.values[1] == "cpu"]
HEADS_CASES = [p for p in backend_cases("grouped_heads") if p.values[1] == "cpu"]
META = torch.device("meta")


def _raises(exc, words, fn, *args, **kwargs):
    """fn(...) raises exc and its message holds every word (each a literal, e.g. an argument name)."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


def _bad_cases(table):
    """pytest params (breaks, exc, words) of a table of (id, breaks, exc, words) rows, each named by its id."""
    return [pytest.param(breaks, exc, words, id=name) for name, breaks, exc, words in table]


# --- kd_loss / KDLoss ------------------------------------------------------------------------------

def _kd_args():
    return torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])


KD_BAD = [
    # (id, how to break (student, teacher, target, kwargs), exception, words in the message)
    ("student-not-tensor", lambda s, t, y, kw: ([[1.0]], t, y, kw), TypeError, ["student"]),
    ("student-1d", lambda s, t, y, kw: (s[0], t, y, kw), ValueError, ["student", "2-D"]),
    ("student-int", lambda s, t, y, kw: (s.long(), t, y, kw), TypeError, ["student"]),
    ("teacher-int", lambda s, t, y, kw: (s, t.long(), y, kw), TypeError, ["teacher"]),
    ("teacher-shape", lambda s, t, y, kw: (s, t[:, :4], y, kw), ValueError, ["teacher", "shape"]),
    ("teacher-rows", lambda s, t, y, kw: (s, t[:3], y, kw), ValueError, ["teacher"]),
    ("teacher-meta", lambda s, t, y, kw: (s, t.to(META), y, kw), ValueError, ["teacher", "meta"]),
    ("target-meta", lambda s, t, y, kw: (s, t, y.to(META), kw), ValueError, ["target", "meta"]),
    ("target-float", lambda s, t, y, kw: (s, t, y.float(), kw), TypeError, ["target", "int64"]),
    ("target-int32", lambda s, t, y, kw: (s, t, y.int(), kw), TypeError, ["target"]),
    ("target-rows", lambda s, t, y, kw: (s, t, y[:3], kw), ValueError, ["target", "rows"]),
    ("target-2d", lambda s, t, y, kw: (s, t, y[:, None], kw), ValueError, ["target"]),
    ("target-high", lambda s, t, y, kw: (s, t, torch.tensor([0, 1, 5, 2]), kw), ValueError, ["target", "5"]),
    ("target-negative", lambda s, t, y, kw: (s, t, torch.tensor([0, -1, 2, 3]), kw), ValueError, ["target"]),
    ("empty-batch", lambda s, t, y, kw: (s[:0], t[:0], None, kw), ValueError, ["student", "empty"]),
    ("no-classes", lambda s, t, y, kw: (s[:, :0], t[:, :0], None, kw), ValueError, ["student", "classes"]),
    ("temperature-0", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": 0.0}), ValueError, ["temperature"]),
    ("temperature-nan", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": math.nan}), ValueError, ["temperature"]),
    ("temperature-inf", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": math.inf}), ValueError, ["temperature"]),
    ("temperature-str", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": "4"}), TypeError, ["temperature"]),
    ("temperature-tensor", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": torch.tensor(4.0)}), TypeError,
     ["temperature"]),
    ("alpha-high", lambda s, t, y, kw: (s, t, y, {**kw, "alpha": 1.5}), ValueError, ["alpha"]),
    ("alpha-nan", lambda s, t, y, kw: (s, t, y, {**kw, "alpha": math.nan}), ValueError, ["alpha"]),
    ("alpha-bool", lambda s, t, y, kw: (s, t, y, {**kw, "alpha": True}), TypeError, ["alpha"]),
    ("t2_scale-int", lambda s, t, y, kw: (s, t, y, {**kw, "t2_scale": 1}), TypeError, ["t2_scale"]),
    ("reduction", lambda s, t, y, kw: (s, t, y, {**kw, "reduction": "avg"}), ValueError, ["reduction", "avg"]),
    ("teacher_kind", lambda s, t, y, kw: (s, t, y, {**kw, "teacher_kind": "soft"}), ValueError, ["teacher_kind"]),
    ("ignore_index-float", lambda s, t, y, kw: (s, t, y, {**kw, "ignore_index": -100.0}), TypeError,
     ["ignore_index"]),
]


@pytest.mark.parametrize("backend,device", KD_CASES)
@pytest.mark.parametrize("breaks,exc,words", _bad_cases(KD_BAD))
def test_kd_loss_bad_input(backend, device, breaks, exc, words):
    s, t, y, kw = breaks(*_kd_args(), {"backend": backend})
    _raises(exc, ["kd_loss"] + words, ued_fast.kd_loss, s, t, y, **kw)
    # The module form: scalar arguments are checked when it is built, tensors when it is called.
    module_kw = {k: v for k, v in kw.items() if k != "backend"}
    if module_kw:
        _raises(exc, ["KDLoss"] + words, ued_fast.KDLoss, **module_kw, backend=backend)
    else:
        _raises(exc, words, ued_fast.KDLoss(backend=backend), s, t, y)


@pytest.mark.parametrize("backend", ["nope", "CPP", "", "cuda"])
def test_unknown_or_unavailable_backend_is_named(backend):
    s, t, y = _kd_args()
    for call in (lambda: ued_fast.kd_loss(s, t, y, backend=backend),
                 lambda: ued_fast.ensemble_kd_loss(s, torch.stack([t, t]), backend=backend),
                 lambda: ued_fast.grouped_heads(torch.randn(2, 4), torch.randn(2, 2, 3), torch.randn(2, 3),
                                                [[0, 1], [1, 2]], backend=backend)):
        _raises(ValueError, ["backend", repr(backend)], call)


# --- ensemble_kd_loss -----------------------------------------------------------------------------

def _ens_args():
    return torch.randn(4, 5), torch.randn(3, 4, 5), torch.rand(3) + 0.1


ENS_BAD = [
    ("teachers-2d", lambda s, T, w, kw: (s, T[0], w, kw), ValueError, ["teachers"]),
    ("teachers-shape", lambda s, T, w, kw: (s, T[:, :, :4], w, kw), ValueError, ["teachers", "shape"]),
    ("teachers-K0", lambda s, T, w, kw: (s, T[:0], None, kw), ValueError, ["teachers"]),
    ("teachers-empty-list", lambda s, T, w, kw: (s, [], None, kw), TypeError, ["teachers"]),
    ("teachers-list-shape", lambda s, T, w, kw: (s, [T[0], T[1][:, :3]], None, kw), ValueError, ["teachers[1]"]),
    ("teachers-list-item", lambda s, T, w, kw: (s, [T[0], "x"], None, kw), TypeError, ["teachers[1]"]),
    ("teachers-int", lambda s, T, w, kw: (s, T.long(), w, kw), TypeError, ["teachers"]),
    ("teachers-meta", lambda s, T, w, kw: (s, T.to(META), w, kw), ValueError, ["teachers", "meta"]),
    ("teachers-list-meta", lambda s, T, w, kw: (s, [T[0], T[1].to(META)], None, kw), ValueError, ["teachers[1]"]),
    ("weights-shape", lambda s, T, w, kw: (s, T, w[:2], kw), ValueError, ["weights", "shape"]),
    ("weights-KN-shape", lambda s, T, w, kw: (s, T, torch.rand(3, 5), kw), ValueError, ["weights"]),
    ("weights-int", lambda s, T, w, kw: (s, T, torch.ones(3, dtype=torch.long), kw), TypeError, ["weights"]),
    ("weights-meta", lambda s, T, w, kw: (s, T, w.to(META), kw), ValueError, ["weights", "meta"]),
    ("weights-negative", lambda s, T, w, kw: (s, T, torch.tensor([1.0, -0.5, 1.0]), kw), ValueError, ["weights"]),
    ("weights-nan", lambda s, T, w, kw: (s, T, torch.tensor([1.0, math.nan, 1.0]), kw), ValueError, ["weights"]),
    ("weights-inf", lambda s, T, w, kw: (s, T, torch.tensor([1.0, math.inf, 1.0]), kw), ValueError, ["weights"]),
    ("weights-zero-sum", lambda s, T, w, kw: (s, T, torch.zeros(3), kw), ValueError, ["weights"]),
    ("weights-zero-column", lambda s, T, w, kw: (s, T, torch.ones(3, 4).index_fill(1, torch.tensor([2]), 0.0), kw),
     ValueError, ["weights"]),
    ("mix", lambda s, T, w, kw: (s, T, w, {**kw, "mix": "geo"}), ValueError, ["mix", "geo"]),
    ("teacher_kind", lambda s, T, w, kw: (s, T, w, {**kw, "teacher_kind": "soft"}), ValueError, ["teacher_kind"]),
    ("empty-batch", lambda s, T, w, kw: (s[:0], T[:, :0], None, kw), ValueError, ["student", "empty"]),
    ("student-1d", lambda s, T, w, kw: (s[0], T, w, kw), ValueError, ["student"]),
    ("temperature", lambda s, T, w, kw: (s, T, w, {**kw, "temperature": -1.0}), ValueError, ["temperature"]),
    ("alpha", lambda s, T, w, kw: (s, T, w, {**kw, "alpha": -0.1}), ValueError, ["alpha"]),
    ("reduction", lambda s, T, w, kw: (s, T, w, {**kw, "reduction": None}), ValueError, ["reduction"]),
    ("target-high", lambda s, T, w, kw: (s, T, w, {**kw, "target": torch.tensor([0, 1, 2, 9])}), ValueError,
     ["target", "9"]),
    ("target-meta", lambda s, T, w, kw: (s, T, w, {**kw, "target": torch.zeros(4, dtype=torch.long,
                                                                               device=META)}), ValueError, ["target"]),
]


@pytest.mark.parametrize("backend,device", ENS_CASES)
@pytest.mark.parametrize("breaks,exc,words", _bad_cases(ENS_BAD))
def test_ensemble_kd_loss_bad_input(backend, device, breaks, exc, words):
    s, T, w, kw = breaks(*_ens_args(), {"backend": backend})
    _raises(exc, ["ensemble_kd_loss"] + words, ued_fast.ensemble_kd_loss, s, T, weights=w, **kw)


def test_module_constructors_check_their_arguments():
    _raises(ValueError, ["temperature"], ued_fast.KDLoss, temperature=0)
    _raises(ValueError, ["reduction"], ued_fast.KDLoss, reduction="avg")
    _raises(ValueError, ["teacher_kind"], ued_fast.KDLoss, teacher_kind="x")
    _raises(ValueError, ["mix"], ued_fast.EnsembleKDLoss, mix="x")
    _raises(ValueError, ["alpha"], ued_fast.EnsembleKDLoss, alpha=2)
    _raises(ValueError, ["teacher_kind"], ued_fast.EnsembleKDLoss, teacher_kind="x")


@pytest.mark.parametrize("weights", [torch.rand(3) + 0.1, torch.rand(3, 4) + 0.1], ids=["K", "KN"])
def test_ensemble_kd_loss_weights_in_the_old_third_place(weights):
    """The signature was (student, teachers, weights, target); target is third now, as in kd_loss."""
    s, T, _ = _ens_args()
    _raises(TypeError, ["ensemble_kd_loss", "weights is keyword-only", "target"], ued_fast.ensemble_kd_loss,
            s, T, weights)
    _raises(TypeError, ["ensemble_kd_loss", "weights is keyword-only"], ued_fast.EnsembleKDLoss(), s, T, weights)
    y = torch.tensor([0, 1, 2, 3])
    for old_call in ((s, T, weights, y), (s, T, None, y)):
        _raises(TypeError, ["ensemble_kd_loss", "weights is keyword-only"], ued_fast.ensemble_kd_loss, *old_call)


# --- grouped_heads -------------------------------------------------------------------------------

COVER = [[0, 1], [1, 2, 3]]  # K=2, C=4, max |S_k| = 3


def _heads_args():
    return torch.randn(5, 2 * 6), torch.randn(2, 6, 4), torch.randn(2, 4)  # D=6, W=4 (room for 'other')


HEADS_BAD = [
    ("features-int", lambda f, w, b, c, kw: (f.long(), w, b, c, kw), TypeError, ["features"]),
    ("features-cols", lambda f, w, b, c, kw: (f[:, :11], w, b, c, kw), ValueError, ["features", "K*D"]),
    ("features-1d", lambda f, w, b, c, kw: (f[0], w, b, c, kw), ValueError, ["features"]),
    ("features-KND", lambda f, w, b, c, kw: (f.view(5, 2, 6)[:, :, :5].permute(1, 0, 2), w, b, c, kw),
     ValueError, ["features"]),
    ("features-empty", lambda f, w, b, c, kw: (f[:0], w, b, c, kw), ValueError, ["features", "empty"]),
    ("features-meta", lambda f, w, b, c, kw: (f.to(META), w, b, c, kw), ValueError, ["meta"]),
    ("weight-2d", lambda f, w, b, c, kw: (f, w[0], b, c, kw), ValueError, ["weight"]),
    ("weight-heads", lambda f, w, b, c, kw: (f, w[:1], b[:1], c, kw), ValueError, ["weight", "K=2"]),
    ("weight-narrow", lambda f, w, b, c, kw: (f, w[:, :, :2], b[:, :2], c, kw), ValueError, ["weight", "outputs"]),
    ("weight-dtype", lambda f, w, b, c, kw: (f, w.double(), b, c, kw), TypeError, ["weight"]),
    ("weight-meta", lambda f, w, b, c, kw: (f, w.to(META), b, c, kw), ValueError, ["weight", "meta"]),
    ("bias-shape", lambda f, w, b, c, kw: (f, w, b[:, :3], c, kw), ValueError, ["bias"]),
    ("bias-meta", lambda f, w, b, c, kw: (f, w, b.to(META), c, kw), ValueError, ["bias", "meta"]),
    ("bias-int", lambda f, w, b, c, kw: (f, w, b.long(), c, kw), TypeError, ["bias"]),
    ("prob_mean-no-other", lambda f, w, b, c, kw: (f, w[:, :, :3], b[:, :3], c, {**kw, "mode": "prob_mean"}),
     ValueError, ["weight", "prob_mean"]),
    ("mode", lambda f, w, b, c, kw: (f, w, b, c, {**kw, "mode": "max"}), ValueError, ["mode", "max"]),
    ("cover-str", lambda f, w, b, c, kw: (f, w, b, "contiguous", kw), TypeError, ["cover"]),
    ("cover-empty", lambda f, w, b, c, kw: (f, w, b, [], kw), ValueError, ["cover"]),
    ("cover-empty-subset", lambda f, w, b, c, kw: (f, w, b, [[0, 1, 2, 3], []], kw), ValueError, ["cover[1]"]),
    ("cover-negative", lambda f, w, b, c, kw: (f, w, b, [[0, -1], [1, 2, 3]], kw), ValueError, ["cover[0]"]),
    ("cover-float", lambda f, w, b, c, kw: (f, w, b, [[0, 1.0], [1, 2, 3]], kw), TypeError, ["cover[0]"]),
    ("cover-gap", lambda f, w, b, c, kw: (f, w, b, [[0, 1], [1, 3]], kw), ValueError, ["cover", "[2]"]),
    ("cover-repeat", lambda f, w, b, c, kw: (f, w, b, [[0, 0], [1, 2, 3]], kw), ValueError, ["cover[0]", "twice"]),
]


@pytest.mark.parametrize("backend,device", HEADS_CASES)
@pytest.mark.parametrize("breaks,exc,words", _bad_cases(HEADS_BAD))
def test_grouped_heads_bad_input(backend, device, breaks, exc, words):
    f, w, b, c, kw = breaks(*_heads_args(), COVER, {"backend": backend})
    _raises(exc, words, ued_fast.grouped_heads, f, w, b, c, **kw)


# --- NaN / inf policy ----------------------------------------------------------------------------

def _nonfinite_rows(x: torch.Tensor) -> list[int]:
    return (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten().tolist()


def _poison(x: torch.Tensor, what: str, row: int = 1) -> torch.Tensor:
    x = x.clone()
    if what == "nan":
        x[..., row, 2] = math.nan
    elif what == "+inf":
        x[..., row, 2] = math.inf
    elif what == "row -inf":
        x[..., row, :] = -math.inf
    return x


@pytest.mark.parametrize("backend,device", KD_CASES)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("what", ["nan", "+inf", "row -inf"])
@pytest.mark.parametrize("with_target", [False, True], ids=["no_target", "target"])
def test_kd_loss_nonfinite_input_gives_nonfinite_row(backend, device, where, what, with_target):
    if where == "student" and what == "row -inf":
        pytest.skip("an all -inf student row is covered by the -inf student test")
    s, t, y = _kd_args()
    s, t = (_poison(s, what), t) if where == "student" else (s, _poison(t, what))
    s = s.requires_grad_(True)
    rows = ued_fast.kd_loss(s, t, y if with_target else None, reduction="none", backend=backend)
    assert _nonfinite_rows(rows) == [1], rows  # only the poisoned row, and it is not silently finite
    rows.sum().backward()
    assert _nonfinite_rows(s.grad) == [1]
    mean = ued_fast.kd_loss(s.detach(), t, y if with_target else None, backend=backend)
    assert not math.isfinite(float(mean))  # a reduced loss shows it


@pytest.mark.parametrize("backend,device", KD_CASES)
@pytest.mark.parametrize("teacher_kind", ["logits", "log_probs", "probs"])
def test_kd_loss_zero_probability_teacher_entries_are_legal(backend, device, teacher_kind):
    s, t, y = _kd_args()
    t = torch.log_softmax(t, 1)
    t[1, 2] = t[3, 0] = -math.inf  # probability 0
    t_given = t.exp() if teacher_kind == "probs" else t
    s = s.requires_grad_(True)
    loss = ued_fast.kd_loss(s, t_given, y, reduction="none", teacher_kind=teacher_kind, backend=backend)
    ref = ued_fast.kd_loss_reference(s.detach().double(), t_given.double(), y, reduction="none",
                                     teacher_kind=teacher_kind)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("backend,device", KD_CASES)
def test_kd_loss_minus_inf_student_logit_is_an_infinite_kl(backend, device):
    """The student gives probability 0 to a class the teacher gives mass: KL is +inf, not NaN."""
    s, t, _ = _kd_args()
    s[1, 2] = -math.inf
    rows = ued_fast.kd_loss(s, t, reduction="none", backend=backend)
    assert rows[1] == math.inf and torch.isfinite(rows[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend,device", ENS_CASES)
@pytest.mark.parametrize("what", ["nan", "+inf", "row -inf"])
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_ensemble_kd_loss_nonfinite_teacher_gives_nonfinite_row(backend, device, what, mix):
    s, T, w = _ens_args()
    T = T.clone()
    T[1] = _poison(T[1], what)  # one teacher of three
    s = s.requires_grad_(True)
    rows = ued_fast.ensemble_kd_loss(s, T, weights=w, mix=mix, reduction="none", backend=backend)
    assert _nonfinite_rows(rows) == [1], rows
    rows.sum().backward()
    assert _nonfinite_rows(s.grad) == [1]


@pytest.mark.parametrize("backend,device", ENS_CASES)
@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_ensemble_kd_loss_nan_student_and_legal_minus_inf(backend, device, mix):
    s, T, w = _ens_args()
    rows = ued_fast.ensemble_kd_loss(_poison(s, "nan"), T, weights=w, mix=mix, reduction="none", backend=backend)
    assert _nonfinite_rows(rows) == [1]
    # -inf in every teacher at one entry (probability 0 in the mixture), and -inf in a teacher of
    # weight 0 (it counts nowhere): finite and equal to the reference.
    T = T.clone()
    T[:, 1, 2] = -math.inf
    T[1, 3, 0] = -math.inf
    w = torch.tensor([1.0, 0.0, 2.0])
    T[1, 0, 4] = -math.inf
    rows = ued_fast.ensemble_kd_loss(s, T, weights=w, mix=mix, reduction="none", backend=backend)
    ref = ued_fast.ensemble_kd_loss_reference(s.double(), T.double(), w.double(), mix=mix, reduction="none")
    assert torch.isfinite(ref).all() and torch.isfinite(rows).all()
    torch.testing.assert_close(rows.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", HEADS_CASES)
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
@pytest.mark.parametrize("what", ["nan", "+inf"])
def test_grouped_heads_nonfinite_features_stay_in_their_row(backend, device, mode, what):
    f, w, b = _heads_args()
    f = _poison(f, what)
    out = ued_fast.grouped_heads(f, w, b, COVER, mode=mode, backend=backend)
    assert _nonfinite_rows(out) == [1], out


# --- covers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,args,exc,words", [
    (covers.validate_cover, ([],), ValueError, ["cover", "K >= 1"]),
    (covers.validate_cover, ("01",), TypeError, ["cover"]),
    (covers.validate_cover, ([[0, 1], [2, 12]], 10), ValueError, ["cover[1]", "12"]),
    (covers.validate_cover, ([[0, 1], [1]], 3), ValueError, ["cover", "[2]"]),
    (covers.cover_counts, ([[0, 1], [5]],), ValueError, ["cover"]),
    (covers.cover_index, ("abc",), TypeError, ["cover"]),
    (covers.cover_index, ([[0, 1, 2], [2]], 2), ValueError, ["width"]),
    (covers.contiguous, (10, 11), ValueError, ["k=11"]),
    (covers.contiguous, (0,), ValueError, ["num_classes"]),
    (covers.contiguous, (10.0,), TypeError, ["num_classes"]),
    (covers.rfold, (10, 3, 4), ValueError, ["size=4"]),
    (covers.rfold, (10, 11), ValueError, ["r=11"]),
    (covers.confusion, ([[1.0, math.nan], [0.0, 1.0]], 1), ValueError, ["confusion_matrix"]),
    (covers.confusion, ([[1.0, 2.0, 3.0]], 1), ValueError, ["confusion_matrix"]),
    (covers.confusion, (torch.eye(3), 4), ValueError, ["k=4"]),
    (covers.confusion_matrix, ([0, 3], [0, 1], 3), ValueError, ["predictions"]),
    (covers.confusion_matrix, ([0, 1], [0], 3), ValueError, ["predictions", "labels"]),
    (covers.make_cover, ("nope", 10), ValueError, ["nope"]),
    (covers.make_cover, ({"name": "rfold", "zz": 1}, 10), TypeError, ["zz"]),
    (covers.make_cover, ({"name": "confusion", "k": 2}, 10), ValueError, ["matrix"]),
    (covers.make_cover, ([[0, 1]], 3), ValueError, ["[2]"]),
])
def test_cover_functions_bad_input(fn, args, exc, words):
    _raises(exc, words, fn, *args)


@pytest.mark.parametrize("name,text,words", [
    ("bad.yaml", "[[0, 1], [1\n", ["bad.yaml", "YAML"]),
    ("bad.json", "[[0, 1], [1\n", ["bad.json", "JSON"]),
    ("scalar.yaml", "hello\n", ["scalar.yaml"]),
    ("gap.yaml", "[[0, 1], [3]]\n", ["gap.yaml", "[2]"]),
    ("spec.yaml", "name: nope\n", ["nope"]),
])
def test_cover_files_bad_content_names_the_file(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises((ValueError, TypeError)) as info:
        covers.make_cover(str(path), 4)
    for w in words:
        assert w in str(info.value)
    _raises(ValueError, ["missing.yaml"], covers.make_cover, str(tmp_path / "missing.yaml"), 4)


# --- models --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs,exc,words", [
    (("nope", 10, 1, 8), {}, ValueError, ["nope", "known models"]),
    (("student", 10, 1, 8), {"zz": 1}, TypeError, ["student", "zz"]),
    (("student", 0, 1, 8), {}, ValueError, ["num_classes"]),
    (("student", "10", 1, 8), {}, TypeError, ["num_classes"]),
    (("student", 10, 0, 8), {}, ValueError, ["in_channels"]),
    (("student", 10, 1, 0), {}, ValueError, ["image_size"]),
    (("student", 10, 1, "8x8"), {}, TypeError, ["image_size"]),
    (("uste_v1", 10, 1, 8), {"cover": [[0, 1], [2]]}, ValueError, ["cover", "no subset"]),
    (("uste_v1", 10, 1, 8), {"cover": "nope"}, ValueError, ["nope"]),
    (("uste_v1", 10, 1, 8), {"second_softmax": True}, ValueError, ["second_softmax"]),
])
def test_build_model_bad_input(args, kwargs, exc, words):
    _raises(exc, words, models.build_model, *args, **kwargs)


@pytest.mark.parametrize("name", ["student", "uste_v1", "uste_v2", "generalist_ensemble"])
def test_model_forward_names_bad_images(name):
    small = {"student": {}, "uste_v1": {"width": 2, "depth": 1, "stages": 1},
             "uste_v2": {"width": 2, "depth": 1, "stages": 1},
             "generalist_ensemble": {"width": 2, "depth": 1, "stages": 1}}[name]
    model = models.build_model(name, 10, 1, 8, **small)
    _raises(ValueError, ["images", "[N, 1, H, W]", "(2, 3, 8, 8)"], model, torch.randn(2, 3, 8, 8))
    _raises(ValueError, ["images"], model, torch.randn(2, 8, 8))
    _raises(TypeError, ["images", "uint8"], model, torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# --- data ----------------------------------------------------------------------------------------

def test_data_bad_names_and_files(tmp_path):
    _raises(ValueError, ["unknown dataset", "nope"], data.load, "nope", "train")
    _raises(ValueError, ["split", "val"], data.load, "digits", "val")
    _raises(FileNotFoundError, ["train-images-idx3-ubyte.gz", str(tmp_path)], data.load, "mnist", "train",
            root=tmp_path)
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / f).write_bytes(b"not a gzip file")
    _raises(ValueError, ["train-images-idx3-ubyte.gz"], data.load, "mnist", "train", root=tmp_path, cache=False)
    _raises(ValueError, ["images", "mnist"], data.normalize, torch.zeros(2, 3, 8, 8), "mnist")


# --- the CLI -------------------------------------------------------------------------------------

runner = CliRunner()
TINY = ["--model-arg", "widths=[4, 8]", "--model-arg", "depths=[1, 1]"]


def _cli_error(args, *words):
    """exit code 2, no traceback (no uncaught exception), one `ued-fast: error:` line naming the words."""
    from ued_fast.cli import app

    r = runner.invoke(app, [str(a) for a in args])
    assert_one_line_cli_error(r, *words)
    assert isinstance(r.exception, SystemExit), r.exception


def _usage_error(args, *words):
    """Options that click itself rejects: exit 2, no traceback, the option named (click's format)."""
    from ued_fast.cli import app

    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.exit_code, r.output)
    text = r.output + (r.stderr or "")
    assert "Traceback" not in text
    for w in words:
        assert w in text, (w, text)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from ued_fast.cli import app

    out = tmp_path_factory.mktemp("teacher")
    r = runner.invoke(app, ["--quiet", "train-teacher", "--dataset", "digits", "--model", "teacher_s", *TINY,
                            "--epochs", "1", "--train-subset", "64", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out / "checkpoint.pt"


def test_cli_rejects_bad_numbers(tmp_path):
    base = ["train-teacher", "--dataset", "digits", "--model", "teacher_s", *TINY, "--out", tmp_path / "r"]
    _usage_error(base + ["--epochs", "0"], "--epochs")
    _usage_error(base + ["--batch-size", "-3"], "--batch-size")
    _usage_error(base + ["--lr", "x"], "--lr")
    _cli_error(base + ["--val-fraction", "1.5"], "val_fraction")
    _cli_error(base + ["--train-subset", "1"], "train_subset")
    _cli_error(base + ["--model-arg", "zz=1"], "zz")
    _cli_error(base + ["--model-arg", "widths"], "--model-arg")


def test_cli_distill_bad_kd_arguments(tmp_path, teacher_ckpt):
    base = ["distill", "--dataset", "digits", "--student", "teacher_s", "--student-arg", "widths=[4, 8]",
            "--student-arg", "depths=[1, 1]", "--teacher", "teacher_s", "--teacher-arg", "widths=[4, 8]",
            "--teacher-arg", "depths=[1, 1]", "--teacher-checkpoint", teacher_ckpt, "--epochs", "1",
            "--train-subset", "64", "--device", "cpu", "--out", tmp_path / "s"]
    _cli_error(base + ["--temperature", "0"], "temperature")
    _cli_error(base + ["--alpha", "1.5"], "alpha")
    _cli_error([("nope" if a == "teacher_s" and base[i - 1] == "--teacher" else a) for i, a in enumerate(base)],
               "--teacher", "nope")


def test_cli_corrupt_teacher_checkpoint_is_named(tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"\x00garbage, not a checkpoint")
    _cli_error(["distill", "--dataset", "digits", "--teacher", "teacher_s", "--teacher-checkpoint", bad,
                "--epochs", "1", "--train-subset", "64", "--device", "cpu", "--out", tmp_path / "s"], "teacher.pt")


def test_cli_corrupt_resume_checkpoint_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x00garbage, not a checkpoint")
    _cli_error(["train-teacher", "--dataset", "digits", "--model", "teacher_s", *TINY, "--epochs", "1",
                "--train-subset", "64", "--device", "cpu", "--out", run, "--resume"], "checkpoint.pt")


def test_cli_missing_and_corrupt_data_files(tmp_path):
    base = ["train-teacher", "--dataset", "mnist", "--model", "teacher_s", *TINY, "--epochs", "1",
            "--device", "cpu", "--out", tmp_path / "r"]
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    _cli_error(["--data-dir", tmp_path / "data", *base], "train-images-idx3-ubyte.gz")
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "data" / "mnist" / f).write_bytes(b"corrupt")
    _cli_error(["--data-dir", tmp_path / "data", *base], "ubyte.gz")


def test_cli_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 2\n")
    _cli_error(["experiment", "--config", bad], "bad.yaml")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  epochs: zero\n")
    _cli_error(["experiment", "--config", wrong, "--out", tmp_path / "o"], "epochs")
