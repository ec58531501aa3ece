"""Class covers (DESIGN 1.1): the authors' covers, construction properties, files and specs, errors."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ued_fast.covers import (
    confusion,
    confusion_matrix,
    contiguous,
    cover_counts,
    cover_index,
    load_cover,
    authors_v2,
    make_cover,
    rfold,
    validate_cover,
)


def test_authors_contiguous_c10():
    expected = ((0, 1), (1, 2, 3), (3, 4, 5), (6, 7), (8, 9))
    assert contiguous(10) == expected
    assert contiguous(10, k=5) == expected


def test_authors_contiguous_c100():
    cover = contiguous(100)
    spans = [(s[0], s[-1], len(s)) for s in cover]
    assert spans == [(0, 19, 20), (10, 39, 30), (30, 59, 30), (60, 79, 20), (80, 99, 20)]
    assert all(list(s) == list(range(s[0], s[-1] + 1)) for s in cover)


def test_authors_v2_c10():
    expected = ((0, 1, 2, 3), (1, 2, 3, 4), (4, 5, 6, 7), (6, 7, 8, 9), (0, 5, 8, 9))
    assert authors_v2(10) == expected
    assert make_cover("authors_v2", 10) == expected
    assert cover_counts(expected) == [2] * 10


def test_authors_v2_c100_is_the_authors_block_cover():
    r = lambda a, b: list(range(a, b + 1))  # noqa: E731
    expected = [r(0, 39), r(10, 49), r(40, 79), r(60, 99), r(0, 9) + r(50, 59) + r(80, 99)]
    assert [list(s) for s in authors_v2(100)] == expected
    assert cover_counts(authors_v2(100)) == [2] * 100
    assert authors_v2(100) != rfold(100)  # rfold stays the generic cyclic construction
    with pytest.raises(ValueError, match="authors_v2"):
        authors_v2(12)


def test_rfold_is_generic_cyclic_windows():
    # C=10, r=2, size=4: windows start at 0, 2, 4, 6, 8 (not the authors' hand-made cover).
    assert rfold(10) == ((0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 6, 7), (6, 7, 8, 9), (0, 1, 8, 9))
    assert cover_counts(rfold(10)) == [2] * 10


@pytest.mark.parametrize("c,k,overlap", [(10, 5, 0), (10, 5, 1), (10, 3, 2), (7, 3, 1), (20, 4, 3), (100, 10, 4), (5, 1, 0), (6, 6, 0)])
def test_contiguous_windows_share_the_stated_overlap(c, k, overlap):
    cover = contiguous(c, k=k, overlap=overlap)
    assert len(cover) == k
    assert validate_cover(cover, c) == cover
    for s in cover:
        assert list(s) == list(range(s[0], s[-1] + 1))  # contiguous
    for a, b in zip(cover, cover[1:]):
        assert len(set(a) & set(b)) == overlap
        assert a[0] < b[0]


def test_contiguous_default_overlap_for_other_c():
    cover = contiguous(7)
    assert len(cover) == 5
    assert all(len(set(a) & set(b)) == 1 for a, b in zip(cover, cover[1:]))
    assert contiguous(3) == ((0, 1), (1, 2), (2,))
    assert contiguous(1) == ((0,),)


@pytest.mark.parametrize("c,r,size", [(10, 1, 2), (10, 2, 5), (10, 3, 6), (7, 3, 7), (7, 3, 3), (12, 2, 3), (100, 2, 40), (100, 3, 12), (9, 2, 6)])
def test_rfold_every_class_exactly_r_times(c, r, size):
    cover = rfold(c, r=r, size=size)
    assert validate_cover(cover, c) == cover
    assert cover_counts(cover, c) == [r] * c
    assert all(len(s) == size for s in cover)
    assert len(cover) == c * r // size
    assert all(list(s) == sorted(s) for s in cover)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.data())
def test_rfold_property_random(c, data):
    r = data.draw(st.integers(1, min(c, 4)))
    sizes = [s for s in range(1, c + 1) if (c * r) % s == 0]
    size = data.draw(st.sampled_from(sizes))
    cover = rfold(c, r=r, size=size)
    assert cover_counts(cover, c) == [r] * c
    assert all(len(s) == size for s in cover)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.data())
def test_contiguous_property_random(c, data):
    k = data.draw(st.integers(1, c))
    overlap = data.draw(st.integers(0, max(0, c // k - 1)))
    cover = contiguous(c, k=k, overlap=overlap)
    assert len(cover) == k and validate_cover(cover, c) == cover
    if k > 1:
        assert all(len(set(a) & set(b)) == overlap for a, b in zip(cover, cover[1:]))


def test_rfold_default_k_and_k_argument():
    assert len(rfold(100)) == 5 and cover_counts(rfold(100)) == [2] * 100
    cover = rfold(12, r=2, k=6)
    assert len(cover) == 6 and cover_counts(cover) == [2] * 12
    assert len(set(rfold(10, r=2, size=5))) == 4  # windows are shifted, not repeated


def _confusion_with_pairs(c, pairs, seed=0):
    rng = np.random.default_rng(seed)
    m = np.eye(c) * 500 + rng.integers(0, 4, (c, c))
    for a, b, n in pairs:
        m[a, b] += n
        m[b, a] += n * 0.8
    return m


@pytest.mark.parametrize("method", ["spectral", "agglomerative"])
def test_confusion_cover_puts_confused_classes_together(method):
    pairs = [(2, 7, 120), (0, 9, 100), (3, 5, 110), (1, 6, 90), (4, 8, 95)]
    m = _confusion_with_pairs(10, pairs)
    cover = confusion(m, k=5, overlap=0, method=method)
    assert cover_counts(cover, 10) == [1] * 10
    for a, b, _ in pairs:
        assert any(a in s and b in s for s in cover), (a, b, cover)
    widened = confusion(m, k=5, overlap=1, method=method)
    assert len(widened) == 5
    for s0, s1 in zip(cover, widened):
        assert set(s0) < set(s1) and len(s1) == len(s0) + 1
    assert confusion(m, k=5, overlap=1, method=method) == widened  # deterministic


def test_confusion_widening_adds_most_confused_outside_class():
    m = np.eye(6) * 100
    m[0, 1] = m[1, 0] = 50  # cluster {0, 1}
    m[2, 3] = m[3, 2] = 50  # cluster {2, 3}
    m[4, 5] = m[5, 4] = 50  # cluster {4, 5}
    m[1, 4] = 20  # {0, 1} confuses 4 more than anything else outside
    cover = confusion(m, k=3, overlap=1, method="agglomerative")
    assert (0, 1, 4) in cover
    assert (1, 4, 5) in cover  # {4, 5} is confused with 1
    assert (2, 3) in cover  # {2, 3} confuses no outside class: not widened with a zero-confusion one
    assert sorted(len(s) for s in cover) == [2, 3, 3]


def test_confusion_widening_ties_go_to_the_larger_single_confusion():
    # Symmetric rates whose rows sum to 1 (so the affinity is m off the diagonal). Clusters {0,1},
    # {2,3}, {4,5}; {0,1} confuses 2 and 4 equally in total (0.01 + 0.01 = 0.02 = 0.02 + 0) but 4
    # through one larger confusion: 4 wins, where an index tie-break would pick 2.
    m = np.zeros((6, 6))
    for a, b, v in [(0, 1, 0.3), (2, 3, 0.3), (4, 5, 0.3), (0, 4, 0.02), (0, 2, 0.01), (1, 2, 0.01)]:
        m[a, b] = m[b, a] = v
    np.fill_diagonal(m, 1 - m.sum(axis=1))
    cover = confusion(m, k=3, overlap=1, method="agglomerative")
    assert (0, 1, 4) in cover, cover


def test_confusion_accepts_tensor_and_extreme_k():
    import torch

    m = torch.eye(4) * 10 + 1
    assert confusion(m, k=1, overlap=0) == ((0, 1, 2, 3),)
    assert confusion(m, k=4, overlap=0) == ((0,), (1,), (2,), (3,))


def test_confusion_errors():
    with pytest.raises(ValueError, match="confusion_matrix"):
        confusion(np.ones((3, 4)), k=2)
    with pytest.raises(ValueError, match="confusion_matrix"):
        confusion(-np.ones((3, 3)), k=2)
    with pytest.raises(ValueError, match="k="):
        confusion(np.ones((3, 3)), k=4)
    with pytest.raises(ValueError, match="method"):
        confusion(np.ones((3, 3)), k=2, method="kmeans")


@pytest.mark.parametrize(
    "cover,num_classes,exc,word",
    [
        ([], 3, ValueError, "at least one"),
        ([[0, 1], []], 2, ValueError, r"cover\[1\] is empty"),
        ([[0, 1], [3]], 3, ValueError, "outside"),
        ([[0, -1]], None, ValueError, "outside"),
        ([[0, 1]], 3, ValueError, r"leaves classes \[2\]"),
        ([[0, 0, 1]], 2, ValueError, "twice"),
        ([[0, 1.0]], 2, TypeError, "not an int"),
        ("0,1", 2, TypeError, "list of K lists"),
        ([3], 4, TypeError, r"cover\[0\]"),
    ],
)
def test_invalid_covers_raise(cover, num_classes, exc, word):
    with pytest.raises(exc, match=word):
        validate_cover(cover, num_classes)
    with pytest.raises((ValueError, TypeError)):  # a string is read as a cover name by make_cover
        make_cover(cover, num_classes if num_classes is not None else 3)


def test_construction_argument_errors():
    with pytest.raises(ValueError, match="k="):
        contiguous(3, k=4)
    with pytest.raises(ValueError, match="overlap"):
        contiguous(5, k=2, overlap=-1)
    with pytest.raises(TypeError, match="num_classes"):
        contiguous(10.0)
    with pytest.raises(ValueError, match="size=3 must divide"):
        rfold(10, r=2, size=3)
    with pytest.raises(ValueError, match="size=11"):
        rfold(10, r=2, size=11)
    with pytest.raises(ValueError, match="r=5"):
        rfold(4, r=5)
    with pytest.raises(ValueError, match="either size or k"):
        rfold(10, size=4, k=5)


def test_cover_files_json_and_yaml(tmp_path):
    explicit = [[0, 1, 2], [2, 3], [3, 4, 0]]
    (tmp_path / "c.json").write_text(json.dumps(explicit))
    (tmp_path / "c.yaml").write_text("- [0, 1, 2]\n- [2, 3]\n- [3, 4, 0]\n")
    (tmp_path / "wrapped.yml").write_text("cover:\n  - [0, 1, 2]\n  - [2, 3]\n  - [3, 4, 0]\n")
    (tmp_path / "spec.yaml").write_text("name: rfold\nr: 2\nsize: 4\n")
    expected = tuple(tuple(s) for s in explicit)
    assert load_cover(tmp_path / "c.json") == expected
    assert load_cover(tmp_path / "c.yaml", num_classes=5) == expected
    assert load_cover(tmp_path / "wrapped.yml") == expected
    assert make_cover(str(tmp_path / "c.yaml"), 5) == expected
    assert load_cover(tmp_path / "spec.yaml", num_classes=10) == rfold(10)
    with pytest.raises(ValueError, match="num_classes"):
        load_cover(tmp_path / "spec.yaml")
    with pytest.raises(ValueError, match=r"leaves classes \[5\]"):
        load_cover(tmp_path / "c.json", num_classes=6)
    with pytest.raises(ValueError, match="does not exist"):
        load_cover(tmp_path / "missing.json")


def test_make_cover_specs(tmp_path):
    assert make_cover("contiguous", 10) == contiguous(10)
    assert make_cover("rfold", 10) == rfold(10)
    assert make_cover({"name": "contiguous", "k": 3, "overlap": 2}, 10) == contiguous(10, 3, 2)
    assert make_cover({"type": "rfold", "r": 3, "size": 6}, 10) == rfold(10, 3, 6)
    assert make_cover([[1, 0], [1]], 2) == ((1, 0), (1,))
    m = _confusion_with_pairs(6, [(0, 5, 100), (1, 4, 100), (2, 3, 100)])
    spec = {"name": "confusion", "matrix": m.tolist(), "k": 3, "overlap": 0}
    cover = make_cover(spec, 6)
    assert set(cover) == {(0, 5), (1, 4), (2, 3)}
    np.save(tmp_path / "m.npy", m)
    assert make_cover({"name": "confusion", "matrix_path": str(tmp_path / "m.npy"), "k": 3, "overlap": 0}, 6) == cover
    with pytest.raises(ValueError, match="known covers"):
        make_cover("stripes", 10)
    with pytest.raises(ValueError, match="matrix"):
        make_cover("confusion", 10)
    with pytest.raises(ValueError, match="expected"):
        make_cover(spec, 7)
    with pytest.raises(TypeError, match="spec"):
        make_cover({"name": "rfold", "bogus": 1}, 10)


def test_cover_index_pads_with_minus_one():
    idx = cover_index(((0, 1), (1, 2, 3)))
    assert idx.tolist() == [[0, 1, -1], [1, 2, 3]]


def test_confusion_matrix_counts_and_feeds_confusion():
    import torch

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    preds = torch.tensor([0, 1, 1, 0, 2, 3, 3, 2, 3])
    m = confusion_matrix(preds, labels, 4)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 2]]
    assert set(confusion(m, k=2, overlap=0)) == {(0, 1), (2, 3)}
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="entries"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 4)
