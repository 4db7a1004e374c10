"""Learning tests of the contrastive family: on real images (the embedded CIFAR-10 sample),
pretraining must lift kNN top-1 (PixPro: the linear probe's) clearly above the same network at
random init (same seed, same architecture); and SupCon, which sees the labels, must beat SimCLR at
the same budget.

The setting (network, batch, data) is tests/learning.py's, shared by every learning test.
"""

import pytest
from learning import QUARTER_WIDTH_SMALL_BATCH, assert_lifts_accuracy, pretrain_small

pytestmark = pytest.mark.slow


def test_supcon_beats_simclr_knn_accuracy_at_the_same_budget(tmp_path):
    # The same optimizer, views, network and steps for both (SimCLR's, as tests/test_learning.py
    # trains it: LARS, lr 1.2 with square-root scaling, one warm-up epoch), so the labels are the
    # only difference. 4 epochs: measured 34.0% against 32.0%.
    epochs, optim = 4, {"name": "lars", "lr": 1.2, "lr_scaling": "sqrt", "warmup_epochs": 1,
                        "weight_decay": 1e-6}
    supcon = pretrain_small(tmp_path / "supcon", "supcon", epochs=epochs, optim=optim)
    simclr = pretrain_small(tmp_path / "simclr", "simclr", epochs=epochs, optim=optim)
    assert supcon["knn_top1"] > simclr["knn_top1"], (supcon, simclr)


def test_invaspread_lifts_knn_accuracy_above_random_init(tmp_path):
    # The paper's settings (lr 0.03 at batch 128, temperature 0.1, linear head). Measured: 35.8%
    # against 26.9% at random init in 4 epochs.
    assert_lifts_accuracy(pretrain_small(tmp_path, "invaspread", epochs=4))


def test_cmc_lifts_knn_accuracy_above_random_init(tmp_path):
    # In-batch negatives (objective=in_batch), the paper's other settings (L and ab, t = 0.07,
    # lr 0.03 at batch 128): measured 37.2% against 28.5% at random init in 6 epochs. The memory
    # bank default learned nothing measurable in 6 epochs (24.8%): its entries start random and
    # each is refreshed once an epoch, so the positives are noise for the whole first epoch.
    results = pretrain_small(tmp_path, "cmc", epochs=6, method_args={"objective": "in_batch"})
    assert_lifts_accuracy(results)


@pytest.mark.slow(seconds=100)
def test_mocov1_lifts_knn_accuracy_above_random_init(tmp_path):
    # v1's linear head and t = 0.07, a queue of 1024 and SimCLR's small-batch optimizer (LARS, lr
    # 1.2 with square-root scaling), at quarter width and batch 64 (1,400 steps) with the key
    # encoder's momentum at 0.99 (MoCo v2's CIFAR value) rather than v1's 0.999, under which the
    # key encoder is still 25% its random init after 1,400 steps. Measured on one thread: 31.3%
    # vs 25.0% at random init (seed 0) and 30.2% vs 24.2% (seed 1), 99 s each. The earlier
    # setting (half width, batch 128, 16 epochs, momentum 0.999) gave +5.9 on two threads and
    # +3.5 on one; with momentum 0.99 there, +6.3 and +2.0 over seeds 0 and 1. v1's SGD at lr
    # 0.03 x B/256 learned nothing measurable in 12 epochs (27.1% vs 26.9%). In bf16 on every
    # CPU: in float32 the old setting fell to +4.2.
    results = pretrain_small(tmp_path, "mocov1", epochs=20, backbone={"width": 0.25},
                             method_args={"queue_size": 1024, "momentum": 0.99},
                             train={"precision": "bf16", "batch_size": 64},
                             optim={"name": "lars", "lr": 1.2, "lr_scaling": "sqrt",
                                    "warmup_epochs": 1, "weight_decay": 1e-6})
    assert_lifts_accuracy(results)


@pytest.mark.slow(seconds=105)
def test_instdisc_lifts_knn_accuracy_above_random_init(tmp_path):
    # The full non-parametric softmax over the bank (eq. 2-3; objective=softmax) with the authors'
    # CIFAR settings (t = 0.1, SGD lr 0.06 x B/256, bank momentum 0.5, no proximal term), at
    # quarter width and batch 64. Measured: 34.9% against 25.0% at random init in 30 epochs. The
    # paper's NCE collapses here (17.2%; the embeddings' rank falls to ~3 within two epochs), and
    # at half width and batch 128 the softmax gained only 1.7 points in 20 epochs.
    results = pretrain_small(tmp_path, "instdisc", epochs=30, **QUARTER_WIDTH_SMALL_BATCH,
                             method_args={"objective": "softmax", "temperature": 0.1,
                                          "proximal_weight": 0.0},
                             optim={"lr": 0.06})
    assert_lifts_accuracy(results)


@pytest.mark.slow(seconds=570)
def test_pixpro_lifts_linear_probe_accuracy_above_random_init(tmp_path):
    # The probe that fits a pixel-level objective: linear on the pooled feature map (PixPro's kNN
    # gained 4.4 points or less here in every run but seed 1's). The CIFAR stem at quarter width
    # gives the 4x4 map that pixel pairs need (the ImageNet stem leaves 1x1), with a 1024-wide
    # head, the target's momentum rising from 0.9 (not the paper's 0.99: 16 epochs then gained 3.1
    # points, 24 epochs 3.9) and LARS lr 2.0 x B/256 with one warm-up epoch. Measured on one thread
    # (AMD Zen 4), 24 epochs (840 steps): in bf16 37.7% vs 30.5% at random init (seed 0), 40.2% vs
    # 28.5% (seed 1), 35.3% vs 28.2% (seed 2), 560 s each; in float32 +8.0, +13.1 and +7.9 (seeds
    # 0-2), 950 s each. 16 epochs gave +1.4 (seed 0) and +8.0 (seed 1); a lower lr or the paper's
    # momentum learned less. The collapse monitor warns in these runs: the pooled projections fall
    # to an effective rank of 2 to 5, while the backbone's features, which the probe reads, gain.
    results = pretrain_small(tmp_path, "pixpro", epochs=24,
                             backbone={"cifar_stem": True, "width": 0.25},
                             method_args={"proj_hidden_dim": 1024, "base_momentum": 0.9},
                             optim={"lr": 2.0, "warmup_epochs": 1},
                             eval={"after_training": ["knn", "linear"]})
    assert_lifts_accuracy(results, probe="linear")
