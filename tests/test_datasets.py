"""Tests for dn2.datasets: every format is generated here, small, in tmp_path."""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dn2.datasets import (
    FASHION_MNIST_CLASSES,
    LabelledDataset,
    Split,
    SubsetSource,
    describe,
    load_dataset,
    read_idx,
    subset,
)

SHARED_CIFAR10_ZIP = Path(__file__).parents[2].joinpath("shared/datasets/cifar10-jpeg.zip")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def write_png(path: Path, value: int) -> None:
    """A tiny solid-colour PNG whose red channel encodes ``value`` (lossless, so readable back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (value, 10, 20)).save(path)


def pixel(split: Split, i: int) -> int:
    return np.asarray(split.source.load(i))[0, 0, 0]


def make_split_folder(root: Path) -> None:
    """train/{cat,dog}/ and test/{cat,dog,fox}/ ('fox' only in test)."""
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("test", {"cat": 1, "dog": 2, "fox": 1})):
        for c, (name, n) in enumerate(counts.items()):
            for k in range(n):
                write_png(root / split / name / f"{k:02d}.png", 50 * c + k)


def make_class_folder(root: Path, counts: dict[str, int]) -> None:
    for name, n in counts.items():
        for k in range(n):
            write_png(root / name / f"{k:03d}.png", k)


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------


def test_folder_with_train_and_test(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    make_split_folder(root)
    (root / "train" / "README.txt").write_text("not an image, not in a class folder")
    ds = load_dataset(root)
    assert isinstance(ds, LabelledDataset)
    assert ds.name == "pets"
    assert ds.classes == ["cat", "dog", "fox"]
    assert ds.train.labels.dtype == np.int64
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.test.labels.tolist() == [0, 1, 1, 2]
    assert len(ds.train.source) == 5 and len(ds.test.source) == 4
    assert [pixel(ds.train, i) for i in range(5)] == [0, 1, 2, 50, 51]
    assert "train/dog/01.png" in ds.train.source.name(4).replace(os.sep, "/")
    assert load_dataset(root, format="folder").classes == ds.classes


def test_folder_needs_both_train_and_test(tmp_path: Path) -> None:
    make_class_folder(tmp_path / "train", {"cat": 2})
    with pytest.raises(ValueError, match="test"):
        load_dataset(tmp_path)


def test_folder_split_by_seed_is_deterministic_stratified_disjoint(tmp_path: Path) -> None:
    counts = {"a": 20, "b": 10, "c": 5}
    make_class_folder(tmp_path, counts)
    ds = load_dataset(tmp_path, seed=0, test_fraction=0.2)
    assert ds.classes == ["a", "b", "c"]
    # stratified: each class loses round(n * 0.2) images to test
    assert np.bincount(ds.test.labels).tolist() == [4, 2, 1]
    assert np.bincount(ds.train.labels).tolist() == [16, 8, 4]
    train_names, test_names = set(ds.train.source.names()), set(ds.test.source.names())
    assert not train_names & test_names
    assert len(train_names | test_names) == sum(counts.values())
    # labels follow the images' folders
    for split in (ds.train, ds.test):
        for i, label in enumerate(split.labels):
            assert Path(split.source.name(i)).parent.name == ds.classes[label]
    again = load_dataset(tmp_path, seed=0, test_fraction=0.2)
    assert again.test.source.names() == ds.test.source.names()
    other = load_dataset(tmp_path, seed=1, test_fraction=0.2)
    assert other.test.source.names() != ds.test.source.names()
    half = load_dataset(tmp_path, seed=0, test_fraction=0.5)
    assert np.bincount(half.test.labels).tolist() == [10, 5, 3]  # 2.5 rounds up


def test_split_of_a_class_does_not_depend_on_other_classes(tmp_path: Path) -> None:
    make_class_folder(tmp_path / "two", {"b": 10, "c": 10})
    make_class_folder(tmp_path / "three", {"a": 10, "b": 10, "c": 10})

    def test_files(ds: LabelledDataset, cls: str) -> list[str]:
        return sorted(Path(n).name for n, y in zip(ds.test.source.names(), ds.test.labels) if ds.classes[y] == cls)

    two, three = load_dataset(tmp_path / "two"), load_dataset(tmp_path / "three")
    assert test_files(two, "b") == test_files(three, "b")
    assert test_files(two, "c") == test_files(three, "c")


# ---------------------------------------------------------------------------------------------
# zip
# ---------------------------------------------------------------------------------------------


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> None:
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr(prefix or "ignored/", b"")  # a directory entry
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, prefix + file.relative_to(folder).as_posix())
        archive.writestr(prefix + "__MACOSX/train/cat/._00.png", b"junk")


@pytest.mark.parametrize("prefix", ["", "pets/"])
def test_zip_with_and_without_top_level_folder(tmp_path: Path, prefix: str) -> None:
    make_split_folder(tmp_path / "pets")
    zip_path = tmp_path / "pets.zip"
    zip_folder(tmp_path / "pets", zip_path, prefix)
    ds = load_dataset(zip_path)
    assert ds.name == "pets"
    assert ds.classes == ["cat", "dog", "fox"]
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.test.labels.tolist() == [0, 1, 1, 2]
    assert ds.train.source.name(3) == f"{prefix}train/dog/00.png"
    assert [pixel(ds.train, i) for i in range(5)] == [0, 1, 2, 50, 51]
    assert [pixel(ds.test, i) for i in range(4)] == [0, 50, 51, 100]


def test_zip_of_class_folders_split_by_seed(tmp_path: Path) -> None:
    make_class_folder(tmp_path / "flat", {"a": 10, "b": 5})
    zip_path = tmp_path / "flat.zip"
    zip_folder(tmp_path / "flat", zip_path, "flat/")
    ds = load_dataset(zip_path, format="zip", seed=3)
    assert ds.classes == ["a", "b"]
    assert np.bincount(ds.test.labels).tolist() == [2, 1]
    assert not set(ds.train.source.names()) & set(ds.test.source.names())
    # same split as the same files in a folder
    folder_ds = load_dataset(tmp_path / "flat", seed=3)
    assert [Path(n).name for n in ds.test.source.names()] == [Path(n).name for n in folder_ds.test.source.names()]


def test_zip_without_images_is_rejected(tmp_path: Path) -> None:
    zip_path = tmp_path / "empty.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("notes.txt", "nothing")
    with pytest.raises(ValueError, match="empty.zip"):
        load_dataset(zip_path)


# ---------------------------------------------------------------------------------------------
# CIFAR pickles
# ---------------------------------------------------------------------------------------------


def cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def as_hwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def dump(obj: object, path: Path, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, protocol: int = 2, per_batch: int = 3) -> tuple[np.ndarray, list, np.ndarray, list]:
    """The official layout: root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    train_data, train_labels = [], []
    for b in range(1, 6):
        data = cifar_images(rng, per_batch)
        labels = [(b + k) % 10 for k in range(per_batch)]
        dump({b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels, b"data": data,
              b"filenames": [f"img_{b}_{k}.png".encode() for k in range(per_batch)]},
             folder / f"data_batch_{b}", protocol)
        train_data.append(data)
        train_labels += labels
    test_data = cifar_images(rng, 4)
    test_labels = [9, 0, 5, 5]
    dump({b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_data,
          b"filenames": [b""] * 4}, folder / "test_batch", protocol)
    dump({b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072},
         folder / "batches.meta", protocol)
    return np.concatenate(train_data), train_labels, test_data, test_labels


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickles_read_pixel_exact(tmp_path: Path, protocol: int) -> None:
    train_data, train_labels, test_data, test_labels = write_cifar10(tmp_path, protocol)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):  # torchvision root, or the folder itself
        ds = load_dataset(path)
        assert ds.name == "cifar10"
        assert ds.classes == CIFAR10_NAMES
        assert ds.train.labels.tolist() == train_labels
        assert ds.test.labels.tolist() == test_labels
        assert len(ds.train.source) == 15 and len(ds.test.source) == 4
        expected = as_hwc(train_data)
        for i in (0, 7, 14):
            image = ds.train.source.load(i)
            assert image.mode == "RGB" and image.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(image), expected[i])
        np.testing.assert_array_equal(np.asarray(ds.test.source.load(3)), as_hwc(test_data)[3])


def write_cifar100(root: Path) -> tuple[np.ndarray, dict, dict]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    fine = {"train": [0, 99, 42, 7, 64], "test": [1, 2, 98]}
    coarse = {"train": [4, 19, 0, 3, 12], "test": [1, 15, 19]}
    data = {}
    for split in ("train", "test"):
        data[split] = cifar_images(rng, len(fine[split]))
        dump({b"filenames": [b"x.png"] * len(fine[split]), b"batch_label": split.encode(),
              b"fine_labels": fine[split], b"coarse_labels": coarse[split], b"data": data[split]},
             folder / split, protocol=2)
    dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
          b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, folder / "meta", protocol=2)
    return data, fine, coarse


def test_cifar100_coarse_and_fine(tmp_path: Path) -> None:
    data, fine, coarse = write_cifar100(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.name == "cifar100"
    assert ds.classes == [f"coarse{i}" for i in range(20)]
    assert ds.train.labels.tolist() == coarse["train"]
    assert ds.test.labels.tolist() == coarse["test"]
    np.testing.assert_array_equal(np.asarray(ds.train.source.load(4)), as_hwc(data["train"])[4])
    np.testing.assert_array_equal(np.asarray(ds.test.source.load(0)), as_hwc(data["test"])[0])

    fine_ds = load_dataset(tmp_path / "cifar-100-python", format="cifar100", coarse=False)
    assert len(fine_ds.classes) == 100 and fine_ds.classes[99] == "fine99"
    assert fine_ds.train.labels.tolist() == fine["train"]
    assert fine_ds.test.labels.tolist() == fine["test"]


class CreatesMarker:
    """Unpickling this calls open(marker, 'w'), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsShell:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("payload", [CreatesMarker, RunsShell])
@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_3", "test_batch"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_cifar_pickle_is_rejected(tmp_path: Path, payload: type, victim: str, protocol: int) -> None:
    write_cifar10(tmp_path / "data")
    marker = tmp_path / "PWNED"
    evil = {b"labels": [0], b"data": payload(marker), b"label_names": payload(marker)}
    dump(evil, tmp_path / "data" / "cifar-10-batches-py" / victim, protocol)
    with pytest.raises(pickle.UnpicklingError, match=victim):
        load_dataset(tmp_path / "data")
    assert not marker.exists()


def test_cifar_pickle_with_wrong_content_is_rejected(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    dump({b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)}, batch, protocol=2)
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset(tmp_path)
    batch.write_bytes(pickle.dumps({b"labels": [0]}, protocol=2)[:-5])  # truncated
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([0, 1, 2, 3, 4, 9], np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 8, 9], np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / stem).write_bytes(idx_bytes(array))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("where", ["", "raw", "MNIST/raw"])
def test_mnist_idx_raw_and_gz(tmp_path: Path, gz: bool, where: str) -> None:
    arrays = write_idx_set(tmp_path / "digits" / where, gz=gz)
    ds = load_dataset(tmp_path / "digits")
    assert ds.name == "mnist"
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.train.labels.tolist() == [0, 1, 2, 3, 4, 9]
    assert ds.test.labels.tolist() == [7, 8, 9]
    image = ds.train.source.load(5)
    assert image.mode == "RGB" and image.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], arrays["train-images-idx3-ubyte"][5])
    np.testing.assert_array_equal(np.asarray(ds.test.source.load(2))[..., 1], arrays["t10k-images-idx3-ubyte"][2])


def test_fashion_mnist_names(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=True)
    ds = load_dataset(tmp_path / "tv")  # torchvision's root
    assert ds.name == "fashion-mnist"
    assert ds.classes == FASHION_MNIST_CLASSES
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    write_idx_set(tmp_path / "plain")
    assert load_dataset(tmp_path / "plain").classes[0] == "0"  # "fashion" in tmp_path's name is ignored
    assert load_dataset(tmp_path / "tv" / "FashionMNIST" / "raw").name == "fashion-mnist"
    assert load_dataset(tmp_path / "plain", format="fashion-mnist").classes == FASHION_MNIST_CLASSES
    assert load_dataset(tmp_path / "plain", format="mnist").classes[0] == "0"


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_is_rejected(tmp_path: Path, gz: bool) -> None:
    write_idx_set(tmp_path, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    file = tmp_path / name
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_dataset(tmp_path, format="idx")


def test_read_idx_checks_header(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4)))
    np.testing.assert_array_equal(read_idx(good), np.arange(12).reshape(3, 4))
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad_magic"):
        read_idx(bad_magic)
    huge = tmp_path / "huge"  # header claims 4 billion items: rejected without allocating
    huge.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 2**32 - 1) + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(huge)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(good.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(trailing)


# ---------------------------------------------------------------------------------------------
# CSV manifest
# ---------------------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_with_split(tmp_path: Path) -> None:
    for k in range(5):
        write_png(tmp_path / "img" / f"{k}.png", k)
    write_csv(tmp_path / "manifest.csv", ["path", "label", "split"], [
        ["img/0.png", "10", "train"], ["img/1.png", "2", "train"], ["img/2.png", "10", "test"],
        ["img/3.png", "2", "Test"], ["img/4.png", "2", "train"],
    ])
    ds = load_dataset(tmp_path / "manifest.csv")
    assert ds.name == "manifest"
    assert ds.classes == ["2", "10"]  # numeric labels sort as numbers
    assert ds.train.labels.tolist() == [1, 0, 0]
    assert ds.test.labels.tolist() == [1, 0]
    assert [pixel(ds.train, i) for i in range(3)] == [0, 1, 4]
    assert [pixel(ds.test, i) for i in range(2)] == [2, 3]


def test_csv_without_split_uses_seed(tmp_path: Path) -> None:
    rows = []
    for k in range(15):
        write_png(tmp_path / "img" / f"{k:02d}.png", k)
        rows.append([f"img/{k:02d}.png", "cat" if k < 10 else "dog"])
    write_csv(tmp_path / "list.csv", ["path", "label"], rows)
    ds = load_dataset(tmp_path / "list.csv", test_fraction=0.2, seed=5)
    assert ds.classes == ["cat", "dog"]
    assert np.bincount(ds.test.labels).tolist() == [2, 1]
    assert np.bincount(ds.train.labels).tolist() == [8, 4]
    assert not set(ds.train.source.names()) & set(ds.test.source.names())
    assert load_dataset(tmp_path / "list.csv", seed=5).test.source.names() == ds.test.source.names()


def test_csv_missing_file_names_file_and_line(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 1)
    write_csv(tmp_path / "m.csv", ["path", "label"], [["a.png", "x"], ["missing.png", "y"]])
    with pytest.raises(FileNotFoundError, match=r"line 3.*missing\.png"):
        load_dataset(tmp_path / "m.csv")


def test_csv_bad_header_and_split(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 1)
    write_csv(tmp_path / "bad.csv", ["file", "class"], [["a.png", "x"]])
    with pytest.raises(ValueError, match="header"):
        load_dataset(tmp_path / "bad.csv")
    write_csv(tmp_path / "split.csv", ["path", "label", "split"], [["a.png", "x", "val"]])
    with pytest.raises(ValueError, match="line 2"):
        load_dataset(tmp_path / "split.csv")


# ---------------------------------------------------------------------------------------------
# subset, describe, errors
# ---------------------------------------------------------------------------------------------


def test_subset_keeps_names_and_labels(tmp_path: Path) -> None:
    make_split_folder(tmp_path)
    ds = load_dataset(tmp_path)
    part = subset(ds.train, [4, 0, 3])
    assert isinstance(part.source, SubsetSource)
    assert len(part.source) == 3
    assert part.labels.tolist() == [1, 0, 1]
    assert part.source.names() == [ds.train.source.name(i) for i in (4, 0, 3)]
    assert pixel(part, 0) == pixel(ds.train, 4)
    nested = subset(part, [2])
    assert nested.source.names() == [ds.train.source.name(3)]
    assert nested.labels.tolist() == [1]
    assert pixel(nested, 0) == 50
    mask = subset(ds.train, ds.train.labels == 0)
    assert mask.labels.tolist() == [0, 0, 0]
    assert len(subset(ds.train, []).source) == 0
    with pytest.raises(IndexError):
        subset(ds.train, [5])
    with pytest.raises(ValueError):
        Split(ds.train.source, [0, 1])


def test_subset_of_array_source_is_picklable(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    ds = load_dataset(tmp_path)
    part = subset(ds.test, [3, 1])
    clone = pickle.loads(pickle.dumps(part))
    np.testing.assert_array_equal(np.asarray(clone.source.load(0)), np.asarray(ds.test.source.load(3)))


def test_describe(tmp_path: Path) -> None:
    make_split_folder(tmp_path / "pets")
    text = describe(load_dataset(tmp_path / "pets"))
    assert "\n" not in text
    assert text.startswith("pets: 3 classes")
    assert "train 5 images" in text and "test 4 images" in text


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="format"):
        load_dataset(tmp_path, format="imagenet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="CIFAR-10"):
        load_dataset(tmp_path / "empty", format="cifar10")
    with pytest.raises(ValueError, match="idx"):
        load_dataset(tmp_path / "empty", format="mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset(tmp_path, test_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# the shared CIFAR-10 JPEG zip
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_CIFAR10_ZIP.exists(), reason="needs ../shared/datasets/cifar10-jpeg.zip")
def test_shared_cifar10_jpeg_zip() -> None:
    ds = load_dataset(SHARED_CIFAR10_ZIP)
    assert ds.classes == CIFAR10_NAMES
    assert len(ds.train.source) == 50_000 and len(ds.test.source) == 10_000
    assert np.bincount(ds.train.labels).tolist() == [5_000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1_000] * 10
    image = ds.test.source.load(0)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert ds.test.source.name(0).startswith("test/airplane/")


# ---------------------------------------------------------------------------------------------
# the reader registry
# ---------------------------------------------------------------------------------------------


def test_explicit_mnist_format_is_obeyed(tmp_path: Path) -> None:
    """Regression: format="mnist" used to pick Fashion-MNIST when a folder name said "fashion"."""
    write_idx_set(tmp_path / "fashion_data" / "FashionMNIST" / "raw")
    assert load_dataset(tmp_path / "fashion_data").name == "fashion-mnist"  # auto: the names decide
    ds = load_dataset(tmp_path / "fashion_data", format="mnist")
    assert ds.name == "mnist" and ds.classes == [str(d) for d in range(10)]
    assert load_dataset(tmp_path / "fashion_data", format="idx").name == "fashion-mnist"
    write_idx_set(tmp_path / "digits")
    assert load_dataset(tmp_path / "digits", format="fashion-mnist").classes == FASHION_MNIST_CLASSES


def test_formats_come_from_the_readers() -> None:
    from dn2.datasets import FORMATS, READERS, DatasetReader, get_reader

    assert set(FORMATS) == {"auto", "folder", "zip", "cifar10", "cifar100", "mnist", "fashion-mnist", "idx", "csv",
                            "mtd", "mtd-mixed", "mvtec"}
    names = [r.name for r in READERS]
    assert len(names) == len(set(names)) and all(isinstance(r, DatasetReader) for r in READERS)
    assert names[-1] == "folder"  # the catch-all layout is asked last
    assert get_reader("csv").name == "csv"
    with pytest.raises(ValueError, match="unknown dataset format 'imagenet'; expected one of auto, csv"):
        get_reader("imagenet")


def test_a_new_reader_is_one_class_and_one_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dn2.datasets import READERS, DatasetReader, LabelledDataset, LoadOptions, Split
    from dn2.images import as_source

    class MarkerReader(DatasetReader):
        name = "marker"
        looks_for = "a MARKER file"

        def detect(self, path: Path) -> bool:
            return (path / "MARKER").is_file()

        def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
            images = as_source(np.zeros((2, 4, 4), np.uint8))
            return LabelledDataset("marked", ["a", "b"], Split(images, [0, 1]), Split(images, [1, 0]))

    make_class_folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "MARKER").write_text("")
    assert load_dataset(tmp_path).name == tmp_path.name  # not registered: class folders
    monkeypatch.setattr("dn2.datasets.registry.READERS", [MarkerReader(), *READERS])
    assert load_dataset(tmp_path).name == "marked"
    assert load_dataset(tmp_path, format="marker").name == "marked"
    assert load_dataset(tmp_path, format="folder").classes == ["cat", "dog"]
    with pytest.raises(ValueError, match="a MARKER file"):
        load_dataset(tmp_path / "cat" / "000.png", format="auto")


def test_folders_and_zips_share_one_layout(tmp_path: Path) -> None:
    """The same files give the same dataset in a folder, a wrapped folder, and a zip."""
    from dn2.datasets import class_layout

    make_split_folder(tmp_path / "wrap" / "pets")
    (tmp_path / "wrap" / "pets" / "train" / ".hidden").mkdir()
    write_png(tmp_path / "wrap" / "pets" / "train" / ".hidden" / "x.png", 1)
    zip_folder(tmp_path / "wrap", tmp_path / "pets.zip")
    from_folder, from_zip = load_dataset(tmp_path / "wrap"), load_dataset(tmp_path / "pets.zip")
    for ds in (from_folder, from_zip):
        assert ds.classes == ["cat", "dog", "fox"]
        assert ds.train.labels.tolist() == [0, 0, 0, 1, 1] and ds.test.labels.tolist() == [0, 1, 1, 2]
    assert [n.replace(os.sep, "/") for n in from_folder.train.source.names()] == from_zip.train.source.names()
    layout = class_layout([p.split("/") for p in ["a/1.png", "b/2.png", "a/3.png", "loose.png"]], "x", 0, 0.5)
    assert layout.classes == ["a", "b"] and sorted(layout.train_index.tolist() + layout.test_index.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="no class folders with images found in x"):
        class_layout([["loose.png"]], "x", 0, 0.5)
