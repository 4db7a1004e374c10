"""Learning tests of the contrastive family: on real images (the embedded CIFAR-10 sample),
pretraining must lift kNN top-1 clearly above the same network at random init (same seed, same
architecture); and SupCon, which sees the labels, must beat SimCLR at the same budget.

The setting (network, batch, data) is tests/learning.py's, shared by every learning test.
"""

import pytest
from learning import assert_lifts_knn_accuracy, pretrain_small

pytestmark = pytest.mark.slow


def test_supcon_beats_simclr_knn_accuracy_at_the_same_budget(tmp_path):
    # SupCon with the paper's lr (0.125 per 256 images) and temperature 0.1, no warm-up (the
    # reference's ten would be the whole run); SimCLR exactly as tests/test_learning.py trains it.
    # 4 epochs each: measured 33.2-34.1% against 30.9% (at 5 epochs only 33.9% against 33.4%).
    epochs = 4
    supcon = pretrain_small(tmp_path / "supcon", "supcon", epochs=epochs,
                            optim={"warmup_epochs": 0})
    simclr = pretrain_small(tmp_path / "simclr", "simclr", epochs=epochs,
                            optim={"lr": 1.2, "lr_scaling": "sqrt", "warmup_epochs": 1})
    assert supcon["knn_top1"] > simclr["knn_top1"], (supcon, simclr)


def test_invaspread_lifts_knn_accuracy_above_random_init(tmp_path):
    # The paper's settings (lr 0.03 at batch 128, temperature 0.1, linear head); a larger lr (0.12
    # at batch 128) learned less in the same 6 epochs.
    assert_lifts_knn_accuracy(pretrain_small(tmp_path, "invaspread", epochs=6))


def test_cmc_lifts_knn_accuracy_above_random_init(tmp_path):
    # In-batch negatives (objective=in_batch), the paper's other settings (L and ab, t = 0.07,
    # lr 0.03 at batch 128): measured 36.8% against 24.7% at random init in 6 epochs. The memory
    # bank default learned nothing measurable in 6 epochs (24.8%): its entries start random and
    # each is refreshed once an epoch, so the positives are noise for the whole first epoch.
    results = pretrain_small(tmp_path, "cmc", epochs=6, method_args={"objective": "in_batch"})
    assert_lifts_knn_accuracy(results)
