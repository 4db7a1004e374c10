"""Learning tests: on real images (the embedded CIFAR-10 sample), pretraining must lift kNN top-1
clearly above the same network at random init (same seed, same architecture).

Small network (ResNet-18 with the CIFAR stem at a quarter width) and a few epochs, so each test
takes a couple of minutes on 2 CPU cores.
"""

import pytest

from selfsup.config import resolve_config
from selfsup.train import train

pytestmark = pytest.mark.slow

MARGIN = 0.05  # five points of kNN top-1


def _run(tmp_path, method: str, epochs: int, **sections) -> dict:
    values = {
        "method": method,
        "data": {"source": "cifar10-sample", "num_workers": 1},
        "backbone": {"name": "resnet18", "cifar_stem": True, "width": 0.25},
        "train": {"epochs": epochs, "batch_size": 128, "seed": 0, "out": str(tmp_path),
                  "progress_bar": False},
        "eval": {"monitor_every_n_epochs": 0, "after_training": ["knn"]},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    return train(resolve_config(values))


def test_simclr_lifts_knn_accuracy_above_random_init(tmp_path):
    results = _run(tmp_path, "simclr", epochs=12,
                   optim={"lr": 1.2, "lr_scaling": "sqrt", "warmup_epochs": 1})
    assert results["knn_top1"] >= results["knn_top1_random_init"] + MARGIN, results


def test_mocov2_lifts_knn_accuracy_above_random_init(tmp_path):
    # MoCo learns more slowly at the start than SimCLR (its queue first fills with keys from a
    # lagging encoder), so it gets more steps: 18 epochs of 35 steps, and a queue of 1024 that
    # holds ~8 batches rather than nearly the whole 4,500-image sample.
    results = _run(tmp_path, "mocov2", epochs=18, method_args={"queue_size": 1024},
                   optim={"lr": 0.12})
    assert results["knn_top1"] >= results["knn_top1_random_init"] + MARGIN, results
