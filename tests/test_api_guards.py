"""The op layer a user meets: no host round trips per call, teacher kinds (already-tempered soft
targets included), guards that warn once on common mistakes, available_backends, import cost."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ued_fast
from ued_fast.ops import _checks
from ued_fast.reference import REDUCTIONS, TEACHER_KINDS

from conftest import backend_cases, teacher_as_kind

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's masked lanes

COVER = [[0, 1, 2], [2, 3], [3, 4, 5, 6], [6, 0]]


@pytest.fixture
def fresh_guards():
    """Each guard warns once per process: forget that, and restore the default setting afterwards."""
    _checks.reset_warnings()
    yield
    ued_fast.set_input_checks(None)
    _checks.reset_warnings()


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- no host synchronization, no host-to-device copy per call -----------------------------------------

class _NoHostData(TorchDispatchMode):
    """Fails on a tensor built from Python data (aten.lift_fresh: torch.tensor, as_tensor, indexing with a
    list) or a value read back to Python (aten._local_scalar_dense: item(), bool()) in any aten op it sees.
    A custom op's insides run below the mode: the monkeypatches of _forbid_host_round_trips cover those."""

    FORBIDDEN = ("aten::lift_fresh", "aten::lift_fresh_copy", "aten::_local_scalar_dense")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.FORBIDDEN:
            raise AssertionError(f"{func._schema.name} on the op's hot path")
        return func(*args, **(kwargs or {}))


def _forbid_host_round_trips(monkeypatch):
    """Make every Python-level way of building a tensor from host numbers or reading a value fail."""
    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} called on the op's hot path")
        return fail

    for name in ("tensor", "as_tensor", "scalar_tensor"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    return _NoHostData()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend,device", backend_cases("ensemble_kd_loss"))
def test_kd_ops_make_no_host_round_trip(backend, device, reduction, monkeypatch, fresh_guards):
    """target=None and the default weights: nothing on the call path reads a value or builds a tensor
    from Python numbers (on a GPU either is a blocking copy that also breaks CUDA-graph capture). The
    CPU-only value checks are switched off to see what a GPU call does."""
    ued_fast.set_input_checks(False)
    s = _logits(8, 5, seed=1).to(device).requires_grad_()
    t = _logits(8, 5, seed=2).to(device)
    teachers = torch.stack([t, -t])
    with _forbid_host_round_trips(monkeypatch):
        for loss in (ued_fast.kd_loss(s, t, reduction=reduction, backend=backend),
                     ued_fast.ensemble_kd_loss(s, teachers, reduction=reduction, backend=backend),
                     ued_fast.kd_loss(s, t.softmax(-1), reduction=reduction, teacher_kind="tempered_probs",
                                      backend=backend)):
            loss.backward(torch.ones_like(loss))
    assert s.grad is not None


@pytest.mark.parametrize("backend,device", backend_cases("grouped_heads"))
def test_grouped_heads_makes_no_host_round_trip_after_the_first_call(backend, device, monkeypatch):
    k, d = len(COVER), 4
    features = _logits(5, k * d).to(device).requires_grad_()
    weight, bias = _logits(k, d, 5, seed=3).to(device), _logits(k, 5, seed=4).to(device)
    for mode in ("logit_mean", "prob_mean"):
        ued_fast.grouped_heads(features, weight, bias, COVER, mode=mode, backend=backend)  # builds the tables
    with _forbid_host_round_trips(monkeypatch):
        for mode in ("logit_mean", "prob_mean"):
            out = ued_fast.grouped_heads(features, weight, bias, COVER, mode=mode, backend=backend)
            out.sum().backward()
    assert features.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_sync_on_cuda(fresh_guards):
    s = _logits(64, 100).cuda().requires_grad_()
    t = _logits(64, 100, seed=1).cuda()
    for fn in (lambda: ued_fast.kd_loss(s, t), lambda: ued_fast.ensemble_kd_loss(s, torch.stack([t, -t])),
               lambda: ued_fast.kd_loss(s, t.softmax(-1), teacher_kind="tempered_probs")):
        fn().backward()  # warm up: kernel compilation and caches may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --- teacher kinds ------------------------------------------------------------------------------------

def test_kldivloss_habit_has_a_direct_translation():
    """nn.KLDivLoss(log_softmax(s/T), softmax(t/T)) * T^2 is kd_loss with the soft targets passed as
    teacher_kind='tempered_probs' (and is kd_loss(s, t) on the logits)."""
    s64, t64 = _logits(16, 10, seed=5).double(), _logits(16, 10, seed=6).double()
    T = 3.0
    old = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s64 / T, -1), F.softmax(t64 / T, -1)) * T * T
    for backend in ued_fast.available_backends("cpu"):
        s, t = (s64, t64) if backend in ("cpp", "reference") else (s64.float(), t64.float())
        soft = ued_fast.kd_loss(s, F.softmax(t / T, -1), temperature=T, teacher_kind="tempered_probs", backend=backend)
        plain = ued_fast.kd_loss(s, t, temperature=T, backend=backend)
        tol = dict(rtol=1e-10, atol=1e-12) if s.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(soft.double(), old, **tol)
        torch.testing.assert_close(plain.double(), old, **tol)


def test_ensemble_reference_teacher_kinds_follow_the_spec():
    """Written out by hand: p_k the tempered distribution of teacher k; 'prob' mixes p_k, 'logit' mixes log p_k."""
    logits = _logits(3, 5, 6, seed=7).double()
    w = torch.rand(3, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 0.1
    wn = w / w.sum(0)
    s = _logits(5, 6, seed=9).double()
    T = 2.5
    p_k = F.softmax(logits / T, -1)
    expected = {"prob": (wn[..., None] * p_k).sum(0), "logit": F.softmax((wn[..., None] * p_k.log()).sum(0), -1)}
    for kind in TEACHER_KINDS:
        for mix, p in expected.items():
            got = ued_fast.ensemble_kd_loss_reference(s, teacher_as_kind(logits, kind, T), w, mix=mix, temperature=T,
                                                      teacher_kind=kind, reduction="none")
            want = T * T * (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{kind} {mix}: {m}")


@pytest.mark.parametrize("mix", ["prob", "logit"])
@pytest.mark.parametrize("backend,device", backend_cases("ensemble_kd_loss"))
def test_ensemble_teacher_kinds_agree_on_every_backend(backend, device, mix):
    dtype = torch.float64 if backend in ("cpp", "reference") else torch.float32
    logits = _logits(3, 9, 11, seed=10).double()
    logits[0, 0, :4] = -float("inf")  # probability exactly 0 in one teacher
    s = _logits(9, 11, seed=11).to(dtype)
    y = torch.tensor([0, 3, -100, 10, 2, 1, 5, 5, 7])
    w = torch.rand(3, 9, generator=torch.Generator().manual_seed(12)) + 0.1
    T = 2.0
    ref = ued_fast.ensemble_kd_loss_reference(s.double(), logits, w.double(), y, mix=mix, temperature=T,
                                              reduction="none")
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for kind in TEACHER_KINDS:
        teachers = teacher_as_kind(logits, kind, T).to(dtype).to(device)
        for given in (teachers, list(teachers.unbind(0))):
            got = ued_fast.ensemble_kd_loss(s.to(device), given, y.to(device), weights=w.to(dtype).to(device), mix=mix,
                                            temperature=T, reduction="none", teacher_kind=kind, backend=backend)
            torch.testing.assert_close(got.double().cpu(), ref, **tol, msg=lambda m: f"{kind}: {m}")


def test_module_takes_teacher_kind():
    s, logits = _logits(4, 6, seed=13), _logits(2, 4, 6, seed=14)
    y = torch.tensor([0, 5, 1, 2])
    mod = ued_fast.EnsembleKDLoss(temperature=2.0, teacher_kind="tempered_log_probs")
    assert "tempered_log_probs" in repr(mod)
    torch.testing.assert_close(mod(s, F.log_softmax(logits / 2.0, -1), y),
                               ued_fast.ensemble_kd_loss(s, logits, y, temperature=2.0))


# --- guards against common mistakes ---------------------------------------------------------------------

def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_guards_warn_once_on_common_mistakes(fresh_guards):
    s, t = _logits(12, 10, seed=15), _logits(12, 10, seed=16)
    T = 4.0
    probs, log_probs_student = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    cases = [
        ("probabilities", lambda: ued_fast.kd_loss(s, probs, temperature=T)),
        ("probabilities", lambda: ued_fast.ensemble_kd_loss(s, torch.stack([probs, probs]), temperature=T)),
        ("log-probabilities", lambda: ued_fast.kd_loss(log_probs_student, t, temperature=T)),
        ("outside [0, 1]", lambda: ued_fast.kd_loss(s, t, teacher_kind="probs")),
        ("not log-probabilities", lambda: ued_fast.kd_loss(s, t, teacher_kind="log_probs")),
    ]
    for words, call in cases:
        first = _warnings_of(call)
        assert len(first) == 1 and words in first[0], (words, first)
        assert _warnings_of(call) == [], f"warned twice: {words}"


def test_guards_stay_quiet_on_right_inputs(fresh_guards):
    s, t = _logits(12, 10, seed=17), _logits(12, 10, seed=18)
    calls = [lambda: ued_fast.kd_loss(s, t), lambda: ued_fast.ensemble_kd_loss(s, torch.stack([t, -t])),
             *(lambda k=k: ued_fast.kd_loss(s, teacher_as_kind(t, k, 3.0), temperature=3.0, teacher_kind=k)
               for k in TEACHER_KINDS),
             # log_softmax(s) as the student is harmless at T = 1 (softmax is shift invariant)
             lambda: ued_fast.kd_loss(F.log_softmax(s, -1), t, temperature=1.0)]
    for call in calls:
        assert _warnings_of(call) == []


def test_guards_can_be_switched_off_and_on(fresh_guards, monkeypatch):
    s, probs = _logits(6, 5, seed=19), F.softmax(_logits(6, 5, seed=20), -1)
    ued_fast.set_input_checks(False)
    assert _warnings_of(lambda: ued_fast.kd_loss(s, probs)) == []
    ued_fast.set_input_checks(None)
    monkeypatch.setenv("UED_FAST_INPUT_CHECKS", "0")
    assert _warnings_of(lambda: ued_fast.kd_loss(s, probs)) == []
    monkeypatch.delenv("UED_FAST_INPUT_CHECKS")
    assert len(_warnings_of(lambda: ued_fast.kd_loss(s, probs))) == 1
    with pytest.raises(TypeError, match="set_input_checks"):
        ued_fast.set_input_checks("yes")


def test_guards_only_read_tensors_on_the_cpu_by_default(fresh_guards):
    """A GPU tensor is never read by the guards unless asked for (it would be a host sync)."""
    meta = torch.empty(4, 5, device="meta")
    assert not _checks.input_checks_enabled(meta)
    ued_fast.set_input_checks(True)
    assert _checks.input_checks_enabled(torch.empty(4, 5))
    if torch.cuda.is_available():
        ued_fast.set_input_checks(None)
        assert not _checks.input_checks_enabled(torch.empty(4, 5, device="cuda"))


def test_guards_do_not_run_under_torch_compile(fresh_guards):
    s, probs = _logits(6, 5, seed=21), F.softmax(_logits(6, 5, seed=22), -1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ued_fast.kd_loss(a, b, backend="reference"), fullgraph=True,
                             backend="eager")
    assert _warnings_of(lambda: compiled(s, probs)) == []


# --- available_backends, import -----------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_available_backends_without_a_gpu_lists_only_what_runs():
    assert ued_fast.available_backends("cuda") == ["reference"]


def test_constant_marker_is_the_one_dynamo_reads():
    """ued_fast marks its backend lookups constant for torch.compile without importing torch._dynamo;
    the mark must stay the one torch.compiler.assume_constant_result sets."""
    def ours():
        return 1

    def theirs():
        return 1

    ued_fast._backend.constant_under_compile(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) and vars(ours)


def test_import_stays_light():
    """`import ued_fast` must not pull in torch._dynamo (~1.3 s), triton or plotting/learning libraries."""
    code = ("import sys, ued_fast; heavy = [m for m in ('torch._dynamo', 'triton', 'matplotlib', 'sklearn') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
