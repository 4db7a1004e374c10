"""The contrastive family's methods: MoCo v1, InstDisc (and its memory bank), InvaSpread (and its
loss, against a float64 transcription of the paper's equation), SupCon and its cross-entropy
baseline; their paper defaults and their CIFAR-10 configs."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import read_yaml, resolve_config
from selfsup.errors import ConfigError
from selfsup.losses import InvaSpreadLoss, info_nce, invaspread, memory_bank_softmax, nce, supcon
from selfsup.memory import MemoryBank
from selfsup.methods import Batch, MethodContext, build_method, method_hyperparameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _tiny_backbone(feature_dim: int = 16) -> nn.Module:
    # No BatchNorm: a sample's output does not depend on the rest of the batch.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, feature_dim))


def _context(num_samples: int = 64, num_classes: int = 10) -> MethodContext:
    return MethodContext(feature_dim=16, num_samples=num_samples, num_classes=num_classes,
                         image_size=8)


def _batch(views, labels=None, index=None, seed: int = 0) -> Batch:
    size = views[0].shape[0]
    index = torch.arange(size) if index is None else index
    return Batch(list(views), labels, index, torch.Generator().manual_seed(seed))


# ---- InvaSpread loss --------------------------------------------------------------------------

def _unit(v):
    norm = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / norm for x in v]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def paper_invaspread(f, f_hat, t):
    """Ye et al. 2019, eq. 2, 3 and 5, with both sums, divided by the batch size m:
    J = -sum_i log P(i|x̂_i) - sum_i sum_{j != i} log(1 - P(i|x_j))."""
    f = [_unit(v) for v in f]
    f_hat = [_unit(v) for v in f_hat]
    m = len(f)
    total = 0.0
    for i in range(m):
        denominator = sum(math.exp(_dot(f[k], f_hat[i]) / t) for k in range(m))
        total -= math.log(math.exp(_dot(f[i], f_hat[i]) / t) / denominator)
    for i in range(m):
        for j in range(m):
            if j == i:
                continue
            denominator = sum(math.exp(_dot(f[k], f[j]) / t) for k in range(m))
            total -= math.log(1.0 - math.exp(_dot(f[i], f[j]) / t) / denominator)
    return total / m


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_invaspread_equals_ye_et_al_equation_with_both_sums_in_float64(temperature):
    generator = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, dtype=torch.float64, generator=generator)
    f_hat = f + 0.3 * torch.randn(7, 5, dtype=torch.float64, generator=generator)
    expected = paper_invaspread(f.tolist(), f_hat.tolist(), temperature)
    assert invaspread(f, f_hat, temperature).item() == pytest.approx(expected, rel=1e-10)
    assert InvaSpreadLoss(temperature)(f, f_hat).item() == pytest.approx(expected, rel=1e-10)


def test_invaspread_gradient_passes_gradcheck():
    generator = torch.Generator().manual_seed(1)
    f = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    f_hat = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: invaspread(a, b, 0.1), (f, f_hat))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["identical", "zero", "huge"])
def test_invaspread_value_and_gradient_stay_finite_on_degenerate_embeddings(dtype, case):
    base = {"identical": torch.ones(6, 8), "zero": torch.zeros(6, 8),
            "huge": 1e30 * torch.randn(6, 8, generator=torch.Generator().manual_seed(2))}[case]
    f = base.clone().to(dtype).requires_grad_(True)
    f_hat = base.clone().to(dtype).requires_grad_(True)
    loss = invaspread(f, f_hat, 0.1)
    loss.backward()
    assert torch.isfinite(loss.float())
    assert torch.isfinite(f.grad.float()).all() and torch.isfinite(f_hat.grad.float()).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_invaspread_gradient_stays_finite_when_an_instance_is_classified_with_certainty(autocast):
    # Orthogonal features at t = 0.05: P(j | x_j) = e^20 / (e^20 + 7) is 1 in float32, so the
    # left-out diagonal of the spreading term meets log(1 - 1). A bf16 training run hit the same
    # (with P rounded to 1 in bf16) and its gradient turned NaN.
    f = torch.eye(8, 16).requires_grad_(True)
    f_hat = (torch.eye(8, 16) + 0.1 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
             ).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = invaspread(f, f_hat, 0.05)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(f.grad).all() and torch.isfinite(f_hat.grad).all()


def test_invaspread_rejects_features_of_different_shapes():
    with pytest.raises(ValueError, match="must both be"):
        invaspread(torch.randn(4, 3), torch.randn(5, 3))


def test_invaspread_method_uses_a_linear_head_and_the_loss_on_both_normalised_views():
    torch.manual_seed(0)
    method = build_method("invaspread", _tiny_backbone(), _context(), {})
    assert isinstance(method.projector, nn.Linear) and method.projector.out_features == 128
    assert method.temperature == 0.1 and method.views == "moco_v1"
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    output = method.training_step(_batch([x1, x2]))
    f = F.normalize(method.projector(method.backbone(x1)), dim=1)
    f_hat = F.normalize(method.projector(method.backbone(x2)), dim=1)
    assert output.loss.item() == pytest.approx(invaspread(f, f_hat, 0.1).item(), rel=1e-5)
    assert output.features.shape == (6, 16) and len(output.embeddings) == 2


# ---- MoCo v1 ----------------------------------------------------------------------------------

def test_mocov1_has_a_linear_head_and_the_v1_defaults():
    assert method_hyperparameters("mocov1") == {"proj_dim": 128, "queue_size": 4096,
                                                "momentum": 0.999, "temperature": 0.07,
                                                "bn_splits": 8}
    moco = build_method("mocov1", _tiny_backbone(), _context(), {})
    assert isinstance(moco.projector, nn.Linear)
    assert (moco.projector.in_features, moco.projector.out_features) == (16, 128)
    assert isinstance(moco.momentum_encoder.module[1], nn.Linear)
    assert (moco.momentum, moco.temperature, moco.queue.size) == (0.999, 0.07, 4096)
    assert moco.views == "moco_v1"
    with pytest.raises(ConfigError, match="proj_hidden_dim"):
        build_method("mocov1", _tiny_backbone(), _context(), {"proj_hidden_dim": 64})


def test_mocov1_step_is_info_nce_of_linear_projections_against_the_queue():
    torch.manual_seed(3)
    moco = build_method("mocov1", _tiny_backbone(), _context(), {"queue_size": 8})
    queue = moco.queue.keys.clone()
    x_q, x_k = torch.randn(2, 4, 3, 8, 8)
    output = moco.training_step(_batch([x_q, x_k]))
    q = moco.projector(moco.backbone(x_q))
    k = moco.momentum_encoder(x_k)
    expected = info_nce(q, k, negative_keys=queue, temperature=0.07)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- InstDisc and its memory bank -------------------------------------------------------------

def test_memory_bank_first_write_replaces_the_random_start_and_later_writes_mix():
    bank = MemoryBank(10, 4)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(10))
    assert not bank.written.any()
    before = bank.features.clone()
    index = torch.tensor([2, 7])
    first = torch.randn(2, 4)
    bank.update(index, first, momentum=0.5)
    assert torch.allclose(bank.features[index], F.normalize(first, dim=1), atol=1e-6)
    assert bank.is_written(torch.tensor([2, 3, 7])).tolist() == [True, False, True]
    # A later write mixes with momentum; a row written for the first time in the same call
    # (here 3) is replaced.
    again = torch.tensor([7, 3])
    second = torch.randn(2, 4)
    bank.update(again, second, momentum=0.5)
    assert torch.allclose(bank.features[7],
                          F.normalize(0.5 * F.normalize(first[1], dim=0) + 0.5 * second[0],
                                      dim=0), atol=1e-6)
    assert torch.allclose(bank.features[3], F.normalize(second[1], dim=0), atol=1e-6)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[[2, 3, 7]] = False
    assert torch.equal(bank.features[untouched], before[untouched])


def _instdisc(**arguments):
    torch.manual_seed(4)
    values = {"num_noise": 16, **arguments}
    return build_method("instdisc", _tiny_backbone(), _context(num_samples=32), values)


def test_instdisc_bank_takes_the_first_visit_then_half_momentum_at_the_batch_indices_only():
    method = _instdisc()
    before = method.memory_bank.features.clone()
    index = torch.tensor([3, 9, 17, 30])
    for step in range(2):
        x = torch.randn(4, 3, 8, 8)
        stored = method.memory_bank.features[index].clone()
        output = method.training_step(_batch([x], index=index, seed=step))
        f = F.normalize(method.projector(method.backbone(x)), dim=1).detach()
        assert torch.allclose(output.embeddings[0], f, atol=1e-6)
        # The first visit replaces the random start, later ones keep half of the entry.
        expected = f if step == 0 else F.normalize(0.5 * stored + 0.5 * f, dim=1)
        assert torch.allclose(method.memory_bank.features[index], expected, atol=1e-6)
    others = torch.ones(32, dtype=torch.bool)
    others[index] = False
    assert torch.equal(method.memory_bank.features[others], before[others])


def test_instdisc_nce_loss_is_the_papers_with_z_estimated_once_from_the_first_noise():
    method = _instdisc(proximal_weight=0.0)
    assert method.normalizer.item() == 0.0
    n, m, t = 32, 16, 0.07
    normalizer = None
    for step in range(2):
        x = torch.randn(4, 3, 8, 8)
        index = torch.arange(4) + 4 * step
        bank = method.memory_bank.features.clone()
        output = method.training_step(_batch([x], index=index, seed=step))
        # The noise indices: M uniform draws from the step's generator.
        noise = torch.randint(n, (m,), generator=torch.Generator().manual_seed(step))
        f = F.normalize(method.projector(method.backbone(x)), dim=1)
        logits = torch.cat([(f * bank[index]).sum(1, keepdim=True), f @ bank[noise].T], 1) / t
        if normalizer is None:  # Wu et al.: Z ~ n/m sum_j exp(v_j·f/t), on the first batch only
            normalizer = (logits[:, 1:].exp().mean() * n).item()
        assert method.normalizer.item() == pytest.approx(normalizer, rel=1e-6)
        expected = nce(logits.exp() / normalizer, 1.0 / n, m)
        assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_instdisc_noise_is_drawn_reproducibly_from_the_batch_generator():
    x = torch.randn(4, 3, 8, 8)
    losses = []
    for seed in (0, 0, 1):
        method = _instdisc()
        losses.append(method.training_step(_batch([x], seed=seed)).loss.item())
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_instdisc_proximal_term_is_lambda_times_the_squared_distance_to_the_previous_visit():
    x = torch.randn(4, 3, 8, 8)
    index = torch.tensor([0, 1, 2, 3])
    methods = {weight: _instdisc(proximal_weight=weight) for weight in (0.0, 30.0)}
    # First visit: the entries are still their random start, so there is nothing to stay near.
    first = methods[30.0].training_step(_batch([x], index=index))
    assert first.logs["proximal"].item() == 0.0
    methods[0.0].training_step(_batch([x], index=index))
    # Second visit of samples 0 and 1 (2 and 3 are new): the term is over the revisited ones,
    # averaged over the batch.
    index, y = torch.tensor([0, 1, 8, 9]), torch.randn(4, 3, 8, 8)
    far = F.normalize(torch.randn(2, 128), dim=1)  # entries far from this step's features
    for method in methods.values():
        method.memory_bank.features[:2] = far
    bank = methods[30.0].memory_bank.features.clone()
    base = methods[0.0].training_step(_batch([y], index=index, seed=1)).loss
    output = methods[30.0].training_step(_batch([y], index=index, seed=1))
    f = output.embeddings[0]
    distance = (f - bank[index]).pow(2).sum(1)
    proximal = (distance * torch.tensor([1.0, 1.0, 0.0, 0.0])).mean()
    assert proximal.item() > 0.1
    assert output.loss.item() == pytest.approx((base + 30.0 * proximal).item(), rel=1e-5)
    assert output.logs["proximal"].item() == pytest.approx(proximal.item(), rel=1e-6)


def test_instdisc_softmax_objective_is_the_non_parametric_softmax_over_the_whole_bank():
    method = _instdisc(objective="softmax", proximal_weight=0.0)
    bank = method.memory_bank.features.clone()
    x = torch.randn(4, 3, 8, 8)
    index = torch.tensor([5, 6, 7, 8])
    output = method.training_step(_batch([x], index=index))
    f = F.normalize(method.projector(method.backbone(x)), dim=1)
    expected = memory_bank_softmax(f @ bank.T, index, 0.07)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_instdisc_bank_and_z_are_in_state_dict_and_restore_exactly():
    method = _instdisc()
    method.training_step(_batch([torch.randn(4, 3, 8, 8)]))
    state = method.state_dict()
    assert "memory_bank.features" in state and "normalizer" in state
    assert state["memory_bank.features"].shape == (32, 128) and state["normalizer"].item() > 0
    restored = _instdisc()
    restored.load_state_dict(state)
    assert torch.equal(restored.memory_bank.features, method.memory_bank.features)
    assert restored.normalizer.item() == method.normalizer.item()


def test_instdisc_defaults_are_the_papers_and_knn_reads_the_bank():
    assert method_hyperparameters("instdisc") == {
        "objective": "nce", "proj_dim": 128, "num_noise": 4096, "temperature": 0.07,
        "bank_momentum": 0.5, "proximal_weight": 30.0}
    method = build_method("instdisc", _tiny_backbone(), _context(num_samples=50), {})
    assert method.num_views == 1 and isinstance(method.projector, nn.Linear)
    bank, encoder = method.knn_bank()
    assert bank is method.memory_bank.features and bank.shape == (50, 128)
    x = torch.randn(4, 3, 8, 8)
    method.eval()
    expected = F.normalize(method.projector(method.backbone(x)), dim=1)
    assert torch.allclose(encoder(x), expected, atol=1e-6)


def test_knn_against_a_bank_equals_knn_against_the_same_features_encoded_again():
    """A bank that holds exactly the encoder's features of the training split, row i for sample
    i, must give the kNN top-1 of re-encoding the split: rows and labels line up."""
    from selfsup.config import EvalConfig
    from selfsup.data import load_data
    from selfsup.evaluate import evaluate_knn_bank, extract_features, knn_top1

    splits = load_data("cifar10-sample", val_fraction=0.5)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                            nn.Flatten())
    config = EvalConfig(knn_k=20)
    train_features, train_labels = extract_features(encoder, splits.train, splits.info)
    test_features, test_labels = extract_features(encoder, splits.test, splits.info)
    expected = knn_top1(train_features, train_labels, test_features, test_labels, 10, 20,
                        config.knn_temperature)
    results = evaluate_knn_bank(train_features, encoder, splits, config)
    assert results["knn_bank_top1"] == expected
    shuffled = train_features[torch.randperm(len(train_features))]
    assert evaluate_knn_bank(shuffled, encoder, splits, config)["knn_bank_top1"] < expected - 0.05
    with pytest.raises(ValueError, match="rows for"):
        evaluate_knn_bank(train_features[:10], encoder, splits, config)


# ---- SupCon and the cross-entropy baseline ----------------------------------------------------

def _supcon_step(labels, views=2, seed=5):
    torch.manual_seed(seed)
    method = build_method("supcon", _tiny_backbone(), _context(), {"num_views": views})
    x = torch.randn(views, 6, 3, 8, 8)
    output = method.training_step(_batch(list(x), labels=labels, index=torch.arange(10, 16)))
    z = torch.stack([F.normalize(method.projector(method.backbone(v)), dim=1) for v in x], dim=1)
    return output, z


def test_supcon_treats_two_samples_of_one_class_as_positives():
    labels = torch.tensor([0, 0, 1, 2, 3, 4])  # samples 0 and 1 share a class
    output, z = _supcon_step(labels)
    assert output.loss.item() == pytest.approx(supcon(z, labels, 0.1).item(), rel=1e-5)
    # The labels are used: without them sample 1 is a negative of sample 0, and the loss differs.
    assert abs(output.loss.item() - supcon(z, None, 0.1).item()) > 1e-4


def test_supcon_unlabelled_samples_have_only_their_own_views_as_positives():
    labels = torch.tensor([0, -1, 0, -1, 1, 1])
    output, z = _supcon_step(labels)
    own_class = torch.tensor([0, 100, 0, 101, 1, 1])
    assert output.loss.item() == pytest.approx(supcon(z, own_class, 0.1).item(), rel=1e-5)
    unlabelled, _ = _supcon_step(torch.full((6,), -1))
    assert unlabelled.loss.item() == pytest.approx(supcon(z, None, 0.1).item(), rel=1e-5)


def test_supcon_trains_on_as_many_views_as_asked():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    output, z = _supcon_step(labels, views=3)
    assert z.shape[1] == 3 and len(output.embeddings) == 3
    assert output.loss.item() == pytest.approx(supcon(z, labels, 0.1).item(), rel=1e-5)


def test_supcon_defaults_follow_the_supcontrast_reference():
    method = build_method("supcon", _tiny_backbone(), _context(), {})
    assert (method.num_views, method.temperature, method.base_temperature) == (2, 0.1, None)
    linear = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(16, 16), (16, 128)]
    assert method.views == "supcon"


def test_supervised_loss_is_cross_entropy_of_a_linear_classifier_on_labelled_samples():
    torch.manual_seed(6)
    method = build_method("supervised", _tiny_backbone(), _context(), {})
    assert method.num_views == 1 and isinstance(method.classifier, nn.Linear)
    x = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([3, -1, 0, 9, -1, 3])
    output = method.training_step(_batch([x], labels=labels))
    logits = method.classifier(method.backbone(x))
    labelled = labels >= 0
    expected = F.cross_entropy(logits[labelled], labels[labelled])
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    nothing = method.training_step(_batch([x], labels=torch.full((6,), -1)))
    nothing.loss.backward()
    assert nothing.loss.item() == 0.0


def test_supervised_needs_labelled_data():
    with pytest.raises(ConfigError, match="labelled"):
        build_method("supervised", _tiny_backbone(), _context(num_classes=0), {})


# ---- recipes and configs ----------------------------------------------------------------------

def test_supcon_recipe_is_the_supcontrast_cifar_pipeline():
    from selfsup.augment import build_view_generator
    from selfsup.augment.ops import (ColorJitter, HorizontalFlip, Normalize, RandomGrayscale,
                                     RandomResizedCrop)

    ops = build_view_generator("supcon", 32, (0.5,) * 3, (0.5,) * 3).pipelines[0].ops
    assert [type(op) for op in ops] == [RandomResizedCrop, HorizontalFlip, ColorJitter,
                                        RandomGrayscale, Normalize]
    assert ops[0] == RandomResizedCrop(32, scale=(0.2, 1.0))
    assert ops[2] == ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)


@pytest.mark.parametrize("method", ["mocov1", "supcon", "supervised", "invaspread", "instdisc"])
def test_cifar10_config_resolves_to_the_method(method):
    path = CONFIGS / f"{method}_cifar10.yaml"
    config = resolve_config(read_yaml(path), origin=str(path))
    assert config.method == method
    assert config.backbone.cifar_stem is True


def test_trainer_reports_knn_from_instdiscs_memory_bank_beside_the_shared_protocol(tmp_path):
    from selfsup.train import train

    results = train(resolve_config({
        "method": "instdisc", "method_args": {"num_noise": 64},
        "data": {"source": "cifar10-sample", "num_workers": 0, "val_fraction": 0.9},
        "backbone": {"name": "resnet18", "width": 0.125},
        "train": {"max_steps": 3, "batch_size": 32, "out": str(tmp_path), "progress_bar": False},
        "eval": {"monitor_every_n_epochs": 0, "after_training": ["knn"], "knn_k": 20}}))
    for key in ("knn_bank_top1", "knn_bank_val_top1", "knn_top1"):
        assert 0.0 <= results[key] <= 1.0, results
    assert "knn_bank_top1_random_init" not in results  # a random-init network has no bank
