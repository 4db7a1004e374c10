"""PixPro's pixel-to-propagation consistency loss and its positive pixel pairs (Xie, Lin, Zhang,
Cao, Lin & Hu 2021, "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual
Representation Learning", CVPR).

Positive pairs (Section 3.1). Every pixel of a view's feature map is the centre of a bin of that
map; warped back to the original image through the view's crop box, pixel ``i`` of view 1 and
pixel ``j`` of view 2 lie some distance apart. The distances "are normalised to the diagonal length
of a feature map bin" (the two views' crops differ in size, so their bins do), and a pair is
positive where the normalised distance is below ``T = 0.7``. The two views' bins differ; as in the
authors' code (zdaxie/PixPro, ``regression_loss``) the unit is the longer of the two diagonals,
which keeps the rule symmetric. Distances are measured in coordinates normalised to the image's
width and height, as in that code (for square images, the same as pixels).

The loss (Section 3.2), over the positive pairs ``(i, j)``, ``i`` in view 1 and ``j`` in view 2::

    L_PixPro = - cos(y_i, x'_j) - cos(y_j, x'_i)

``y``: the online branch's features after the pixel propagation module; ``x'``: the momentum
encoder's projections (no gradient: the method computes them under ``no_grad``). It is averaged
over the positive pairs of each image, then over the images of the batch. An image whose two views
share no positive pair adds 0 to that batch mean (as in the authors' code, whose per-image sum is
divided by ``count + 1e-6``): no NaN, and no gradient from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The positive-pair threshold T of Section 3.1, in feature-map bin diagonals.
DEFAULT_THRESHOLD = 0.7


def _bin_centres(boxes: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``(N, H * W, 2)`` (x, y) in the image of a ``size = (H, W)`` feature map's bins,
    row-major as ``flatten(2)`` orders the map, and each map's bin diagonal ``(N,)``."""
    height, width = size
    x0, y0, x1, y1 = boxes.unbind(1)
    u = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) / width
    v = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) / height
    xs = x0[:, None] + u * (x1 - x0)[:, None]  # (N, W)
    ys = y0[:, None] + v * (y1 - y0)[:, None]  # (N, H)
    centres = torch.stack((xs[:, None, :].expand(-1, height, -1),
                           ys[:, :, None].expand(-1, -1, width)), dim=-1)
    # A mirrored box has x1 < x0: its bins are as wide, read right to left.
    diagonal = torch.hypot((x1 - x0) / width, (y1 - y0) / height)
    return centres.reshape(len(boxes), height * width, 2), diagonal


def positive_pixel_pairs(boxes_1: torch.Tensor, boxes_2: torch.Tensor, size_1: tuple[int, int],
                         size_2: tuple[int, int], threshold: float = DEFAULT_THRESHOLD
                         ) -> torch.Tensor:
    """Which pixels of two views' feature maps are positive pairs: bool ``(N, H1 * W1, H2 * W2)``.

    ``boxes_1``, ``boxes_2``: ``(N, 4)``, where each view lies in its image, ``(x0, y0, x1, y1)``
    in ``[0, 1]`` with ``x0 > x1`` for a mirrored view (``Batch.view_boxes``). ``size_k``: the
    ``(H, W)`` of view ``k``'s feature map. Entry ``[n, i, j]`` holds where pixel ``i`` of view 1
    and pixel ``j`` of view 2 (row-major) lie less than ``threshold`` bin diagonals apart.
    """
    dtype = torch.promote_types(torch.promote_types(boxes_1.dtype, boxes_2.dtype), torch.float32)
    centres_1, diagonal_1 = _bin_centres(boxes_1.to(dtype), tuple(size_1))
    centres_2, diagonal_2 = _bin_centres(boxes_2.to(dtype), tuple(size_2))
    # Explicit differences, not cdist, whose matrix-product shortcut loses the small distances.
    distance = (centres_1[:, :, None, :] - centres_2[:, None, :, :]).norm(dim=-1)
    unit = torch.maximum(diagonal_1, diagonal_2)[:, None, None]
    return distance / unit < threshold


def _propagation_to_target(propagated: torch.Tensor, target: torch.Tensor,
                           positives: torch.Tensor) -> torch.Tensor:
    """``-cos(y_i, x'_j)`` averaged over each image's positive pairs ``(i, j)``, then over the
    images (an image without pairs adds 0)."""
    y = F.normalize(propagated.flatten(2), dim=1)  # (N, C, H1 * W1)
    x = F.normalize(target.flatten(2), dim=1)  # (N, C, H2 * W2)
    cosine = torch.bmm(y.transpose(1, 2), x)  # (N, H1 * W1, H2 * W2)
    weights = positives.to(cosine.dtype)
    per_image = (cosine * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp(min=1.0)
    return -per_image.mean()


def pixpro(propagated_1: torch.Tensor, propagated_2: torch.Tensor, target_1: torch.Tensor,
           target_2: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """L_PixPro of Xie et al. 2021 (Section 3.2): ``-cos(y_i, x'_j) - cos(y_j, x'_i)`` averaged
    over each image's positive pairs ``(i, j)``, then over the batch.

    ``propagated_k``: ``(N, C, H_k, W_k)``, view ``k``'s features after the pixel propagation
    module (``y``); ``target_k``: the momentum encoder's projections of view ``k`` (``x'``), same
    shape; ``positives``: ``(N, H1 * W1, H2 * W2)`` from :func:`positive_pixel_pairs`. Both terms
    run over the same pairs, so the loss is the sum of the two directions' means. Computed in
    float32 at least whatever the autocast: in bfloat16 a cosine near 1 moves in steps of 0.004.
    """
    dtype = torch.promote_types(propagated_1.dtype, torch.float32)
    with torch.autocast(propagated_1.device.type, enabled=False):
        y1, y2, t1, t2 = (t.to(dtype) for t in (propagated_1, propagated_2, target_1, target_2))
        return (_propagation_to_target(y1, t2, positives)
                + _propagation_to_target(y2, t1, positives.transpose(1, 2)))


class PixProLoss(nn.Module):
    """Module form of :func:`pixpro`, with the positive pairs computed from the views' boxes."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, propagated_1: torch.Tensor, propagated_2: torch.Tensor,
                target_1: torch.Tensor, target_2: torch.Tensor, boxes_1: torch.Tensor,
                boxes_2: torch.Tensor) -> torch.Tensor:
        positives = positive_pixel_pairs(boxes_1, boxes_2, propagated_1.shape[-2:],
                                         propagated_2.shape[-2:], self.threshold)
        return pixpro(propagated_1, propagated_2, target_1, target_2, positives)
