"""The user's own data: an ImageNet-layout folder of real images (Fashion-MNIST items as PNG and JPEG, some saved as
RGB), read as the configured channels with the folders' class names. `meal-ray init`, `pretrain`, `distill` and
`evaluate --dataset imagefolder` on such a folder: test_init.py's README walkthrough."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_fashion_mnist_folder
from PIL import Image

from meal_ray.config import DataConfig
from meal_ray.data import FASHION_MNIST_CLASSES, ImageFolderUint8, load_datasets
from meal_ray.errors import DatasetError

FOLDERS = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]  # "T-shirt-top": a class name is a folder name


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_fashion_mnist_folder(tmp_path_factory.mktemp("my-dataset"), FOLDERS, 80, 20)


def test_folder_images_are_converted_to_the_configured_channels(image_folder, tmp_path):
    gray = ImageFolderUint8(image_folder / "val", channels=1)
    rgb = ImageFolderUint8(image_folder / "val", channels=3)
    assert gray.classes == tuple(sorted(FOLDERS)) and len(gray) == 200
    kinds = set()
    for i in range(12):  # PNG and JPEG, grayscale and RGB files
        g, label = gray[i]
        c, _ = rgb[i]
        assert g.shape == (1, 28, 28) and c.shape == (3, 28, 28) and g.dtype == c.dtype == torch.uint8
        assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])  # grayscale replicated to RGB
        path = gray.folder.samples[i][0]
        with Image.open(path) as im:
            kinds.add((path.rsplit(".", 1)[1], im.mode))
            if im.mode == "L":
                assert torch.equal(g[0], torch.from_numpy(np.array(im)))
    assert {"png", "jpg"} <= {k for k, _ in kinds} and {"L", "RGB"} <= {m for _, m in kinds}
    # an RGB job on the same folder: three channels, the dataset's class names
    train, val, classes = load_datasets(DataConfig(dataset="imagefolder", root=str(image_folder), mean=(0.5,) * 3,
                                                   std=(0.5,) * 3), 10)
    assert val[0][0].shape == (3, 28, 28) and classes == tuple(sorted(FOLDERS))

    with pytest.raises(DatasetError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, not 2"):
        ImageFolderUint8(image_folder / "val", channels=2)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="one subfolder per class"):
        ImageFolderUint8(tmp_path / "empty" / "train")
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderUint8(tmp_path / "nowhere")
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        ImageFolderUint8(tmp_path / "bad")[0]
