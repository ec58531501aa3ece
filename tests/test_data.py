"""ued_fast.data: every format is written here in its official layout and read back exactly; the
real MNIST / Fashion-MNIST / CIFAR-10 files are checked when ../shared/data is present."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ued_fast import data


def _shared_data() -> Path | None:
    env = os.environ.get("UED_FAST_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data (or $UED_FAST_SHARED_DATA) absent")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # no test may read the user's settings or write to ~/.cache
    for var in ("UED_FAST_DATA_DIR", "UED_FAST_CACHE_DIR", "UED_FAST_DATA_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- writers (official formats)
def _write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None, drop: int = 0) -> None:
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - drop])


def _write_mnist(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    _write_idx(img, images)
    _write_idx(lab, labels)
    return [img, lab]


def _sums(paths) -> dict:
    return {p.name: _sha256(p) for p in paths}


def _random_mnist(rng, n):
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _random_mnist_split(root, split, seed, n):
    """n random MNIST-format images and labels written as `split`'s two IDX files under root."""
    images, labels = _random_mnist(np.random.default_rng(seed), n)
    _write_mnist(root, split, images, labels)
    return images, labels


def _cifar_batch(rng, n, num_classes, label_key):
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    batch = {b"data": images.reshape(n, 3072), label_key: [int(v) for v in labels],
             b"batch_label": b"synthetic"}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) % 20 for v in labels]
    return images, labels, pickle.dumps(batch)


def _write_cifar10_batches(folder: Path, rng, sizes=(3, 2, 4, 1, 2, 5)):
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays = {}
    for name, n in zip(names, sizes):
        images, labels, blob = _cifar_batch(rng, n, 10, b"labels")
        (folder / name).write_bytes(blob)
        arrays[name] = (images, labels)
    train = tuple(np.concatenate([arrays[f"data_batch_{i}"][k] for i in range(1, 6)]) for k in (0, 1))
    return train, arrays["test_batch"]


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


def _png_bytes(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- registry and locations
def test_registry_is_consistent():
    assert set(data.DATASETS) == {"cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "digits"}
    for name, info in data.DATASETS.items():
        assert info.name == name
        assert len(info.classes) == info.num_classes == len(set(info.classes))
        assert len(info.mean) == len(info.std) == info.channels
        assert all(0 < s < 1 for s in info.std) and all(0 < m < 1 for m in info.mean)
        for f in info.files:
            assert f.checksum is not None, f.name
            algo, digest = f.checksum
            assert len(digest) == {"md5": 32, "sha256": 64}[algo]
            assert all(u.startswith(("http://", "https://")) and u.endswith(f.name) for u in f.urls)
        if info.layouts:  # every downloadable file has an official URL
            for layout in info.layouts:
                if layout.downloadable:
                    for split in data.SPLITS:
                        for rel in layout.files[split]:
                            assert info.file(Path(rel).name).urls, rel
    assert data.DATASETS["cifar100"].num_classes == 100
    assert data.DATASETS["cifar10"].file("cifar-10-python.tar.gz").md5 == "c58f30108f718f92721af3b95e74349a"
    assert data.DATASETS["svhn"].file("train_32x32.mat").md5 == "e26dedcc434d2e4c54c9b2d4a06d8373"


@needs_shared
def test_registry_checksums_match_shared_sums_files():
    for name in ("cifar10", "mnist", "fashion-mnist"):
        info = data.get_info(name)
        for algo, sums_file in (("sha256", "SHA256SUMS"), ("md5", "MD5SUMS")):
            lines = (SHARED / name / sums_file).read_text().split("\n")
            for digest, file in (ln.split() for ln in lines if ln.strip()):
                assert getattr(info.file(file), algo) == digest, (name, file)


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="known: cifar10, cifar100, digits, fashion-mnist, mnist, svhn"):
        data.load("imagenet", "train")
    with pytest.raises(ValueError, match="split"):
        data.load("digits", "validation")
    with pytest.raises(TypeError):
        data.get_info(3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_workers"):
            data.load("digits", "train", num_workers=bad)
    assert data.get_info("Fashion_MNIST") is data.DATASETS["fashion-mnist"]
    assert data.get_info("CIFAR-10") is data.DATASETS["cifar10"]


def test_dataset_root(monkeypatch, tmp_path):
    assert data.dataset_root("mnist", tmp_path) == tmp_path / "mnist"
    assert data.dataset_root("FASHION_MNIST", "/x") == Path("/x/fashion-mnist")
    assert data.dataset_root("cifar10") == tmp_path / "xdg-cache" / "ued_fast" / "data" / "cifar10"
    monkeypatch.setenv("UED_FAST_DATA_DIR", str(tmp_path / "d"))
    assert data.dataset_root("svhn") == tmp_path / "d" / "svhn"
    with pytest.raises(ValueError, match="unknown dataset"):
        data.dataset_root("nope", tmp_path)


def test_root_none_uses_env_data_dir(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    images, labels = _random_mnist(rng, 5)
    paths = _write_mnist(tmp_path / "parent" / "mnist", "test", images, labels)
    monkeypatch.setenv("UED_FAST_DATA_DIR", str(tmp_path / "parent"))
    x, y = data.load("mnist", "test", checksums=_sums(paths))
    assert torch.equal(x[:, 0], torch.from_numpy(images))


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("split", data.SPLITS)
def test_idx_round_trip(tmp_path, name, split):
    images, labels = _random_mnist_split(tmp_path, split, 1, 17)
    x, y = data.load(name, split, tmp_path, verify=False)
    assert x.dtype == torch.uint8 and x.shape == (17, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (17,)
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_checksum_mismatch_and_overrides(tmp_path):
    rng = np.random.default_rng(2)
    paths = _write_mnist(tmp_path, "train", *_random_mnist(rng, 4))
    with pytest.raises(data.DatasetFileError, match="checksum mismatch.*train-images-idx3-ubyte.gz"):
        data.load("mnist", "train", tmp_path)
    with pytest.raises(ValueError, match="verify=False"):  # DatasetFileError is a ValueError
        data.load("mnist", "train", tmp_path)
    # the expected digest of each file can be replaced, by SHA-256 or MD5
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in paths}
    x_sha, _ = data.load("mnist", "train", tmp_path, checksums=_sums(paths), cache=False)
    x_md5, _ = data.load("mnist", "train", tmp_path, checksums=md5s, cache=False)
    assert torch.equal(x_sha, x_md5)
    wrong = dict(_sums(paths), **{"train-labels-idx1-ubyte.gz": "0" * 64})
    with pytest.raises(data.DatasetFileError, match="train-labels-idx1-ubyte.gz"):
        data.load("mnist", "train", tmp_path, checksums=wrong, cache=False)
    with pytest.raises(ValueError, match="MD5 .32 hex digits. or SHA-256"):
        data.load("mnist", "train", tmp_path, checksums={"train-labels-idx1-ubyte.gz": "abc"})


def test_idx_corrupt_files(tmp_path):
    images, labels = _random_mnist_split(tmp_path, "test", 3, 6)
    img = tmp_path / "t10k-images-idx3-ubyte.gz"
    lab = tmp_path / "t10k-labels-idx1-ubyte.gz"

    _write_idx(img, images, magic=b"\x00\x00\x08\x01")  # label magic on the image file
    with pytest.raises(data.DatasetFileError, match="t10k-images-idx3-ubyte.gz.*bad IDX magic"):
        data.load("mnist", "test", tmp_path, verify=False, cache=False)

    _write_idx(img, images, drop=5)  # data shorter than the header says
    with pytest.raises(data.DatasetFileError, match="t10k-images.*truncated"):
        data.load("mnist", "test", tmp_path, verify=False, cache=False)

    _write_idx(img, images)
    img.write_bytes(img.read_bytes()[:-40])  # truncated gzip stream
    with pytest.raises(data.DatasetFileError, match="t10k-images-idx3-ubyte.gz"):
        data.load("mnist", "test", tmp_path, verify=False, cache=False)

    img.write_bytes(b"not gzip at all")
    with pytest.raises(data.DatasetFileError, match="t10k-images-idx3-ubyte.gz"):
        data.load("mnist", "test", tmp_path, verify=False, cache=False)

    _write_idx(img, images)
    _write_idx(lab, labels[:5])
    with pytest.raises(data.DatasetFileError, match="6 images but .* 5 labels"):
        data.load("mnist", "test", tmp_path, verify=False, cache=False)

    bad = labels.copy()
    bad[2] = 10
    _write_idx(lab, bad)
    with pytest.raises(data.DatasetFileError, match=r"labels span \[\d+, 10\]"):
        data.load("mnist", "test", tmp_path, verify=False, cache=False)


def test_missing_file_message(tmp_path):
    rng = np.random.default_rng(4)
    images, labels = _random_mnist(rng, 3)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(FileNotFoundError) as err:
        data.load("mnist", "train", tmp_path)
    msg = str(err.value)
    assert "train-labels-idx1-ubyte.gz" in msg and str(tmp_path) in msg
    assert "download=True" in msg and "https://ossci-datasets.s3.amazonaws.com/mnist/" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("svhn", "test", tmp_path / "nowhere")
    # CIFAR-10 with some PNG archives present: the message names the missing archive
    (tmp_path / "c10").mkdir()
    (tmp_path / "c10" / "cifar10-png-train-1.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="cifar10-png-train-2.tar.gz"):
        data.load("cifar10", "train", tmp_path / "c10")


# ----------------------------------------------------------------------------- CIFAR pickles, SVHN
def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(5)
    train, test = _write_cifar10_batches(tmp_path / "cifar-10-batches-py", rng)
    for split, (images, labels) in (("train", train), ("test", test)):
        x, y = data.load("cifar10", split, tmp_path, verify=False)
        assert x.shape == (len(labels), 3, 32, 32) and x.dtype == torch.uint8
        np.testing.assert_array_equal(x.numpy(), images)
        np.testing.assert_array_equal(y.numpy(), labels)
        # root may also be the batches folder itself
        x2, y2 = data.load("cifar10", split, tmp_path / "cifar-10-batches-py", verify=False)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # the official MD5 of data_batch_1 does not match a synthetic file
    with pytest.raises(data.DatasetFileError, match="data_batch_1"):
        data.load("cifar10", "train", tmp_path)


def test_cifar10_python_archive(tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    train, test = _write_cifar10_batches(src / "cifar-10-batches-py", rng)
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes()
               for p in sorted((src / "cifar-10-batches-py").iterdir())}
    root = tmp_path / "root"
    root.mkdir()
    _tar_gz(root / "cifar-10-python.tar.gz", members)
    x, y = data.load("cifar10", "train", root, verify=False)
    np.testing.assert_array_equal(x.numpy(), train[0])
    np.testing.assert_array_equal(y.numpy(), train[1])
    with pytest.raises(data.DatasetFileError, match="cifar-10-python.tar.gz.*md5 c58f30108f"):
        data.load("cifar10", "test", root)
    x, y = data.load("cifar10", "test", root, checksums=_sums([root / "cifar-10-python.tar.gz"]))
    np.testing.assert_array_equal(x.numpy(), test[0])
    # an archive that lacks a batch
    del members["cifar-10-batches-py/test_batch"]
    _tar_gz(root / "cifar-10-python.tar.gz", members)
    with pytest.raises(data.DatasetFileError, match="lacks member.*test_batch"):
        data.load("cifar10", "test", root, verify=False)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    expected = {}
    for split, n in (("train", 9), ("test", 4)):
        images, labels, blob = _cifar_batch(rng, n, 100, b"fine_labels")
        labels[0] = 99
        batch = pickle.loads(blob)
        batch[b"fine_labels"][0] = 99
        (folder / split).write_bytes(pickle.dumps(batch))
        expected[split] = (images, labels)
    for split, (images, labels) in expected.items():
        x, y = data.load("cifar100", split, tmp_path, verify=False)
        np.testing.assert_array_equal(x.numpy(), images)
        np.testing.assert_array_equal(y.numpy(), labels)
        assert int(y.max()) <= 99
    with pytest.raises(data.DatasetFileError, match="cifar-100-python/train.*md5 16019d7e"):
        data.load("cifar100", "train", tmp_path)
    # the official archive layout
    _tar_gz(tmp_path / "cifar-100-python.tar.gz",
            {f"cifar-100-python/{s}": (folder / s).read_bytes() for s in ("train", "test")})
    for s in ("train", "test"):
        (folder / s).unlink()
    x, y = data.load("cifar100", "test", tmp_path, verify=False)
    np.testing.assert_array_equal(x.numpy(), expected["test"][0])


def test_cifar_pickle_bad_contents(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(data.DatasetFileError, match="lacks 'data' or 'fine_labels'"):
        data.load("cifar100", "test", tmp_path, verify=False)
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                b"fine_labels": [0, 1]}))
    with pytest.raises(data.DatasetFileError, match=r"uint8 \[N, 3072\]"):
        data.load("cifar100", "test", tmp_path, verify=False)
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                b"fine_labels": [0, 100]}))
    with pytest.raises(data.DatasetFileError, match="outside"):
        data.load("cifar100", "test", tmp_path, verify=False)
    (folder / "test").write_bytes(pickle.dumps({b"data": 1})[:-3])
    with pytest.raises(data.DatasetFileError, match="cifar-100-python/test"):
        data.load("cifar100", "test", tmp_path, verify=False)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps({b"data": _Boom(), b"fine_labels": [0]}))
    with pytest.raises(data.DatasetFileError, match="refusing to load"):
        data.load("cifar100", "test", tmp_path, verify=False)
    assert not (tmp_path / "PWNED").exists()


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(8)
    n = 11
    x_hwcn = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0], y[1, 0] = 10, 1
    savemat(tmp_path / "test_32x32.mat", {"X": x_hwcn, "y": y})
    images, labels = data.load("svhn", "test", tmp_path, verify=False)
    assert images.shape == (n, 3, 32, 32) and images.is_contiguous()
    np.testing.assert_array_equal(images.numpy(), x_hwcn.transpose(3, 2, 0, 1))
    expected = y[:, 0].astype(np.int64)
    expected[expected == 10] = 0
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert labels[0] == 0 and labels[1] == 1
    with pytest.raises(data.DatasetFileError, match="test_32x32.mat.*md5 eb5a983b"):
        data.load("svhn", "test", tmp_path)
    savemat(tmp_path / "train_32x32.mat", {"X": x_hwcn[:, :, :2], "y": y})
    with pytest.raises(data.DatasetFileError, match=r"X must be uint8 \[32, 32, 3, N\]"):
        data.load("svhn", "train", tmp_path, verify=False)
    (tmp_path / "train_32x32.mat").write_bytes((tmp_path / "test_32x32.mat").read_bytes()[:2000])
    with pytest.raises(data.DatasetFileError, match="train_32x32.mat"):
        data.load("svhn", "train", tmp_path, verify=False)


# ----------------------------------------------------------------------------- CIFAR-10 PNG archives
def _write_png_archives(root: Path, rng, per_class_train=(2, 1), per_class_test=2, classes=(0, 3, 9)):
    """Archives in the ../shared/data/cifar10 layout; returns the expected arrays per split,
    rows ordered by (class, file name)."""
    names = data.DATASETS["cifar10"].classes
    root.mkdir(parents=True, exist_ok=True)
    expected = {"train": [], "test": []}
    archives = [("test", "cifar10-png-test.tar.gz", per_class_test)] + [
        ("train", f"cifar10-png-train-{i}.tar.gz", per_class_train[i % 2]) for i in range(1, 6)]
    for split, archive, per_class in archives:
        members, rows = {}, []
        for c in reversed(classes):  # tar order differs from the output order
            for k in reversed(range(per_class)):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                fname = f"{archive[12:-7]}_{k:03d}.png"
                members[f"{split}/{names[c]}/{fname}"] = _png_bytes(pixels)
                rows.append((c, fname, pixels))
        _tar_gz(root / archive, members)
        rows.sort(key=lambda r: (r[0], r[1]))
        expected[split] += rows
    return {s: (np.stack([r[2] for r in rows]).transpose(0, 3, 1, 2), np.array([r[0] for r in rows]))
            for s, rows in expected.items()}


@pytest.mark.parametrize("num_workers", [1, 2])
def test_cifar10_png_archives(tmp_path, num_workers):
    rng = np.random.default_rng(9)
    expected = _write_png_archives(tmp_path, rng)
    for split in data.SPLITS:
        x, y = data.load("cifar10", split, tmp_path, verify=False, cache=False, num_workers=num_workers)
        np.testing.assert_array_equal(x.numpy(), expected[split][0])
        np.testing.assert_array_equal(y.numpy(), expected[split][1])
    with pytest.raises(data.DatasetFileError, match="cifar10-png-test.tar.gz.*sha256 01890684"):
        data.load("cifar10", "test", tmp_path)
    # a broken archive among several is named, also when a worker process decoded it
    (tmp_path / "cifar10-png-train-3.tar.gz").write_bytes(b"\x1f\x8b\x08broken")
    with pytest.raises(data.DatasetFileError, match="cifar10-png-train-3.tar.gz"):
        data.load("cifar10", "train", tmp_path, verify=False, cache=False, num_workers=num_workers)


def test_cifar10_png_non_rgb_and_bad_members(tmp_path):
    rng = np.random.default_rng(10)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    _tar_gz(tmp_path / "cifar10-png-test.tar.gz",
            {"test/cat/a.png": _png_bytes(np.stack([grey] * 3, axis=-1), mode="L")})
    x, y = data.load("cifar10", "test", tmp_path, verify=False, cache=False)
    assert y.tolist() == [3]
    for c in range(3):
        np.testing.assert_array_equal(x[0, c].numpy(), grey)

    cases = {
        "test/unicorn/a.png": (_png_bytes(np.zeros((32, 32, 3), np.uint8)), "unknown class"),
        "train/cat/a.png": (_png_bytes(np.zeros((32, 32, 3), np.uint8)), "not in split 'test'"),
        "test/cat/small.png": (_png_bytes(np.zeros((16, 32, 3), np.uint8)), "expected 32x32 RGB"),
        "test/cat/broken.png": (b"\x89PNG garbage", "cifar10-png-test.tar.gz"),
        "test/readme.txt": (b"hi", "unexpected member"),
    }
    for member, (blob, message) in cases.items():
        _tar_gz(tmp_path / "cifar10-png-test.tar.gz", {member: blob})
        with pytest.raises(data.DatasetFileError, match=message):
            data.load("cifar10", "test", tmp_path, verify=False, cache=False)
    (tmp_path / "cifar10-png-test.tar.gz").write_bytes(b"\x1f\x8b\x08truncated")
    with pytest.raises(data.DatasetFileError, match="cifar10-png-test.tar.gz"):
        data.load("cifar10", "test", tmp_path, verify=False, cache=False)


def test_png_layout_is_preferred_over_pickles(tmp_path):
    rng = np.random.default_rng(11)
    expected = _write_png_archives(tmp_path, rng)
    _write_cifar10_batches(tmp_path / "cifar-10-batches-py", rng)
    x, _ = data.load("cifar10", "test", tmp_path, verify=False, cache=False)
    np.testing.assert_array_equal(x.numpy(), expected["test"][0])


# ----------------------------------------------------------------------------- cache and stamps
def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    rng = np.random.default_rng(12)
    images, labels = _random_mnist(rng, 8)
    paths = _write_mnist(tmp_path, "train", images, labels)
    sums = _sums(paths)
    x1, y1 = data.load("mnist", "train", tmp_path, checksums=sums)
    cache = tmp_path / ".ued_fast_cache"  # default: inside a writable root
    assert sorted(p.name.split(".", 1)[1] for p in cache.glob("mnist-train-*.npy")) == \
        ["images.npy", "labels.npy"]
    assert (cache / "verified.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left

    def no_decode(*a, **k):
        raise AssertionError("decoded although cached")

    def no_hash(*a, **k):
        raise AssertionError("hashed although verified before")

    monkeypatch.setattr(data, "_read_idx", no_decode)
    monkeypatch.setattr(data, "_hash_file", no_hash)
    x2, y2 = data.load("mnist", "train", tmp_path, checksums=sums)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    monkeypatch.undo()

    # new file contents: verification runs again and the cache entry is replaced
    images2, labels2 = _random_mnist(rng, 5)
    paths = _write_mnist(tmp_path, "train", images2, labels2)
    with pytest.raises(data.DatasetFileError, match="checksum mismatch"):
        data.load("mnist", "train", tmp_path, checksums=sums)
    x3, y3 = data.load("mnist", "train", tmp_path, checksums=_sums(paths))
    np.testing.assert_array_equal(x3[:, 0].numpy(), images2)
    np.testing.assert_array_equal(y3.numpy(), labels2)
    assert len(list(cache.glob("mnist-train-*.images.npy"))) == 1


def test_corrupt_cache_is_rebuilt(tmp_path):
    images, labels = _random_mnist_split(tmp_path, "test", 13, 4)
    data.load("mnist", "test", tmp_path, verify=False, cache=tmp_path / "c")
    (cached,) = (tmp_path / "c").glob("*.images.npy")
    cached.write_bytes(b"garbage")
    x, _ = data.load("mnist", "test", tmp_path, verify=False, cache=tmp_path / "c")
    np.testing.assert_array_equal(x[:, 0].numpy(), images)


def test_cache_locations(tmp_path, monkeypatch):
    rng = np.random.default_rng(14)
    _write_mnist(tmp_path / "root", "test", *_random_mnist(rng, 3))
    data.load("mnist", "test", tmp_path / "root", verify=False, cache=False)
    assert not (tmp_path / "root" / ".ued_fast_cache").exists()
    assert not (tmp_path / "xdg-cache").exists()

    monkeypatch.setenv("UED_FAST_CACHE_DIR", str(tmp_path / "envcache"))
    data.load("mnist", "test", tmp_path / "root", verify=False)
    assert list((tmp_path / "envcache").glob("mnist-test-*.images.npy"))
    monkeypatch.delenv("UED_FAST_CACHE_DIR")

    # a read-only root (like ../shared/data) falls back to $XDG_CACHE_HOME/ued_fast/arrays, also
    # for root, whom permission bits do not stop
    (tmp_path / "root").chmod(0o555)
    try:
        data.load("mnist", "test", tmp_path / "root", verify=False)
        assert not (tmp_path / "root" / ".ued_fast_cache").exists()
    finally:
        (tmp_path / "root").chmod(0o755)
    fallback = tmp_path / "xdg-cache" / "ued_fast" / "arrays"
    assert len(list(fallback.glob("mnist-test-*.images.npy"))) == 1
    # another root with the same dataset gets its own entry in the shared fallback folder
    _write_mnist(tmp_path / "root2", "test", *_random_mnist(rng, 2))
    data.load("mnist", "test", tmp_path / "root2", verify=False, cache=fallback)
    assert len(list(fallback.glob("mnist-test-*.images.npy"))) == 2


# ----------------------------------------------------------------------------- download (loopback only)
@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/'served'; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_from_mirror(tmp_path, loopback_server):
    served, url = loopback_server
    rng = np.random.default_rng(15)
    images, labels = _random_mnist(rng, 9)
    sums = _sums(_write_mnist(served, "test", images, labels))
    root = tmp_path / "dl" / "mnist"
    x, y = data.load("mnist", "test", root, download=True, mirror=url, checksums=sums)
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".ued")) == \
        ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # only the split asked for
    assert _sums(root.glob("*.gz")) == sums


def test_download_env_mirror_and_cifar_archive(tmp_path, loopback_server, monkeypatch):
    served, url = loopback_server
    rng = np.random.default_rng(16)
    train, _ = _write_cifar10_batches(tmp_path / "src" / "cifar-10-batches-py", rng)
    _tar_gz(served / "cifar-10-python.tar.gz",
            {f"cifar-10-batches-py/{p.name}": p.read_bytes()
             for p in (tmp_path / "src" / "cifar-10-batches-py").iterdir()})
    monkeypatch.setenv("UED_FAST_DATA_MIRROR", url)
    paths = data.download("cifar10", tmp_path / "c10", verify=False)
    assert paths == [tmp_path / "c10" / "cifar-10-python.tar.gz"]
    x, y = data.load("cifar10", "train", tmp_path / "c10", verify=False)
    np.testing.assert_array_equal(x.numpy(), train[0])
    np.testing.assert_array_equal(y.numpy(), train[1])


def test_download_bad_checksum_and_missing(tmp_path, loopback_server):
    served, url = loopback_server
    rng = np.random.default_rng(17)
    _write_mnist(served, "test", *_random_mnist(rng, 2))
    root = tmp_path / "dl"
    # the official MNIST digest does not match the served file: nothing may be left behind
    with pytest.raises(data.DatasetFileError, match="t10k-images-idx3-ubyte.gz.*discarded"):
        data.load("mnist", "test", root, download=True, mirror=url)
    assert not [p for p in root.iterdir() if not p.name.startswith(".ued")]
    with pytest.raises(data.DownloadError, match="train_32x32.mat.*404"):
        data.load("svhn", "train", root, download=True, mirror=url, verify=False)
    assert not [p for p in root.iterdir() if not p.name.startswith(".ued")]


# ----------------------------------------------------------------------------- digits, normalize
def test_digits():
    x_tr, y_tr = data.load("digits", "train")
    x_te, y_te = data.load("digits", "test", "/ignored")
    assert x_tr.shape == (1438, 1, 8, 8) and x_te.shape == (359, 1, 8, 8)
    assert x_tr.dtype == torch.uint8 and y_tr.dtype == torch.int64
    assert set(y_tr.tolist()) == set(y_te.tolist()) == set(range(10))
    assert int(torch.cat([x_tr, x_te]).max()) == 255
    # stratified: 20% of every class (rounded) in test
    from sklearn.datasets import load_digits

    ref = load_digits()
    counts = np.bincount(ref.target)
    np.testing.assert_array_equal(np.bincount(y_te.numpy()), np.rint(counts * 0.2).astype(int))
    # the two splits partition the data set; values are the 0..16 scale mapped to 0..255
    scaled = np.rint(ref.images * 255 / 16).astype(np.uint8)
    rows = {(r.tobytes(), int(t)) for r, t in zip(scaled, ref.target)}
    got = [(r[0].tobytes(), int(t)) for r, t in zip(torch.cat([x_tr, x_te]).numpy(),
                                                    torch.cat([y_tr, y_te]).tolist())]
    assert len(got) == len(ref.target) and set(got) == rows
    # deterministic, and loads return fresh tensors
    x_tr[0] = 0
    x2, y2 = data.load("digits", "train")
    assert torch.equal(y2, y_tr) and int(x2[0].sum()) > 0
    a = x2.numpy().astype(np.float64) / 255
    info = data.DATASETS["digits"]
    assert abs(a.mean() - info.mean[0]) < 1e-6 and abs(a.std() - info.std[0]) < 1e-6


def test_normalize():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    info = data.DATASETS["cifar10"]
    out = data.normalize(x, "cifar10")
    ref = (x.double() / 255 - torch.tensor(info.mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(info.std, dtype=torch.float64).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        data.normalize(x, "mnist")


# ----------------------------------------------------------------------------- real data
def _channel_stats(images: torch.Tensor):
    """Exact per-channel mean and population std on the [0, 1] scale, from 256-bin histograms."""
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double().numpy()
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        stds.append(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
    return np.array(means), np.array(stds)


@needs_shared
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_idx(name, tmp_path):
    info = data.DATASETS[name]
    x, y = data.load(name, "train", SHARED / name, cache=tmp_path)
    xt, yt = data.load(name, "test", SHARED / name, cache=tmp_path)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    train_counts, test_counts = np.bincount(y.numpy()), np.bincount(yt.numpy())
    if name == "fashion-mnist":
        assert train_counts.tolist() == [6000] * 10 and test_counts.tolist() == [1000] * 10
    else:
        assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean, std = _channel_stats(x)
    np.testing.assert_allclose(mean, info.mean, atol=1e-6)
    np.testing.assert_allclose(std, info.std, atol=1e-6)
    x2, y2 = data.load(name, "train", SHARED / name, cache=tmp_path)  # from the cache
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.fixture(scope="module")
def cifar10_real(tmp_path_factory):
    """Decode the 60k PNGs once per module, into a temporary cache (../shared is read-only)."""
    cache = tmp_path_factory.mktemp("cifar10-cache")
    return {s: data.load("cifar10", s, SHARED / "cifar10", cache=cache) for s in data.SPLITS}, cache


@needs_shared
def test_real_cifar10(cifar10_real):
    splits, cache = cifar10_real
    (x, y), (xt, yt) = splits["train"], splits["test"]
    assert x.shape == (50000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32)
    assert np.bincount(y.numpy()).tolist() == [5000] * 10
    assert np.bincount(yt.numpy()).tolist() == [1000] * 10
    mean, std = _channel_stats(x)
    np.testing.assert_allclose(mean, (0.49139968, 0.48215841, 0.44653091), atol=1e-6)
    np.testing.assert_allclose(std, (0.24703223, 0.24348513, 0.26158784), atol=1e-6)
    np.testing.assert_allclose(mean, data.DATASETS["cifar10"].mean, atol=1e-6)
    mean, std = _channel_stats(xt)
    np.testing.assert_allclose(mean, (0.49421428, 0.48513139, 0.45040909), atol=1e-6)
    np.testing.assert_allclose(std, (0.24665252, 0.24289226, 0.26159238), atol=1e-6)


@needs_shared
def test_real_cifar10_cached_reload(cifar10_real, monkeypatch):
    splits, cache = cifar10_real
    monkeypatch.setattr(data, "_read_png_archive", lambda *a: pytest.fail("decoded again"))
    monkeypatch.setattr(data, "_hash_file", lambda *a: pytest.fail("hashed again"))
    x, y = data.load("cifar10", "train", SHARED / "cifar10", cache=cache)
    assert torch.equal(x, splits["train"][0]) and torch.equal(y, splits["train"][1])


# sha256 of the decoded (images, labels) bytes of the offline copies in ../shared/data, taken with the
# readers these files were first decoded with: a change of reader must decode the same tensors.
DECODED_SHA256 = {
    "mnist/train": ("741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
                    "e474323ac02fc156161b0bbb1f8c9cfeb327a74bcd9f9680a8385269a24f566c"),
    "mnist/test": ("6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
                   "2fd8de6bdb8d11780b4b96dc57847bcfe6953f7c32aa48bfcd8237c3b7847243"),
    "fashion-mnist/train": ("2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
                            "e3245b63f7c40d1c8b652835f19744d970c1613b40ddac6bcfc87b9c46e16a0b"),
    "fashion-mnist/test": ("c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
                           "d51d859896c55775b9e9e219b77ff03bcec1b6ac322f313544dc3f9e7bc94fae"),
    "cifar10/train": ("6cb59f5bdc8e94fe89e8ce87eed11755e41dd9a996acf316560b15d3b4bbad96",
                      "7b8df05f0a5654acb5b8c0e841f5d1bf0e036222611903b00a12d876863160f4"),
    "cifar10/test": ("9165c1d143a683d4922593d4f60185b58b31fe2bc38dd2db672c1aa23f9be049",
                     "c5575395e636cadcdfe5764ffc8d56f56d234a4dc687096f8fc2d975dd6a5597"),
    "digits/train": ("56698d0a3d2ca8276e3f80516295e278dd4cc7942e39e1bf82e95a2adf4a02d0",
                     "623f476e17fdfbd83fa261cb3fa9d9f911a880784baf9cbc5bd06580e6f356ca"),
    "digits/test": ("79f879f7d5c51589b8875b8f9a3b4cce601d08519a4c9060910c1b6df2c5db27",
                    "bfc50f70029db07375ea5336e1c45ed2c06dfa90c6aabe1b5f13cbb20d29ee3b"),
}


def _decoded_sha256(images: torch.Tensor, labels: torch.Tensor) -> tuple[str, str]:
    import hashlib

    return hashlib.sha256(images.numpy().tobytes()).hexdigest(), hashlib.sha256(labels.numpy().tobytes()).hexdigest()


def test_digits_decode_to_the_recorded_tensors():
    for split in data.SPLITS:
        assert _decoded_sha256(*data.load("digits", split)) == DECODED_SHA256[f"digits/{split}"], split


@needs_shared
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_idx_decode_to_the_recorded_tensors(name):
    for split in data.SPLITS:
        got = _decoded_sha256(*data.load(name, split, SHARED / name, cache=False))
        assert got == DECODED_SHA256[f"{name}/{split}"], split


@needs_shared
def test_real_cifar10_decodes_to_the_recorded_tensors(cifar10_real):
    splits, _ = cifar10_real
    for split in data.SPLITS:
        assert _decoded_sha256(*splits[split]) == DECODED_SHA256[f"cifar10/{split}"], split
