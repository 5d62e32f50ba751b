"""Datasets as uint8 tensors: Fashion-MNIST (idx files, checksummed) and ImageNet-layout folders.

Every training sample has a *sample id*, its index in the full training set, which batches
record and renderers look up (:func:`sample_by_id`), whatever subset a job trains on.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2 import functional as TF

from meal_ray.config import DataConfig
from meal_ray.errors import ClassCountMismatchError, DatasetError

IMAGE_MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode images are converted to
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_TRAIN_SIZE = 60000  # training images (the test set has 10000)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the *decompressed* idx files: Debian re-compresses the .gz, the contents are identical.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
FASHION_MNIST_SEARCH_PATH = (
    os.environ.get("MEAL_RAY_FASHION_MNIST", ""),
    "/usr/share/datasets/fashion-mnist",
    str(Path.home() / ".cache/meal-ray/fashion-mnist"),
)
_FIX = (
    "Install it with `apt-get install dataset-fashion-mnist`, or run `meal-ray data fashion-mnist` "
    "to download and verify it, or set data.root to a folder holding the four idx(.gz) files."
)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _open_idx(root: Path, stem: str) -> bytes:
    for candidate, opener in ((root / f"{stem}.gz", gzip.open), (root / stem, open)):
        if candidate.is_file():
            try:
                with opener(candidate, "rb") as f:
                    return f.read()
            except (OSError, EOFError) as e:
                raise DatasetError(f"{candidate} is truncated or corrupt ({e}). {_FIX}") from None
    raise DatasetError(f"Fashion-MNIST file {stem}(.gz) is missing from {root}. {_FIX}")


def read_idx(data: bytes, name: str = "idx") -> np.ndarray:
    """Parse an IDX (MNIST-format) uint8 array, checking the header against the payload size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{name} is not an unsigned-byte IDX file (bad magic number). {_FIX}")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(
            f"{name} is truncated or corrupt: header says {dims} ({expected} bytes), file has {len(data)} bytes. {_FIX}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_fashion_mnist(root: Optional[str] = None) -> Path:
    candidates = [root] if root else [p for p in FASHION_MNIST_SEARCH_PATH if p]
    for c in candidates:
        p = Path(c).expanduser()
        if any((p / f"{stem}{ext}").is_file() for stem in FASHION_MNIST_FILES for ext in (".gz", "")):
            return p
    raise DatasetError(f"Fashion-MNIST not found (looked in: {', '.join(candidates)}). {_FIX}")


class FashionMNIST(Dataset):
    """Fashion-MNIST from its idx files as uint8 tensors [N, channels, 28, 28] and int64 labels.

    The images are grayscale; ``channels=3`` replicates them (for RGB students and teachers).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Optional[str] = None, train: bool = True, channels: int = 1):
        if channels not in IMAGE_MODES:
            raise DatasetError(f"Fashion-MNIST can be read as 1 (grayscale) or 3 (replicated) channels, not "
                               f"{channels}; give data.mean/data.std one value or three.")
        self.root = find_fashion_mnist(root)
        prefix = "train" if train else "t10k"
        images = read_idx(_open_idx(self.root, f"{prefix}-images-idx3-ubyte"), f"{prefix}-images")
        labels = read_idx(_open_idx(self.root, f"{prefix}-labels-idx1-ubyte"), f"{prefix}-labels")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"Fashion-MNIST {prefix} images {images.shape} and labels {labels.shape} disagree. "
                               f"{_FIX}")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
        if channels == 3:
            self.images = self.images.repeat(1, 3, 1, 1)
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])


def download_fashion_mnist(dest: str | Path, base_url: str = FASHION_MNIST_URL) -> Path:
    """Download the four files from the dataset's official source and verify their checksums."""
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    for stem, (sha256, size) in FASHION_MNIST_FILES.items():
        target = dest / f"{stem}.gz"
        if target.is_file() and _verify(target, sha256, size):
            continue
        tmp = target.with_suffix(".gz.part")
        try:
            with urllib.request.urlopen(base_url + f"{stem}.gz", timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DatasetError(f"could not download {base_url}{stem}.gz ({e}). {_FIX}") from None
        if not _verify(tmp, sha256, size):
            tmp.unlink(missing_ok=True)
            raise DatasetError(f"{stem}.gz from {base_url} failed checksum verification; not using it. {_FIX}")
        os.replace(tmp, target)
    return dest


def _verify(path: Path, sha256: str, size: int) -> bool:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError):
        return False
    return len(data) == size and hashlib.sha256(data).hexdigest() == sha256


def verify_fashion_mnist(root: Optional[str] = None) -> Path:
    """Check every file against the known checksums; raise DatasetError naming the bad one."""
    path = find_fashion_mnist(root)
    for stem, (sha256, size) in FASHION_MNIST_FILES.items():
        data = _open_idx(path, stem)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise DatasetError(f"{path / stem} does not match the official Fashion-MNIST checksum. {_FIX}")
    return path


# ----------------------------------------------------------------------------- ImageFolder


class ImageFolderUint8(Dataset):
    """ImageNet-layout folder (one subfolder per class) decoded to uint8 CHW tensors with ``channels`` channels.

    Every image is converted to the configured channel count with PIL: grayscale images in an
    RGB job are replicated to three channels, RGB images in a grayscale job become luminance
    (ITU-R 601-2, PIL's ``convert("L")``), so mixed folders never reach a model in the wrong shape.
    """

    def __init__(self, root: str | Path, channels: int = 3):
        from torchvision.datasets import ImageFolder

        if channels not in IMAGE_MODES:
            raise DatasetError(f"image folders can be read as 1 (grayscale) or 3 (RGB) channels, not {channels}; "
                               "give data.mean/data.std one value (grayscale) or three (RGB).")
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist; expected the ImageNet layout "
                               "root/{train,val}/<class>/<image>.(jpg|png|...).")
        try:
            self.folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as e:
            raise DatasetError(f"{root}: {e} Expected one subfolder per class holding .jpg/.png images.") from None
        self.mode = IMAGE_MODES[channels]
        self.classes = tuple(self.folder.classes)
        self.targets = torch.tensor(self.folder.targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.folder.samples[i]
        try:
            with Image.open(path) as im:
                img = TF.pil_to_tensor(im.convert(self.mode))
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"cannot read image {path}: {e}. Remove or replace the file.") from None
        return img, label


# ----------------------------------------------------------------------------- subsets and sample ids


class SampleSubset(Subset):
    """A subset that keeps its samples' ids in the full dataset (what batches record), targets and class names."""

    def __init__(self, dataset: Dataset, indices):
        super().__init__(dataset, list(indices))
        self.ids = torch.as_tensor(self.indices, dtype=torch.int64)
        self.targets = dataset.targets[self.ids]
        self.classes = getattr(dataset, "classes", None)


def sample_ids(dataset: Dataset) -> torch.Tensor:
    """Sample id of each position of ``dataset``: its index in the full dataset."""
    return dataset.ids if isinstance(dataset, SampleSubset) else torch.arange(len(dataset))


def sample_by_id(dataset: Dataset, sample_id: int):
    """``(image, label)`` of a sample id, whether ``dataset`` is the full dataset or a subset of it."""
    full = dataset.dataset if isinstance(dataset, SampleSubset) else dataset
    return full[int(sample_id)]


def dataset_fingerprint(dataset: Dataset) -> str:
    """A short hash of a full training set's content (Fashion-MNIST pixels and labels; an image folder's class
    folders, file names and sizes), so a soft-label cache can tell it was made from the same data."""
    full = dataset.dataset if isinstance(dataset, SampleSubset) else dataset
    h = hashlib.sha256()
    if isinstance(full, FashionMNIST):
        h.update(b"fashion-mnist")
        h.update(full.images[:, :1].contiguous().numpy().tobytes())
        h.update(full.targets.numpy().tobytes())
    elif isinstance(full, ImageFolderUint8):
        h.update(b"imagefolder")
        root = Path(full.folder.root)
        for path, label in full.folder.samples:
            h.update(f"{Path(path).relative_to(root)}|{label}|{Path(path).stat().st_size}\n".encode())
    else:
        raise DatasetError(f"no fingerprint for a {type(full).__name__} dataset")
    return h.hexdigest()[:16]


def stratified_indices(targets: torch.Tensor, n: int, num_classes: int) -> list[int]:
    """The first ``n // num_classes`` samples of each class (plus remainder), in dataset order."""
    per_class = [torch.nonzero(targets == c).flatten().tolist() for c in range(num_classes)]
    take = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    return sorted(i for c in range(num_classes) for i in per_class[c][: take[c]])


def load_train_set(dataset: str, root: Optional[str], channels: int) -> Dataset:
    """The whole training set (sample id = index), as jobs and teacher replicas rendering crop boxes read it."""
    if dataset == "fashion-mnist":
        return FashionMNIST(root, True, channels)
    return ImageFolderUint8(Path(root) / "train", channels)


def load_datasets(cfg: DataConfig, num_classes: int) -> tuple[Dataset, Dataset, tuple]:
    """Return (train base, val base, class names) with optional stratified subsets."""
    train = load_train_set(cfg.dataset, cfg.root, cfg.in_chans)
    if cfg.dataset == "fashion-mnist":
        val = FashionMNIST(cfg.root, False, cfg.in_chans)
        classes = FASHION_MNIST_CLASSES
    else:
        val = ImageFolderUint8(Path(cfg.root) / "val", cfg.in_chans)
        classes = tuple(train.classes)
        if tuple(val.classes) != classes:
            raise DatasetError(f"{cfg.root}/train and {cfg.root}/val hold different class folders "
                               f"({len(classes)} vs {len(val.classes)}); give both the same class subfolders.")
    if len(classes) != num_classes:
        raise ClassCountMismatchError(
            f"the dataset has {len(classes)} classes but student.num_classes={num_classes}; "
            f"set student.num_classes={len(classes)}."
        )
    if cfg.train_subset:
        train = SampleSubset(train, stratified_indices(train.targets, cfg.train_subset, num_classes))
    if cfg.val_subset:
        val = SampleSubset(val, stratified_indices(val.targets, cfg.val_subset, num_classes))
    return train, val, classes
