"""ViT backbones, MoCo v3 and SwAV: the losses against float64 transcriptions of the papers'
pseudocode (explicit loops, not our implementation), and what each method freezes, schedules,
queues and keeps."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones import backbone_names, build_backbone
from selfsup.errors import ConfigError
from selfsup.losses import SwAVLoss, sinkhorn, swav
from selfsup.methods import Batch, MethodContext, build_method, get_method_class
from selfsup.methods import method_hyperparameters

REL = 1e-10


def _random(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _unit_rows(*shape, seed):
    return F.normalize(_random(*shape, seed=seed), dim=-1)


# ---- float64 transcriptions --------------------------------------------------------------------

def paper_sinkhorn(scores, epsilon, iterations):
    """SwAV, Appendix A.1 pseudocode (the reference's ``sinkhorn``), in Python floats:
    Q = exp(scores / eps)^T (K x B); Q /= sum(Q); repeat: rows to 1/K, columns to 1/B;
    finally each column (sample) rescaled to sum to 1; returned B x K."""
    b, k = scores.shape
    q = [[math.exp(float(scores[j, i]) / epsilon) for j in range(b)] for i in range(k)]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for i in range(k):
            row_sum = sum(q[i])
            q[i] = [x / row_sum / k for x in q[i]]
        for j in range(b):
            col_sum = sum(q[i][j] for i in range(k))
            for i in range(k):
                q[i][j] = q[i][j] / col_sum / b
    return [[q[i][j] * b for i in range(k)] for j in range(b)]


def paper_swav_loss(scores, temperature, epsilon, iterations, code_views, extra=None):
    """SwAV eq. 1-2 with the reference's averaging: for each code view s, its codes (Sinkhorn over
    [queued scores; batch scores], batch rows kept), predicted from every other view t:
    -sum_k q_s log softmax(z_t c / T); mean over samples, over t, over s."""
    b = scores[0].shape[0]
    total = 0.0
    for s in range(code_views):
        problem = scores[s] if extra is None else torch.cat([extra[s], scores[s]])
        codes = paper_sinkhorn(problem, epsilon, iterations)[-b:]
        others = [t for t in range(len(scores)) if t != s]
        sub = 0.0
        for t in others:
            for n in range(b):
                logits = [float(x) / temperature for x in scores[t][n]]
                log_z = math.log(sum(math.exp(x) for x in logits))
                sub -= sum(c * (x - log_z) for c, x in zip(codes[n], logits)) / b
        total += sub / len(others)
    return total / code_views


def paper_mocov3_loss(q1, q2, k1, k2, tau):
    """MoCo v3 Algorithm 1: ctr(q, k) = CrossEntropy(q k^T / t, arange(N)) * 2t on normalised
    vectors; loss = ctr(q1, k2) + ctr(q2, k1)."""

    def ctr(q, k):
        n = q.shape[0]
        q = [[float(x) / math.sqrt(sum(float(y) ** 2 for y in row)) for x in row] for row in q]
        k = [[float(x) / math.sqrt(sum(float(y) ** 2 for y in row)) for x in row] for row in k]
        loss = 0.0
        for i in range(n):
            logits = [sum(a * b for a, b in zip(q[i], k[j])) / tau for j in range(n)]
            loss += math.log(sum(math.exp(x) for x in logits)) - logits[i]
        return loss / n * 2 * tau

    return ctr(q1, k2) + ctr(q2, k1)


# ---- ViT backbones -----------------------------------------------------------------------------

def test_vit_backbones_are_listed_and_return_the_cls_token_features():
    assert {"vit_tiny", "vit_small", "vit_base"} <= set(backbone_names())
    for name, width in (("vit_tiny", 192), ("vit_small", 384)):
        model, dim = build_backbone(name, cifar_stem=True, width=0.125)
        assert dim == width // 8
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, dim)


def test_vit_small_16_at_224_has_the_papers_21_7_million_parameters():
    model, dim = build_backbone("vit_small")
    count = sum(p.numel() for p in model.parameters())
    assert dim == 384 and model.patch_size == 16 and model.image_size == 224
    assert count == pytest.approx(21.7e6, rel=0.005)
    timm = pytest.importorskip("timm")
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    assert count == sum(p.numel() for p in reference.parameters())


def test_vit_with_cifar_stem_cuts_32_px_images_into_64_patches_of_4_px():
    model, dim = build_backbone("vit_small", cifar_stem=True, width=0.125)
    assert model.conv_proj.kernel_size == (4, 4) and model.conv_proj.stride == (4, 4)
    assert model.encoder.pos_embedding.shape == (1, 1 + 64, dim)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_vit_resizes_its_position_embedding_for_smaller_crops_and_rejects_partial_patches():
    model, dim = build_backbone("vit_tiny", cifar_stem=True, width=0.125)
    assert model.position_embedding(4, 4).shape == (1, 17, dim)
    assert torch.equal(model.position_embedding(8, 8), model.encoder.pos_embedding)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, dim)  # a multi-crop local crop
    with pytest.raises(ConfigError, match="multiples of 4"):
        model(torch.randn(2, 3, 30, 30))


# ---- Sinkhorn and the SwAV loss ----------------------------------------------------------------

@pytest.mark.parametrize("batch, prototypes, epsilon, iterations",
                         [(6, 4, 0.05, 3), (5, 7, 0.5, 3), (4, 3, 0.1, 10)])
def test_sinkhorn_equals_the_swav_pseudocode_in_float64(batch, prototypes, epsilon, iterations):
    scores = _unit_rows(batch, 5, seed=0) @ _unit_rows(prototypes, 5, seed=1).T
    expected = paper_sinkhorn(scores, epsilon, iterations)
    codes = sinkhorn(scores, epsilon=epsilon, iterations=iterations)
    assert codes.shape == (batch, prototypes) and codes.dtype == torch.float64
    assert torch.allclose(codes, torch.tensor(expected, dtype=torch.float64), rtol=REL, atol=0)


def test_sinkhorn_codes_are_assignments_and_converge_to_an_equal_partition():
    scores = _unit_rows(12, 6, seed=2) @ _unit_rows(4, 6, seed=3).T
    codes = sinkhorn(scores)  # the defaults: eps 0.05, 3 iterations
    assert torch.allclose(codes.sum(dim=1), torch.ones(12, dtype=torch.float64), rtol=1e-12)
    # The column step is the last one, so rows are exact; the prototype marginals B/K are what
    # the iterations approach.
    converged = sinkhorn(scores, epsilon=0.5, iterations=200)
    assert torch.allclose(converged.sum(dim=0), torch.full((4,), 12 / 4, dtype=torch.float64),
                          rtol=1e-8)


def test_sinkhorn_defaults_are_the_papers_and_small_epsilon_stays_finite():
    scores = _unit_rows(8, 4, seed=4) @ _unit_rows(5, 4, seed=5).T
    assert torch.equal(sinkhorn(scores), sinkhorn(scores, epsilon=0.05, iterations=3))
    # exp(1 / 1e-3) overflows float64; the shift by the maximum keeps the codes finite.
    codes = sinkhorn(scores, epsilon=1e-3)
    assert torch.isfinite(codes).all()
    assert torch.allclose(codes.sum(dim=1), torch.ones(8, dtype=torch.float64))


def test_sinkhorn_runs_in_float32_on_bfloat16_scores():
    scores = (_unit_rows(8, 4, seed=6) @ _unit_rows(5, 4, seed=7).T).bfloat16()
    codes = sinkhorn(scores)
    assert codes.dtype == torch.float32
    assert torch.allclose(codes, sinkhorn(scores.float()))


@pytest.mark.parametrize("views", [2, 4])
def test_swav_loss_equals_the_swapped_prediction_equation_in_float64(views):
    prototypes = _unit_rows(5, 6, seed=8)
    scores = [_unit_rows(4, 6, seed=10 + v) @ prototypes.T for v in range(views)]
    expected = paper_swav_loss(scores, 0.1, 0.05, 3, code_views=2)
    assert swav(scores).item() == pytest.approx(expected, rel=REL)
    assert SwAVLoss()(scores).item() == pytest.approx(expected, rel=REL)


def test_swav_loss_with_queued_scores_equals_the_equation_on_the_enlarged_problem():
    prototypes = _unit_rows(5, 6, seed=20)
    scores = [_unit_rows(3, 6, seed=21 + v) @ prototypes.T for v in range(3)]
    queued = [_unit_rows(7, 6, seed=30 + v) @ prototypes.T for v in range(2)]
    expected = paper_swav_loss(scores, 0.2, 0.1, 3, code_views=2, extra=queued)
    loss = swav(scores, temperature=0.2, epsilon=0.1, extra_code_scores=queued)
    assert loss.item() == pytest.approx(expected, rel=REL)
    assert loss.item() != pytest.approx(swav(scores, temperature=0.2, epsilon=0.1).item(),
                                        rel=1e-6)


def test_swav_codes_carry_no_gradient_only_the_predictions_do():
    prototypes = _unit_rows(5, 6, seed=40)
    z = [_unit_rows(4, 6, seed=41 + v).requires_grad_() for v in range(2)]
    # With a single code view, view 1 only predicts: its scores get a gradient, and view 0's
    # scores only feed Sinkhorn, which is outside the graph.
    swav([zv @ prototypes.T for zv in z], num_code_views=1).backward()
    assert z[0].grad is None or torch.count_nonzero(z[0].grad) == 0
    assert torch.count_nonzero(z[1].grad) > 0


def test_swav_gather_in_one_process_changes_nothing_and_bad_views_are_errors():
    scores = [_random(4, 5, seed=50 + v) for v in range(2)]
    assert swav(scores, gather_distributed=True).item() == pytest.approx(swav(scores).item(),
                                                                         rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 views"):
        swav(scores[:1])
    with pytest.raises(ValueError, match="num_code_views"):
        swav(scores, num_code_views=3)


# ---- MoCo v3 -----------------------------------------------------------------------------------

def _conv_backbone(feature_dim: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, feature_dim))


def _context(feature_dim: int = 16, image_size: int = 8) -> MethodContext:
    return MethodContext(feature_dim=feature_dim, num_samples=64, num_classes=10,
                         image_size=image_size)


def _batch(views, epoch=0.0):
    return Batch(list(views), None, torch.arange(views[0].shape[0]), torch.Generator(), epoch)


SMALL_MOCOV3 = {"proj_hidden_dim": 32, "proj_dim": 8, "pred_hidden_dim": 32}


def _mocov3(backbone=None, feature_dim=16, **overrides):
    torch.manual_seed(0)
    return build_method("mocov3", backbone or _conv_backbone(feature_dim),
                        _context(feature_dim, 32), {**SMALL_MOCOV3, **overrides})


def _tiny_vit():
    return build_backbone("vit_tiny", cifar_stem=True, width=0.125)


def test_mocov3_defaults_are_the_papers():
    assert method_hyperparameters("mocov3") == {
        "proj_hidden_dim": 4096, "proj_dim": 256, "proj_layers": 3, "pred_hidden_dim": 4096,
        "base_momentum": 0.99, "temperature": None, "freeze_patch_embed": None}
    assert get_method_class("mocov3").default_optimizer == {
        "name": "lars", "lr": 0.6, "lr_scaling": "linear", "weight_decay": 1e-6,
        "warmup_epochs": 10}
    assert get_method_class("mocov3").views == "byol"


def test_mocov3_temperature_and_patch_freeze_follow_the_backbone():
    resnet = _mocov3()
    assert resnet.temperature == 1.0 and resnet.freeze_patch_embed is False
    vit, dim = _tiny_vit()
    on_vit = _mocov3(vit, dim)
    assert on_vit.temperature == 0.2 and on_vit.freeze_patch_embed is True
    assert _mocov3(temperature=0.5).temperature == 0.5
    with pytest.raises(ConfigError, match="method_args.freeze_patch_embed"):
        _mocov3(freeze_patch_embed=True)


def test_mocov3_heads_are_3_and_2_layer_mlps_with_bn_and_an_affine_free_output_bn():
    mocov3 = _mocov3()
    linears = [m for m in mocov3.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert [m.out_features for m in linears] == [32, 32, 8]
    output_bn = mocov3.projector[-1]
    assert isinstance(output_bn, nn.BatchNorm1d) and not output_bn.affine
    predictor_linears = [m for m in mocov3.predictor if isinstance(m, nn.Linear)]
    assert len(predictor_linears) == 2 and not mocov3.predictor[-1].affine
    assert len([m for m in _mocov3(proj_layers=2).projector if isinstance(m, nn.Linear)]) == 2


@pytest.mark.parametrize("temperature", [None, 0.2])
def test_mocov3_loss_equals_algorithm_1_in_float64(temperature):
    mocov3 = _mocov3(temperature=temperature).double()
    with torch.no_grad():  # the momentum network has moved away from the online one
        for p in mocov3.momentum_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = _random(2, 6, 3, 8, 8, seed=60)
    loss = mocov3.training_step(_batch([x1, x2])).loss
    with torch.no_grad():
        q1 = mocov3.predictor(mocov3.projector(mocov3.backbone(x1)))
        q2 = mocov3.predictor(mocov3.projector(mocov3.backbone(x2)))
        k1, k2 = mocov3.momentum_encoder(x1), mocov3.momentum_encoder(x2)
    expected = paper_mocov3_loss(q1, q2, k1, k2, mocov3.temperature)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_mocov3_keys_get_no_gradient_and_the_online_network_does():
    mocov3 = _mocov3()
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    mocov3.training_step(_batch([x1, x2])).loss.backward()
    assert all(p.grad is None and not p.requires_grad
               for p in mocov3.momentum_encoder.parameters())
    for module in (mocov3.backbone, mocov3.projector, mocov3.predictor):
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("progress, momentum", [(0.0, 0.99), (0.5, 0.995), (1.0, 1.0)])
def test_mocov3_momentum_rises_from_0_99_to_1_on_a_half_cosine(progress, momentum):
    mocov3 = _mocov3()
    with torch.no_grad():
        for p in mocov3.online_encoder().parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mocov3.momentum_encoder.parameters()]
    online = list(mocov3.online_encoder().parameters())
    mocov3.on_after_optimizer_step(progress)
    # The reference's adjust_moco_momentum: m = 1 - (1 + cos(pi t / T)) / 2 * (1 - m0).
    assert mocov3.momentum == pytest.approx(1 - (1 + math.cos(math.pi * progress)) / 2 * 0.01)
    assert mocov3.momentum == pytest.approx(momentum)
    for key, old, query in zip(mocov3.momentum_encoder.parameters(), before, online):
        assert torch.allclose(key, momentum * old + (1 - momentum) * query, atol=1e-6)


def test_mocov3_random_patch_projection_stays_at_its_initialisation():
    vit, dim = _tiny_vit()
    mocov3 = _mocov3(vit, dim)
    projection = mocov3.backbone.conv_proj
    initial = [p.clone() for p in projection.parameters()]
    trainable = {id(p) for p in mocov3.trainable_parameters()}
    assert not any(id(p) in trainable for p in projection.parameters())
    blocks_before = mocov3.backbone.encoder.layers[0].mlp[0].weight.clone()
    optimizer = torch.optim.AdamW(mocov3.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        x1, x2 = torch.randn(2, 4, 3, 32, 32)
        mocov3.training_step(_batch([x1, x2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mocov3.on_after_optimizer_step(step / 2)
    assert all(torch.equal(p, q) for p, q in zip(projection.parameters(), initial))
    assert not torch.equal(mocov3.backbone.encoder.layers[0].mlp[0].weight, blocks_before)
    # The momentum copy of a frozen layer stays equal to it (an EMA of a constant), to rounding.
    assert torch.allclose(mocov3.momentum_encoder.module[0].conv_proj.weight, projection.weight,
                          rtol=1e-6, atol=1e-7)


def test_mocov3_patch_projection_trains_when_not_frozen():
    vit, dim = _tiny_vit()
    mocov3 = _mocov3(vit, dim, freeze_patch_embed=False)
    x1, x2 = torch.randn(2, 4, 3, 32, 32)
    mocov3.training_step(_batch([x1, x2])).loss.backward()
    assert mocov3.backbone.conv_proj.weight.grad is not None


# ---- SwAV --------------------------------------------------------------------------------------

SMALL_SWAV = {"proj_hidden_dim": 32, "proj_dim": 8, "num_prototypes": 10, "queue_size": 12,
              "queue_start_epoch": 2.0}


def _swav(**overrides):
    torch.manual_seed(0)
    return build_method("swav", _conv_backbone(), _context(), {**SMALL_SWAV, **overrides})


def test_swav_defaults_are_the_papers():
    assert method_hyperparameters("swav") == {
        "proj_hidden_dim": 2048, "proj_dim": 128, "num_prototypes": 3000, "num_local_crops": 6,
        "temperature": 0.1,
        "epsilon": 0.05, "sinkhorn_iterations": 3, "queue_size": 3840,
        "queue_start_epoch": 15.0, "freeze_prototypes_epochs": 1.0}
    assert get_method_class("swav").default_optimizer == {
        "name": "lars", "lr": 0.6, "lr_scaling": "linear", "weight_decay": 1e-6,
        "warmup_epochs": 0}
    assert get_method_class("swav").views == "swav"
    assert _swav().num_views == 8 and _swav(num_local_crops=0).num_views == 2


def test_swav_step_normalises_the_prototypes_and_matches_the_loss_on_its_own_scores():
    swav_method = _swav().double()
    with torch.no_grad():
        swav_method.prototypes.weight.mul_(3.0)
    views = list(_random(4, 6, 3, 8, 8, seed=70))
    output = swav_method.training_step(_batch(views))
    weight = swav_method.prototypes.weight.detach()
    assert torch.allclose(weight.norm(dim=1), torch.ones(10, dtype=torch.float64))
    with torch.no_grad():
        z = F.normalize(swav_method.projector(swav_method.backbone(torch.cat(views))), dim=1)
    scores = [zv @ weight.T for zv in z.split(6)]
    # One backbone pass over all four equal-size views, as the reference batches a resolution.
    assert output.loss.item() == pytest.approx(paper_swav_loss(scores, 0.1, 0.05, 3, 2),
                                               rel=1e-9)
    assert len(output.embeddings) == 2 and output.features.shape == (6, 16)


def test_swav_accepts_multi_crop_views_of_two_sizes():
    swav_method = _swav()
    views = list(torch.randn(2, 5, 3, 8, 8)) + list(torch.randn(3, 5, 3, 4, 4))
    output = swav_method.training_step(_batch(views))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert swav_method.prototypes.weight.grad is not None


def _train_step(method, optimizer, views, epoch):
    optimizer.zero_grad(set_to_none=True)
    method.training_step(_batch(views, epoch)).loss.backward()
    method.on_before_optimizer_step(epoch)
    optimizer.step()


def test_swav_prototypes_are_frozen_in_the_first_epoch_then_move():
    swav_method = _swav()
    optimizer = torch.optim.SGD(swav_method.trainable_parameters(), lr=0.5, momentum=0.9,
                                weight_decay=1e-4)
    views = list(torch.randn(2, 6, 3, 8, 8))
    _train_step(swav_method, optimizer, views, epoch=0.0)  # normalises, then leaves them
    frozen = swav_method.prototypes.weight.detach().clone()
    projector_before = swav_method.projector[0].weight.clone()
    _train_step(swav_method, optimizer, views, epoch=0.9)
    # Only the start-of-step normalisation touched them (it rounds a unit row in its last bit).
    assert torch.equal(swav_method.prototypes.weight, F.normalize(frozen, dim=1))
    assert swav_method.prototypes.weight not in optimizer.state or \
        "momentum_buffer" not in optimizer.state[swav_method.prototypes.weight]
    assert not torch.equal(swav_method.projector[0].weight, projector_before)
    _train_step(swav_method, optimizer, views, epoch=1.0)
    assert not torch.allclose(swav_method.prototypes.weight, frozen)


def test_swav_queue_switches_on_from_its_epoch_once_full_for_small_batches():
    swav_method = _swav()  # 10 prototypes, queue 12, from epoch 2
    views = list(torch.randn(2, 6, 3, 8, 8))
    assert swav_method.training_step(_batch(views, 1.9)).logs["queue_active"] == 0.0
    assert int(swav_method.queue_filled) == 0  # nothing is stored before its epoch
    assert swav_method.training_step(_batch(views, 2.0)).logs["queue_active"] == 0.0
    assert int(swav_method.queue_filled) == 6  # stored, but half full: not used yet
    assert swav_method.training_step(_batch(views, 2.1)).logs["queue_active"] == 0.0
    assert int(swav_method.queue_filled) == 12
    assert swav_method.training_step(_batch(views, 2.2)).logs["queue_active"] == 1.0
    state = swav_method.state_dict()
    assert {"queue_filled", "queues.0.keys", "queues.1.keys", "queues.0.pointer"} <= set(state)


def test_swav_queue_stays_off_when_the_batch_already_covers_the_prototypes():
    swav_method = _swav(num_prototypes=4)
    views = list(torch.randn(2, 6, 3, 8, 8))
    for epoch in (3.0, 4.0, 5.0):
        assert swav_method.training_step(_batch(views, epoch)).logs["queue_active"] == 0.0
    assert int(swav_method.queue_filled) == 0
    no_queue = _swav(queue_size=0)
    assert len(no_queue.queues) == 0
    assert no_queue.training_step(_batch(views, 20.0)).logs["queue_active"] == 0.0


def test_swav_codes_use_the_newest_queued_projections_with_the_current_prototypes():
    swav_method = _swav().double()
    views = list(_random(2, 6, 3, 8, 8, seed=80))
    for epoch in (2.0, 2.1):
        swav_method.training_step(_batch(list(_random(2, 6, 3, 8, 8, seed=int(epoch * 10))),
                                         epoch))
    queued = [q.keys.clone() for q in swav_method.queues]  # full, 12 rows each
    output = swav_method.training_step(_batch(views, 2.2))
    weight = swav_method.prototypes.weight.detach()
    with torch.no_grad():
        z = F.normalize(swav_method.projector(swav_method.backbone(torch.cat(views))), dim=1)
    scores = [zv @ weight.T for zv in z.split(6)]
    extra = [k @ weight.T for k in queued]
    assert output.loss.item() == pytest.approx(
        paper_swav_loss(scores, 0.1, 0.05, 3, 2, extra=extra), rel=1e-9)


# ---- through the CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize("method, extra", [
    ("mocov3", ["--backbone", "vit_small", "--optimizer", "adamw", "--lr", "1.5e-4"]),
    ("mocov3", []),
    ("swav", [])])
def test_cli_trains_two_steps_at_tiny_width(method, extra, tmp_path):
    sizes = [f"method_args.{k}=32" for k in ("proj_hidden_dim", "pred_hidden_dim")
             if k in method_hyperparameters(method)]
    command = [sys.executable, "-m", "selfsup.cli", "train", "--method", method,
               "--max-steps", "2", "--width", "0.125", "--batch-size", "16", "--no-eval",
               "--num-workers", "0", "--out", str(tmp_path / "run"),
               "--set", "eval.monitor_every_n_epochs=0", "--set", "train.progress_bar=false",
               *[arg for size in sizes for arg in ("--set", size)], *extra]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_cifar10_configs_resolve_to_a_small_patch_vit_mocov3_and_a_multi_crop_swav():
    from pathlib import Path

    from selfsup.config import read_yaml, resolve_config

    configs = Path(__file__).resolve().parent.parent / "configs"
    mocov3 = resolve_config(read_yaml(configs / "mocov3_cifar10.yaml"))
    assert (mocov3.method, mocov3.backbone.name, mocov3.backbone.cifar_stem) == \
        ("mocov3", "vit_small", True)
    assert mocov3.method_args["temperature"] == 0.2 and mocov3.method_args["freeze_patch_embed"]
    assert (mocov3.optim.name, mocov3.optim.lr, mocov3.optim.weight_decay) == ("adamw", 1.5e-4, 0.1)
    swav_config = resolve_config(read_yaml(configs / "swav_cifar10.yaml"))
    assert swav_config.method == "swav" and swav_config.method_args["num_prototypes"] == 3000
    assert swav_config.method_args["queue_size"] == 3840
    # The queue matters at this batch: 512 samples cannot fill 3000 prototypes evenly.
    assert swav_config.train.batch_size < swav_config.method_args["num_prototypes"]


def _sinkhorn_on_one_of_two_processes(rank, init_file, scores, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = scores.shape[0] // 2
    codes = sinkhorn(scores[rank * half:(rank + 1) * half], gather_distributed=True)
    torch.save(codes, f"{out_dir}/codes{rank}.pt")
    dist.destroy_process_group()


def test_sinkhorn_over_two_processes_equals_sinkhorn_on_the_whole_batch(tmp_path):
    # The reference's distributed_sinkhorn: one transport problem over every process's samples.
    import torch.multiprocessing as mp

    scores = _unit_rows(8, 4, seed=90) @ _unit_rows(5, 4, seed=91).T
    mp.spawn(_sinkhorn_on_one_of_two_processes, nprocs=2,
             args=(str(tmp_path / "init"), scores, str(tmp_path)))
    gathered = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in (0, 1)])
    assert torch.allclose(gathered, sinkhorn(scores), rtol=1e-12, atol=0)
    # Per-process problems would differ: the partition constraint couples the halves.
    assert not torch.allclose(torch.cat([sinkhorn(scores[:4]), sinkhorn(scores[4:])]),
                              sinkhorn(scores), rtol=1e-6)
