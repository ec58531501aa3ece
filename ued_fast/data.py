"""Image-classification datasets for the USTE experiments, read from their official file formats.

    images, labels = ued_fast.data.load("cifar10", "train", "/path/to/cifar10")

returns ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]`` (CPU torch tensors).

Datasets (``DATASETS``) and the files each accepts in its ``root`` folder:

- ``cifar10``: the PNG archives ``cifar10-png-{test,train-1..5}.tar.gz`` (members
  ``<split>/<class>/<file>.png``, class from the folder name, rows ordered by class then file
  name), or the official python batches ``cifar-10-batches-py/{data_batch_1..5,test_batch}``
  (also directly in ``root``), or the official archive ``cifar-10-python.tar.gz`` (read without
  extracting it). Archives are read as streams; nothing is extracted.
- ``cifar100``: ``cifar-100-python/{train,test}`` (fine labels), or ``cifar-100-python.tar.gz``.
- ``svhn``: ``train_32x32.mat`` / ``test_32x32.mat`` (label 10 means digit 0 and becomes 0).
- ``mnist``, ``fashion-mnist``: the four official ``*-idx?-ubyte.gz`` files.
- ``digits``: scikit-learn's embedded 8x8 digits (no files, ``root`` is ignored); values 0..16 are
  scaled to 0..255; split: stratified, 20% test per class, ``numpy.random.default_rng(0)``.

Integrity: every file with a known checksum (``DATASETS[name].files``: SHA-256 where known, else
the published MD5) is hashed before it is decoded; a mismatch raises ``DatasetFileError`` (a
ValueError). ``verify=False`` skips the check and ``checksums={file_name: hex}`` replaces the
expected digest of a file (32 hex digits: MD5, 64: SHA-256), e.g. for a re-packed copy. A file
that passed is remembered (path, size, mtime) in ``verified.json`` in the cache folder, so later
loads do not hash it again.

Cache: decoded arrays are stored as ``.npy`` in ``<root>/.ued_fast_cache`` when ``root`` is
writable, else in ``$XDG_CACHE_HOME/ued_fast/arrays`` (default ``~/.cache/ued_fast/arrays``);
``UED_FAST_CACHE_DIR`` or ``cache=<folder>`` chooses the folder, ``cache=False`` disables it. The
cache key covers the source files' names, sizes and mtimes, so replacing a file invalidates it.

Locations: ``root=None`` means ``dataset_root(name)``: ``$UED_FAST_DATA_DIR/<name>`` if that
variable is set, else ``~/.cache/ued_fast/data/<name>``. ``download=True`` fetches missing files
from their official URLs, or from ``mirror`` / ``$UED_FAST_DATA_MIRROR`` (a base URL holding the
files by name), into a temporary file that is verified and then renamed into place.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import augment
from .checkpoint import atomic_write

__all__ = [
    "DATASETS", "DatasetInfo", "DatasetFile", "DatasetFileError", "DownloadError", "SPLITS",
    "load", "download", "get_info", "dataset_root", "default_data_dir", "normalize",
    "DIGITS_TEST_FRACTION", "DIGITS_SPLIT_SEED",
]

SPLITS = ("train", "test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_CACHE_FORMAT = 1  # bump when the decoded layout of any dataset changes
_CHUNK = 1 << 20


class DatasetFileError(ValueError):
    """A dataset file is corrupt, truncated, not in the expected format, or fails its checksum."""


class DownloadError(OSError):
    """No URL of a dataset file could be fetched."""


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset as published: checksums of the exact bytes and where to get it."""

    name: str
    md5: str | None = None
    sha256: str | None = None
    urls: tuple[str, ...] = ()

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) used for verification: SHA-256 when known, else MD5."""
        if self.sha256:
            return ("sha256", self.sha256)
        if self.md5:
            return ("md5", self.md5)
        return None


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    ``mean``/``std``: per-channel statistics of the train split on the [0, 1] scale (population
    std over all train pixels), for ``normalize``; ``stats_source`` says where they come from.
    """

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_sizes: Mapping[str, int]
    files: tuple[DatasetFile, ...] = ()
    homepage: str = ""
    stats_source: str = ""
    citation: str = ""
    layouts: tuple["_Layout", ...] = field(default=(), repr=False)

    def file(self, name: str) -> DatasetFile | None:
        """The registry entry of a file, by its base name, or None."""
        for f in self.files:
            if f.name == name:
                return f
        return None


# ----------------------------------------------------------------------------- file readers
@contextlib.contextmanager
def _reading(path: Path | str):
    """Turn any decoding failure of `path` into a DatasetFileError that names it."""
    try:
        yield
    except (DatasetFileError, FileNotFoundError):
        raise
    except (OSError, EOFError, zlib.error, tarfile.TarError, pickle.UnpicklingError, ValueError,
            KeyError, IndexError, TypeError, AttributeError, struct.error, MemoryError) as exc:
        raise DatasetFileError(
            f"cannot read {path}: {type(exc).__name__}: {exc} (the file is corrupt, truncated or "
            f"not in the expected format; delete it and get it again)"
        ) from exc


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """IDX file (gzip): magic 0x0000 08 <ndim>, big-endian uint32 dims, then uint8 data."""
    with _reading(path), gzip.open(path, "rb") as f:
        raw = f.read()
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DatasetFileError(
            f"{path}: bad IDX magic {raw[:4].hex() or '(empty)'}, expected 000008{ndim:02x} "
            f"(uint8, {ndim}-D)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DatasetFileError(
            f"{path}: IDX header says {dims} = {count} bytes of data but the file holds "
            f"{len(raw) - header} (truncated or trailing data)"
        )
    return np.frombuffer(raw, np.uint8, count, header).reshape(dims).copy()


def _idx_reader(image_file: str, label_file: str):
    def read(paths: Sequence[Path], num_workers: int | None):
        by_name = {p.name: p for p in paths}
        images = _read_idx(by_name[image_file], 3)
        labels = _read_idx(by_name[label_file], 1)
        if images.shape[0] != labels.shape[0]:
            raise DatasetFileError(
                f"{by_name[image_file]} holds {images.shape[0]} images but "
                f"{by_name[label_file]} holds {labels.shape[0]} labels"
            )
        return images[:, None], labels.astype(np.int64)

    return read


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: builds dicts, lists and numpy arrays, and nothing else.

    A pickle can run arbitrary code on load; a dataset file from a mirror must not.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return super().find_class(module, name)


def _get(d: dict, key: str):
    """Official batches (Python 2 pickles) load with str keys; files written by Python 3 with bytes."""
    if key in d:
        return d[key]
    return d.get(key.encode())


def _parse_cifar_pickle(data: bytes, source: str, label_key: str):
    with _reading(source):
        d = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
        if not isinstance(d, dict):
            raise DatasetFileError(f"{source}: expected a pickled dict, got {type(d).__name__}")
        pixels, labels = _get(d, "data"), _get(d, label_key)
        if pixels is None or labels is None:
            raise DatasetFileError(f"{source}: the pickled dict lacks 'data' or {label_key!r}")
        pixels = np.asarray(pixels)
        labels = np.asarray(labels)
        if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
            raise DatasetFileError(
                f"{source}: 'data' must be uint8 [N, 3072], got {pixels.dtype} {pixels.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != pixels.shape[0] or labels.dtype.kind not in "iu":
            raise DatasetFileError(
                f"{source}: {label_key!r} must hold {pixels.shape[0]} integers, got "
                f"{labels.dtype} {labels.shape}"
            )
        return pixels.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _concat(parts):
    return (np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
            np.concatenate([p[1] for p in parts]))


def _pickle_files_reader(names: Sequence[str], label_key: str):
    def read(paths: Sequence[Path], num_workers: int | None):
        by_name = {p.name: p for p in paths}
        parts = []
        for n in names:
            with _reading(by_name[n]):
                data = by_name[n].read_bytes()
            parts.append(_parse_cifar_pickle(data, str(by_name[n]), label_key))
        return _concat(parts)

    return read


def _pickle_tar_reader(members: Sequence[str], label_key: str):
    def read(paths: Sequence[Path], num_workers: int | None):
        (archive,) = paths
        wanted, found = set(members), {}
        with _reading(archive), tarfile.open(archive, "r:gz") as tf:
            for m in tf:
                if m.name in wanted and m.isfile():
                    found[m.name] = tf.extractfile(m).read()
                    if len(found) == len(wanted):
                        break
        missing = [m for m in members if m not in found]
        if missing:
            raise DatasetFileError(f"{archive}: archive lacks member(s) {missing}")
        return _concat([_parse_cifar_pickle(found[m], f"{archive}:{m}", label_key) for m in members])

    return read


def _read_png_archive(path: str, split: str, classes: tuple[str, ...]):
    """Decode one `<split>/<class>/<file>.png` tar.gz; rows ordered by (class, file name)."""
    from PIL import Image

    class_index = {c: i for i, c in enumerate(classes)}
    records = []
    with _reading(path), tarfile.open(path, "r:gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            parts = m.name.split("/")
            if len(parts) != 3 or not parts[2].lower().endswith(".png"):
                raise DatasetFileError(f"{path}: unexpected member {m.name!r}, expected "
                                       f"'{split}/<class>/<file>.png'")
            if parts[0] != split or parts[1] not in class_index:
                raise DatasetFileError(f"{path}: member {m.name!r} is not in split {split!r} or "
                                       f"names an unknown class (known: {', '.join(classes)})")
            with Image.open(io.BytesIO(tf.extractfile(m).read())) as im:
                if im.mode != "RGB":
                    im = im.convert("RGB")
                pixels = np.asarray(im, dtype=np.uint8)
            if pixels.shape != (32, 32, 3):
                raise DatasetFileError(f"{path}: {m.name} is {pixels.shape}, expected 32x32 RGB")
            records.append((class_index[parts[1]], parts[2], pixels))
    if not records:
        raise DatasetFileError(f"{path}: archive holds no images")
    records.sort(key=lambda r: (r[0], r[1]))
    images = np.stack([r[2] for r in records]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.array([r[0] for r in records], dtype=np.int64)


def _png_reader(split: str, classes: tuple[str, ...]):
    def read(paths: Sequence[Path], num_workers: int | None):
        workers = min(len(paths), os.cpu_count() or 1) if num_workers is None else num_workers
        args = [(str(p), split, classes) for p in paths]
        if workers > 1 and len(paths) > 1 and "fork" in multiprocessing.get_all_start_methods():
            # fork: workers start in milliseconds (spawn would re-import torch in each)
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                parts = list(pool.map(_read_png_archive, *zip(*args)))
        else:
            parts = [_read_png_archive(*a) for a in args]
        return _concat(parts)

    return read


def _mat_reader(file: str):
    def read(paths: Sequence[Path], num_workers: int | None):
        (path,) = paths
        from scipy.io import loadmat

        with _reading(path):
            mat = loadmat(path, variable_names=["X", "y"])
            x, y = mat.get("X"), mat.get("y")
            if x is None or y is None:
                raise DatasetFileError(f"{path}: .mat file lacks variable 'X' or 'y'")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
                raise DatasetFileError(f"{path}: X must be uint8 [32, 32, 3, N], got "
                                       f"{x.dtype} {x.shape}")
            if y.size != x.shape[3] or y.dtype.kind not in "iuf":
                raise DatasetFileError(f"{path}: y must hold {x.shape[3]} labels, got "
                                       f"{y.dtype} {y.shape}")
        labels = y.reshape(-1).astype(np.int64)
        labels[labels == 10] = 0  # SVHN stores digit 0 as class 10
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels

    return read


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Layout:
    """One way a dataset can be stored in its root: the files per split and how to read them."""

    name: str
    files: Mapping[str, tuple[str, ...]]  # split -> paths relative to root
    readers: Mapping[str, Callable]  # split -> reader(paths, num_workers) -> (images, labels)
    downloadable: bool = False


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                    "truck")
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")
_DIGIT_CLASSES = tuple(str(d) for d in range(10))

_TORONTO = "https://www.cs.toronto.edu/~kriz/"
_MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _files(sums: Mapping[str, tuple[str, str | None]], bases: Sequence[str] = ()):
    """DatasetFile entries from {file name: (md5, sha256 or None)}, fetched from each base URL."""
    return tuple(DatasetFile(n, md5=m, sha256=s, urls=tuple(b + n for b in bases))
                 for n, (m, s) in sums.items())


def _idx_dataset(name: str, classes, *, mean: float, std: float, sums, urls, homepage: str, citation: str):
    """An MNIST-format dataset: 10 classes of 28x28 grayscale, 60k/10k images in the four IDX files."""
    layout = _Layout("idx", _IDX_FILES, {s: _idx_reader(*files) for s, files in _IDX_FILES.items()},
                     downloadable=True)
    return DatasetInfo(name=name, num_classes=10, channels=1, image_size=(28, 28), classes=classes, mean=(mean,),
                       std=(std,), split_sizes={"train": 60000, "test": 10000}, files=_files(sums, urls),
                       homepage=homepage, stats_source="computed here from the official train files",
                       citation=citation, layouts=(layout,))


def _cifar_pickle_layouts(folder: str, archive: str, split_files: Mapping[str, tuple[str, ...]],
                          label_key: str):
    return (
        _Layout("python", {s: tuple(f"{folder}/{n}" for n in names) for s, names in split_files.items()},
                {s: _pickle_files_reader(names, label_key) for s, names in split_files.items()}),
        # root may also be the batches folder itself
        _Layout("python-flat", dict(split_files),
                {s: _pickle_files_reader(names, label_key) for s, names in split_files.items()}),
        _Layout("python-tar", {s: (archive,) for s in split_files},
                {s: _pickle_tar_reader([f"{folder}/{n}" for n in names], label_key)
                 for s, names in split_files.items()}, downloadable=True),
    )


_CIFAR10_PNG = {"train": tuple(f"cifar10-png-train-{i}.tar.gz" for i in range(1, 6)),
                "test": ("cifar10-png-test.tar.gz",)}
_CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10", num_classes=10, channels=3, image_size=(32, 32), classes=_CIFAR10_CLASSES,
        mean=(0.49139968, 0.48215841, 0.44653091), std=(0.24703223, 0.24348513, 0.26158784),
        split_sizes={"train": 50000, "test": 10000},
        files=(
            # PNG archives of ../shared/data/cifar10 (checksums from its SHA256SUMS / MD5SUMS)
            *_files({
                "cifar10-png-test.tar.gz": ("a87d5fcde7b098c4da706b941a95836a",
                                            "018906846afc123a572cc95442bafe660fadc75b74c0cf91376723480991f4c6"),
                "cifar10-png-train-1.tar.gz": ("4e85b02135182cba67bf4a6ab8acb316",
                                               "b14caa424bc18a8fee1d86bac4bdc2ece7c0a8640d71bdb0ae337493a12e49ce"),
                "cifar10-png-train-2.tar.gz": ("814bfa37064b76f0d10caf060d1a83cb",
                                               "2113a26eb5ca239166b5eceec442419d6abb1bc10bd4ddcc33d72e875f5559dc"),
                "cifar10-png-train-3.tar.gz": ("716f4180dfdbc24b46b14ae639af3417",
                                               "004dbefbe75e329c7b6eb3a7197a2873717e609a58db31bf070313177161cf57"),
                "cifar10-png-train-4.tar.gz": ("a2080d8377bdd567f212bcaf567df57e",
                                               "2ce42ebc8a82ff3b607008bd809efcd30cbbd3d4a2ed07c16703baa592f32291"),
                "cifar10-png-train-5.tar.gz": ("142bbe119bf6d036fab60828697f2b26",
                                               "331a11a9bd8189d7d2fdae823d79db1a5cad7993ecf297979bbb47eb8d9b9ea9"),
            }),
            # official python version (MD5s as published on the CIFAR page / used by torchvision)
            *_files({"cifar-10-python.tar.gz": ("c58f30108f718f92721af3b95e74349a", None)}, (_TORONTO,)),
            *_files({"data_batch_1": ("c99cafc152244af753f735de768cd75f", None),
                     "data_batch_2": ("d4bba439e000b95fd0a9bffe97cbabec", None),
                     "data_batch_3": ("54ebc095f3ab1f0389bbae665268c751", None),
                     "data_batch_4": ("634d18415352ddfa80567beed471001a", None),
                     "data_batch_5": ("482c414d41f54cd18b22e5b47cb7c3cb", None),
                     "test_batch": ("40351d587109b95175f43aff81a1287e", None)}),
        ),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        stats_source="published train-split values; reproduced from the PNG archives to 1e-6",
        citation="Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009",
        layouts=(
            _Layout("png", _CIFAR10_PNG,
                    {s: _png_reader(s, _CIFAR10_CLASSES) for s in SPLITS}),
            *_cifar_pickle_layouts("cifar-10-batches-py", "cifar-10-python.tar.gz",
                                   _CIFAR10_BATCHES, "labels"),
        ),
    ),
    "cifar100": DatasetInfo(
        name="cifar100", num_classes=100, channels=3, image_size=(32, 32), classes=_CIFAR100_CLASSES,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        split_sizes={"train": 50000, "test": 10000},
        files=(
            *_files({"cifar-100-python.tar.gz": ("eb9058c3a382ffc7106e4002c42a8d85", None)}, (_TORONTO,)),
            *_files({"train": ("16019d7e3df5f24257cddd939b257f8d", None),
                     "test": ("f0ef6b0ae62326f3e7ffdfab6717acfc", None)}),
        ),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        stats_source="commonly published train-split values (4 decimals); not re-derived here",
        citation="Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009",
        layouts=_cifar_pickle_layouts("cifar-100-python", "cifar-100-python.tar.gz",
                                      {"train": ("train",), "test": ("test",)}, "fine_labels"),
    ),
    "svhn": DatasetInfo(
        name="svhn", num_classes=10, channels=3, image_size=(32, 32), classes=_DIGIT_CLASSES,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
        split_sizes={"train": 73257, "test": 26032},
        files=(
            *_files({"train_32x32.mat": ("e26dedcc434d2e4c54c9b2d4a06d8373", None),
                     "test_32x32.mat": ("eb5a983be6a315427106f1b8d3c3d6d4", None)}, (_SVHN_URL,)),
        ),
        homepage="http://ufldl.stanford.edu/housenumbers/",
        stats_source="commonly published train-split values (4 decimals); not re-derived here",
        citation="Netzer et al., Reading Digits in Natural Images with Unsupervised Feature "
                 "Learning, 2011",
        layouts=(_Layout("mat", {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
                         {"train": _mat_reader("train_32x32.mat"),
                          "test": _mat_reader("test_32x32.mat")}, downloadable=True),),
    ),
    "mnist": _idx_dataset(
        "mnist", _DIGIT_CLASSES, mean=0.13066048, std=0.30810780, urls=_MNIST_URLS, sums={
            "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                           "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",
                                           "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",
                                          "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",
                                          "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        }, homepage="http://yann.lecun.com/exdb/mnist/",
        citation="LeCun et al., Gradient-Based Learning Applied to Document Recognition, 1998"),
    "fashion-mnist": _idx_dataset(
        "fashion-mnist", _FASHION_CLASSES, mean=0.28604060, std=0.35302424, urls=_FASHION_URLS, sums={
            "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                           "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe",
                                           "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79",
                                          "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310",
                                          "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        }, homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation="Xiao et al., Fashion-MNIST, arXiv:1708.07747, 2017"),
    "digits": DatasetInfo(
        name="digits", num_classes=10, channels=1, image_size=(8, 8), classes=_DIGIT_CLASSES,
        mean=(0.30553290,), std=(0.37594736,),
        split_sizes={"train": 1438, "test": 359},
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        stats_source="computed from the train split (values scaled to 0..255)",
        citation="Alpaydin and Kaynak, Optical Recognition of Handwritten Digits, UCI 1998",
    ),
}
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashion_mnist": "fashion-mnist",
            "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}


def get_info(name: str) -> DatasetInfo:
    """The DatasetInfo of `name` (case-insensitive; a few aliases such as 'fashion_mnist')."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


# ----------------------------------------------------------------------------- locations
def _user_cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_data_dir() -> Path:
    """Parent folder of the per-dataset folders: $UED_FAST_DATA_DIR, else ~/.cache/ued_fast/data."""
    env = os.environ.get("UED_FAST_DATA_DIR")
    return Path(env).expanduser() if env else _user_cache_home() / "ued_fast" / "data"


def dataset_root(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the files of `name` under `data_dir` (a folder of per-dataset folders,
    like ../shared/data); data_dir=None means default_data_dir()."""
    info = get_info(name)
    parent = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return parent / info.name


def _may_write(path: Path) -> bool:
    """os.access, but a folder with no write bit at all counts as read-only even for root (who
    may write anywhere): a data folder marked read-only must not get a cache inside it."""
    try:
        return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def _writable_dir(path: Path) -> bool:
    if not path.is_dir():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not _may_write(parent):
            return False
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
    return _may_write(path)


def _cache_dir(root: Path, cache) -> Path | None:
    if cache is False or cache is None:
        return None
    if cache is not True:
        path = Path(cache).expanduser()
    elif os.environ.get("UED_FAST_CACHE_DIR"):
        path = Path(os.environ["UED_FAST_CACHE_DIR"]).expanduser()
    elif root.is_dir() and _may_write(root) and _writable_dir(root / ".ued_fast_cache"):
        return root / ".ued_fast_cache"
    else:
        path = _user_cache_home() / "ued_fast" / "arrays"
    if not _writable_dir(path):
        raise OSError(f"cache folder {path} cannot be created or written; pass cache=False or "
                      f"another folder")
    return path


# ----------------------------------------------------------------------------- verification
def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _parse_expected(value: str, file: str) -> tuple[str, str]:
    hexval = str(value).strip().lower()
    algo = {32: "md5", 64: "sha256"}.get(len(hexval))
    if algo is None or any(c not in "0123456789abcdef" for c in hexval):
        raise ValueError(f"checksums[{file!r}] must be an MD5 (32 hex digits) or SHA-256 "
                         f"(64 hex digits), got {value!r}")
    return algo, hexval


def _parse_overrides(checksums: Mapping[str, str] | None) -> dict[str, tuple[str, str]]:
    if checksums is None:
        return {}
    if not isinstance(checksums, Mapping):
        raise TypeError(f"checksums must be a mapping {{file name: hex digest}}, got "
                        f"{type(checksums).__name__}")
    return {Path(k).name: _parse_expected(v, k) for k, v in checksums.items()}


def _expected_checksum(info: DatasetInfo, path: Path, overrides: Mapping[str, tuple[str, str]]):
    if path.name in overrides:
        return overrides[path.name]
    entry = info.file(path.name)
    return entry.checksum if entry else None


class _Stamps:
    """Files already verified: path -> (size, mtime_ns, algorithm, digest), in verified.json."""

    def __init__(self, cache_dir: Path | None):
        self.path = cache_dir / "verified.json" if cache_dir else None
        self.entries: dict = {}
        if self.path and self.path.is_file():
            with contextlib.suppress(OSError, ValueError):
                self.entries = json.loads(self.path.read_text())

    @staticmethod
    def _sig(path: Path, algo: str, digest: str):
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, algo, digest]

    def known(self, path: Path, algo: str, digest: str) -> bool:
        return self.entries.get(str(path.resolve())) == self._sig(path, algo, digest)

    def add(self, path: Path, algo: str, digest: str) -> None:
        if self.path is None:
            return
        self.entries[str(path.resolve())] = self._sig(path, algo, digest)
        text = json.dumps(self.entries, indent=0, sort_keys=True)
        with contextlib.suppress(OSError):  # a lost stamp only costs a re-hash next time
            atomic_write(self.path, lambda f: f.write(text.encode()))


def _verify(info: DatasetInfo, paths: Sequence[Path], overrides, stamps: _Stamps) -> None:
    for path in paths:
        expected = _expected_checksum(info, path, overrides)
        if expected is None:
            continue
        algo, digest = expected
        if stamps.known(path, algo, digest):
            continue
        actual = _hash_file(path, algo)
        if actual != digest:
            raise DatasetFileError(
                f"{info.name}: checksum mismatch for {path}: expected {algo} {digest}, got "
                f"{actual}. The file is corrupt, truncated or not the official one: delete it and "
                f"get it again (download=True), or, if this copy is intended, pass "
                f"checksums={{{path.name!r}: '<its md5 or sha256>'}} or verify=False."
            )
        stamps.add(path, algo, digest)


# ----------------------------------------------------------------------------- download
def _urls_for(entry: DatasetFile, mirror: str | None) -> tuple[str, ...]:
    mirror = mirror or os.environ.get("UED_FAST_DATA_MIRROR")
    if mirror:
        return (mirror.rstrip("/") + "/" + entry.name,)
    return entry.urls


def _fetch(entry: DatasetFile, dest: Path, mirror: str | None, expected, timeout: float) -> None:
    """Stream the first URL that answers into a temp file, check its digest, move it into place."""
    urls = _urls_for(entry, mirror)
    if not urls:
        raise DownloadError(f"{entry.name}: no download URL is known for this file")
    errors = []
    for url in urls:
        def stream(out, url=url):
            hashes = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
            if expected is not None:
                algo, digest = expected
                if hashes[algo].hexdigest() != digest:
                    raise DatasetFileError(
                        f"downloaded {url} but its {algo} is {hashes[algo].hexdigest()}, expected "
                        f"{digest}; the file was discarded"
                    )

        try:
            atomic_write(dest, stream)  # the file appears only once complete and verified
            return
        except (OSError, urllib.error.URLError, DatasetFileError) as exc:
            errors.append(exc)
    if all(isinstance(e, DatasetFileError) for e in errors):
        raise errors[-1]
    raise DownloadError(f"could not download {entry.name}: " +
                        "; ".join(f"{u}: {e}" for u, e in zip(urls, errors)))


def _download_layout(info: DatasetInfo) -> _Layout:
    return next(layout for layout in info.layouts if layout.downloadable)


def download(name: str, root: str | os.PathLike | None = None, *, splits: Sequence[str] = SPLITS,
             mirror: str | None = None, verify: bool = True,
             checksums: Mapping[str, str] | None = None, timeout: float = 60.0) -> list[Path]:
    """Fetch the official files of `name` for `splits` into `root` (missing ones only).

    Each file is streamed to a temp file, its checksum checked (unless verify=False), then renamed
    into place. `mirror` (or $UED_FAST_DATA_MIRROR) is a base URL that replaces the official
    URLs: the file is fetched from ``<mirror>/<file name>``. Returns the paths of the files.
    """
    info = get_info(name)
    overrides = _parse_overrides(checksums)
    if not info.layouts:
        return []  # embedded dataset
    root = Path(root).expanduser() if root is not None else dataset_root(info.name)
    layout = _download_layout(info)
    paths = []
    for split in splits:
        _check_split(split)
        for rel in layout.files[split]:
            dest = root / rel
            if dest not in paths:
                if not dest.is_file():
                    entry = info.file(dest.name) or DatasetFile(dest.name)
                    expected = _expected_checksum(info, dest, overrides) if verify else None
                    _fetch(entry, dest, mirror, expected, timeout)
                paths.append(dest)
    return paths


_download = download  # load() has a parameter named `download`


# ----------------------------------------------------------------------------- loading
def _check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _resolve(info: DatasetInfo, root: Path, split: str) -> tuple[_Layout, list[Path]] | None:
    for layout in info.layouts:
        paths = [root / rel for rel in layout.files[split]]
        if all(p.is_file() for p in paths):
            return layout, paths
    return None


def _missing_message(info: DatasetInfo, root: Path, split: str) -> str:
    # The layout with files present is most likely what the user meant: name its missing files.
    def present(layout):
        return sum((root / rel).is_file() for s in SPLITS for rel in layout.files[s])

    best = max(info.layouts, key=present)
    layout = best if present(best) else _download_layout(info)
    missing = [rel for rel in layout.files[split] if not (root / rel).is_file()]
    urls = [u for rel in missing for u in (info.file(Path(rel).name) or DatasetFile(rel)).urls[:1]]
    accepted = "; ".join(f"{l.name}: {', '.join(l.files[split])}" for l in info.layouts)
    where = "does not exist" if not root.is_dir() else "lacks it"
    return (
        f"{info.name} {split}: file {missing[0]!r} not found in {root} (the folder {where}; "
        f"missing: {', '.join(missing)}). Accepted files for this split: {accepted}. "
        f"Pass the folder that holds them as root (or set UED_FAST_DATA_DIR to their parent), or "
        f"get them with load({info.name!r}, {split!r}, root, download=True)"
        + (f" or from {', '.join(urls)}" if urls else "") + "."
    )


def _check_arrays(info: DatasetInfo, images: np.ndarray, labels: np.ndarray, source: str) -> None:
    shape = (info.channels, *info.image_size)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        raise DatasetFileError(f"{source}: decoded images are {images.dtype} {images.shape}, "
                               f"expected uint8 [N, {', '.join(map(str, shape))}]")
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise DatasetFileError(f"{source}: decoded labels are {labels.dtype} {labels.shape}, "
                               f"expected int64 [{images.shape[0]}]")
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DatasetFileError(f"{source}: labels span [{labels.min()}, {labels.max()}], outside "
                               f"[0, {info.num_classes})")


def _cache_stem(cache_dir: Path, info, split, layout, root: Path, paths: Sequence[Path]) -> Path:
    """<name>-<split>-<root hash>-<content key>: one cached version per (root, split); the key
    changes with the format version, the layout and each source file's name, size and mtime."""
    files = []
    for p in paths:
        st = p.stat()
        files.append([p.name, st.st_size, st.st_mtime_ns])
    root_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    blob = json.dumps([_CACHE_FORMAT, info.name, split, layout.name, files])
    return cache_dir / f"{info.name}-{split}-{root_id}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _cache_file(stem: Path, kind: str) -> Path:
    return stem.with_name(f"{stem.name}.{kind}.npy")


def _load_cached(info, stem: Path):
    img_path, lab_path = _cache_file(stem, "images"), _cache_file(stem, "labels")
    if not (img_path.is_file() and lab_path.is_file()):
        return None
    try:
        images, labels = np.load(img_path), np.load(lab_path)
        _check_arrays(info, images, labels, str(stem))
    except (OSError, ValueError):  # unreadable or stale cache: decode again
        return None
    return images, labels


def _save_cached(stem: Path, images: np.ndarray, labels: np.ndarray) -> None:
    prefix = stem.name.rsplit("-", 1)[0] + "-"
    for old in stem.parent.glob(prefix + "*.npy"):  # older versions of the same split
        if not old.name.startswith(stem.name + "."):
            with contextlib.suppress(OSError):
                old.unlink()
    atomic_write(_cache_file(stem, "labels"), lambda f: np.save(f, labels))
    atomic_write(_cache_file(stem, "images"), lambda f: np.save(f, images))


@lru_cache(maxsize=1)
def _digits_arrays():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: int(round(len(members) * DIGITS_TEST_FRACTION))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return {"train": (images[~is_test], labels[~is_test]), "test": (images[is_test], labels[is_test])}


def load(name: str, split: str, root: str | os.PathLike | None = None, *, download: bool = False,
         cache: bool | str | os.PathLike = True, verify: bool = True,
         checksums: Mapping[str, str] | None = None, mirror: str | None = None,
         num_workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a dataset as (images uint8 [N, C, H, W], labels int64 [N]) CPU tensors.

    Args:
        name: a key of DATASETS ('cifar10', 'cifar100', 'svhn', 'mnist', 'fashion-mnist', 'digits').
        split: 'train' or 'test'.
        root: the folder holding this dataset's files; None: dataset_root(name).
        download: fetch missing files (official URLs, or `mirror`), verified, before loading.
        cache: True: decoded arrays cached as .npy (see the module doc for the folder); a path:
            cache there; False: decode every time and write nothing.
        verify: check the files' checksums (once per file version when caching).
        checksums: {file name: md5 or sha256 hex} replacing the registry's expected digests.
        mirror: base URL replacing the official download URLs (also $UED_FAST_DATA_MIRROR).
        num_workers: processes decoding the CIFAR-10 PNG archives (None: one per archive, up to
            the CPU count; 1: in this process).

    Raises:
        ValueError: unknown name or split; DatasetFileError (a ValueError) for a corrupt file or a
        checksum mismatch. FileNotFoundError: a needed file is missing (the message names it, the
        folder searched and how to get it). DownloadError (an OSError): download=True failed.
    """
    info = get_info(name)
    _check_split(split)
    overrides = _parse_overrides(checksums)
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise ValueError(f"num_workers must be None or an int >= 1, got {num_workers!r}")
    if not info.layouts:  # embedded (digits)
        images, labels = _digits_arrays()[split]
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
    root = Path(root).expanduser() if root is not None else dataset_root(info.name)
    found = _resolve(info, root, split)
    if found is None and download:
        _download(info.name, root, splits=(split,), mirror=mirror, verify=verify,
                  checksums=checksums)
        found = _resolve(info, root, split)
    if found is None:
        raise FileNotFoundError(_missing_message(info, root, split))
    layout, paths = found
    cache_dir = _cache_dir(root, cache)
    if verify:
        _verify(info, paths, overrides, _Stamps(cache_dir))
    stem = None
    if cache_dir is not None:
        stem = _cache_stem(cache_dir, info, split, layout, root, paths)
        cached = _load_cached(info, stem)
        if cached is not None:
            return torch.from_numpy(cached[0]), torch.from_numpy(cached[1])
    images, labels = layout.readers[split](paths, num_workers)
    _check_arrays(info, images, labels, ", ".join(map(str, paths)))
    if stem is not None:
        _save_cached(stem, images, labels)
    return torch.from_numpy(images), torch.from_numpy(labels)


def normalize(images: torch.Tensor, name: str | DatasetInfo, dtype=torch.float32) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float (images / 255 - mean) / std with the dataset's channel stats."""
    info = name if isinstance(name, DatasetInfo) else get_info(name)
    if images.dim() != 4 or images.shape[1] != info.channels:
        raise ValueError(f"normalize: images must be [N, {info.channels}, H, W] for {info.name}, "
                         f"got {tuple(images.shape)}")
    return augment.normalize(images, torch.tensor(info.mean, dtype=dtype, device=images.device),
                             torch.tensor(info.std, dtype=dtype, device=images.device), dtype=dtype)

