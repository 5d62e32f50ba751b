"""Datasets and the paper's transforms, on uint8 tensors.

Images stay uint8 until they reach the model: the student normalizes on its device and every
teacher applies its own preprocessing, so the same uint8 crop can go to both (and over the
wire to Serve) at a quarter of float32's size. The train transform records each sample's
crop box and flip so the identical crop can be rendered again (teachers, soft-label cache).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from meal_ray.config import DataConfig
from meal_ray.errors import DatasetError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
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

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> InterpolationMode:
    return _INTERP[name]


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
    """Fashion-MNIST from its idx files as uint8 tensors [N, 1, 28, 28] and int64 labels."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Optional[str] = None, train: bool = True):
        self.root = find_fashion_mnist(root)
        prefix = "train" if train else "t10k"
        images = read_idx(_open_idx(self.root, f"{prefix}-images-idx3-ubyte"), f"{prefix}-images")
        labels = read_idx(_open_idx(self.root, f"{prefix}-labels-idx1-ubyte"), f"{prefix}-labels")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"Fashion-MNIST {prefix} images {images.shape} and labels {labels.shape} disagree. {_FIX}")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
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
    """ImageNet-layout folder (one subfolder per class) decoded to uint8 CHW RGB tensors."""

    def __init__(self, root: str | Path):
        from torchvision.datasets import ImageFolder

        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist; expected the ImageNet layout root/{{train,val}}/<class>/*.JPEG.")
        try:
            self.folder = ImageFolder(str(root))
        except FileNotFoundError as e:
            raise DatasetError(f"{root}: {e}") from None
        self.classes = self.folder.classes
        self.targets = torch.tensor(self.folder.targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        path, label = self.folder.samples[i]
        from PIL import Image

        with Image.open(path) as im:
            img = TF.pil_to_tensor(im.convert("RGB"))
        return img, label


# ----------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class CropParams:
    """Where a training crop came from: box (top, left, height, width) in the source image, and flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.top, self.left, self.height, self.width, int(self.flip)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "CropParams":
        top, left, h, w, flip = (int(v) for v in t.tolist())
        return cls(top, left, h, w, bool(flip))


def render_crop(image: torch.Tensor, params: CropParams, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Render the recorded crop of a uint8 CHW image at ``size`` x ``size`` (deterministic)."""
    out = TF.resized_crop(
        image, params.top, params.left, params.height, params.width, [size, size],
        interpolation=_INTERP[interpolation], antialias=True,
    )
    return TF.horizontal_flip(out) if params.flip else out


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip, recording the crop."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 interpolation: str = "bilinear"):
        self.size, self.scale, self.ratio, self.interpolation = size, tuple(scale), tuple(ratio), interpolation

    def sample(self, image: torch.Tensor) -> CropParams:
        top, left, h, w = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        return CropParams(top, left, h, w, bool(torch.rand(()) < 0.5))

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, CropParams]:
        params = self.sample(image)
        return render_crop(image, params, self.size, self.interpolation), params


class EvalTransform:
    """Resize(size / crop_pct) + CenterCrop(size): 256/224 for ImageNet."""

    def __init__(self, size: int, crop_pct: float = 224 / 256, interpolation: str = "bilinear"):
        self.size, self.resize, self.interpolation = size, int(round(size / crop_pct)), interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = TF.resize(image, [self.resize], interpolation=_INTERP[self.interpolation], antialias=True)
        return TF.center_crop(out, [self.size, self.size])


class TrainView(Dataset):
    """Yields (uint8 crop, label, sample index, crop params [top, left, h, w, flip])."""

    def __init__(self, base: Dataset, transform: TrainTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        crop, params = self.transform(image)
        return crop, label, i, params.as_tensor()


class EvalView(Dataset):
    def __init__(self, base: Dataset, transform: EvalTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


def stratified_indices(targets: torch.Tensor, n: int, num_classes: int) -> list[int]:
    """The first ``n // num_classes`` samples of each class (plus remainder), in dataset order."""
    per_class = [torch.nonzero(targets == c).flatten().tolist() for c in range(num_classes)]
    take = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    return sorted(i for c in range(num_classes) for i in per_class[c][: take[c]])


def load_datasets(cfg: DataConfig, num_classes: int) -> tuple[Dataset, Dataset, tuple]:
    """Return (train base, val base, class names) with optional stratified subsets."""
    if cfg.dataset == "fashion-mnist":
        train, val = FashionMNIST(cfg.root, True), FashionMNIST(cfg.root, False)
        classes = FASHION_MNIST_CLASSES
    else:
        train, val = ImageFolderUint8(Path(cfg.root) / "train"), ImageFolderUint8(Path(cfg.root) / "val")
        classes = tuple(train.classes)
    if len(classes) != num_classes:
        from meal_ray.errors import ClassCountMismatchError

        raise ClassCountMismatchError(
            f"the dataset has {len(classes)} classes but student.num_classes={num_classes}; "
            f"set student.num_classes={len(classes)}."
        )
    if cfg.train_subset:
        train = _subset(train, stratified_indices(train.targets, cfg.train_subset, num_classes))
    if cfg.val_subset:
        val = _subset(val, stratified_indices(val.targets, cfg.val_subset, num_classes))
    return train, val, classes


def _subset(ds, indices):
    sub = Subset(ds, indices)
    sub.targets = ds.targets[indices]
    return sub


class Normalize(torch.nn.Module):
    """uint8 NCHW -> float (x/255 - mean)/std on the model's device, optionally in channels-last layout."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def build_loaders(cfg: DataConfig, num_classes: int, batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: int = 0, epoch_seeded: bool = True):
    """Train loader (sharded, shuffled per epoch via ``loader.sampler.set_epoch``) and this rank's val shard."""
    from torch.utils.data.distributed import DistributedSampler

    train, val, classes = load_datasets(cfg, num_classes)
    train_view = TrainView(train, TrainTransform(cfg.image_size, cfg.crop_scale, cfg.crop_ratio, cfg.interpolation))
    sampler = DistributedSampler(train_view, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    train_loader = DataLoader(train_view, batch_size=batch_size, sampler=sampler, drop_last=True,
                              num_workers=cfg.loader_workers, generator=gen,
                              persistent_workers=cfg.loader_workers > 0)
    val_view = EvalView(val, EvalTransform(cfg.image_size, cfg.crop_pct, cfg.interpolation))
    val_shard = Subset(val_view, list(range(rank, len(val_view), world_size)))
    val_loader = DataLoader(val_shard, batch_size=max(batch_size, 256), shuffle=False, num_workers=cfg.loader_workers)
    return train_loader, val_loader, classes
