"""Each preset of ued_fast.presets against the framework's loss, transcribed from its code (the file and
function are named at each transcription), in float64 on random logits with ignored rows; Liger-Kernel,
TRL and torchtune also against their installed code (requirements-dev.txt pins them; all run on CPU). Where a framework's formula is not expressible by kd_loss's
arguments, the test checks the exact transformation that PRESET_DIFFERENCES states."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ued_fast
from ued_fast.distill_losses import authors_kd_loss
from ued_fast.presets import KD_LOSS_KEYWORDS, PRESET_DIFFERENCES, PRESETS, preset_kwargs
from ued_fast.reference import kd_loss_reference

IGNORE = -100


def make_case(n=13, c=11, seed=0, ignored=(1, 6, 7), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    teacher = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    target[list(ignored)] = IGNORE
    return student, teacher, target


def preset_loss(name, student, teacher, target, **overrides):
    return kd_loss_reference(student, teacher, target, **preset_kwargs(name, **overrides))


def kl_rows(log_a, log_b):
    """sum_c a_c (log a_c - log b_c) per row."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def generalized_jsd_rows(student, teacher, beta, temperature):
    """The generalized JSD per row as TRL (gkd_trainer.py, GKDTrainer.generalized_jsd_loss) and Liger
    (chunked_loss/jsd_loss.py, LigerFusedLinearJSDFunction.distillation_loss_fn) write it: both sides
    divided by T; beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher); otherwise the
    mixture m = beta * teacher + (1 - beta) * student (in log space) and
    beta * KL(teacher || m) + (1 - beta) * KL(student || m)."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    if beta == 0:
        return kl_rows(log_p, log_q)
    if beta == 1:
        return kl_rows(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log(torch.tensor(1.0 - beta, dtype=log_q.dtype)),
                                         log_p + torch.log(torch.tensor(beta, dtype=log_q.dtype))]), dim=0)
    return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)


def entropy_rows(log_p):
    return -(log_p.exp() * log_p).sum(-1)


# ---------------------------------------------------------------------------------------------
# The table itself
# ---------------------------------------------------------------------------------------------

def test_every_preset_is_kd_loss_arguments_with_a_stated_difference():
    assert set(PRESET_DIFFERENCES) == set(PRESETS)
    student, teacher, target = make_case()
    for name in PRESETS:
        assert set(preset_kwargs(name)) <= set(KD_LOSS_KEYWORDS)
        assert torch.isfinite(preset_loss(name, student, teacher, target))
    assert preset_kwargs("hinton") == dict(temperature=4.0, alpha=0.9, t2_scale=True, reduction="batchmean",
                                           teacher_kind="logits", divergence="forward_kl")


def test_overrides_replace_and_beta_endpoints_pick_the_divergence():
    assert preset_kwargs("distillkit", temperature=3.0)["temperature"] == 3.0
    assert PRESETS["distillkit"]["temperature"] == 2.0  # the table is not changed by an override
    for name in ("trl", "liger"):
        assert preset_kwargs(name, beta=0.0)["divergence"] == "forward_kl"
        assert preset_kwargs(name, beta=1)["divergence"] == "reverse_kl"
        assert preset_kwargs(name, beta=0.3)["divergence"] == "jsd"
        assert preset_kwargs(name, beta=0.0, divergence="jsd")["divergence"] == "jsd"
    assert preset_kwargs("hinton", beta=0.0)["divergence"] == "forward_kl"


def test_bad_name_or_argument_is_named():
    with pytest.raises(ValueError, match="name must be one of"):
        preset_kwargs("hintonn")
    with pytest.raises(TypeError, match="unknown keyword argument 'tempreature'"):
        preset_kwargs("hinton", tempreature=2.0)
    with pytest.raises(TypeError, match="unknown keyword argument 'weight_hard_loss'"):
        preset_kwargs("liger", weight_hard_loss=0.5)


# ---------------------------------------------------------------------------------------------
# hinton
# ---------------------------------------------------------------------------------------------

def test_hinton_is_t2_scaled_forward_kl_plus_ce():
    student, teacher, target = make_case(seed=1)
    t, alpha = PRESETS["hinton"]["temperature"], PRESETS["hinton"]["alpha"]
    valid = target != IGNORE
    kl = kl_rows(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1))
    ce = F.cross_entropy(student, target, reduction="none", ignore_index=IGNORE)
    expected = ((alpha * t * t * kl + (1 - alpha) * ce) * valid).sum() / valid.sum()
    torch.testing.assert_close(preset_loss("hinton", student, teacher, target), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# liger: transcription and the installed package
# ---------------------------------------------------------------------------------------------

def liger_formula(student, teacher, target, *, beta, temperature, weight_hard, weight_soft):
    """fused_linear_distillation.py, LigerFusedLinearDistillationBase._compute_loss / chunk_forward: CE of
    the untempered student logits summed over non-ignored tokens, the distillation term (jsd_loss.py,
    distillation_loss_fn: the generalized JSD of the tempered logits, ignored rows zeroed) summed, both
    divided by the number of non-ignored tokens (at least 1); weight_hard * CE + weight_soft * JSD."""
    valid = target != IGNORE
    n_valid = valid.sum().clamp(min=1)
    ce = F.nll_loss(F.log_softmax(student, -1), target, reduction="sum", ignore_index=IGNORE) / n_valid
    jsd = generalized_jsd_rows(student, teacher, beta, temperature).masked_fill(~valid, 0.0).sum() / n_valid
    return weight_hard * ce + weight_soft * jsd


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_liger_transcription(beta, temperature):
    student, teacher, target = make_case(seed=2)
    expected = liger_formula(student, teacher, target, beta=beta, temperature=temperature, weight_hard=0.5,
                             weight_soft=0.5)
    got = preset_loss("liger", student, teacher, target, beta=beta, temperature=temperature)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_liger_unnormalized_weights_are_a_scale():
    student, teacher, target = make_case(seed=3)
    w_hard, w_soft = 0.2, 0.6
    expected = liger_formula(student, teacher, target, beta=0.5, temperature=1.0, weight_hard=w_hard,
                             weight_soft=w_soft)
    got = (w_hard + w_soft) * preset_loss("liger", student, teacher, target, alpha=w_soft / (w_hard + w_soft))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta,temperature,weights", [(0.5, 1.0, (0.5, 0.5)), (0.0, 2.0, (0.5, 0.5)),
                                                      (1.0, 1.0, (0.5, 0.5)), (0.25, 3.0, (0.3, 0.9))])
def test_liger_installed_package(beta, temperature, weights):
    """liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (pure PyTorch; runs on CPU): loss and the
    gradients of the student's hidden states and weight, against the preset through the same matmul."""
    import liger_kernel.chunked_loss as chunked
    g = torch.Generator().manual_seed(4)
    n, h, v = 12, 6, 17
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    target[[0, 5]] = IGNORE
    w_hard, w_soft = weights
    loss_fn = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=w_hard, weight_soft_loss=w_soft, beta=beta,
                                              temperature=temperature, compiled=False, chunk_size=4)
    liger = loss_fn(hidden, weight, t_hidden, t_weight, target)
    liger.backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ours = (w_hard + w_soft) * preset_loss("liger", h64 @ w64.T, t_hidden.double() @ t_weight.double().T, target,
                                           beta=beta, temperature=temperature, alpha=w_soft / (w_hard + w_soft))
    ours.backward()
    torch.testing.assert_close(liger.double(), ours.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# trl
# ---------------------------------------------------------------------------------------------

def trl_formula(student, teacher, labels, *, beta, temperature=1.0):
    """gkd_trainer.py, GKDTrainer.generalized_jsd_loss with labels, reduction 'batchmean': the
    generalized JSD per token, kept where labels != -100, summed / their number. compute_loss passes
    no temperature (1.0) and adds no CE."""
    mask = labels != IGNORE
    return generalized_jsd_rows(student, teacher, beta, temperature)[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_transcription(beta, temperature):
    student, teacher, target = make_case(seed=5)
    expected = trl_formula(student, teacher, target, beta=beta, temperature=temperature)
    got = preset_loss("trl", student, teacher, target, beta=beta, temperature=temperature)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def loss_and_grad(loss_fn, student):
    s = student.detach().clone().requires_grad_()
    loss = loss_fn(s)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_installed_package(beta, temperature):
    """trl.experimental.gkd GKDTrainer.generalized_jsd_loss itself (a static method: no trainer needed) on
    [batch, tokens, vocab] logits with -100 labels: the preset's loss and gradient."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher, target = make_case(n=14, seed=8)
    trl_loss, trl_grad = loss_and_grad(lambda s: GKDTrainer.generalized_jsd_loss(
        s.view(2, 7, -1), teacher.view(2, 7, -1), target.view(2, 7), beta=beta, temperature=temperature), student)
    ours, our_grad = loss_and_grad(
        lambda s: preset_loss("trl", s, teacher, target, beta=beta, temperature=temperature), student)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# torchtune: soft cross-entropy, not KL
# ---------------------------------------------------------------------------------------------

def torchtune_formula(student, teacher, labels, *, kd_ratio):
    """kd_losses.py, ForwardKLLoss.forward: x = sum_c softmax(teacher)_c * log_softmax(student)_c (terms
    at infinite student logits set to 0), loss = -sum(x * mask) / sum(mask), mask = labels != -100.
    recipes/knowledge_distillation_single_device.py, train: (1 - kd_ratio) * class_loss + kd_ratio *
    kd_loss, class_loss the token-mean cross-entropy over non-ignored labels."""
    p = F.softmax(teacher, dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    x = torch.masked_fill(p * log_q, torch.isinf(student), 0).sum(-1)
    mask = (labels != IGNORE).to(x.dtype)
    kd = -(x * mask).sum() / mask.sum()
    class_loss = F.cross_entropy(student, labels, ignore_index=IGNORE)
    return (1 - kd_ratio) * class_loss + kd_ratio * kd


@pytest.mark.parametrize("kd_ratio", [0.5, 1.0, 0.25])
def test_torchtune_is_kd_loss_plus_teacher_entropy_with_the_same_gradient(kd_ratio):
    student, teacher, target = make_case(seed=6)
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    expected = torchtune_formula(s1, teacher, target, kd_ratio=kd_ratio)
    ours = preset_loss("torchtune", s2, teacher, target, alpha=kd_ratio)
    valid = target != IGNORE
    entropy = entropy_rows(F.log_softmax(teacher, -1))[valid].mean()
    torch.testing.assert_close(ours + kd_ratio * entropy, expected, rtol=1e-12, atol=1e-12)
    assert (expected - ours).abs() > 1e-3  # the two values do differ: the table must say so
    expected.backward()
    ours.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-12, atol=1e-13)


@functools.cache
def torchtune_kd_losses():
    """torchtune's installed torchtune/modules/loss/kd_losses.py, loaded as a file: it needs only torch,
    while `import torchtune` needs torchao, which does not import beside this torch."""
    spec = importlib.util.find_spec("torchtune")
    assert spec is not None, "torchtune is not installed (requirements-dev.txt)"
    path = Path(spec.submodule_search_locations[0], "modules", "loss", "kd_losses.py")
    module_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kd_ratio", [0.5, 1.0, 0.25])
def test_torchtune_installed_forward_kl_loss(kd_ratio):
    """torchtune's ForwardKLLoss (the recipe's kd_loss) in the recipe's mix with the token-mean CE: the
    preset plus kd_ratio times the teacher's mean entropy, and the same gradient."""
    forward_kl = torchtune_kd_losses().ForwardKLLoss(ignore_index=IGNORE)
    student, teacher, target = make_case(seed=12)
    theirs, their_grad = loss_and_grad(lambda s: (1 - kd_ratio) * F.cross_entropy(s, target, ignore_index=IGNORE)
                                       + kd_ratio * forward_kl(s, teacher, target), student)
    ours, our_grad = loss_and_grad(lambda s: preset_loss("torchtune", s, teacher, target, alpha=kd_ratio), student)
    entropy = entropy_rows(F.log_softmax(teacher, -1))[target != IGNORE].mean()
    # ForwardKLLoss computes its softmaxes in float32 whatever the input dtype.
    torch.testing.assert_close(ours + kd_ratio * entropy, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sym_kd_ratio", [0.0, 0.3, 1.0])
def test_torchtune_installed_reverse_and_symmetric_kl_losses(sym_kd_ratio):
    """torchtune's ReverseKLLoss is kd_loss's reverse_kl at T = 1 without T^2 or CE; its SymmetricKLLoss mixes
    ForwardKLLoss (a soft cross-entropy: KL + the teacher's entropy) and ReverseKLLoss."""
    losses = torchtune_kd_losses()
    student, teacher, target = make_case(seed=13)
    kw = dict(temperature=1.0, t2_scale=False, alpha=1.0)
    reverse = kd_loss_reference(student, teacher, target, divergence="reverse_kl", **kw)
    torch.testing.assert_close(reverse, losses.ReverseKLLoss(IGNORE)(student, teacher, target).double(),
                               rtol=1e-6, atol=1e-6)
    forward = kd_loss_reference(student, teacher, target, divergence="forward_kl", **kw)
    entropy = entropy_rows(F.log_softmax(teacher, -1))[target != IGNORE].mean()
    symmetric = losses.SymmetricKLLoss(sym_kd_ratio, IGNORE)(student, teacher, target).double()
    torch.testing.assert_close(sym_kd_ratio * (forward + entropy) + (1 - sym_kd_ratio) * reverse, symmetric,
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# distillkit
# ---------------------------------------------------------------------------------------------

def distillkit_kl_formula(student, teacher, labels, *, temperature):
    """distillkit/lossfuncs/kl.py: dense_kl_div sums kl_div(log_softmax(s / T), log_softmax(t / T),
    log_target) over the vocabulary, multiplies by the mask and sums over tokens; KLDLoss.__call__
    multiplies by T^2 and divides by num_items_in_batch = mask.sum() (trainer.py: mask = labels >= 0)."""
    mask = labels >= 0
    per_elem = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                        reduction="none", log_target=True)
    return (per_elem.sum(-1) * mask).sum() * temperature**2 / mask.float().sum()


def distillkit_jsd_formula(student, teacher, labels, *, temperature):
    """distillkit/lossfuncs/jsd.py: dense_js_div, 0.5 * (KL(q || m) + KL(p || m)) with m the average of
    the tempered distributions, masked and summed; JSDLoss.__call__: times T^2 / mask.sum()."""
    mask = labels >= 0
    log_q = F.log_softmax(student / temperature, -1)
    log_p = F.log_softmax(teacher / temperature, -1)
    log_m = torch.logaddexp(log_q, log_p) - torch.log(torch.tensor(2.0, dtype=log_q.dtype))
    rows = 0.5 * (kl_rows(log_q, log_m) + kl_rows(log_p, log_m))
    return (rows * mask).sum() * temperature**2 / mask.float().sum()


@pytest.mark.parametrize("temperature", [2.0, 1.0, 3.5])
def test_distillkit_kl_and_jsd_transcriptions(temperature):
    student, teacher, target = make_case(seed=7)
    torch.testing.assert_close(preset_loss("distillkit", student, teacher, target, temperature=temperature),
                               distillkit_kl_formula(student, teacher, target, temperature=temperature),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(preset_loss("distillkit", student, teacher, target, temperature=temperature,
                                           divergence="jsd", beta=0.5),
                               distillkit_jsd_formula(student, teacher, target, temperature=temperature),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# uste_authors: ued_fast/distill_losses.py, authors_kd_loss (the project's transcription)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [1.0, 0.3, 2.0])
@pytest.mark.parametrize("temperature", [4.0, 1.0])
def test_uste_authors_is_a_scaled_kd_loss_of_the_probabilities_plus_entropy(lam, temperature):
    student, teacher, target = make_case(seed=8, ignored=())  # the authors' code has no ignored rows
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    expected = authors_kd_loss(s1, teacher, target, temperature=temperature, lam=lam)
    probs = torch.softmax(teacher, -1)
    ours = (1 + lam) * preset_loss("uste_authors", s2, probs, target, temperature=temperature,
                                   alpha=1 / (1 + lam))
    entropy = entropy_rows(F.log_softmax(probs / temperature, -1)).mean()
    torch.testing.assert_close(ours + entropy, expected, rtol=1e-12, atol=1e-12)
    expected.backward()
    ours.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-12, atol=1e-13)
    # Not the project's 'probs' kind (softmax(log(P) / T)): the authors temper P itself.
    other = (1 + lam) * kd_loss_reference(student, probs, target, temperature=temperature, alpha=1 / (1 + lam),
                                          t2_scale=False, teacher_kind="probs")
    if temperature != 1.0:
        assert (other + entropy - expected).abs() > 1e-6


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if b in ued_fast.available_backends("cpu")])
def test_preset_through_the_fused_op_equals_the_reference(name, backend):
    """A preset's arguments mean the same on the fused op as on the reference (loss and gradient)."""
    gen = torch.Generator().manual_seed(11)
    student = (torch.randn(9, 23, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(9, 23, generator=gen) * 3
    if name == "uste_authors":
        teacher = teacher.softmax(-1)
    target = torch.randint(0, 23, (9,), generator=gen)
    target[2] = -100
    kwargs = preset_kwargs(name)
    loss = ued_fast.kd_loss(student, teacher, target, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    ref = kd_loss_reference(student, teacher, target, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-4, atol=2e-6)
