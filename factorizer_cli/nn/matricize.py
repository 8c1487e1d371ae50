"""Matricize: fold a feature map into a batch of matrices for NMF, and back.

``Matricize`` splits channels into heads of ``head_dim`` and space into windows of ``patch_size``, and
makes one matrix per (sample, head, window): rows are the head's channels, columns the window's voxels::

    b (h d) (g0 p0) (g1 p1) (g2 p2)  ->  (b h) (g0 g1 g2) d (p0 p1 p2)

With ``shifts`` the map is first rolled cyclically (as torch.roll would), so windows straddle the
unshifted borders. The roll and the cut are done together, as a few block copies between two views of
the data, so ``x`` is read once (upstream rolls, then rearranges: four copies in 3D). ``SWMatricize`` (shifted windows) applies several such Matricize ops and stacks their outputs
along the first axis; its inverse averages the folded-back maps, so ``inverse_forward(forward(x)) == x``.

``partition_mean`` (and its in-place, slab-at-a-time twin ``partition_mean_``) is the shifted-window loop
of a Factorizer subblock: cut, transform, fold back, average over the partitions. The training path,
the inference path, the component capture and the ONNX export graph all call it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from einops import rearrange
from torch import Tensor, nn

from ..errors import ConfigError

Size = Sequence[int | None]


def _ntuple(value: int | Sequence[int] | None, n: int) -> tuple[int | None, ...]:
    if value is None or isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ConfigError(f"expected {n} values (one per spatial axis), got {tuple(value)}")
    return tuple(value)


class Matricize(nn.Module):
    """One (optionally shifted) window partition. ``input_size`` is ``(B, C, *spatial)``; B may be None."""

    def __init__(
        self,
        input_size: Size,
        num_heads: int | None = None,
        head_dim: int | None = None,
        grid_size: int | Sequence[int] | None = None,
        patch_size: int | Sequence[int] | None = None,
        shifts: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_heads is None and head_dim is None:
            raise ConfigError("Matricize needs `num_heads` or `head_dim`")
        if grid_size is None and patch_size is None:
            raise ConfigError("Matricize needs `grid_size` or `patch_size`")
        self.input_size = tuple(input_size)
        channels, spatial = input_size[1], tuple(input_size[2:])
        ndim = len(spatial)
        grid, patch = _ntuple(grid_size, ndim), _ntuple(patch_size, ndim)
        self.patch_size = tuple(
            s // max(g, 1) if p is None else max(p, 1) for s, g, p in zip(spatial, grid, patch)
        )
        self.grid_size = tuple(s // p for s, p in zip(spatial, self.patch_size))
        for axis, (s, p) in enumerate(zip(spatial, self.patch_size)):
            if s % p:
                raise ConfigError(
                    f"a feature map of spatial size {spatial} cannot be cut into windows of "
                    f"{self.patch_size}: {s} on axis {axis} is not a multiple of {p}; use a patch_size "
                    "that divides the size of every stage, or a larger spatial_size"
                )
        self.head_dim = channels // max(num_heads, 1) if head_dim is None else max(head_dim, 1)
        if channels % self.head_dim:
            raise ConfigError(f"{channels} channels cannot be split into heads of {self.head_dim}")
        self.num_heads = channels // self.head_dim
        self.shifts = None if shifts is None else tuple(int(s) for s in _ntuple(shifts, ndim))

        g = " ".join(f"g{i}" for i in range(ndim))
        p = " ".join(f"p{i}" for i in range(ndim))
        gp = " ".join(f"(g{i} p{i})" for i in range(ndim))
        g_p = " ".join(f"g{i} p{i}" for i in range(ndim))
        self.pattern = f"b (h d) {gp} -> (b h) ({g}) d ({p})"
        # Both layouts seen as the same 3 + 2·ndim axes, as views: copies between them need no reshape.
        self._spatial_axes = f"b (h d) {gp} -> b h d {g_p}"
        self._window_axes = f"(b h) ({g}) d ({p}) -> b h d {g_p}"
        self.axes = {"h": self.num_heads, **{f"g{i}": n for i, n in enumerate(self.grid_size)},
                     **{f"p{i}": n for i, n in enumerate(self.patch_size)}}
        self._blocks = _shift_blocks(self.grid_size, self.patch_size, self.shifts or (0,) * ndim)
        batch = input_size[0]
        self.output_size = (
            None if batch is None else batch * self.num_heads,
            math.prod(self.grid_size),
            self.head_dim,
            math.prod(self.patch_size),
        )

    def forward(self, x: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
        """Roll by ``shifts`` and cut into windows, in one pass over ``x`` (no rolled copy).

        ``rows = (start, stop)`` keeps only the windows whose index along the first spatial axis is
        in that range: inference cuts a feature map a slab at a time, to hold less in memory.
        """
        start, stop = rows or (0, self.grid_size[0])
        out = x.new_empty((x.shape[0] * self.num_heads, (stop - start) * math.prod(self.grid_size[1:]),
                           self.head_dim, math.prod(self.patch_size)))
        windows, spatial = self._window_view(out, stop - start), rearrange(x, self._spatial_axes, **self.axes)
        for window_index, spatial_index in self._row_blocks(start, stop):
            windows[window_index].copy_(spatial[spatial_index])
        return out

    def inverse_forward(self, x: Tensor) -> Tensor:
        """Put every window back in place and undo the roll: the exact inverse of ``forward``.

        The rows of ``x`` may number other than ``head_dim`` (NMF component maps fold ``R`` rows per
        head): the output then has ``num_heads × rows`` channels, head-major.
        """
        batch = x.shape[0] // self.num_heads
        out = x.new_empty((batch, self.num_heads * x.shape[2],
                           *(g * p for g, p in zip(self.grid_size, self.patch_size))))
        windows, spatial = self._window_view(x), rearrange(out, self._spatial_axes, **self.axes)
        for window_index, spatial_index in self._blocks:
            spatial[spatial_index].copy_(windows[window_index])
        return out

    def fold_add_(self, acc: Tensor, x: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
        """``acc += inverse_forward(x)`` in one pass, without a temporary (inference only).

        ``rows``: ``x`` holds only those windows, as made by ``forward(..., rows)``.
        """
        start, stop = rows or (0, self.grid_size[0])
        windows, spatial = self._window_view(x, stop - start), rearrange(acc, self._spatial_axes, **self.axes)
        for window_index, spatial_index in self._row_blocks(start, stop):
            spatial[spatial_index].add_(windows[window_index])
        return acc

    def _window_view(self, x: Tensor, rows: int | None = None) -> Tensor:
        return rearrange(x, self._window_axes, **{**self.axes, "g0": rows or self.grid_size[0]})

    def _row_blocks(self, start: int, stop: int) -> list[tuple[Index, Index]]:
        """The blocks restricted to windows ``start:stop`` along the first axis, re-indexed from 0.

        Inside a block, window row ``g`` holds spatial row ``g - offset``, so a sub-range of window
        rows maps to the same sub-range, shifted, of spatial rows.
        """
        if (start, stop) == (0, self.grid_size[0]):
            return self._blocks
        blocks = []
        for window_index, spatial_index in self._blocks:
            w, sp = window_index[3], spatial_index[3]  # g0 sits after b, h, d
            lo, hi = max(w.start, start), min(w.stop, stop)
            if lo < hi:
                shift = sp.start - w.start
                blocks.append((window_index[:3] + (slice(lo - start, hi - start),) + window_index[4:],
                               spatial_index[:3] + (slice(lo + shift, hi + shift),) + spatial_index[4:]))
        return blocks


Index = tuple[slice, ...]


def _shift_blocks(grid: Sequence[int], patch: Sequence[int], shifts: Sequence[int]) -> list[tuple[Index, Index]]:
    """Rectangular blocks that map the rolled, windowed layout onto the unrolled spatial one.

    Along one axis of ``G`` windows of ``P`` voxels rolled by ``s = qP + r``, window voxel ``(g, p)``
    holds spatial voxel ``(g - q, p - r)`` if ``p >= r``, else ``(g - q - 1, P - r + p)``, windows
    counted modulo ``G``: at most two ranges of ``p`` times two of ``g``. The blocks of all axes combine
    as a product; each block is an index for the ``b h d g0 p0 g1 p1 ...`` views of both layouts.
    """
    per_axis = []
    for n_windows, size, shift in zip(grid, patch, shifts):
        q, r = divmod(shift % (n_windows * size), size)
        pieces = []
        for p_window, p_spatial, g_shift in (
            (slice(r, size), slice(0, size - r), q),
            (slice(0, r), slice(size - r, size), q + 1),
        ):
            if p_window.start == p_window.stop:
                continue
            g_shift %= n_windows
            for g_window, g_spatial in (
                (slice(g_shift, n_windows), slice(0, n_windows - g_shift)),
                (slice(0, g_shift), slice(n_windows - g_shift, n_windows)),
            ):
                if g_window.start != g_window.stop:
                    pieces.append(((g_window, p_window), (g_spatial, p_spatial)))
        per_axis.append(pieces)
    head = (slice(None),) * 3
    return [
        (head + sum((w for w, _ in combo), ()), head + sum((s for _, s in combo), ()))
        for combo in itertools.product(*per_axis)
    ]


class SWMatricize(nn.Module):
    """Shifted-window Matricize: one partition per entry of ``shifts``, stacked along the first axis.

    ``shifts`` defaults to ``[None, patch_size // 2]`` (plain windows and half-window shifted ones), as
    in Swin Transformers. Each entry may be None, an int (same shift on every axis) or one int per axis.
    """

    def __init__(
        self,
        input_size: Size,
        num_heads: int | None = None,
        head_dim: int | None = None,
        grid_size: int | Sequence[int] | None = None,
        patch_size: int | Sequence[int] | None = None,
        shifts: Sequence[int | Sequence[int] | None] | None = None,
    ) -> None:
        super().__init__()
        ndim = len(input_size) - 2
        if shifts is None:
            patch = _ntuple(patch_size, ndim)
            if None in patch:
                raise ConfigError("SWMatricize needs `patch_size` or explicit `shifts`")
            shifts = [None, tuple(p // 2 for p in patch)]
        self.shifted_windows = nn.ModuleList(
            Matricize(input_size, num_heads, head_dim, grid_size, patch_size, s) for s in shifts
        )
        self.output_size = self.shifted_windows[0].output_size
        if self.output_size[0] is not None:
            self.output_size = (self.output_size[0] * len(shifts), *self.output_size[1:])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([window(x) for window in self.shifted_windows])

    def inverse_forward(self, x: Tensor) -> Tensor:
        """Fold every partition back and average them.

        A running mean, ``m += (y - m) / k``, rather than ``sum / count``: it returns ``x`` bit for bit
        from ``forward(x)`` whatever the number of shifts (``(x + x + x) / 3`` is not always ``x``).
        """
        folded = [w.inverse_forward(c) for w, c in zip(self.shifted_windows, x.chunk(len(self.shifted_windows)))]
        out = folded[0]
        for k, y in enumerate(folded[1:], start=2):
            out = out + (y - out) / k
        return out


class Partition(Protocol):
    """A window partition: ``p(x)`` cuts a map into windows, ``p.inverse_forward(y)`` puts them back."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def inverse_forward(self, y: Tensor) -> Tensor: ...


def fold_mean(partitions: Sequence[Partition], windows: Iterable[Tensor]) -> Tensor:
    """The mean over partitions of ``p.inverse_forward(y_p)``; ``windows`` may be a generator, so that one
    partition's windows exist at a time. Summed, then divided by the count, as upstream does."""
    total = None
    for partition, y in zip(partitions, windows, strict=True):
        folded = partition.inverse_forward(y)
        total = folded if total is None else total + folded
    return total / len(partitions) if len(partitions) > 1 else total


def partition_mean(x: Tensor, partitions: Sequence[Partition], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``mean_p p⁻¹(fn(p(x)))``: the shifted-window loop, out of place (autograd, capture, export)."""
    return fold_mean(partitions, (fn(partition(x)) for partition in partitions))


def partition_mean_(
    x: Tensor, partitions: Sequence[Matricize], fn: Callable[[Tensor], Tensor], slab_elements: int
) -> Tensor:
    """``partition_mean`` at inference: a slab of about ``slab_elements`` window values at a time (whole
    rows of windows along the first axis), each folded into one accumulator in place. ``fn`` may write
    over its input; nothing here is differentiable."""
    acc = torch.zeros_like(x)
    rows = partitions[0].grid_size[0]
    step = max(1, rows * slab_elements // x.numel())  # window rows per slab
    for partition in partitions:
        for start in range(0, rows, step):
            slab = (start, min(start + step, rows))
            partition.fold_add_(acc, fn(partition(x, rows=slab)), rows=slab)
    return acc.div_(len(partitions)) if len(partitions) > 1 else acc
