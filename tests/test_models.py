"""Models (DESIGN 1.2, 1.3, 1.5): unified == separate branches, head assembly, losses, registry."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ued_fast.covers import authors_v2, contiguous, rfold
from ued_fast.models import (
    MODELS,
    ConvBody,
    count_macs,
    GeneralistEnsemble,
    UnifiedEnsemble,
    build_model,
    count_parameters,
)

SMALL = dict(width=3, depth=2, stages=2)


def _randomize_bn(model: nn.Module, gen: torch.Generator):
    """Non-trivial BN affine params and running stats, so a mis-sliced copy cannot pass."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)


def _separate_by_hand(grouped: ConvBody) -> list[ConvBody]:
    """K single-branch bodies with the grouped body's weights, copied here independently of split()."""
    k = grouped.groups
    out = []
    for b in range(k):
        net = ConvBody(grouped.in_channels, grouped.image_size, grouped.widths, grouped.depths).double()
        convs_g = [m for m in grouped.modules() if isinstance(m, nn.Conv2d)]
        convs_s = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        bns_g = [m for m in grouped.modules() if isinstance(m, nn.BatchNorm2d)]
        bns_s = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            for i, (g, s) in enumerate(zip(convs_g, convs_s)):
                assert g.groups == (1 if i == 0 else k)
                w = s.out_channels
                s.weight.copy_(g.weight[b * w : (b + 1) * w])
            for g, s in zip(bns_g, bns_s):
                w = s.num_features
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(s, name).copy_(getattr(g, name)[b * w : (b + 1) * w])
        out.append(net)
    return out


def _hand_mean_over_covering_heads(h, weight, bias, cover, num_classes, head_value):
    """[N, C]: column c is the mean over the heads j covering c of head_value(u_j, S_j)[:, index of c
    in S_j], u_j = head j's raw output; plain Python loops."""
    n, d = h.shape[0], weight.shape[1]
    out = torch.zeros(n, num_classes, dtype=h.dtype)
    for c in range(num_classes):
        terms = []
        for j, s in enumerate(cover):
            if c in s:
                u = h[:, j * d : (j + 1) * d] @ weight[j] + bias[j]
                terms.append(head_value(u, s)[:, s.index(c)])
        out[:, c] = sum(terms) / len(terms)
    return out


def _hand_assemble_v1(h, weight, bias, cover, num_classes):
    """z_c = mean over heads covering c of their logit for c."""
    return _hand_mean_over_covering_heads(h, weight, bias, cover, num_classes, lambda u, s: u)


def _hand_assemble_v2(h, weight, bias, cover, num_classes):
    """log of the renormalized mean over covering heads of their softmax (with the 'other' unit)."""
    r = _hand_mean_over_covering_heads(h, weight, bias, cover, num_classes,
                                       lambda u, s: torch.softmax(u[:, : len(s) + 1], dim=1))
    return torch.log(r / r.sum(dim=1, keepdim=True))


@pytest.mark.parametrize("executor", ["grouped", "loop"])
@pytest.mark.parametrize("name", ["uste_v1", "uste_v2"])
@pytest.mark.parametrize("train", [True, False])
def test_unified_equals_separate_branches(name, train, executor):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 8, executor=executor, **SMALL).double()
    assert model.body.resolved_executor(torch.device("cpu")) == executor
    _randomize_bn(model, gen)
    model.train(train)
    cover = model.cover
    branches = _separate_by_hand(model.body)
    for br in branches:
        br.train(train)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=gen)
    probe = torch.randn(6, 10, dtype=torch.float64, generator=gen)

    x1 = x.clone().requires_grad_(True)
    feats = model.features(x1)
    out = model(x1) if not train else model.assemble(feats)  # one BN update per forward in train mode
    (out * probe).sum().backward()

    x2 = x.clone().requires_grad_(True)
    feats_sep = torch.cat([br(x2) for br in branches], dim=1)
    assert feats.shape == (6, len(cover) * model.body.feature_dim)
    torch.testing.assert_close(feats, feats_sep, rtol=1e-12, atol=1e-12)
    hand = (_hand_assemble_v1 if name == "uste_v1" else _hand_assemble_v2)(
        feats_sep, model.head_weight, model.head_bias, cover, 10)
    (hand * probe).sum().backward()
    torch.testing.assert_close(out, hand, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)

    # Parameter gradients: grouped slices == separate branches.
    k = len(cover)
    convs_g = [m for m in model.body.modules() if isinstance(m, nn.Conv2d)]
    bns_g = [m for m in model.body.modules() if isinstance(m, nn.BatchNorm2d)]
    for b, br in enumerate(branches):
        convs_s = [m for m in br.modules() if isinstance(m, nn.Conv2d)]
        bns_s = [m for m in br.modules() if isinstance(m, nn.BatchNorm2d)]
        for g, s in zip(convs_g, convs_s):
            w = s.out_channels
            torch.testing.assert_close(g.weight.grad[b * w : (b + 1) * w], s.weight.grad, rtol=1e-9, atol=1e-11)
        for g, s in zip(bns_g, bns_s):
            w = s.num_features
            torch.testing.assert_close(g.weight.grad[b * w : (b + 1) * w], s.weight.grad, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(g.bias.grad[b * w : (b + 1) * w], s.bias.grad, rtol=1e-9, atol=1e-11)
            # Train mode: both updated their running stats from the same batch once.
            torch.testing.assert_close(g.running_mean[b * w : (b + 1) * w], s.running_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g.running_var[b * w : (b + 1) * w], s.running_var, rtol=1e-12, atol=1e-12)
    assert k == 5


@pytest.mark.parametrize("name", ["uste_v1", "uste_v2"])
def test_separate_twin_matches_unified(name):
    """UnifiedEnsemble.separate(): the heterogeneous loop path gives the same outputs and head grads."""
    torch.manual_seed(0)
    model = build_model(name, 10, 1, 8, **SMALL).double()
    twin = model.separate()
    assert isinstance(twin.body.branches, nn.ModuleList) and len(twin.body.branches) == 5
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    loss_a, out_a = model.training_loss(x, y)
    loss_b, out_b = twin.training_loss(x, y)
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=1e-10)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(model.head_weight.grad, twin.head_weight.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(model.head_bias.grad, twin.head_bias.grad, rtol=1e-9, atol=1e-11)


def _small_ensemble(cover, mode, num_classes, d=4, **kw):
    body = ConvBody(1, 4, [d], [1], groups=len(cover))
    model = UnifiedEnsemble(body, cover, num_classes, mode=mode, **kw).double()
    with torch.no_grad():  # make the padding non-zero: it must be ignored
        model.head_weight.normal_()
        model.head_bias.normal_()
    return model


def test_v1_assembly_matches_hand_computation():
    cover = [[0, 1], [1, 2], [2, 0, 3]]
    model = _small_ensemble(cover, "logit_mean", 4)
    h = torch.randn(7, 3 * 4, dtype=torch.float64)
    z = model.assemble(h)
    # A direct hand computation, class by class.
    w, b = model.head_weight, model.head_bias
    u = [h[:, 4 * j : 4 * j + 4] @ w[j] + b[j] for j in range(3)]
    expected = torch.stack([
        (u[0][:, 0] + u[2][:, 1]) / 2,
        (u[0][:, 1] + u[1][:, 0]) / 2,
        (u[1][:, 1] + u[2][:, 0]) / 2,
        u[2][:, 2],
    ], dim=1)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    loss, logits = model.training_loss(torch.randn(7, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    assert logits.shape == (7, 4) and torch.isfinite(loss)


def test_v2_output_is_normalized_log_distribution_and_matches_hand():
    cover = [[0, 1], [1, 2], [2, 0, 3]]
    model = _small_ensemble(cover, "prob_mean", 4)
    h = torch.randn(7, 12, dtype=torch.float64) * 3
    out = model.assemble(h)
    torch.testing.assert_close(torch.logsumexp(out, dim=1), torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, _hand_assemble_v2(h, model.head_weight, model.head_bias, cover, 4), rtol=1e-10, atol=1e-10)


def test_v2_second_softmax_reads_the_raw_probability_mean():
    cover = authors_v2(10)
    plain = _small_ensemble(cover, "prob_mean", 10)
    flat = _small_ensemble(cover, "prob_mean", 10, second_softmax=True)
    flat.load_state_dict(plain.state_dict())
    h = torch.randn(9, 5 * 4, dtype=torch.float64) * 5
    p, q = plain.assemble(h), flat.assemble(h)
    # The authors: softmax over r_c = mean over covering heads of q_k[c], with q_k the softmax over
    # head k's classes and its 'other' unit; r is NOT renormalized before the second softmax.
    u = plain.head_logits(h)
    raw = torch.zeros(9, 10, dtype=torch.float64)
    for c in range(10):
        terms = [torch.softmax(u[:, k, : len(s) + 1], dim=1)[:, s.index(c)] for k, s in enumerate(cover) if c in s]
        raw[:, c] = sum(terms) / len(terms)
    assert not torch.allclose(raw.sum(1), torch.ones(9, dtype=torch.float64))  # 'other' mass: r is not normalized
    torch.testing.assert_close(q, F.log_softmax(raw, dim=1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(q, F.log_softmax(p.exp(), dim=1), atol=1e-6)  # the renormalized mean differs
    torch.testing.assert_close(torch.logsumexp(q, 1), torch.zeros(9, dtype=torch.float64), rtol=0, atol=1e-12)
    # A softmax of probabilities can't exceed e/(e + C - 1) = 0.232 for C = 10.
    assert q.exp().max() <= math.e / (math.e + 9) + 1e-12
    with pytest.raises(ValueError, match="second_softmax"):
        _small_ensemble(cover, "logit_mean", 10, second_softmax=True)


def test_v2_training_loss_is_per_specialist_ce_with_other():
    torch.manual_seed(3)
    cover = [[0, 1], [1, 2, 4], [2, 0, 3]]
    model = _small_ensemble(cover, "prob_mean", 5)
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 4, 1, 0])
    loss, logits = model.training_loss(x, y)
    h = model.features(x)
    expected = 0.0
    for j, s in enumerate(cover):
        u = (h[:, 4 * j : 4 * j + 4] @ model.head_weight[j] + model.head_bias[j])[:, : len(s) + 1]
        target = torch.tensor([s.index(int(c)) if int(c) in s else len(s) for c in y])  # 'other' = |S_k|
        expected = expected + F.cross_entropy(u, target)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)


def test_v1_training_loss_is_ce_of_assembled_logits():
    model = build_model("uste_v1", 10, 1, 8, **SMALL).double().eval()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    loss, logits = model.training_loss(x, y)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


def test_generalist_output_and_loss():
    model = build_model("generalist_ensemble", 10, 3, 8, **SMALL).double().eval()
    assert isinstance(model, GeneralistEnsemble) and model.body.groups == 5
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    u = model.branch_logits(x)  # [N, K, C]
    assert u.shape == (6, 5, 10)
    expected = torch.log(torch.softmax(u, dim=2).mean(dim=1))
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.logsumexp(out, 1), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    loss, logits = model.training_loss(x, y)
    torch.testing.assert_close(loss, sum(F.cross_entropy(u[:, k], y) for k in range(5)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, out)
    # Each branch's feature group feeds only its own head.
    feats = model.body(x)
    d = model.body.feature_dim
    for k in range(5):
        torch.testing.assert_close(u[:, k], feats[:, k * d : (k + 1) * d] @ model.head_weight[k] + model.head_bias[k])
    # K follows a named cover.
    assert build_model("generalist_ensemble", 10, 3, 8, cover=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], **SMALL).body.groups == 2


def test_heterogeneous_branches_with_different_widths():
    class Branch(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.feature_dim = d
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, d), nn.Tanh())

        def forward(self, x):
            return self.net(x)

    cover = [[0, 1], [1, 2], [2, 3, 0]]
    torch.manual_seed(0)
    model = UnifiedEnsemble([Branch(3), Branch(5), Branch(2)], cover, 4).double()
    assert model.head_weight.shape == (3, 5, 3)
    assert model.head_weight[0, 3:].abs().sum() == 0 and model.head_weight[2, 2:].abs().sum() == 0
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    out = model(x)
    u = [br(x) @ model.head_weight[j, : br.feature_dim] + model.head_bias[j] for j, br in enumerate(model.body.branches)]
    expected = torch.stack([(u[0][:, 0] + u[2][:, 2]) / 2, (u[0][:, 1] + u[1][:, 0]) / 2,
                            (u[1][:, 1] + u[2][:, 0]) / 2, u[2][:, 1]], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    model.training_loss(x, torch.tensor([0, 1, 2, 3]))[0].backward()
    assert model.head_weight.grad[0, 3:].abs().sum() == 0  # padded feature rows never learn
    with pytest.raises(ValueError, match="feature_dim"):
        UnifiedEnsemble([nn.Identity()] * 3, cover, 4)
    with pytest.raises(ValueError, match="K=3"):
        UnifiedEnsemble([Branch(3), Branch(3)], cover, 4)


SHAPES = [(1, 8), (1, 28), (3, 32)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_on_every_input_shape(name):
    counts = []
    for channels, side in SHAPES:
        torch.manual_seed(0)
        model = build_model(name, 10, channels, side)
        x = torch.randn(3, channels, side, side)
        y = torch.tensor([0, 5, 9])
        model.train()
        loss, logits = model.training_loss(x, y)
        assert logits.shape == (3, 10) and torch.isfinite(logits).all() and torch.isfinite(loss)
        loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        model.eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        counts.append(count_parameters(model))
    print(f"{name}: params 8x8x1={counts[0]} 28x28x1={counts[1]} 32x32x3={counts[2]}")


def test_parameter_counts():
    counts = {name: count_parameters(build_model(name, 10, 3, 32)) for name in MODELS}
    print("params at 32x32x3, 10 classes:", counts)
    assert 95_000 <= counts["student"] <= 115_000  # the authors' student: 107k
    uste = counts["uste_v1"]
    assert 0.75e6 <= uste <= 1.0e6  # the authors' ensemble: 925k
    assert abs(counts["generalist_ensemble"] - uste) / uste < 0.02  # same budget, no specialization
    assert abs(counts["uste_v2"] - uste) / uste < 0.02
    sweep = [counts[n] for n in ("teacher_s", "teacher_m", "teacher_l", "teacher_xl")]
    assert sweep == sorted(sweep) and sweep[-1] > uste and sweep[-2] > uste
    assert counts["student_small"] < counts["student"]
    frozen = build_model("student", 10, 3, 32)
    frozen.head.requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == counts["student"] - 128 * 10 - 10


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model("uste_v1", 10, 3, 32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_forward_and_loss():
    model = build_model("uste_v2", 10, 3, 32, **SMALL)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = model.training_loss(x, y)
    assert torch.isfinite(loss) and logits.shape == (4, 10)
    loss.backward()
    assert torch.isfinite(model.head_weight.grad).all()


def test_state_dict_round_trip_and_device_buffers():
    a = build_model("uste_v2", 10, 1, 8, **SMALL)
    b = build_model("uste_v2", 10, 1, 8, **SMALL)
    assert not any(k.endswith(("local_targets", "pad_mask")) for k in a.state_dict())  # derived from the cover
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    assert a.local_targets.shape == (5, 10)


@pytest.mark.parametrize("name", ["uste_v1", "uste_v2", "generalist_ensemble", "student"])
def test_full_graph_capture(name):
    """No graph breaks in the training step (backend 'eager' checks capture without codegen)."""
    torch._dynamo.reset()
    model = build_model(name, 10, 1, 8, **(SMALL if name != "student" else {}))
    step = torch.compile(model.training_loss, fullgraph=True, backend="eager")
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss, logits = step(x, y)
    ref_loss, ref_logits = model.training_loss(x, y)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)


def test_registry_errors():
    with pytest.raises(ValueError, match="uste_v1"):
        build_model("resnet9000", 10, 3, 32)
    with pytest.raises(TypeError, match="uste_v1"):
        build_model("uste_v1", 10, 3, 32, widht=4)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("student", 0, 3, 32)
    with pytest.raises(TypeError, match="image_size"):
        build_model("student", 10, 3, "32")
    with pytest.raises(ValueError, match="width"):
        build_model("uste_v1", 10, 3, 32, width=0)
    with pytest.raises(ValueError, match="leaves classes"):
        build_model("uste_v1", 10, 3, 32, cover=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="second_softmax"):
        build_model("uste_v1", 10, 3, 32, second_softmax=True)
    with pytest.raises(ValueError, match="mode"):
        UnifiedEnsemble(ConvBody(1, 8, [2], [1], groups=1), [[0, 1]], 2, mode="max")


def test_uste_covers_and_kwargs():
    v1 = build_model("uste_v1", 10, 3, 32)
    assert v1.cover == contiguous(10) and v1.body.groups == 5
    assert build_model("uste_v2", 10, 3, 32).cover == authors_v2(10)
    assert build_model("uste_v2", 100, 3, 32, width=2, depth=1, stages=1).cover == authors_v2(100)
    assert build_model("uste_v2", 12, 3, 32, width=2, depth=1, stages=1).cover == rfold(12)
    m = build_model("uste_v1", 100, 3, 32, cover={"name": "contiguous"}, width=4, depth=1, stages=2)
    assert m.cover == contiguous(100) and m.head_weight.shape == (5, 8, 30)
    m = build_model("uste_v2", 10, 3, 32, cover=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 9]], width=4)
    assert m.head_weight.shape == (3, 16, 6) and m.body.groups == 3


@pytest.mark.parametrize("momentum", [0.1, None])
def test_loop_executor_equals_grouped_over_training_steps(momentum):
    """The CPU branch loop is the grouped network: same outputs, gradients and BN statistics
    (cumulative-average BN included) after several SGD steps, fp64."""
    torch.manual_seed(0)
    grouped, loop = (build_model("uste_v1", 10, 3, 8, executor=e, **SMALL).double() for e in ("grouped", "loop"))
    for m in [*grouped.modules(), *loop.modules()]:
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    loop.load_state_dict(grouped.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (grouped, loop)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 10, (5,), generator=gen)
        losses = []
        for model, opt in zip((grouped, loop), opts):
            opt.zero_grad()
            loss, _ = model.training_loss(x, y)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(grouped.state_dict().items(), loop.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(grouped.eval()(x), loop.eval()(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="executor"):
        build_model("uste_v1", 10, 3, 8, executor="threads")


def test_joint_generalist_is_v1_with_every_branch_over_all_classes():
    torch.manual_seed(0)
    model = build_model("joint_generalist", 10, 3, 8, **SMALL).double()
    assert isinstance(model, UnifiedEnsemble) and model.mode == "logit_mean"
    assert model.cover == tuple(tuple(range(10)) for _ in range(5))
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    feats = model.features(x)
    u = model.head_logits(feats)  # [N, K, C]
    torch.testing.assert_close(model(x), u.mean(dim=1), rtol=1e-12, atol=1e-12)
    loss, _ = model.training_loss(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(u.mean(dim=1), y), rtol=1e-12, atol=1e-12)
    v1 = build_model("uste_v1", 10, 3, 8, **SMALL)
    assert model.body.groups == v1.body.groups
    assert build_model("joint_generalist", 10, 3, 8, cover="authors_v2", **SMALL).body.groups == 5


def _conv_macs_by_hand(model, side, in_channels):
    """MACs of the convs walked layer by layer (3x3, padding 1, pooling halves while side >= 4)."""
    total, channels, first = 0, in_channels, True
    body = model.body
    for width, depth in zip(body.widths, body.depths):
        for _ in range(depth):
            out = body.groups * width
            total += side * side * out * (channels // (1 if first else body.groups)) * 9
            channels, first = out, False
        if side >= 4:
            side //= 2
    return total


@pytest.mark.parametrize("kwargs,image", [({}, (3, 32, 32)), ({"width": 16, "depth": 1}, (1, 28, 28)),
                                           ({"width": 8, "depth": 1, "stages": 3}, (1, 8, 8)),
                                           ({"width": 24, "depth": 2, "cover": "authors_v2"}, (3, 32, 32))])
def test_matched_single_teacher_matches_uste_parameters_and_flops(kwargs, image):
    c_in, side = image[0], image[1]
    uste = build_model("uste_v1", 10, c_in, side, **kwargs)
    single = build_model("matched_single", 10, c_in, side, **kwargs)
    p_u, p_s = count_parameters(uste), count_parameters(single)
    f_u, f_s = count_macs(uste, image), count_macs(single, image)
    assert abs(p_s - p_u) / p_u < 0.10, (p_s, p_u)
    assert abs(f_s - f_u) / f_u < 0.10, (f_s, f_u)
    # count_macs against a hand count of the convs plus the heads
    assert f_u == _conv_macs_by_hand(uste, side, c_in) + uste.head_weight.numel()
    assert f_s == _conv_macs_by_hand(single, side, c_in) + single.head.weight.numel()
    assert uste.body.executor == "auto"  # count_macs restores the executor


@pytest.mark.parametrize("widths,depth,image", [((5, 7, 12), 2, (3, 32, 32)), ((20, 36, 72), 1, (1, 28, 28)),
                                                 ((4, 8), 1, (1, 8, 8))])
def test_single_cnn_cost_counts_like_the_model(widths, depth, image):
    from ued_fast.models import SingleCNN, _single_cnn_cost

    model = SingleCNN(10, image[0], image[1], list(widths), [depth] * len(widths))
    assert _single_cnn_cost(10, image[0], image[1], list(widths), depth) == (count_parameters(model),
                                                                             count_macs(model, image))


def test_set_ops_backend_forces_the_grouped_heads_backend(monkeypatch):
    import ued_fast.uste as uste_mod
    from ued_fast.models import set_ops_backend

    seen = []
    real = uste_mod.grouped_heads

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(uste_mod, "grouped_heads", spy)
    model = build_model("uste_v1", 10, 1, 8, **SMALL).eval()
    x = torch.randn(2, 1, 8, 8)
    default = model(x)
    set_ops_backend(model, "reference")
    forced = model(x)
    assert seen == [None, "reference"]
    torch.testing.assert_close(forced, default, rtol=1e-5, atol=1e-6)
    assert set_ops_backend(build_model("student", 10, 1, 8), "reference") is not None  # no heads: a no-op
