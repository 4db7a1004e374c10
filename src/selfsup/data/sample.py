"""The CIFAR-10 sample shipped inside the package: the default dataset of a fresh clone.

500 train and 100 test images per class, cut from the full set by ``scripts/make_sample.py``
with a fixed seed. It is loaded without pickle, once per process, and shared read-only.
"""

from __future__ import annotations

import functools
from importlib import resources

from selfsup.data.cifar import CifarArrays, read_npz
from selfsup.errors import DataError

SAMPLE_FILE = "cifar10_sample.npz"


@functools.lru_cache(maxsize=1)
def read_sample() -> CifarArrays:
    """The embedded sample's arrays (CHW uint8), read once; the arrays are read-only because
    every dataset built from the sample shares them."""
    resource = resources.files("selfsup.data") / "assets" / SAMPLE_FILE
    if not resource.is_file():
        raise DataError(
            f"the embedded sample {resource} is missing from this install; "
            "rebuild it with scripts/make_sample.py"
        )
    with resources.as_file(resource) as path:
        arrays = read_npz(path)
    for array in (arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test):
        array.flags.writeable = False
    return arrays
