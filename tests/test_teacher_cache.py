"""ued_fast.teacher_cache: fixed views, cached frozen-teacher outputs, the cache key, the batch source."""
import pytest
import torch
import torch.nn.functional as F

from ued_fast.augment import AugmentConfig, normalize
from ued_fast.models import build_model
from ued_fast.teacher_cache import (CACHE_NAME, ViewBatches, ViewSet, cache_key, cached_teacher_outputs,
                                    teacher_view_outputs)

MEAN, STD = [0.4], [0.3]


def _data(n=37, side=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, side, side), dtype=torch.uint8, generator=gen)


def _manual_view(img_u8, dy, dx, flip, pad, mode):
    x = normalize(img_u8[None], torch.tensor(MEAN), torch.tensor(STD))
    if pad:
        x = F.pad(x, (pad,) * 4, mode="reflect" if mode == "reflect" else "constant")
        x = x[:, :, dy:dy + img_u8.shape[1], dx:dx + img_u8.shape[2]]
    return (x.flip(-1) if flip else x)[0]


@pytest.mark.parametrize("aug", [AugmentConfig(2, "reflect", True), AugmentConfig(1, "zeros", False),
                                 AugmentConfig(0, "reflect", True)])
def test_views_render_the_stated_crop_and_flip(aug):
    x = _data()
    views = ViewSet(x.shape[0], 3, aug, view_seed=5, device="cpu")
    assert views.offsets.shape == (37, 3, 2) and int(views.offsets.max()) <= 2 * aug.crop_padding
    if not aug.flip:
        assert not views.flips.any()
    idx = torch.tensor([0, 5, 36, 5])
    view = torch.tensor([2, 0, 1, 1])
    out = ViewBatches(x, views, MEAN, STD).views.render(x[idx], idx, view, torch.tensor(MEAN), torch.tensor(STD))
    for j in range(4):
        i, v = int(idx[j]), int(view[j])
        dy, dx = views.offsets[i, v].tolist()
        ref = _manual_view(x[i], dy, dx, bool(views.flips[i, v]), aug.crop_padding, aug.padding_mode)
        torch.testing.assert_close(out[j], ref, rtol=0, atol=0)
    # the same seed gives the same views; another seed others
    again = ViewSet(x.shape[0], 3, aug, view_seed=5, device="cpu")
    assert torch.equal(again.offsets, views.offsets) and torch.equal(again.flips, views.flips)
    if aug.crop_padding:
        assert not torch.equal(ViewSet(x.shape[0], 3, aug, view_seed=6, device="cpu").offsets, views.offsets)


def test_cached_targets_are_the_teacher_on_the_very_batch():
    torch.manual_seed(0)
    x = _data()
    teacher = build_model("uste_v1", 10, 1, 8, width=2, depth=1, stages=2).double().eval()
    views = ViewSet(x.shape[0], 4, AugmentConfig(2, "reflect", True), view_seed=1, device="cpu")
    outputs = teacher_view_outputs(teacher.float(), x, views, MEAN, STD, batch_size=10)
    assert outputs.shape == (37, 4, 10) and outputs.dtype == torch.float32
    source = ViewBatches(x, views, MEAN, STD, outputs)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        idx = torch.randperm(37, generator=gen)[:16]
        batch = source(idx, gen)
        with torch.no_grad():
            live = teacher.eval()(batch)
        torch.testing.assert_close(source.targets, live, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="teacher_outputs"):
        ViewBatches(x, views, MEAN, STD, outputs[:, :3])
    with pytest.raises(ValueError, match="num_views"):
        ViewSet(4, 0, AugmentConfig(), 0, "cpu")


def test_disk_cache_hits_only_for_the_same_teacher_data_and_views(tmp_path):
    torch.manual_seed(0)
    x = _data(n=12)
    teacher = build_model("student_small", 10, 1, 8).eval()
    aug = AugmentConfig(1, "reflect", False)
    views = ViewSet(12, 2, aug, view_seed=0, device="cpu")
    first, hit = cached_teacher_outputs(teacher, x, views, MEAN, STD, tmp_path)
    assert not hit and (tmp_path / CACHE_NAME).exists()
    second, hit = cached_teacher_outputs(teacher, x, views, MEAN, STD, tmp_path)
    assert hit and torch.equal(first, second)
    key = cache_key(teacher, x, views)
    assert cache_key(teacher, x, ViewSet(12, 2, aug, view_seed=1, device="cpu")) != key
    assert cache_key(teacher, x, ViewSet(12, 3, aug, view_seed=0, device="cpu")) != key
    assert cache_key(teacher, _data(n=12, seed=1), views) != key
    with torch.no_grad():
        teacher.head.bias.add_(1.0)
    assert cache_key(teacher, x, views) != key
    third, hit = cached_teacher_outputs(teacher, x, views, MEAN, STD, tmp_path)
    assert not hit and torch.allclose(third, first + 1.0, atol=1e-5)
    (tmp_path / CACHE_NAME).write_bytes(b"not a checkpoint")  # unreadable: recomputed, not an error
    _, hit = cached_teacher_outputs(teacher, x, views, MEAN, STD, tmp_path)
    assert not hit


def test_fit_with_cached_views_equals_the_teacher_run_live():
    """Distillation from the cache trains the same student as running the teacher on each batch."""
    from ued_fast import rows
    from ued_fast.train import RunOptions, Splits, TrainConfig

    torch.manual_seed(0)
    x = _data(n=64)
    y = torch.randint(0, 10, (64,))
    splits = Splits("toy", 10, x, y, x[:8], y[:8], x[:8], y[:8], tuple(MEAN), tuple(STD))
    teacher = build_model("student_small", 10, 1, 8).eval()
    aug = AugmentConfig(1, "reflect", True)
    views = ViewSet(64, 3, aug, view_seed=0, device="cpu")
    cached = rows.teacher_outputs_for(teacher, splits, views, None)
    setting = rows.KDSetting("hinton", 4.0, 0.9, True)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05)
    finals = []
    for outputs in (cached, None):
        torch.manual_seed(1)
        student = build_model("student_small", 10, 1, 8)
        r = rows.train_student(student, splits, cfg, aug, RunOptions(seed=0, quiet=True), setting=setting,
                               teacher=teacher, views=views, teacher_outputs=outputs, backend="reference")
        finals.append((r, student))
    (r_cached, s_cached), (r_live, s_live) = finals
    for a, b in zip(s_cached.state_dict().values(), s_live.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)
    assert [e["loss"] for e in r_cached["log"]] == pytest.approx([e["loss"] for e in r_live["log"]], rel=1e-4)
