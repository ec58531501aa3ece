"""Class covers (DESIGN 1.1): K subsets of the C classes whose union is all classes; they may overlap."""
from __future__ import annotations

from typing import Sequence

import torch

Cover = tuple[tuple[int, ...], ...]


def validate_cover(cover, num_classes: int | None = None, *, name: str = "cover") -> Cover:
    """Check a cover and return it as a tuple of tuples of ints.

    Errors (ValueError/TypeError naming `name`): K < 1, an empty subset, a non-integer or
    out-of-range class, a class repeated inside one subset, a class in no subset.
    num_classes None means C = 1 + the largest class named.
    """
    if isinstance(cover, (str, bytes)) or not isinstance(cover, Sequence):
        raise TypeError(f"{name} must be a list of K lists of class indices, got {type(cover).__name__}")
    if len(cover) < 1:
        raise ValueError(f"{name} must hold at least one subset (K >= 1)")
    subsets = []
    for k, subset in enumerate(cover):
        if isinstance(subset, (str, bytes)) or not isinstance(subset, Sequence):
            raise TypeError(f"{name}[{k}] must be a list of class indices, got {type(subset).__name__}")
        if len(subset) == 0:
            raise ValueError(f"{name}[{k}] is empty: every teacher needs at least one class")
        for c in subset:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"{name}[{k}] holds {c!r}, not an int class index")
            if c < 0 or (num_classes is not None and c >= num_classes):
                bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise ValueError(f"{name}[{k}] holds class {c}, outside {bound}")
        if len(set(subset)) != len(subset):
            raise ValueError(f"{name}[{k}] names a class twice: {list(subset)}")
        subsets.append(tuple(int(c) for c in subset))
    c_total = num_classes if num_classes is not None else 1 + max(max(s) for s in subsets)
    missing = sorted(set(range(c_total)) - {c for s in subsets for c in s})
    if missing:
        raise ValueError(f"{name} leaves classes {missing} in no subset (C = {c_total})")
    return tuple(subsets)


def cover_num_classes(cover: Cover) -> int:
    return 1 + max(max(s) for s in cover)


def cover_counts(cover: Cover, num_classes: int | None = None) -> list[int]:
    """cover_count(c): how many subsets hold class c."""
    cover = validate_cover(cover, num_classes)
    counts = [0] * (num_classes if num_classes is not None else cover_num_classes(cover))
    for s in cover:
        for c in s:
            counts[c] += 1
    return counts


def cover_index(cover: Cover, width: int | None = None, device=None) -> torch.Tensor:
    """[K, width] int64: entry (k, j) is the class of head k's output j, -1 past |S_k| (padding)."""
    cover = validate_cover(cover)
    if width is not None and width < max(len(s) for s in cover):
        raise ValueError(f"width={width} is smaller than the largest subset ({max(len(s) for s in cover)})")
    width = width if width is not None else max(len(s) for s in cover)
    index = torch.full((len(cover), width), -1, dtype=torch.int64)
    for k, s in enumerate(cover):
        index[k, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return index.to(device) if device is not None else index


# --- Constructions -------------------------------------------------------------------------------

# The authors' C=10, K=5 pattern (DESIGN 1.1); for C = 10*m each class b stands for the block of m
# classes b*m..(b+1)*m-1, which gives their C=100 cover 0-19, 10-39, 30-59, 60-79, 80-99.
AUTHORS_CONTIGUOUS_10 = ((0, 1), (1, 2, 3), (3, 4, 5), (6, 7), (8, 9))
# The authors' v2 cover: every class in exactly 2 of 5 subsets of 4 classes.
AUTHORS_RFOLD_10 = ((0, 1, 2, 3), (1, 2, 3, 4), (4, 5, 6, 7), (6, 7, 8, 9), (0, 5, 8, 9))


def check_int(name: str, value, minimum: int) -> int:
    """value, if it is an int (not a bool) >= minimum; else TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def call_reporting_kwargs(what: str, builder, *args, **kwargs):
    """builder(*args, **kwargs), a keyword it does not take reported as a TypeError that names `what`
    (the config entry or the registry name), so the user sees which spec holds the stray key."""
    try:
        return builder(*args, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"{what}: {e}") from None
        raise


def contiguous(num_classes: int, k: int | None = None, overlap: int | None = None) -> Cover:
    """K contiguous windows over classes 0..C-1.

    overlap None with K = 5 and C a multiple of 10: the authors' pattern ({0,1}, {1,2,3}, {3,4,5},
    {6,7}, {8,9}, scaled by C/10). Otherwise the classes are split into K blocks whose sizes differ
    by at most one, and each window is its block widened by `overlap` classes across every inner
    boundary (floor(overlap/2) to the left, the rest to the right), so adjacent windows share
    `overlap` classes. overlap None there means half a block, at least one: max(1, (C // K) // 2)
    (0 when K = 1).
    k None means min(5, C).
    """
    c = check_int("num_classes", num_classes, 1)
    k = min(5, c) if k is None else check_int("k", k, 1)
    if k > c:
        raise ValueError(f"k={k} windows cannot each hold a class when num_classes={c}")
    if overlap is None and k == 5 and c % 10 == 0:
        m = c // 10
        return tuple(tuple(range(s[0] * m, (s[-1] + 1) * m)) for s in AUTHORS_CONTIGUOUS_10)
    if overlap is None:
        overlap = 0 if k == 1 else max(1, (c // k) // 2)
    overlap = check_int("overlap", overlap, 0)
    if overlap > c - 1:
        raise ValueError(f"overlap={overlap} must be < num_classes={c}")
    bounds = [(i * c) // k for i in range(k + 1)]
    left, right = overlap // 2, overlap - overlap // 2
    windows = []
    for i in range(k):
        lo = bounds[i] - left if i > 0 else 0
        hi = bounds[i + 1] + right if i < k - 1 else c
        windows.append(tuple(range(max(0, lo), min(c, hi))))
    return validate_cover(windows, c, name="contiguous cover")


def authors_v2(num_classes: int) -> Cover:
    """The authors' v2 cover: for C=10 {0-3}, {1-4}, {4-7}, {6-9}, {0,5,8,9} (every class in 2 of 5
    subsets of 4); for C = 10*m each class b stands for the block b*m..(b+1)*m-1, which gives their
    C=100 cover {0-39}, {10-49}, {40-79}, {60-99}, {0-9, 50-59, 80-99}. Defined for C a multiple of 10."""
    c = check_int("num_classes", num_classes, 1)
    if c % 10:
        raise ValueError(f"authors_v2 is defined for num_classes a multiple of 10, got {c} (use rfold)")
    m = c // 10
    return validate_cover([[b * m + i for b in s for i in range(m)] for s in AUTHORS_RFOLD_10], c,
                          name="authors_v2 cover")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rfold(num_classes: int, r: int = 2, size: int | None = None, k: int | None = None) -> Cover:
    """K subsets of `size` classes each, every class in exactly r of them (so K = C*r/size).

    Generic for every C (the authors' own v2 cover is authors_v2): subset j is the cyclic window of `size` classes starting at floor(j*C/K): the starts
    are evenly spaced with gap size/r, so each class lies in exactly r windows. Give size or k (not
    both); with neither, K is the divisor of C*r in [r, C*r] closest to 5 (ties: the larger).
    """
    c = check_int("num_classes", num_classes, 1)
    r = check_int("r", r, 1)
    if r > c:
        raise ValueError(f"r={r} subsets per class needs r <= num_classes={c} (subsets are distinct)")
    total = c * r
    if size is not None and k is not None:
        raise ValueError("give rfold either size or k, not both")
    if size is not None:
        size = check_int("size", size, 1)
        if size > c:
            raise ValueError(f"size={size} must be <= num_classes={c}")
        if total % size:
            raise ValueError(f"size={size} must divide num_classes*r = {total} for every class to be in exactly r={r} subsets")
        k = total // size
    elif k is not None:
        k = check_int("k", k, 1)
        if total % k or k < r:
            raise ValueError(f"k={k} must divide num_classes*r = {total} and be >= r={r}")
        size = total // k
    else:
        k = min((d for d in _divisors(total) if d >= r), key=lambda d: (abs(d - 5), -d))
        size = total // k
    subsets = []
    for j in range(k):
        start = (j * c) // k
        subsets.append(tuple(sorted((start + i) % c for i in range(size))))
    return validate_cover(subsets, c, name="rfold cover")


def confusion(confusion_matrix, k: int, overlap: int = 1, *, method: str = "spectral") -> Cover:
    """Subsets from a generalist's confusion matrix: classes often confused share a specialist.

    confusion_matrix [C, C] (row: true class, column: predicted; counts or rates). Rows are
    normalized to rates, the matrix symmetrized and its diagonal dropped; the classes are split
    into k clusters (method 'spectral': normalized-cut spectral clustering, or 'agglomerative':
    average linkage on 1 - affinity), then each cluster is widened by (at most) the `overlap` outside classes
    it confuses most, never by a class it does not confuse at all (ties: the larger single
    confusion with a member, then the smaller class index). Deterministic.
    """
    import numpy as np

    m = np.asarray(confusion_matrix.detach().cpu() if isinstance(confusion_matrix, torch.Tensor) else confusion_matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"confusion_matrix must be a square [C, C] matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("confusion_matrix must hold finite, non-negative entries")
    c = m.shape[0]
    k = check_int("k", k, 1)
    if k > c:
        raise ValueError(f"k={k} clusters cannot each hold a class when C={c}")
    overlap = check_int("overlap", overlap, 0)
    if method not in ("spectral", "agglomerative"):
        raise ValueError(f"method must be 'spectral' or 'agglomerative', got {method!r}")
    rates = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
    affinity = (rates + rates.T) / 2
    np.fill_diagonal(affinity, 0.0)
    labels = _cluster(affinity, k, method)
    clusters = [sorted(int(i) for i in np.flatnonzero(labels == g)) for g in range(k)]
    # Order clusters by their smallest class so equal inputs give equal covers.
    clusters.sort(key=lambda s: s[0])
    widened = []
    for members in clusters:
        # Only classes the cluster actually confuses (a class of zero confusion adds nothing to
        # learn); ties in the summed confusion go to the larger single confusion, then the index.
        score = affinity[members].sum(axis=0)
        peak = affinity[members].max(axis=0)
        outside = [i for i in range(c) if i not in members and score[i] > 0]
        extra = sorted(outside, key=lambda i: (-score[i], -peak[i], i))[:overlap]
        widened.append(tuple(sorted(members + extra)))
    return validate_cover(widened, c, name="confusion cover")


def confusion_matrix(predictions, labels, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts, row = true class, column = predicted class (input of confusion())."""
    predictions, labels = torch.as_tensor(predictions).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions has {predictions.numel()} entries but labels has {labels.numel()}")
    c = check_int("num_classes", num_classes, 1)
    for name, t in (("predictions", predictions), ("labels", labels)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise ValueError(f"{name} holds a class outside [0, {c})")
    flat = labels.long().cpu() * c + predictions.long().cpu()
    return torch.bincount(flat, minlength=c * c).reshape(c, c)


def _cluster(affinity, k: int, method: str):
    import numpy as np

    c = affinity.shape[0]
    if k == 1:
        return np.zeros(c, dtype=np.int64)
    if k == c:
        return np.arange(c)
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        # A small floor keeps the graph connected (classes never confused still get placed).
        scale = affinity.max() if affinity.max() > 0 else 1.0
        graph = affinity / scale + 1e-3
        np.fill_diagonal(graph, 1.0)
        labels = SpectralClustering(
            n_clusters=k, affinity="precomputed", assign_labels="discretize", random_state=0
        ).fit_predict(graph)
        if len(set(labels.tolist())) == k:
            return labels
        # Spectral clustering left a cluster empty: fall back to the deterministic method.
    from sklearn.cluster import AgglomerativeClustering

    scale = affinity.max() if affinity.max() > 0 else 1.0
    distance = 1.0 - affinity / scale
    np.fill_diagonal(distance, 0.0)
    return AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)


# --- Files and specs -----------------------------------------------------------------------------

COVER_BUILDERS = {"contiguous": contiguous, "rfold": rfold, "authors_v2": authors_v2, "confusion": confusion}


def _read_structured(path) -> object:
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cover file {str(p)!r} does not exist")
    text = p.read_text()
    import yaml

    try:
        if p.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)  # YAML is a superset of JSON, so other suffixes parse too
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cover file {str(p)!r} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                         f"{first}") from None


def load_cover(path, num_classes: int | None = None) -> Cover:
    """A cover from a JSON or YAML file: a list of lists, {'cover': [[...], ...]}, or a spec dict
    ({'name': 'rfold', 'r': 2, ...}, which then needs num_classes)."""
    data = _read_structured(path)
    if isinstance(data, dict) and "cover" in data and len(data) == 1:
        data = data["cover"]
    if isinstance(data, dict):
        if num_classes is None:
            raise ValueError(f"cover file {str(path)!r} holds a spec, so num_classes is needed")
        return make_cover(data, num_classes)
    return validate_cover(data, num_classes, name=f"cover in {path}")


def make_cover(spec, num_classes: int) -> Cover:
    """Build a cover from a config value.

    spec: a name ('contiguous', 'rfold', 'confusion' needs a matrix so only as a dict), a path to a
    .json/.yaml/.yml file, a dict {'name': <name>, **kwargs} (e.g. {'name': 'rfold', 'r': 2}; for
    'confusion': 'matrix' as a nested list or 'matrix_path' to a .npy/.json/.yaml file), or an
    explicit list of lists.
    """
    num_classes = check_int("num_classes", num_classes, 1)
    if isinstance(spec, str):
        if spec.lower().endswith((".json", ".yaml", ".yml")):
            return load_cover(spec, num_classes)
        spec = {"name": spec}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", kwargs.pop("type", None))
        if name not in COVER_BUILDERS:
            raise ValueError(f"cover spec names {name!r}; known covers: {sorted(COVER_BUILDERS)}")
        if name == "confusion":
            matrix = _confusion_matrix_from(kwargs, num_classes)
            if "k" not in kwargs:
                raise ValueError("a 'confusion' cover spec needs k (the number of specialists)")
            return confusion(matrix, **kwargs)
        return validate_cover(call_reporting_kwargs(f"cover spec {spec!r}", COVER_BUILDERS[name], num_classes, **kwargs),
                              num_classes, name="cover")
    return validate_cover(spec, num_classes, name="cover")


def _confusion_matrix_from(kwargs: dict, num_classes: int):
    import numpy as np

    if "matrix" in kwargs:
        matrix = np.asarray(kwargs.pop("matrix"), dtype=np.float64)
    elif "matrix_path" in kwargs:
        path = str(kwargs.pop("matrix_path"))
        matrix = np.load(path) if path.endswith(".npy") else np.asarray(_read_structured(path), dtype=np.float64)
    else:
        raise ValueError("a 'confusion' cover spec needs 'matrix' or 'matrix_path'")
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix has shape {matrix.shape}, expected ({num_classes}, {num_classes})")
    return matrix
