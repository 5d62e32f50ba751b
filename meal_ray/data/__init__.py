"""Data: datasets, recorded crops that can be rendered again, loaders and the Batch.

Images stay uint8 until they reach a model: the student normalizes on its device and every
teacher applies its own preprocessing, so the same uint8 crop can go to both (and over the
wire to Serve) at a quarter of float32's size. A batch records each sample's id, crop box,
flip and CutMix partner, so any batch can be rendered again bit for bit (teachers, soft-label
cache, replayed epochs).
"""

from meal_ray.data.batch import Batch, batches_from_loader, cutmix, render_batch
from meal_ray.data.crops import (
    INTERPOLATIONS,
    CropParams,
    CropSampler,
    EvalTransform,
    MixParams,
    RandomCropSampler,
    ReplayedCropSampler,
    interpolation_mode,
    render_crop,
    render_crops,
    render_sample,
    render_samples,
)
from meal_ray.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    ImageFolderUint8,
    download_fashion_mnist,
    find_fashion_mnist,
    load_datasets,
    read_idx,
    sample_ids,
    stratified_indices,
    verify_fashion_mnist,
)
from meal_ray.data.loaders import EvalView, Normalize, TrainView, build_loaders, build_train_loader, build_val_loader

__all__ = [
    "Batch", "batches_from_loader", "cutmix", "render_batch",
    "INTERPOLATIONS", "CropParams", "CropSampler", "EvalTransform", "MixParams", "RandomCropSampler",
    "ReplayedCropSampler", "interpolation_mode", "render_crop", "render_crops", "render_sample",
    "render_samples",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "FashionMNIST", "ImageFolderUint8",
    "download_fashion_mnist", "find_fashion_mnist", "load_datasets", "read_idx", "sample_ids", "stratified_indices",
    "verify_fashion_mnist",
    "EvalView", "Normalize", "TrainView", "build_loaders", "build_train_loader", "build_val_loader",
]
