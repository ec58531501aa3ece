"""ued_fast.distill_losses: the authors' loss against a literal transcription, fp64; the Hinton variant."""
import math

import pytest
import torch

from ued_fast.distill_losses import authors_kd_loss, distill_loss


def _authors_literal(s, t, y, T, lam):
    """Written out element by element: p = softmax(t); q = softmax(p / T);
    loss = mean_n [ -sum_c q_nc * log( exp(s_nc/T) / sum_j exp(s_nj/T) ) ] + lam * mean_n [ -log softmax(s_n)_{y_n} ]."""
    n, c = len(s), len(s[0])
    total_soft, total_ce = 0.0, 0.0
    for i in range(n):
        pt = [math.exp(t[i][j] - max(t[i])) for j in range(c)]
        pt = [v / sum(pt) for v in pt]
        qt = [math.exp(v / T) for v in pt]
        qt = [v / sum(qt) for v in qt]
        m = max(s[i][j] / T for j in range(c))
        log_den = m + math.log(sum(math.exp(s[i][j] / T - m) for j in range(c)))
        total_soft += -sum(qt[j] * (s[i][j] / T - log_den) for j in range(c))
        m1 = max(s[i])
        log_den1 = m1 + math.log(sum(math.exp(s[i][j] - m1) for j in range(c)))
        total_ce += -(s[i][y[i]] - log_den1)
    return total_soft / n + lam * total_ce / n


@pytest.mark.parametrize("T,lam", [(2.0, 0.1), (6.0, 0.3), (1.0, 0.0)])
@pytest.mark.parametrize("n,c,scale", [(5, 10, 1.0), (3, 7, 30.0), (1, 2, 0.1)])
def test_authors_loss_matches_literal_fp64(T, lam, n, c, scale):
    gen = torch.Generator().manual_seed(n * c)
    s = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)
    t = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, c, (n,), generator=gen)
    loss = authors_kd_loss(s, t, y, temperature=T, lam=lam)
    assert loss.dtype == torch.float64
    ref = _authors_literal(s.detach().tolist(), t.tolist(), y.tolist(), T, lam)
    assert loss.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # log-probabilities as the teacher's output give the same loss (softmax(log p) = p)
    loss_lp = authors_kd_loss(s, torch.log_softmax(t, 1), y, temperature=T, lam=lam)
    torch.testing.assert_close(loss_lp, loss, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: authors_kd_loss(x, t, y, temperature=T, lam=lam), (s,))


def test_authors_soft_targets_are_near_uniform_and_have_no_t2():
    # softmax(p / T) of probabilities: entropy within 1% of log C at T = 2 for a confident teacher.
    t = torch.tensor([[20.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    q = torch.softmax(torch.softmax(t, 1) / 2.0, 1)
    assert -(q * q.log()).sum() > 0.95 * math.log(10)
    s = torch.zeros(1, 10, dtype=torch.float64)
    y = torch.tensor([0])
    # uniform student: soft term is exactly the cross-entropy of q with uniform = log C, unscaled by T^2
    assert authors_kd_loss(s, t, y, temperature=6.0, lam=0.0).item() == pytest.approx(math.log(10), rel=1e-12)


def test_hinton_variant_is_kd_loss():
    import ued_fast

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    got = distill_loss("hinton", s, t, y, temperature=4.0, alpha=0.9, backend="reference")
    torch.testing.assert_close(got, ued_fast.kd_loss(s, t, y, temperature=4.0, alpha=0.9, backend="reference"))
    got = distill_loss("authors", s, t, y, temperature=2.0, alpha=0.3)
    torch.testing.assert_close(got, authors_kd_loss(s, t, y, temperature=2.0, lam=0.3))


def test_bad_input_names_the_argument():
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="variant"):
        distill_loss("fitnets", s, t, y, temperature=2.0, alpha=0.1)
    with pytest.raises(ValueError, match="temperature"):
        authors_kd_loss(s, t, y, temperature=0.0, lam=0.1)
    with pytest.raises(ValueError, match="lam"):
        authors_kd_loss(s, t, y, temperature=2.0, lam=-1.0)
    with pytest.raises(ValueError, match="teacher"):
        authors_kd_loss(s, torch.randn(2, 4), y, temperature=2.0, lam=0.1)
    with pytest.raises(ValueError, match="labels"):
        authors_kd_loss(s, t, torch.tensor([0]), temperature=2.0, lam=0.1)
