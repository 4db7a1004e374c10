"""Learning tests: on real images (the embedded CIFAR-10 sample), pretraining must lift kNN top-1
clearly above the same network at random init (same seed, same architecture).

The setting (network, batch, data) is tests/learning.py's, shared by every learning test; SimCLR
and MoCo v2 here, InvaSpread (and SupCon against SimCLR) in tests/test_learning_contrastive.py.
"""

import pytest
from learning import assert_lifts_knn_accuracy, pretrain_small

pytestmark = pytest.mark.slow


def test_simclr_lifts_knn_accuracy_above_random_init(tmp_path):
    results = pretrain_small(tmp_path, "simclr", epochs=12,
                             optim={"lr": 1.2, "lr_scaling": "sqrt", "warmup_epochs": 1})
    assert_lifts_knn_accuracy(results)


def test_mocov2_lifts_knn_accuracy_above_random_init(tmp_path):
    # MoCo learns more slowly at the start than SimCLR (its queue first fills with keys from a
    # lagging encoder), so it gets more steps: 18 epochs of 35 steps, and a queue of 1024 that
    # holds ~8 batches rather than nearly the whole 4,500-image sample.
    results = pretrain_small(tmp_path, "mocov2", epochs=18, method_args={"queue_size": 1024},
                             optim={"lr": 0.12})
    assert_lifts_knn_accuracy(results)
