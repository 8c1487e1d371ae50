"""Sliding-window inference with Gaussian blending, and mirror test-time augmentation.

A volume larger than the network's window is cut into overlapping windows of size ``roi``. Each
batch of windows is predicted and summed in place into one output, weighted by a Gaussian: a voxel
near a window's edge saw less context, so it counts less. The sum is divided by the summed weights
at the end. Memory: the output, one weight-sum map and one batch of windows.

Placement, weights and padding follow MONAI's ``sliding_window_inference(mode="gaussian")``, so the
two agree to float rounding (the tests check it):

- per axis the step is ``int(roi * (1 - overlap))``, at least 1; windows start at multiples of the
  step, the last moved back to end at the border; the last axis varies fastest;
- the Gaussian has sigma ``sigma_scale * roi`` per axis, peak 1, clamped below at 1e-3;
- an axis shorter than the roi is zero-padded, ``diff // 2`` before and the rest after; the output
  is cropped back.

A predictor may return a tuple of tensors (the probabilities, then extra maps such as NMF components):
each is blended with the same weights, extras in ``extra_dtype`` to save memory.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InputShapeError

Predictor = Callable[[Tensor], Tensor]
Device = torch.device | str | None


def gaussian_importance(
    roi: tuple[int, ...],
    sigma_scale: float = 0.125,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
) -> Tensor:
    """Blending weights of one window: a separable Gaussian, 1 at the centre, never below 1e-3."""
    profiles = []
    for n in roi:  # float32 whatever `dtype`, then cast, as MONAI does
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        profiles.append(torch.exp(x**2 / (-2 * (sigma_scale * n) ** 2)))
    weight = functools.reduce(lambda acc, p: acc[..., None] * p, profiles)
    return weight.clamp_(min=1e-3).to(dtype)  # every voxel keeps weight: the blend divides by it


def _check_overlap(overlap: float) -> None:
    if not 0 <= overlap < 1:  # also rejects NaN
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}")


def window_starts(
    size: tuple[int, ...], roi: tuple[int, ...], overlap: float
) -> list[tuple[int, ...]]:
    """First voxel of each window over ``size`` (padded to at least ``roi``); last axis fastest."""
    _check_overlap(overlap)
    if len(size) != len(roi) or any(s < r for s, r in zip(size, roi)):
        raise InputShapeError(f"size {tuple(size)} must match roi {tuple(roi)}, none smaller")
    per_axis = []
    for s, r in zip(size, roi):
        step = max(int(r * (1 - overlap)), 1)  # as MONAI, float rounding too: 10, 0.8 -> 1
        count = -(-(s - r) // step) + 1  # fewest windows whose last one reaches the border
        per_axis.append([min(i * step, s - r) for i in range(count)])
    return list(itertools.product(*per_axis))


def zeros_in_layout(like: Tensor, shape: Sequence[int], dtype: torch.dtype, device: Device) -> Tensor:
    """Zeros of ``shape`` stored in ``like``'s axis order (its slowest axis slowest), whatever its strides.

    Why: windows are read from the image and summed into the output window by window; a slice-wise
    model's image is stored slice by slice (``pipeline.preprocess.stack_slices``), so that a window
    of one slice is one block of memory, and its output must be too: in the usual order each of its
    voxels lies a slice's depth apart, and the blend read and wrote whole cache lines per voxel.
    """
    order = sorted(range(like.ndim), key=lambda axis: -like.stride(axis))  # stable: ties keep their order
    stored = torch.zeros([shape[axis] for axis in order], dtype=dtype, device=device)
    return stored.permute([order.index(axis) for axis in range(like.ndim)])


@torch.no_grad()  # never differentiated: a graph per window would defeat the memory bound
def sliding_window_inference(
    image: Tensor,
    roi: Sequence[int],
    predictor: Predictor,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    sigma_scale: float = 0.125,
    window_device: Device = None,
    output_device: Device = None,
    progress: Callable[[int, int], None] | None = None,
    extra_dtype: torch.dtype = torch.float32,
) -> Tensor | tuple[Tensor, ...]:
    """Blend ``predictor`` over windows of ``image`` (C, *spatial) into float32 (K, *spatial).

    ``predictor`` maps (B, C, *roi) to (B, K, *roi) on ``window_device``; the blend is kept on
    ``output_device`` (both default to the image's device), so a GPU can predict while the CPU holds
    a volume too large for GPU memory. ``progress(done, total)`` is called after every batch.
    A predictor returning a tuple gives a tuple: the first blended in float32, the others in
    ``extra_dtype``.
    """
    roi = tuple(int(r) for r in roi)
    if image.ndim != len(roi) + 1:
        raise InputShapeError(
            f"image must be (C, *spatial) with {len(roi)} spatial axes for roi {roi}, "
            f"got shape {tuple(image.shape)}"
        )
    if min(roi) < 1:
        raise ConfigError(f"roi sizes must be positive, got {roi}")
    if sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size must be at least 1, got {sw_batch_size}")
    _check_overlap(overlap)
    window_device = torch.device(window_device or image.device)
    output_device = torch.device(output_device or image.device)

    spatial = tuple(image.shape[1:])
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(spatial, roi)]
    padded = any(before or after for before, after in pads)
    if padded:  # F.pad lists the last axis first
        image = F.pad(image, [p for pair in reversed(pads) for p in pair])
    size = tuple(image.shape[1:])

    starts = window_starts(size, roi, overlap)
    weight = gaussian_importance(roi, sigma_scale, device=window_device)
    weight_out = weight.to(output_device)
    weight_sum = zeros_in_layout(image[0], size, torch.float32, output_device)
    outputs: list[Tensor] | None = None
    several = False
    for first in range(0, len(starts), sw_batch_size):
        boxes = [
            tuple(slice(a, a + r) for a, r in zip(start, roi))
            for start in starts[first : first + sw_batch_size]
        ]
        batch = torch.stack([image[(slice(None), *box)] for box in boxes]).to(window_device)
        preds = predictor(batch)
        several = isinstance(preds, tuple)
        preds = preds if several else (preds,)
        for pred in preds:
            if pred.ndim != batch.ndim or pred.shape[0] != len(boxes) or pred.shape[2:] != roi:
                raise InputShapeError(
                    f"predictor must map {tuple(batch.shape)} to (B, K, *roi), "
                    f"returned {tuple(pred.shape)}"
                )
        if outputs is None:  # K is known only now
            outputs = [zeros_in_layout(image, (p.shape[1], *size), torch.float32 if i == 0 else extra_dtype,
                                       output_device) for i, p in enumerate(preds)]
        for output, pred in zip(outputs, preds):
            # float32 even if predicted in float16; an extra is cast to its blend's type
            pred = (pred.float() * weight).to(output_device, output.dtype)
            for box, window in zip(boxes, pred):
                output[(slice(None), *box)] += window
            del pred, window  # `window` is a view: it too would keep this batch alive
        for box in boxes:
            weight_sum[box] += weight_out
        del batch, preds
        if progress is not None:
            progress(min(first + sw_batch_size, len(starts)), len(starts))

    assert outputs is not None  # there is always at least one window
    for output in outputs:
        output /= weight_sum
    if padded:
        crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
        outputs = [o[(slice(None), *crop)].clone() for o in outputs]  # clone: do not pin the padded storage
    outputs = [o.contiguous() for o in outputs]  # the usual order, whatever the image's
    return tuple(outputs) if several else outputs[0]


def mirror_tta(predictor: Predictor, spatial_dims: int = 3, mirrored_dims: int | None = None) -> Predictor:
    """Wrap ``predictor`` to average over all flips of the first ``mirrored_dims`` spatial axes (all by
    default: 2**spatial_dims predictions, as nnU-Net). A slice-wise model mirrors in-plane only (2):
    its window's slice axis has one voxel, the neighbouring slices being channels.

    Each flipped input's prediction is flipped back before averaging; the average is float32. A
    predictor returning a tuple of tensors gives a tuple, each averaged so.
    """
    mirrored_dims = spatial_dims if mirrored_dims is None else mirrored_dims
    if spatial_dims < 1 or not 1 <= mirrored_dims <= spatial_dims:
        raise ConfigError(f"spatial_dims must be at least 1 and mirrored_dims in 1..spatial_dims, got "
                          f"{spatial_dims}, {mirrored_dims}")
    axes = range(2, 2 + mirrored_dims)
    flips = [dims for k in range(mirrored_dims + 1) for dims in itertools.combinations(axes, k)]

    def mirrored(x: Tensor) -> Tensor:
        if x.ndim != spatial_dims + 2:
            raise InputShapeError(f"expected (B, C) + {spatial_dims} spatial axes, got {x.shape}")
        total: list[Tensor] | None = None
        several = False
        for dims in flips:
            ys = predictor(x.flip(dims) if dims else x)
            several = isinstance(ys, tuple)
            ys = [(y.flip(dims) if dims else y).float() for y in (ys if several else (ys,))]
            # not in place: y may be the predictor's
            total = ys if total is None else [t + y for t, y in zip(total, ys)]
        assert total is not None
        means = tuple(t / len(flips) for t in total)
        return means if several else means[0]

    return mirrored


def reuse_constant_windows(predictor: Predictor, capacity: int = 64) -> Predictor:
    """Wrap ``predictor`` to run each constant window (one value per channel) once and reuse its output.

    Why: a slice-wise model on an atlas grid sees whole slices of one value (the grid's empty top, or
    what lay outside the scan's field of view): 30 of the MNI152 template's 189 axial slices. Reuse
    is exact only for a network whose output for a window does not depend on the other windows of
    its batch, so segment applies it to slice-wise models alone. Outputs are kept per channel values,
    at most ``capacity`` of them (a case has a handful: the fill and the background).
    """
    cache: dict[tuple[float, ...], Tensor] = {}

    def reusing(x: Tensor) -> Tensor:
        flat = x.flatten(2)
        lows, highs = flat.amin(2).tolist(), flat.amax(2).tolist()
        keys = [tuple(lo) if lo == hi else None for lo, hi in zip(lows, highs)]
        run: list[int] = []  # windows the network sees: all varying ones, each new constant once
        first: dict[tuple[float, ...], int] = {}  # a new constant's position in ``run``
        position: list[int | None] = []  # each window's output in ``run``'s, or None: from the cache
        for i, key in enumerate(keys):
            if key is not None and key in cache:
                position.append(None)
            elif key is not None and key in first:
                position.append(first[key])
            else:
                if key is not None:
                    first[key] = len(run)
                position.append(len(run))
                run.append(i)
        every = len(run) == len(x)
        outputs = predictor(x if every else x[run]) if run else None
        for key, p in first.items():
            if len(cache) < capacity:
                cache[key] = outputs[p].clone()  # type: ignore[index]  # the caller may write into outputs
        if every:
            return outputs
        return torch.stack([cache[key] if p is None else outputs[p]  # type: ignore[index]
                            for key, p in zip(keys, position)])

    return reusing
