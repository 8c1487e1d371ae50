"""A Swin Factorizer subblock at inference without cutting windows: statistics of half-window blocks.

The published Factorizers run rank-1 HALS on nonnegative input over two window partitions of a 3D map:
plain windows of ``P`` voxels and windows shifted by ``P / 2`` (``SWMatricize``'s default). Inference
only needs, per window and head, the ``d × d`` Gram matrix ``X Xᵀ``, ``X 1`` and ``X v0``
(``factorization.rank1_hals_gram``), and the reconstruction is then a per-window linear map of each voxel's
head channels: ``y = Π x + ε s`` (``Π = u sᵀ``, ``s = u / (uᵀu + ε)``). Both partitions are unions of the same
half-window blocks (``P / 2`` per axis): each block lies in exactly one window of each partition. So:

1. one pass computes ``z = relu(in_proj(norm(x)))`` block by block, in a block-major layout, with each
   block's Gram matrix per head and its products with ``1`` and with every octant of ``v0``;
2. the windows' statistics are sums of eight blocks' (the shifted partition: of the blocks rolled by one),
   and the HALS iterations run on them as ``NMF._rank1_hals_gram`` does;
3. a second pass applies, per block, the mean of its two windows' maps composed with ``out_proj`` (one
   ``C × C`` matrix per block) and adds the residual: ``x + out_proj(mean_p fold_p(nmf(cut_p(z))))``.

The map is never cut into windows nor folded back (the copies took about a third of the forward), the
mean over partitions and ``out_proj`` cost one batched product, and only ``z`` exists at full size. The
result equals the windowed computation up to floating-point rounding (tested against it); other
configurations (other shifts, ranks, solvers, 2D maps) keep the windowed path, and so do other devices
than the CPU (there the windowed path is the one measured on a GPU; this one has not been).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .factorization import NMF, rank1_hals_gram
from .layers import LayerNorm, Linear, is_channels_last, layer_norm_rows
from .matricize import SWMatricize

# Pass 1 and 2 work on pieces of about 4 MB (float32) of the map at a time.
_PIECE_ELEMENTS = 1 << 20


def applies(x: Tensor, norm: object, sub: object) -> bool:
    """Whether ``x + sub(norm(x))`` may run here: the configuration of every published Swin Factorizer."""
    factorize, tensorize = getattr(sub, "factorize", None), getattr(sub, "tensorize", None)
    if not (isinstance(norm, LayerNorm) and isinstance(factorize, NMF) and isinstance(tensorize, SWMatricize)
            and getattr(sub, "_relu_act", False) and getattr(sub, "recorder", None) is None):
        return False
    if not (factorize.gram_shortcut and not factorize.verbose and x.dim() == 5
            and (x.is_contiguous() or is_channels_last(x))
            and x.dtype in (torch.float32, torch.float64) and x.device.type == "cpu"
            and not torch.is_autocast_enabled(x.device.type)):
        return False
    windows = list(tensorize.shifted_windows)
    if len(windows) != 2 or tuple(x.shape[1:]) != tuple(windows[0].input_size[1:]):
        return False
    half = tuple(p // 2 for p in windows[0].patch_size)
    return (all(p % 2 == 0 for p in windows[0].patch_size) and windows[0].shifts in (None, (0, 0, 0))
            and windows[1].shifts == half)


def swin_gram_residual(x: Tensor, norm: LayerNorm, sub: torch.nn.Module) -> Tensor:
    """``x + sub(norm(x))`` for a subblock where ``applies`` holds; a new tensor, ``x`` is left as it was."""
    window = sub.tensorize.shifted_windows[0]
    half = tuple(p // 2 for p in window.patch_size)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        z, gram, linear = _blocks_and_statistics(x[b], norm, sub.in_proj, sub.factorize.init.v0, half,
                                                  window.num_heads)
        maps = _window_maps(gram, linear, sub.factorize, sub.out_proj, window.num_heads)
        _project_add(z, maps, sub.out_proj, x[b], out[b], half)
    return out


def _block_view(map_: Tensor, half: tuple[int, int, int]) -> Tensor:
    """``C × D × H × W`` as ``J0 × S0 × J1 × S1 × J2 × S2 × C`` (blocks of ``S`` voxels), a view in either
    memory format (channels last, its rows of blocks are copied in runs of ``S2 × C`` values)."""
    blocks = map_.movedim(0, -1)
    for axis, s in enumerate(half):
        blocks = blocks.unflatten(2 * axis, (-1, s))
    return blocks


def _blocks_and_statistics(
    x: Tensor, norm: LayerNorm, in_proj: Linear, v0: Tensor, half: tuple[int, int, int], heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``z`` as ``J0 × J1 × J2 × S³ × C`` (block-major, channels last) and, per block and head, its Gram
    matrix ``J0 × J1 × J2 × h × d × d`` and its products with ``[1, v0's eight octants]``,
    ``J0 × J1 × J2 × 9 × h × d``.

    A piece of a row of blocks at a time (``_pieces``): its statistics are taken while it is in cache.
    """
    channels = in_proj.linear.weight.shape[0]
    blocks = _block_view(x, half)  # J0 S0 J1 S1 J2 S2 C
    j0, j1, j2 = blocks.shape[0], blocks.shape[2], blocks.shape[4]
    weight, bias = in_proj.linear.weight[..., 0], in_proj.linear.bias
    columns = _octant_columns(v0.to(x.dtype), half).t()  # 9 × S³
    volume = half[0] * half[1] * half[2]
    z = x.new_empty((j0, j1, j2, volume, channels))
    d = channels // heads
    gram = x.new_empty((j0, heads, j1, j2, d, d))
    linear = x.new_empty((j0, j1, j2, 9, channels))
    for row, piece in _pieces(j0, j1, j2 * volume * channels):
        # One transposing copy: the piece of a row of blocks as voxels × channels, block-major.
        rows = blocks[row, :, piece].permute(1, 3, 0, 2, 4, 5).reshape(-1, channels)
        rows = layer_norm_rows(rows, norm)
        z_piece = z[row, piece].flatten(0, 1)  # blocks × S³ × C
        out = z_piece.view(-1, channels)
        if bias is None:
            torch.mm(rows, weight.t(), out=out)
        else:
            torch.addmm(bias, rows, weight.t(), out=out)
        out.relu_()
        for h in range(heads):  # each head's Gram matrix only: a strided view per head, no copy
            head = z_piece[..., h * d : (h + 1) * d]
            torch.bmm(head.transpose(1, 2), head, out=gram[row, h, piece].flatten(0, 1))
        torch.matmul(columns, z_piece, out=linear[row, piece].flatten(0, 1))
    return z, gram.permute(0, 2, 3, 1, 4, 5), linear.view(j0, j1, j2, 9, heads, d)


def _pieces(j0: int, j1: int, elements_per_j1: int):
    """``(row, slice of J1)``: rows of blocks cut into pieces of about ``_PIECE_ELEMENTS`` values, small
    enough that each piece's temporaries (its copy, normalised rows, products) stay in cache."""
    step = max(1, _PIECE_ELEMENTS // elements_per_j1)
    for row in range(j0):
        for start in range(0, j1, step):
            yield row, slice(start, min(start + step, j1))


def _octant_columns(v0: Tensor, half: tuple[int, int, int]) -> Tensor:
    """``[1, v0 over octant 0, …, octant 7]`` as ``S³ × 9``: a block's part of ``v0``, by its octant.

    ``v0``'s rows are a window's voxels ``(p0 p1 p2)``; octant ``o = 4 o0 + 2 o1 + o2`` is the block at
    ``p_i ∈ [o_i S_i, (o_i + 1) S_i)``, its voxels in ``(q0 q1 q2)`` order as the blocks' rows are.
    """
    s0, s1, s2 = half
    octants = v0[:, 0].view(2, s0, 2, s1, 2, s2).permute(0, 2, 4, 1, 3, 5).reshape(8, -1)
    return torch.cat([torch.ones_like(octants[:1]), octants]).t()


def _pair_sums(blocks: Tensor, shifted: bool) -> Tensor:
    """Sums over each window's 2 × 2 × 2 blocks (axes 0-2 of ``blocks``): window ``g`` holds blocks
    ``2g, 2g + 1`` on each axis in the plain partition, ``2g - 1, 2g`` (cyclically) in the shifted one."""
    for axis in range(3):
        even, odd = blocks.unflatten(axis, (-1, 2)).unbind(axis + 1)
        blocks = even + (odd.roll(1, axis) if shifted else odd)
    return blocks


def _window_statistics(gram: Tensor, linear: Tensor, shifted: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per window and head: ``X Xᵀ`` (``G0 G1 G2 × h × d × d``), ``X 1`` and ``X v0`` (``… × h × d × 1``).

    ``gram``: the blocks' ``J0 J1 J2 × h × d × d``; ``linear``: ``J0 J1 J2 × 9 × h × d``. In either
    partition the block at offset ``o`` (per axis, 0 or 1) within its window is that window's octant
    ``o``: its product with ``v0`` is column ``1 + 4 o0 + 2 o1 + o2`` of ``linear``.
    """
    j0, j1, j2 = gram.shape[:3]
    octant = (torch.arange(j0, device=gram.device)[:, None, None] % 2 * 4
              + torch.arange(j1, device=gram.device)[None, :, None] % 2 * 2
              + torch.arange(j2, device=gram.device)[None, None, :] % 2)
    if shifted:  # block j sits at offset (j + 1) % 2 of its shifted window
        octant = octant ^ 7
    x_v0 = linear.gather(3, (1 + octant)[..., None, None, None].expand(-1, -1, -1, 1, *linear.shape[4:]))
    row_sum = _pair_sums(linear[:, :, :, 0], shifted)
    return _pair_sums(gram, shifted), row_sum[..., None], _pair_sums(x_v0[:, :, :, 0], shifted)[..., None]


def _window_maps(
    gram: Tensor, linear: Tensor, nmf: NMF, out_proj: Linear, heads: int
) -> list[tuple[Tensor, Tensor]]:
    """Per partition, each window's reconstruction composed with ``out_proj`` and halved (the mean of two):
    ``(G0 G1 G2 × C_in × C_out, G0 G1 G2 × C_out)``, the bias not included.

    The iterations run in float64, as ``NMF._rank1_hals_gram`` runs them, and so does the composition.
    """
    small = torch.float64
    channels = heads * gram.shape[-1]
    weight = out_proj.linear.weight[..., 0].to(small).view(-1, heads, gram.shape[-1]) / 2
    v0, eps = nmf.init.v0.to(small), nmf.solver.eps
    maps = []
    for shifted in (False, True):
        window_gram, row_sum, x_v0 = (t.to(small) for t in _window_statistics(gram, linear, shifted))
        u, scaled = rank1_hals_gram(window_gram, row_sum, x_v0, v0, nmf.num_iters, eps)
        # W (u sᵀ z + ε s) / 2 per window, u sᵀ of rank one per head: (W u)_h s_hᵀ.
        grid = u.shape[:3]
        u, scaled = u[..., 0].flatten(0, 2), scaled[..., 0].flatten(0, 2)  # G × h × d
        weight_u = torch.einsum("chd,ghd->ghc", weight, u)
        composed = torch.einsum("ghc,ghe->ghec", weight_u, scaled).flatten(-3, -2)  # G × C_in × C_out
        shift = eps * torch.einsum("chd,ghd->gc", weight, scaled)
        maps.append((composed.to(gram.dtype).view(*grid, channels, channels),
                     shift.to(gram.dtype).view(*grid, channels)))
    return maps


def _project_add(
    z: Tensor, maps: list[tuple[Tensor, Tensor]], out_proj: Linear, x: Tensor, out: Tensor,
    half: tuple[int, int, int],
) -> None:
    """``out = x + out_proj(mean of the two windows' reconstructions)`` block by block, a piece at a time.

    Block ``j`` lies in plain window ``j // 2`` and in shifted window ``(j + 1) // 2`` (cyclically) on
    each axis; its ``C × C`` map is the sum of those two windows' (already halved) composed maps.
    """
    (plain, plain_shift), (shifted, shifted_shift) = maps
    bias = out_proj.linear.bias
    x_blocks, out_blocks = _block_view(x, half), _block_view(out, half)
    j0, j1, j2, channels = x_blocks.shape[0], x_blocks.shape[2], x_blocks.shape[4], x_blocks.shape[6]
    grid = plain.shape[:3]
    index = [torch.arange(n, device=z.device) for n in (j1, j2)]
    in_plain = [i // 2 for i in index]
    in_shifted = [(i + 1) // 2 % g for i, g in zip(index, grid[1:])]
    for row, piece in _pieces(j0, j1, j2 * z.shape[-2] * channels):
        a, b = row // 2, (row + 1) // 2 % grid[0]
        plain_rows = (in_plain[0][piece, None], in_plain[1][None, :])
        shifted_rows = (in_shifted[0][piece, None], in_shifted[1][None, :])
        composed = (plain[a][plain_rows] + shifted[b][shifted_rows]).view(-1, channels, channels)
        shift = plain_shift[a][plain_rows] + shifted_shift[b][shifted_rows]
        if bias is not None:
            shift += bias
        y = torch.baddbmm(shift.view(-1, 1, channels), z[row, piece].flatten(0, 1), composed)
        y = y.view(-1, j2, *half, channels).permute(2, 0, 3, 1, 4, 5)  # S0 J1 S1 J2 S2 C
        torch.add(x_blocks[row, :, piece], y, out=out_blocks[row, :, piece])
