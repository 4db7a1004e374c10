"""The log-sum-exp of contrastive logits, computed tile by tile (the FlashAttention trick).

Every softmax-contrastive loss here (NT-Xent, InfoNCE, SupCon) is, per anchor ``a_i``::

    L_i = logsumexp_j (a_i·k_j / t)  -  (the positive logits of anchor i)

The second term is O(N D) and left to ordinary autograd. The first needs every anchor against every
key: an R x C matrix that a dense implementation keeps for backward (4 R C bytes; 17 GB at
R = C = 65,536). :func:`contrastive_logsumexp` never holds more than one ``block x block`` tile of
it. Forward streams over the key tiles of each anchor tile with an online log-sum-exp (each tile's
log-sum-exp folded into the running one with ``logaddexp``); it saves only the anchors, the keys
and the per-anchor result. Backward recomputes each tile and turns it into the softmax
``P = exp(a·k/t - lse)``, whence

    dlse/da_i = sum_j P_ij k_j / t,        dlse/dk_j = sum_i P_ij a_i / t,

accumulated tile by tile, so the keys get their gradient too (gathered keys pass it on to their
process through :func:`selfsup.distributed.gather_with_grad`). A single tile is the dense
computation: ``block_size=0``.
"""

from __future__ import annotations

import torch

# Logit tiles of at most this many bytes are computed in one piece by the automatic choice.
DENSE_LOGITS_BUDGET = 256 * 2**20
# The automatic tile on the CPU: a few MB, so a tile stays in cache between the matmul that writes
# it and the element-wise passes that read it (measured fastest on the CPU, benchmarks/loss.py).
CPU_BLOCK = 1024


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 inputs accumulate in fp32)."""
    present = [t for t in tensors if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32


def resolve_block_size(rows: int, cols: int, block_size: int | None, device: torch.device,
                       element_size: int = 4) -> int:
    """The tile edge for an R x C logit matrix: ``block_size`` if given (0: one tile, dense),
    otherwise one tile while it fits :data:`DENSE_LOGITS_BUDGET` (on the CPU: while it is no
    larger than :data:`CPU_BLOCK` squared, past which cache-sized tiles are faster), and
    otherwise square tiles within the budget."""
    whole = max(rows, cols, 1)
    if block_size is not None:
        if block_size < 0:
            raise ValueError(f"block_size must be >= 0 (0 = dense), got {block_size}")
        return whole if block_size == 0 else block_size
    if device.type == "cpu":
        return min(whole, CPU_BLOCK)
    if rows * cols * element_size <= DENSE_LOGITS_BUDGET:
        return whole
    return int((DENSE_LOGITS_BUDGET // element_size) ** 0.5)


def _excluded_by_tile(excluded: torch.Tensor | None, block: int, key_count: int
                      ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Where the excluded entries fall: {(row tile, column tile): (rows, columns) within it}.

    Found once per call (one host synchronisation on a GPU; backward reuses it), so only the few
    tiles that hold an excluded entry pay for masking: for NT-Xent, two per row of tiles.
    """
    if excluded is None:
        return {}
    anchor = torch.arange(excluded.numel(), device=excluded.device)
    if excluded.numel() <= block and key_count <= block:
        return {(0, 0): (anchor, excluded)}
    column_tiles = -(-key_count // block)
    tile = (anchor // block) * column_tiles + excluded // block
    order = torch.argsort(tile)
    tiles, counts = torch.unique_consecutive(tile[order], return_counts=True)
    return {divmod(index, column_tiles): (rows % block, excluded[rows] % block)
            for index, rows in zip(tiles.tolist(), order.split(counts.tolist()))}


class _BlockwiseLogSumExp(torch.autograd.Function):
    """lse_i = log( exp(extra_i) + sum_{j != excluded_i} exp(a_i·k_j / t) ), in tiles."""

    @staticmethod
    def forward(ctx, anchors: torch.Tensor, keys: torch.Tensor, extra: torch.Tensor | None,
                excluded: torch.Tensor | None, temperature: float, block: int) -> torch.Tensor:
        rows = anchors.shape[0]
        scaled = anchors / temperature
        # The online log-sum-exp: each tile's, folded into the running one with logaddexp.
        lse = anchors.new_full((rows,), float("-inf")) if extra is None else extra.clone()
        masks = _excluded_by_tile(excluded, block, keys.shape[0])
        for row_tile, row0 in enumerate(range(0, rows, block)):
            anchor_block, running = scaled[row0:row0 + block], lse[row0:row0 + block]
            for col_tile, col0 in enumerate(range(0, keys.shape[0], block)):
                tile = anchor_block @ keys[col0:col0 + block].transpose(0, 1)
                if (row_tile, col_tile) in masks:
                    tile.index_put_(masks[row_tile, col_tile], tile.new_tensor(float("-inf")))
                shift = tile.amax(dim=1, keepdim=True)
                # A row with every logit masked: shift by 0, not by -inf (-inf - -inf = nan).
                shift.masked_fill_(shift == float("-inf"), 0.0)
                tile_lse = tile.sub_(shift).exp_().sum(dim=1).log_().add_(shift.squeeze(1))
                torch.logaddexp(running, tile_lse, out=running)
        ctx.save_for_backward(anchors, keys, extra, lse)
        ctx.temperature, ctx.block, ctx.masks = temperature, block, masks
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse: torch.Tensor):
        anchors, keys, extra, lse = ctx.saved_tensors
        temperature, block, masks = ctx.temperature, ctx.block, ctx.masks
        need_anchors, need_keys, need_extra = ctx.needs_input_grad[:3]
        rows = anchors.shape[0]
        scaled = anchors / temperature
        # Rows without any term: every tile entry is -inf there, so shifting by 0 gives P = 0.
        shift = lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(1)
        grad_anchors = torch.zeros_like(anchors) if need_anchors else None
        grad_keys = torch.zeros_like(keys) if need_keys else None
        if need_anchors or need_keys:
            # The keys' row weights folded into the small side: P^T (g * a / t).
            weighted = scaled * grad_lse.unsqueeze(1) if need_keys else None
            for row_tile, row0 in enumerate(range(0, rows, block)):
                row1 = row0 + block
                for col_tile, col0 in enumerate(range(0, keys.shape[0], block)):
                    key_block = keys[col0:col0 + block]
                    tile = scaled[row0:row1] @ key_block.transpose(0, 1)
                    if (row_tile, col_tile) in masks:
                        tile.index_put_(masks[row_tile, col_tile], tile.new_tensor(float("-inf")))
                    probabilities = tile.sub_(shift[row0:row1]).exp_()
                    if need_anchors:
                        grad_anchors[row0:row1].addmm_(probabilities, key_block)
                    if need_keys:
                        grad_keys[col0:col0 + block].addmm_(probabilities.transpose(0, 1),
                                                            weighted[row0:row1])
            if need_anchors:
                grad_anchors.mul_(grad_lse.unsqueeze(1) / temperature)
        grad_extra = None
        if need_extra:
            grad_extra = grad_lse * (extra - shift.squeeze(1)).exp()
        return grad_anchors, grad_keys, grad_extra, None, None, None


def contrastive_logsumexp(anchors: torch.Tensor, keys: torch.Tensor, temperature: float,
                          excluded_key: torch.Tensor | None = None,
                          extra_logit: torch.Tensor | None = None,
                          block_size: int | None = None) -> torch.Tensor:
    """Per anchor, the log-sum-exp of its logits ``anchors @ keys.T / temperature``.

    Args:
        anchors: (R, D).
        keys: (C, D), e.g. keys gathered from every process (with their gradient).
        temperature: t > 0.
        excluded_key: (R,) int, optional: per anchor, the one key left out of its sum (itself).
        extra_logit: (R,) optional: one more logit per anchor inside the sum (a positive whose key
            is not among ``keys``, as MoCo's).
        block_size: tile edge; ``None`` automatic (:func:`resolve_block_size`), 0 dense.

    Returns:
        (R,) in float32 for float32 / bf16 / fp16 inputs (they accumulate in float32), float64
        for float64. Differentiable in ``anchors``, ``keys`` and ``extra_logit``; its autograd
        graph keeps the inputs and the (R,) result, never an R x C tensor.
    """
    dtype = accumulation_dtype(anchors, keys, extra_logit)
    block = resolve_block_size(anchors.shape[0], keys.shape[0], block_size, anchors.device,
                               torch.finfo(dtype).bits // 8)
    # Autocast would put the tiles back into bf16: the sums must accumulate in ``dtype``.
    with torch.autocast(anchors.device.type, enabled=False):
        return _BlockwiseLogSumExp.apply(
            anchors.to(dtype), keys.to(dtype),
            None if extra_logit is None else extra_logit.to(dtype),
            excluded_key, temperature, block)
