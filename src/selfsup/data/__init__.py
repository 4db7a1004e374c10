"""Data sources, splits and the loader builder.

``load_data(spec)`` turns a spec string (``"cifar10-sample"``, ``"cifar10:DIR"``,
``"folder:DIR"``, ``"csv:FILE"``) into :class:`DataSplits`; every split yields ``(uint8 image (3, S, S),
label, index)``. ``build_loader`` is the one way to batch them. Workers only decode and
resize: augmentation runs later, batched, on the device.
"""

from selfsup.data.dataset import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNLABELED,
    ArrayDataset,
    DataInfo,
    DataSplits,
    LabeledDataset,
    SkipLog,
)
from selfsup.data.download import CIFAR10_MD5, CIFAR10_URL, download_cifar10
from selfsup.data.folder import ImageFileDataset
from selfsup.data.loader import ImageBatch, build_loader
from selfsup.data.sources import SOURCES, load_data, source_names

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCES",
    "UNLABELED",
    "ArrayDataset",
    "DataInfo",
    "DataSplits",
    "ImageBatch",
    "ImageFileDataset",
    "LabeledDataset",
    "SkipLog",
    "build_loader",
    "download_cifar10",
    "load_data",
    "source_names",
]
