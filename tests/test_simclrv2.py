"""SimCLR v2 (Chen et al. 2020b), its three stages: pretraining with a 3-layer head and a memory
buffer of negatives, fine-tuning from the head's first layer, self-distillation into a student.

Losses against float64 transcriptions of the paper's equations (NT-Xent with buffered
negatives; the distillation loss, eq. 2), finite on degenerate inputs; distillation moves a
student toward its teacher; the three CLI stages end to end on a tiny folder of real images."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_finetune import sample, tiny_splits  # noqa: F401  (sample: a fixture)
from test_loss_zoo import _degenerate
from torch import nn

from selfsup.backbones import build_backbone
from selfsup.cli import main
from selfsup.config import read_yaml, resolve_config
from selfsup.data import DataSplits
from selfsup.errors import CheckpointError, ConfigError
from selfsup.evaluate import distill, load_classifier
from selfsup.evaluate.distill import agreement, predictions
from selfsup.evaluate.finetune import linear_classifier, train_classifier
from selfsup.losses import DistillationLoss, distillation, nt_xent
from selfsup.methods import Batch, MethodContext, build_method, method_hyperparameters

REL = 1e-10
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _random(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _tiny_backbone(feature_dim: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, feature_dim))


def _simclrv2(**hyper) -> nn.Module:
    torch.manual_seed(0)
    context = MethodContext(feature_dim=16, num_samples=64, num_classes=10, image_size=8)
    return build_method("simclrv2", _tiny_backbone(), context, hyper)


# ---- float64 transcriptions of the equations ---------------------------------------------------

def _unit(v):
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def _dot(u, v):
    return sum(float(a) * float(b) for a, b in zip(u, v))


def paper_nt_xent_with_memory(z1, z2, memory, t):
    """SimCLR eq. 1 over the 2N views, each anchor's denominator also summing exp(sim / t) over
    the K buffered negatives m_q (SimCLR v2, Section 2: the memory network's outputs)."""
    views = [_unit(v) for v in list(z1) + list(z2)]
    buffered = [_unit(m) for m in memory]
    n = len(z1)
    total = 0.0
    for i, z_i in enumerate(views):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(_dot(z_i, views[k]) / t) for k in range(2 * n) if k != i)
        denominator += sum(math.exp(_dot(z_i, m) / t) for m in buffered)
        total += -math.log(math.exp(_dot(z_i, views[positive]) / t) / denominator)
    return total / (2 * n)


def paper_distillation(student_logits, teacher_logits, t):
    """SimCLR v2 eq. 2: -sum_i sum_y P^T(y|x_i; t) log P^S(y|x_i; t), with
    P(y|x; t) = exp(f(x)[y] / t) / sum_y' exp(f(x)[y'] / t); here averaged over the x_i."""
    total = 0.0
    for student, teacher in zip(student_logits.tolist(), teacher_logits.tolist()):
        teacher_z = sum(math.exp(v / t) for v in teacher)
        student_z = sum(math.exp(v / t) for v in student)
        for y in range(len(teacher)):
            p_teacher = math.exp(teacher[y] / t) / teacher_z
            total -= p_teacher * math.log(math.exp(student[y] / t) / student_z)
    return total / len(student_logits)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_with_buffered_negatives_equals_the_equation_in_float64(temperature):
    z1, z2, memory = _random(5, 4, seed=1), _random(5, 4, seed=2), _random(7, 4, seed=3)
    loss = nt_xent(z1, z2, temperature, negative_keys=memory)
    assert loss.item() == pytest.approx(paper_nt_xent_with_memory(z1, z2, memory, temperature),
                                        rel=REL)
    # The buffer adds to every denominator: without it the loss is SimCLR's, and smaller.
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(
        paper_nt_xent_with_memory(z1, z2, [], temperature), rel=REL)
    assert nt_xent(z1, z2, temperature).item() < loss.item()


def test_nt_xent_buffered_negatives_get_no_gradient_and_gathering_alone_changes_nothing():
    z1, z2 = _random(4, 3, seed=4).requires_grad_(), _random(4, 3, seed=5)
    memory = _random(6, 3, seed=6).requires_grad_()
    loss = nt_xent(z1, z2, 0.2, negative_keys=memory)
    loss.backward()
    assert memory.grad is None and torch.isfinite(z1.grad).all()
    again = nt_xent(z1, z2, 0.2, gather_distributed=True, negative_keys=memory, block_size=2)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0])
def test_distillation_equals_eq_2_in_float64(temperature):
    student, teacher = _random(6, 5, seed=7), 3 * _random(6, 5, seed=8)
    assert distillation(student, teacher, temperature).item() == pytest.approx(
        paper_distillation(student, teacher, temperature), rel=REL)
    assert DistillationLoss(temperature)(student, teacher).item() == pytest.approx(
        paper_distillation(student, teacher, temperature), rel=REL)


def test_distillation_is_smallest_when_the_student_matches_the_teacher_and_teacher_is_fixed():
    teacher = _random(4, 6, seed=9).requires_grad_()
    student = teacher.detach().clone().requires_grad_()
    loss = distillation(student, teacher, 0.5)
    loss.backward()
    # At P^S = P^T the cross-entropy is the teacher's entropy, its minimum: zero gradient.
    assert torch.allclose(student.grad, torch.zeros_like(student.grad), atol=1e-12)
    assert teacher.grad is None
    assert distillation(student + _random(4, 6, seed=10), teacher, 0.5).item() > loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["identical", "zeros", "huge", "one_sample"])
def test_distillation_and_buffered_nt_xent_stay_finite_on_degenerate_inputs(case, dtype):
    logits = _degenerate(case, dtype).requires_grad_(True)
    loss = distillation(logits, logits.flip(0).roll(1, dims=1), 0.1)
    loss.backward()
    # Computed in float32 at least: t = 0.1 would magnify bf16's rounding ten-fold.
    assert loss.dtype == torch.float32 and torch.isfinite(loss).item()
    assert torch.isfinite(logits.grad).all().item()
    z = _degenerate(case, dtype).requires_grad_(True)
    loss = nt_xent(z, z.flip(0), 0.1, negative_keys=_degenerate(case, dtype) * 3)
    loss.backward()
    assert loss.dtype == dtype and torch.isfinite(loss).item()
    assert torch.isfinite(z.grad).all().item()


def test_distillation_rejects_a_bad_temperature_or_mismatched_logits():
    with pytest.raises(ValueError, match="temperature"):
        distillation(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        distillation(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- stage 1: the method -----------------------------------------------------------------------

def test_projection_head_has_three_layers_with_batch_norm_on_each():
    method = _simclrv2()
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    norms = [m for m in method.projector if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 16), (16, 16), (16, 128)]
    assert len(norms) == 3 and all(m.bias is None for m in linears)
    assert sum(isinstance(m, nn.ReLU) for m in method.projector) == 2


def test_fine_tuning_trains_the_backbone_and_exactly_the_first_head_layer():
    method = _simclrv2()
    encoder = method.finetune_encoder(0.1)
    first_linear, first_norm = method.projector[0], method.projector[1]
    expected = ({id(p) for p in method.backbone.parameters()}
                | {id(p) for p in (*first_linear.parameters(), *first_norm.parameters())})
    assert {id(p) for p in encoder.parameters()} == expected  # shares, does not copy
    # Its output: the first layer's Linear-BN-ReLU of the backbone features.
    method.eval()
    x = torch.randn(3, 3, 8, 8)
    hidden = F.relu(first_norm(first_linear(method.backbone(x))))
    assert torch.equal(encoder(x), hidden)
    # With all the labels the paper fine-tunes from the head's input (Section 4).
    assert method.finetune_encoder(1.0) is method.backbone
    # Every other method fine-tunes its backbone, through the same contract.
    simclr = build_method("simclr", _tiny_backbone(),
                          MethodContext(feature_dim=16, num_samples=64, num_classes=10,
                                        image_size=8), {})
    assert simclr.finetune_encoder(0.1) is simclr.backbone


def test_defaults_are_the_papers():
    hyper = method_hyperparameters("simclrv2")
    assert hyper == {"proj_hidden_dim": None, "proj_dim": 128, "temperature": 0.1,
                     "queue_size": 65536, "momentum": 0.999}
    from selfsup.methods import get_method_class
    assert get_method_class("simclrv2").default_optimizer == {
        "name": "lars", "lr": 1.6, "lr_scaling": "sqrt", "weight_decay": 1e-4,
        "warmup_epochs": 40}


def test_memory_buffer_receives_the_memory_networks_outputs_after_serving_as_negatives():
    method = _simclrv2(queue_size=8, momentum=0.9, temperature=0.2)
    before = method.queue.keys.clone()
    x1, x2 = torch.randn(2, 4, 3, 8, 8)
    with torch.no_grad():
        memory = F.normalize(method.memory_encoder(x2), dim=1)
    output = method.training_step(Batch([x1, x2], None, torch.arange(4), torch.Generator()))
    # The loss read the buffer as it was before the push.
    z1, z2 = output.embeddings
    assert output.loss.item() == pytest.approx(
        nt_xent(z1, z2, 0.2, negative_keys=before).item(), rel=1e-6)
    assert torch.allclose(method.queue.keys[:4], memory, atol=1e-6)
    assert torch.equal(method.queue.keys[4:], before[4:]) and int(method.queue.pointer) == 4
    # The memory network is a moving average of backbone + head, never trained by the loss.
    assert all(not p.requires_grad for p in method.memory_encoder.parameters())
    online = [p.detach().clone() for p in nn.Sequential(method.backbone,
                                                         method.projector).parameters()]
    lagging = [p.clone() for p in method.memory_encoder.parameters()]
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.on_after_optimizer_step(0.5)
    moved = list(method.memory_encoder.parameters())
    online = [p.detach() for p in nn.Sequential(method.backbone, method.projector).parameters()]
    for new, old, current in zip(moved, lagging, online):
        assert torch.allclose(new, 0.9 * old + 0.1 * current, atol=1e-6)


def test_queue_size_zero_turns_the_memory_off():
    method = _simclrv2(queue_size=0, temperature=0.2)
    assert method.memory_encoder is None and method.queue is None
    assert not any(k.startswith(("memory_encoder", "queue")) for k in method.state_dict())
    x1, x2 = torch.randn(2, 4, 3, 8, 8)
    output = method.training_step(Batch([x1, x2], None, torch.arange(4), torch.Generator()))
    z1, z2 = output.embeddings
    assert output.loss.item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), rel=1e-6)


def test_cifar10_config_resolves_to_simclrv2_with_a_cifar_sized_buffer():
    path = CONFIGS / "simclrv2_cifar10.yaml"
    config = resolve_config(read_yaml(path), origin=str(path))
    assert config.method == "simclrv2" and config.backbone.cifar_stem is True
    assert config.method_args["queue_size"] < 50_000


# ---- stage 3: distillation ---------------------------------------------------------------------

def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone("resnet18", cifar_stem=True, width=0.125)[0]


def test_distillation_moves_the_student_toward_the_teacher(sample):
    splits = tiny_splits(sample, train=20 / 405, val=0.1)
    info = splits.info
    teacher = train_classifier(_resnet(0), splits.train, info, lr=0.5, epochs=3, batch_size=50,
                               seed=0).eval()
    student_backbone = _resnet(1)
    untrained = linear_classifier(_resnet(1), info, torch.Generator().manual_seed(0)).eval()
    before = agreement(untrained, teacher, splits.test, info)
    teacher_classes = predictions(teacher, splits.test, info)
    most_frequent_share = teacher_classes.bincount().max().item() / len(teacher_classes)
    # 20 epochs of 5 steps at lr 0.4, measured on the 100 test images with one thread on an AMD
    # Zen 4: 0.00 -> 0.75 agreement (the teacher's most frequent class alone is 0.41 of them).
    # 6 epochs gave 0.47 with two threads (most frequent class 0.32) and 0.71 with one (0.63) on
    # Intel machines, but 0.34 on the AMD one, under its teacher's 0.41; 12 epochs gave 0.66 there.
    result = distill(teacher, student_backbone, splits, lrs=[0.4], epochs=20, batch_size=50,
                     seed=0, device="cpu")
    after = agreement(result.model, teacher, splits.test, info)
    assert result.test_agreement == pytest.approx(after)
    assert after >= before + 0.15, (before, after)
    # More than a student that always answers the teacher's most frequent class.
    assert after > most_frequent_share, (after, most_frequent_share)
    assert result.temperature == 0.1 and result.alpha == 1.0 and result.lr == 0.4
    # The student trained on a copy: the backbone handed in is still the random init.
    assert all(torch.equal(a, b) for a, b in zip(student_backbone.state_dict().values(),
                                                  _resnet(1).state_dict().values()))


def test_distillation_with_a_labelled_term_needs_the_labelled_subset(sample):
    splits = tiny_splits(sample, train=20 / 405, val=0.1)
    teacher = linear_classifier(_resnet(0), splits.info, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="alpha"):
        distill(teacher, _resnet(1), splits, alpha=0.5, lrs=[1.6], epochs=1)
    for bad in ({"alpha": 1.5}, {"temperature": 0.0}, {"lrs": []}, {"epochs": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            distill(teacher, _resnet(1), splits, **{"lrs": [1.6], "epochs": 1, **bad})


# ---- the three stages on the command line ------------------------------------------------------

def _image_folder(root: Path, sample: DataSplits, per_class: dict[str, int]) -> Path:
    """A folder dataset of real CIFAR images: root/{train,test}/<class>/<n>.png."""
    names = sample.info.class_names
    for split, count in per_class.items():
        dataset = getattr(sample, split)
        for cls, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for n, position in enumerate(np.flatnonzero(dataset.labels == cls)[:count]):
                image = dataset[int(position)][0].permute(1, 2, 0).numpy()
                Image.fromarray(image).save(root / split / name / f"{n}.png")
    return root


QUIET = ["--num-workers", "0", "--set", "eval.monitor_every_n_epochs=0",
         "--set", "train.progress_bar=false"]


def test_three_stages_on_the_command_line(sample, tmp_path, capsys):
    data = _image_folder(tmp_path / "images", sample, {"train": 16, "test": 5})
    run = tmp_path / "run"
    assert main(["train", "--method", "simclrv2", "--data", f"folder:{data}",
                 "--image-size", "32", "--width", "0.125", "--batch-size", "32",
                 "--max-steps", "2", "--out", str(run), "--no-eval",
                 "--set", "method_args.queue_size=64", *QUIET]) == 0
    checkpoint = run / "checkpoints" / "last.ckpt"
    teacher_file = tmp_path / "teacher.pt"
    capsys.readouterr()
    assert main(["eval", "finetune", "--checkpoint", str(checkpoint), "--labels", "50%",
                 "--set", "eval.finetune_epochs=1", "--set", "eval.finetune_lrs=[0.05]",
                 "--no-baseline", "--out", str(teacher_file), "--json"]) == 0
    finetuned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert finetuned["classifier"] == str(teacher_file)
    # The file is the fine-tuned classifier: backbone + the head's first layer + a linear head.
    teacher, record = load_classifier(teacher_file)
    assert record["encoder"] == {"kind": "finetune_encoder", "label_fraction": 0.5}
    assert isinstance(teacher[0][1][0], nn.Linear) and teacher[1].out_features == 10
    assert record["metrics"]["test_top1"] == finetuned["finetune_top1"]

    out = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(teacher_file), "--out", str(out), "--epochs", "1",
                 "--lrs", "1.6", "--json"]) == 0
    distilled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert distilled["teacher_top1"] == pytest.approx(finetuned["finetune_top1"])
    assert distilled["distill_temperature"] == 0.1  # same architecture: self-distillation
    assert distilled["distill_batch_size"] == 32  # the pretraining batch, as the paper
    for key in ("distill_top1", "distill_val_top1", "distill_agreement"):
        assert 0.0 <= distilled[key] <= 1.0
    assert json.loads((out / "results.json").read_text()) == distilled
    student, student_record = load_classifier(out / "student.pt")
    assert student_record["encoder"]["kind"] == "backbone"
    assert isinstance(student[0], type(teacher[0][0]))  # no projection-head layer

    # A second run into the same folder must be asked for.
    assert main(["distill", "--teacher", str(teacher_file), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # A training checkpoint is not a teacher: a one-line error naming the file.
    assert main(["distill", "--teacher", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(checkpoint) in error and "not a fine-tuned classifier" in error


def test_a_classifier_file_with_a_missing_or_wrong_key_is_an_error_naming_file_and_key(
        tmp_path):
    from selfsup.checkpoint import atomic_torch_save

    path = tmp_path / "teacher.pt"
    atomic_torch_save({"format": "something-else"}, path)
    with pytest.raises(CheckpointError, match=r"teacher\.pt.*'format'"):
        load_classifier(path)
    atomic_torch_save({"format": "selfsup-classifier", "encoder": {"kind": "backbone"}}, path)
    with pytest.raises(CheckpointError, match=r"teacher\.pt.*lacks key.*config"):
        load_classifier(path)


def test_only_finetune_writes_a_classifier(tmp_path, capsys):
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "none.ckpt"),
                 "--out", str(tmp_path / "c.pt")]) == 2
    assert "--out" in capsys.readouterr().err
