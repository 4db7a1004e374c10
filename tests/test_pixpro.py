"""PixPro (Xie et al. 2021): the pixel propagation module, the positive pixel pairs and the loss
against a float64 transcription of the paper's equations; the pairs of identical, mirrored and
disjoint views; the crop boxes the augmentation records (on images whose pixels hold their own
coordinates); finiteness in fp32 and bf16; a short run through the trainer; the backbone's
feature map."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment import build_view_generator
from selfsup.augment.ops import HorizontalFlip, Normalize, Pipeline, RandomResizedCrop
from selfsup.augment.recipes import ViewGenerator, ViewGroup
from selfsup.backbones import build_backbone
from selfsup.checkpoint import load_checkpoint_file
from selfsup.cli import main
from selfsup.errors import ConfigError
from selfsup.losses import pixpro, positive_pixel_pairs
from selfsup.methods import Batch, MethodContext, build_method, method_hyperparameters
from selfsup.methods.pixpro import PixelPropagation, PixPro

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


# ---- the paper's equations in float64 ----------------------------------------------------------

def paper_bin_centres(box, height, width):
    """Each feature-map pixel (row-major) warped to the original image: the centre of its bin in
    the view, placed through the view's box; and the bin's diagonal there."""
    x0, y0, x1, y1 = box
    centres = [(x0 + (c + 0.5) / width * (x1 - x0), y0 + (r + 0.5) / height * (y1 - y0))
               for r in range(height) for c in range(width)]
    return centres, math.hypot((x1 - x0) / width, (y1 - y0) / height)


def paper_positive_pairs(box_1, box_2, size_1, size_2, threshold):
    """Section 3.1: positive where the distance in the original image, normalised to the
    diagonal of a feature-map bin (the longer of the two views'), is below T."""
    centres_1, diagonal_1 = paper_bin_centres(box_1, *size_1)
    centres_2, diagonal_2 = paper_bin_centres(box_2, *size_2)
    unit = max(diagonal_1, diagonal_2)
    return [(i, j) for i, a in enumerate(centres_1) for j, b in enumerate(centres_2)
            if math.dist(a, b) / unit < threshold]


def cos(a, b):
    dot = sum(p * q for p, q in zip(a, b))
    return dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))


def paper_propagation(pixels, weight, bias, gamma):
    """Section 3.2: y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j), g one linear layer."""
    def g(x):
        return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(weight, bias)]

    values = [g(x) for x in pixels]
    out = []
    for x_i in pixels:
        y = [0.0] * len(bias)
        for x_j, value in zip(pixels, values):
            s = max(cos(x_i, x_j), 0.0) ** gamma
            y = [acc + s * v for acc, v in zip(y, value)]
        out.append(y)
    return out


def paper_loss(z_1, z_2, target_1, target_2, boxes_1, boxes_2, weight, bias, gamma, threshold):
    """L_PixPro = -cos(y_i, x'_j) - cos(y_j, x'_i) over the positive pairs (i in view 1, j in
    view 2), averaged over each image's pairs, then over the images (0 for an image without)."""
    def pixels(maps, n):  # (N, C, H, W) -> the H * W pixel vectors of image n, row-major
        return maps[n].flatten(1).T.tolist()

    size_1, size_2 = tuple(z_1.shape[-2:]), tuple(z_2.shape[-2:])
    per_image = []
    for n in range(z_1.shape[0]):
        y_1 = paper_propagation(pixels(z_1, n), weight, bias, gamma)
        y_2 = paper_propagation(pixels(z_2, n), weight, bias, gamma)
        t_1, t_2 = pixels(target_1, n), pixels(target_2, n)
        pairs = paper_positive_pairs(boxes_1[n], boxes_2[n], size_1, size_2, threshold)
        terms = [-cos(y_1[i], t_2[j]) - cos(y_2[j], t_1[i]) for i, j in pairs]
        per_image.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(per_image) / len(per_image)


# Hand-made views of four images: overlapping crops of different sizes, a mirrored second view,
# disjoint crops (no pair), and a crop inside the other (one view zoomed in).
BOXES_1 = [(0.10, 0.20, 0.70, 0.80), (0.00, 0.00, 0.60, 0.50), (0.00, 0.00, 0.30, 0.30),
           (0.20, 0.20, 0.90, 0.90)]
BOXES_2 = [(0.30, 0.10, 0.95, 0.85), (0.70, 0.10, 0.10, 0.60), (0.60, 0.60, 1.00, 1.00),
           (0.40, 0.35, 0.65, 0.60)]


class TinyDenseBackbone(nn.Module):
    """A backbone with a 4x4 feature map for 8-px images, as the contract asks of pixpro's."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


def _context() -> MethodContext:
    return MethodContext(feature_dim=6, num_samples=32, num_classes=10, image_size=8)


def _pixpro(**arguments) -> PixPro:
    torch.manual_seed(0)
    values = {"proj_hidden_dim": 16, "proj_dim": 5, **arguments}
    return build_method("pixpro", TinyDenseBackbone(), _context(), values)


def _batch(views, boxes_1=BOXES_1, boxes_2=BOXES_2) -> Batch:
    boxes = [torch.tensor(boxes_1), torch.tensor(boxes_2)]
    return Batch(list(views), None, torch.arange(len(boxes_1)), torch.Generator().manual_seed(0),
                 view_boxes=boxes)


def test_defaults_are_the_papers_with_byols_views_and_lars():
    assert method_hyperparameters("pixpro") == {
        "proj_hidden_dim": 2048, "proj_dim": 256, "base_momentum": 0.99, "sharpness": 2.0,
        "transform_layers": 1, "distance_threshold": 0.7}
    assert PixPro.views == "byol" and PixPro.num_views == 2 and PixPro.uses_view_boxes
    assert PixPro.default_optimizer == {"name": "lars", "lr": 1.0, "lr_scaling": "linear",
                                        "weight_decay": 1e-5, "warmup_epochs": 5}
    method = build_method("pixpro", TinyDenseBackbone(), _context(), {})
    convs = [m for m in method.projector if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (6, 2048, (1, 1)), (2048, 256, (1, 1))]
    assert [type(m) for m in method.projector][1:3] == [nn.BatchNorm2d, nn.ReLU]
    (g,) = method.propagation.transform
    assert isinstance(g, nn.Conv2d) and (g.in_channels, g.out_channels) == (256, 256)


@pytest.mark.parametrize("sharpness", [2.0, 1.0, 3.0])
def test_step_loss_is_the_papers_ppm_pairs_and_loss_in_float64(sharpness):
    method = _pixpro(sharpness=sharpness)
    # The momentum encoder apart from the online one, as after a few steps.
    with torch.no_grad():
        for parameter in method.momentum_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    views = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    output = method.training_step(_batch(views))

    with torch.no_grad():  # the same networks, in training mode as in the step (BN statistics)
        z = [method.projector(method.backbone.feature_map(v)).double() for v in views]
        targets = [method.momentum_encoder(v).double() for v in views]
    (g,) = method.propagation.transform
    weight, bias = g.weight[:, :, 0, 0].double().tolist(), g.bias.double().tolist()
    expected = paper_loss(z[0], z[1], targets[0], targets[1], BOXES_1, BOXES_2, weight, bias,
                          sharpness, 0.7)
    assert output.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert output.loss.requires_grad


@pytest.mark.parametrize("threshold", [0.7, 1.5, 3.0])
def test_positive_pairs_are_the_papers_rule_for_crops_of_any_size_and_mirrored(threshold):
    expected = [set(paper_positive_pairs(a, b, (3, 4), (5, 2), threshold))
                for a, b in zip(BOXES_1, BOXES_2)]
    mask = positive_pixel_pairs(torch.tensor(BOXES_1), torch.tensor(BOXES_2), (3, 4), (5, 2),
                                threshold)
    assert mask.shape == (4, 12, 10)
    for n in range(4):
        assert {tuple(p) for p in mask[n].nonzero().tolist()} == expected[n]
    assert sum(map(len, expected)) > 0


def test_ppm_is_the_papers_propagation_with_any_number_of_transform_layers():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 3, 3)
    ppm = PixelPropagation(5, transform_layers=1, sharpness=2.0)
    (g,) = ppm.transform
    weight, bias = g.weight[:, :, 0, 0].double().tolist(), g.bias.double().tolist()
    y = ppm(x)
    for n in range(2):
        expected = paper_propagation(x[n].flatten(1).T.double().tolist(), weight, bias, 2.0)
        assert torch.allclose(y[n].flatten(1).T.double(), torch.tensor(expected,
                                                                         dtype=torch.float64),
                              rtol=1e-5, atol=1e-5)
    # l = 0: g is the identity; l = 2: linear, BN, ReLU, linear (the paper's ablation).
    assert isinstance(PixelPropagation(5, transform_layers=0).transform, nn.Sequential)
    assert len(PixelPropagation(5, transform_layers=0).transform) == 0
    assert [type(m) for m in PixelPropagation(5, transform_layers=2).transform] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]


def test_two_identical_views_pair_each_pixel_with_itself_and_its_neighbours_within_t():
    box = torch.tensor([[0.1, 0.2, 0.7, 0.8]])
    identity = torch.eye(16, dtype=torch.bool)[None]
    # Square bins: a side neighbour lies 1/sqrt(2) = 0.707 diagonals away, a corner one 1.
    assert torch.equal(positive_pixel_pairs(box, box, (4, 4), (4, 4), 0.7), identity)
    with_sides = positive_pixel_pairs(box, box, (4, 4), (4, 4), 0.75)[0]
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    manhattan = (rows[:, None] - rows[None]).abs() + (cols[:, None] - cols[None]).abs()
    assert torch.equal(with_sides, manhattan <= 1)


def test_a_mirrored_view_pairs_each_pixel_with_its_mirror_image():
    box = torch.tensor([[0.1, 0.2, 0.9, 0.8]])  # square bins on a 3 x 4 map
    mirrored = box[:, [2, 1, 0, 3]]
    mask = positive_pixel_pairs(box, mirrored, (3, 4), (3, 4), 0.7)[0]
    rows, cols = torch.arange(12) // 4, torch.arange(12) % 4
    mirror = (rows[:, None] == rows[None]) & (cols[:, None] == 3 - cols[None])
    assert torch.equal(mask, mirror)


def test_disjoint_views_have_no_pairs_a_finite_loss_and_no_gradient():
    boxes_1 = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.1, 0.1, 0.6, 0.6]])
    boxes_2 = torch.tensor([[0.6, 0.6, 1.0, 1.0], [0.1, 0.1, 0.6, 0.6]])
    positives = positive_pixel_pairs(boxes_1, boxes_2, (3, 3), (3, 3))
    assert not positives[0].any() and positives[1].any()
    maps = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(4)]
    loss = pixpro(*maps, positives)
    loss.backward()
    assert torch.isfinite(loss)
    for tensor in maps:
        assert torch.equal(tensor.grad[0], torch.zeros_like(tensor.grad[0]))  # no pairs, no say
    assert maps[0].grad[1].abs().sum() > 0
    # Alone, the pair-less image gives 0.
    alone = pixpro(*(m[:1] for m in maps), positives[:1])
    assert alone.item() == 0.0


# ---- the crop boxes the augmentation records ---------------------------------------------------

def _coordinate_images(batch: int = 6, height: int = 30, width: int = 40) -> torch.Tensor:
    """Images whose channels 0 and 1 hold each pixel's centre as a fraction of the width and the
    height: bilinear resampling of such a linear ramp returns the sampled point itself."""
    xs = ((torch.arange(width) + 0.5) / width).expand(height, width)
    ys = ((torch.arange(height) + 0.5) / height)[:, None].expand(height, width)
    image = torch.stack([xs, ys, torch.zeros(height, width)])
    return image.expand(batch, -1, -1, -1).clone()


def _expected_coordinates(boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each view pixel's centre lies in the image, from the recorded boxes."""
    u = (torch.arange(size) + 0.5) / size
    x0, y0, x1, y1 = (b[:, None] for b in boxes.unbind(1))
    xs = (x0 + u * (x1 - x0))[:, None, :].expand(-1, size, -1)
    ys = (y0 + u * (y1 - y0))[:, :, None].expand(-1, -1, size)
    return xs, ys


@pytest.mark.parametrize("ops", [
    # the flip folded into the crop (BYOL, SimCLR) ...
    [RandomResizedCrop(16, scale=(0.2, 1.0)), HorizontalFlip(p=0.5)],
    # ... and a flip later in the pipeline (MoCo v2's order), applied as an op of its own
    [RandomResizedCrop(16, scale=(0.2, 1.0)), Normalize((0, 0, 0), (1, 1, 1)),
     HorizontalFlip(p=0.5)],
], ids=["flip_folded_into_crop", "flip_after_other_ops"])
def test_each_views_pixels_come_from_its_recorded_box_with_and_without_flip(ops):
    images = _coordinate_images()
    generator = ViewGenerator([ViewGroup(Pipeline(ops), 3)])
    views, boxes = generator.views_and_boxes(images, torch.Generator().manual_seed(3))
    assert len(views) == len(boxes) == 3
    all_boxes = torch.cat(boxes)
    mirrored = all_boxes[:, 0] > all_boxes[:, 2]
    assert 0 < mirrored.sum() < len(all_boxes)  # both kinds are checked
    for view, box in zip(views, boxes):
        assert box.shape == (6, 4) and box.dtype == torch.float32
        xs, ys = _expected_coordinates(box, 16)
        # Exact inside; at the border an enlarged crop repeats its edge pixel (half a pixel).
        assert torch.allclose(view[:, 0, 1:-1, 1:-1], xs[:, 1:-1, 1:-1], atol=1e-5)
        assert torch.allclose(view[:, 1, 1:-1, 1:-1], ys[:, 1:-1, 1:-1], atol=1e-5)
        assert (view[:, 0] - xs).abs().max() <= 0.5 / 40 + 1e-5
        assert (view[:, 1] - ys).abs().max() <= 0.5 / 30 + 1e-5


def test_groups_without_a_crop_record_the_whole_image_mirrored_where_flipped():
    images = _coordinate_images(height=16, width=16)
    groups = [ViewGroup(Pipeline([Normalize((0, 0, 0), (1, 1, 1))]), 1),
              ViewGroup(Pipeline([HorizontalFlip(p=0.5)]), 1),
              ViewGroup(Pipeline([HorizontalFlip(p=0.5)]), 2)]
    views, boxes = ViewGenerator(groups).views_and_boxes(images, torch.Generator().manual_seed(4))
    whole, mirrored = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.equal(boxes[0], whole.expand(6, 4))
    for view, box in zip(views, boxes):
        assert all(torch.equal(b, whole) or torch.equal(b, mirrored) for b in box)
        xs, ys = _expected_coordinates(box, 16)
        assert torch.allclose(view[:, 0], xs, atol=1e-6) and torch.allclose(view[:, 1], ys)


@pytest.mark.parametrize("recipe, num_views", [("byol", 2), ("moco_v2", 2), ("dino", 4)])
def test_recording_boxes_changes_neither_the_views_nor_the_random_stream(recipe, num_views):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    generator = build_view_generator(recipe, 32, MEAN, STD, num_views=num_views)
    plain_stream, recorded_stream = (torch.Generator().manual_seed(6) for _ in range(2))
    plain = generator(images, plain_stream)
    views, boxes = generator.views_and_boxes(images, recorded_stream)
    assert all(torch.equal(a, b) for a, b in zip(plain, views))
    assert torch.equal(torch.rand(3, generator=plain_stream), torch.rand(3, generator=recorded_stream))
    assert [len(b) for b in boxes] == [4] * num_views
    assert generator.views_and_boxes(images, record_boxes=False)[1] is None


# ---- the method in training --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["zeros", "identical", "disjoint_views"])
def test_step_is_finite_on_degenerate_inputs_in_fp32_and_bf16(case):
    image = {"zeros": torch.zeros(4, 3, 8, 8), "identical": torch.rand(1, 3, 8, 8).expand(4, -1, -1, -1),
             "disjoint_views": torch.rand(4, 3, 8, 8)}[case]
    boxes_2 = BOXES_2 if case != "disjoint_views" else [(0.6, 0.6, 1.0, 1.0)] * 4
    boxes_1 = BOXES_1 if case != "disjoint_views" else [(0.0, 0.0, 0.4, 0.4)] * 4
    for dtype in (torch.float32, torch.bfloat16):
        method = _pixpro(transform_layers=2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            output = method.training_step(_batch([image, image.clone()], boxes_1, boxes_2))
        output.loss.backward()
        assert torch.isfinite(output.loss).item(), (case, dtype)
        assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
        if case == "disjoint_views":
            assert output.loss.item() == 0.0


def test_only_the_online_network_gets_gradient_and_the_probe_reads_pooled_features():
    method = _pixpro()
    views = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    output = method.training_step(_batch(views))
    output.loss.backward()
    online = [*method.backbone.parameters(), *method.projector.parameters(),
              *method.propagation.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    assert all(not p.requires_grad for p in method.momentum_encoder.parameters())
    assert torch.allclose(output.features, method.backbone(views[0]), atol=1e-6)
    assert [e.shape for e in output.embeddings] == [(4, 5), (4, 5)]


def test_momentum_encoder_follows_the_online_network_on_byols_cosine_schedule():
    method = _pixpro()
    online = [p.detach().clone() for p in method.online_encoder().parameters()]
    with torch.no_grad():
        for parameter in method.momentum_encoder.parameters():
            parameter.add_(1.0)
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    method.on_after_optimizer_step(0.5)
    assert method.momentum == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.5) + 1) / 2)
    for ours, old, theirs in zip(method.momentum_encoder.parameters(), before, online):
        assert torch.allclose(ours, method.momentum * old + (1 - method.momentum) * theirs)
    method.on_after_optimizer_step(1.0)
    assert method.momentum == 1.0


def test_a_batch_without_view_boxes_is_refused_saying_what_is_missing():
    method = _pixpro()
    views = list(torch.randn(2, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="view_boxes"):
        method.training_step(Batch(views, None, torch.arange(4), torch.Generator()))


def test_a_backbone_without_a_feature_map_is_a_config_error_naming_it():
    backbone, dim = build_backbone("vit_tiny", cifar_stem=True, width=0.125)
    context = MethodContext(feature_dim=dim, num_samples=8, num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match="pixpro.*VisionTransformer has none"):
        build_method("pixpro", backbone, context, {})


@pytest.mark.parametrize("cifar_stem, size, side", [(True, 32, 4), (False, 64, 2)])
def test_resnet_feature_map_is_the_last_stage_before_the_pooling_its_forward_does(cifar_stem,
                                                                                  size, side):
    backbone, dim = build_backbone("resnet18", cifar_stem=cifar_stem, width=0.125)
    backbone.eval()
    images = torch.randn(2, 3, size, size)
    feature_map = backbone.feature_map(images)
    assert feature_map.shape == (2, dim, side, side)
    assert torch.allclose(backbone(images), feature_map.mean(dim=(2, 3)), atol=1e-6)


def test_trains_two_steps_through_the_trainer_with_the_views_boxes_and_checkpoints_the_momentum_encoder(
        tmp_path, monkeypatch):
    seen = []
    step = PixPro.training_step

    def spy(self, batch):
        seen.append((len(batch.views), [tuple(b.shape) for b in batch.view_boxes]))
        return step(self, batch)

    monkeypatch.setattr(PixPro, "training_step", spy)
    out = tmp_path / "run"
    assert main(["train", "--method", "pixpro", "--max-steps", "2", "--out", str(out),
                 "--data", "cifar10-sample", "--backbone", "resnet18", "--width", "0.125",
                 "--batch-size", "16", "--num-workers", "0", "--no-eval",
                 "--set", "method_args.proj_hidden_dim=64", "--set", "method_args.proj_dim=32",
                 "--set", "eval.monitor_every_n_epochs=0", "--set", "train.progress_bar=false",
                 "--set", "train.log_every=1"]) == 0
    assert seen == [(2, [(16, 4), (16, 4)])] * 2
    state = load_checkpoint_file(out / "checkpoints" / "last.ckpt")["state_dict"]
    momentum = {k for k in state if k.startswith("method.momentum_encoder.module.")}
    assert "method.momentum_encoder.module.backbone.conv1.weight" in momentum
    assert any(".projector." in k for k in momentum)
    online, copy = state["method.backbone.conv1.weight"], \
        state["method.momentum_encoder.module.backbone.conv1.weight"]
    assert torch.isfinite(online).all() and not torch.equal(online, copy)  # both moved apart
