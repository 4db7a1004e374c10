"""The one setting of every learning test: pretrain a small network on real images (the embedded
CIFAR-10 sample, 4,500 training images) and compare its kNN top-1 with the same network at random
init (same seed, same architecture).

ResNet-18 at half width with the ImageNet stem (its stride-4 stem brings 32 px images to 8x8, so a
step costs a fraction of the CIFAR stem's), ``precision: auto`` (bf16 autocast on a CPU with native
bf16, float32 on one that would emulate it, where bf16 steps are 1.4x slower) and channels_last,
batch 128 (35 steps an epoch): an epoch takes about 4 s on 2 CPU cores. Measured: SimCLR's test
took 12 epochs and 175 s with the CIFAR stem at quarter width in fp32; here it trains 10 epochs, 3
of which took 9.9 s on a Zen 4 with native bf16.

Training runs on one intra-op thread, whatever the machine's core count: the trajectory of a seed
then does not depend on it (2 threads and 1 reduce in different orders and end at different
accuracies), and two learning tests run side by side on two pytest-xdist workers.

A test may change a section (``pretrain_small``'s keyword arguments), e.g.
``QUARTER_WIDTH_SMALL_BATCH`` for the slow starters; the baseline is always the network it
trains, at random init.
"""

from pathlib import Path
from typing import Any

import torch

from selfsup.config import resolve_config
from selfsup.train import train

MARGIN = 0.05  # five points of top-1

# The section for slow starters: the same ResNet-18 at quarter width and batch 64 (70 steps an
# epoch), twice the optimizer steps for about the same compute; its random init scores 25.0%.
QUARTER_WIDTH_SMALL_BATCH: dict[str, dict[str, Any]] = {"backbone": {"width": 0.25},
                                                        "train": {"batch_size": 64}}


def pretrain_small(out: Path, method: str, epochs: int, **sections: dict[str, Any]) -> dict:
    """Train ``method`` for ``epochs`` in the learning-test setting; ``sections`` (``optim``,
    ``method_args``, ...) update the matching config sections. Returns ``train``'s results, with
    ``knn_top1`` and ``knn_top1_random_init``."""
    values: dict[str, Any] = {
        "method": method,
        "data": {"source": "cifar10-sample", "num_workers": 1},
        "backbone": {"name": "resnet18", "cifar_stem": False, "width": 0.5},
        "train": {"epochs": epochs, "batch_size": 128, "seed": 0, "out": str(out),
                  "precision": "auto", "channels_last": True, "progress_bar": False},
        "eval": {"monitor_every_n_epochs": 0, "after_training": ["knn"]},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(resolve_config(values))
    finally:
        torch.set_num_threads(threads)


def assert_lifts_accuracy(results: dict, probe: str = "knn") -> None:
    """``probe``'s top-1 after pretraining (``knn``, or ``linear`` where ``eval.after_training``
    ran the linear probe) is at least ``MARGIN`` above the random-init network's."""
    assert results[f"{probe}_top1"] >= results[f"{probe}_top1_random_init"] + MARGIN, results
