"""Sliding-window inference against MONAI (test-only reference); memory, devices, mirror TTA."""

from __future__ import annotations

import gc
import math

import pytest
import torch
import torch.nn.functional as F

from factorizer_cli.pipeline.sliding_window import (
    gaussian_importance,
    mirror_tta,
    reuse_constant_windows,
    sliding_window_inference,
    window_starts,
    zeros_in_layout,
)

monai_utils = pytest.importorskip("monai.data.utils")
monai_inferers = pytest.importorskip("monai.inferers")


def ramp(n: int, axis: int, dims: int) -> torch.Tensor:
    """0, 1, ..., n-1 along ``axis``, shaped to broadcast over ``dims`` spatial axes."""
    return torch.arange(n, dtype=torch.float32).view([n if a == axis else 1 for a in range(dims)])


def make_predictor(c_in: int, k_out: int, dims: int, seed: int = 0):
    """A fixed random conv net plus a ramp in window coordinates, so where a window sits matters."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k_out, c_in, *(3,) * dims, generator=g) * 0.3
    bias = torch.randn(k_out, generator=g)
    conv = F.conv2d if dims == 2 else F.conv3d

    def predictor(x: torch.Tensor) -> torch.Tensor:
        ramps = sum(ramp(n, axis, dims) / n for axis, n in enumerate(x.shape[2:]))
        return torch.tanh(conv(x, weight, bias, padding=1)) + ramps

    return predictor


def monai_reference(image, roi, predictor, overlap, sw_batch_size, sigma_scale=0.125):
    """MONAI's result for one case, and how many windows MONAI predicted."""
    seen = []

    def counted(x):
        seen.append(x.shape[0])
        return predictor(x)

    out = monai_inferers.sliding_window_inference(
        image[None], roi, sw_batch_size, counted, overlap, mode="gaussian", sigma_scale=sigma_scale
    )
    return torch.as_tensor(out)[0], sum(seen)


CASES = [  # (spatial dims, image (C, *spatial), roi): not multiples of the roi, or smaller
    (2, (3, 37, 29), (16, 12)),
    (3, (2, 19, 23, 17), (8, 10, 6)),
    (2, (1, 5, 30), (8, 8)),
    (3, (2, 4, 9, 20), (7, 12, 8)),
]


@pytest.mark.parametrize("sw_batch_size", [1, 3])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("dims,shape,roi", CASES)
def test_matches_monai(dims, shape, roi, overlap, sw_batch_size):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    predictor = make_predictor(shape[0], 3, dims)  # K=3 differs from C
    calls = []
    ours = sliding_window_inference(
        image,
        roi,
        predictor,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        progress=lambda done, total: calls.append((done, total)),
    )
    ref, monai_windows = monai_reference(image, roi, predictor, overlap, sw_batch_size)
    assert ours.shape == (3, *shape[1:]) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < 1e-5
    padded = tuple(max(s, r) for s, r in zip(shape[1:], roi))
    total = len(window_starts(padded, roi, overlap))
    assert total == monai_windows
    assert len(calls) == math.ceil(total / sw_batch_size) and calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})


@pytest.mark.parametrize("sigma_scale", [0.05, 0.25, 1.0])
def test_matches_monai_other_sigma(sigma_scale):
    image = torch.randn(2, 21, 18, 13, generator=torch.Generator().manual_seed(2))
    predictor = make_predictor(2, 1, 3, seed=3)
    roi = (8, 8, 8)
    ours = sliding_window_inference(image, roi, predictor, overlap=0.5, sigma_scale=sigma_scale)
    ref, _ = monai_reference(image, roi, predictor, 0.5, 1, sigma_scale)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("roi", [(7,), (16, 12), (8, 10, 6), (5, 1, 3), (128, 128, 128)])
@pytest.mark.parametrize("sigma_scale", [0.05, 0.125, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gaussian_importance_matches_monai(roi, sigma_scale, dtype):
    ours = gaussian_importance(roi, sigma_scale, dtype=dtype)
    ref = monai_utils.compute_importance_map(
        roi, mode="gaussian", sigma_scale=sigma_scale, dtype=dtype
    )
    assert ours.shape == roi and ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7, 0.75, 0.8, 0.9])
@pytest.mark.parametrize(
    "size,roi",
    [((37, 29), (16, 12)), ((10, 64, 33), (10, 10, 7)), ((96, 61, 96), (64, 20, 64))],
)
def test_window_starts_match_monai(size, roi, overlap):
    seen = []

    def record(x, coords):  # with_coord=True: MONAI passes each window's slices
        seen.extend(tuple(s.start for s in c[2:]) for c in coords)
        return x[:, :1]

    image = torch.zeros(1, 1, *size)
    monai_inferers.sliding_window_inference(image, roi, 4, record, overlap, with_coord=True)
    assert window_starts(size, roi, overlap) == seen


def test_window_starts_rejects_size_below_roi():
    with pytest.raises(ValueError, match="none smaller"):
        window_starts((5, 30), (8, 8), 0.5)


def live_window_batches(roi: tuple[int, ...]) -> int:
    """How many (B, K, *roi) tensors exist now (type(), not isinstance: skips lazy proxies)."""
    return sum(
        1
        for obj in gc.get_objects()
        if issubclass(type(obj), torch.Tensor)
        and obj.ndim == len(roi) + 2
        and tuple(obj.shape[2:]) == roi
    )


@pytest.mark.parametrize("sw_batch_size", [1, 4])
def test_one_batch_at_a_time(sw_batch_size):
    """At most sw_batch_size windows per call; no earlier batch or prediction outlives its turn."""
    roi, sizes = (12, 12), []
    inner = make_predictor(1, 2, 2)

    def predictor(x):
        assert live_window_batches(roi) == 1, "an earlier batch or its prediction is still alive"
        sizes.append(x.shape[0])
        return inner(x)

    gc.collect()
    image = torch.randn(1, 30, 26)
    sliding_window_inference(image, roi, predictor, overlap=0.5, sw_batch_size=sw_batch_size)
    assert max(sizes) <= sw_batch_size
    assert sum(sizes) == len(window_starts((30, 26), roi, 0.5)) == 16


@pytest.mark.parametrize("capacity", [64, 1])
def test_constant_windows_run_once_with_the_same_numbers(capacity):
    """Slices of one value (per channel) reach the network once per value and case; the blended result
    is the plain one's (to the last bits that a convolution's batch size moves), whatever the cache holds."""
    image = torch.randn(2, 12, 10, 16)
    image[:, :, :, 10:] = torch.tensor([-1.0, 2.0]).view(2, 1, 1, 1)  # six slices of one pair of values
    image[:, :, :, :2] = 0.0  # two more: another pair
    inner, seen = make_predictor(2, 3, 3), []

    def counting(x):
        seen.append(len(x))
        return inner(x)

    plain = sliding_window_inference(image, (12, 10, 1), inner, overlap=0.0, sw_batch_size=4)
    reused = sliding_window_inference(image, (12, 10, 1), reuse_constant_windows(counting, capacity),
                                      overlap=0.0, sw_batch_size=4)
    torch.testing.assert_close(reused, plain, rtol=1e-5, atol=1e-5)  # a wrong reuse is off by O(1)
    # batches of 4 slices: [0 0 v v] [v v v v] [v v c c] [c c c c]; 8 varying slices and one per value,
    # plus, when the cache holds only the first value, the second once more in the last batch
    assert seen == ([3, 4, 3] if capacity > 1 else [3, 4, 3, 1])


@pytest.mark.parametrize("roi", [(12, 10, 1), (8, 6, 3)])
def test_an_image_stored_slice_by_slice_blends_the_same(roi):
    """A slice-wise model's image comes stored slice by slice; windows are read and their outputs
    summed in that order, and the result is the usual one, stored in the usual order."""
    image = torch.randn(2, 12, 10, 16)
    by_slice = image.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    assert torch.equal(by_slice, image) and not by_slice.is_contiguous()
    predictor = make_predictor(2, 3, 3)
    usual = sliding_window_inference(image, roi, predictor, overlap=0.5, sw_batch_size=4)
    blended = sliding_window_inference(by_slice, roi, predictor, overlap=0.5, sw_batch_size=4)
    torch.testing.assert_close(blended, usual, rtol=0, atol=1e-6)
    assert blended.is_contiguous()


def test_zeros_in_layout_follow_the_axis_order():
    by_slice = torch.empty(16, 2, 12, 10).permute(1, 2, 3, 0)  # (C, I, J, K), K slowest
    zeros = zeros_in_layout(by_slice, (3, 12, 10, 16), torch.float32, "cpu")
    assert zeros.shape == (3, 12, 10, 16) and not zeros.any()
    assert zeros[:, :, :, 5].is_contiguous()  # one slice, one block
    assert zeros_in_layout(torch.empty(2, 4, 5), (3, 4, 5), torch.float16, "cpu").is_contiguous()


def test_float16_predictor_under_inference_mode():
    image = torch.randn(2, 20, 17, 15)
    predictor = make_predictor(2, 3, 3)
    plain = sliding_window_inference(image, (8, 8, 8), predictor, overlap=0.5)
    with torch.inference_mode():
        half = sliding_window_inference(
            image, (8, 8, 8), lambda x: predictor(x).half(), overlap=0.5, sw_batch_size=2
        )
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, plain, rtol=0, atol=3e-3)


def test_no_graph_kept_for_a_trainable_predictor():
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    out = sliding_window_inference(torch.randn(1, 20, 20), (8, 8), net)
    assert not out.requires_grad


def test_window_and_output_devices():
    """Windows go to window_device, the blend stays on output_device (meta stands in for a GPU)."""
    seen = []

    def predictor(x):
        seen.append(x.device.type)
        return torch.zeros(x.shape[0], 4, *x.shape[2:], device=x.device)

    image = torch.randn(1, 20, 9)
    out = sliding_window_inference(
        image, (8, 12), predictor, window_device="meta", output_device="meta"
    )
    assert set(seen) == {"meta"} and out.device.type == "meta" and out.shape == (4, 20, 9)
    out = sliding_window_inference(image, (8, 12), make_predictor(1, 4, 2), output_device="meta")
    assert out.device.type == "meta" and out.shape == (4, 20, 9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(roi=(8, 8, 8)), "spatial axes"),
        (dict(roi=(8,)), "spatial axes"),
        (dict(roi=(8, 0)), "positive"),
        (dict(overlap=-0.1), "overlap"),
        (dict(overlap=1.0), "overlap"),
        (dict(overlap=float("nan")), "overlap"),
        (dict(sw_batch_size=0), "sw_batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(roi=(8, 8), overlap=0.5, sw_batch_size=1) | kwargs
    roi = args.pop("roi")
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(torch.zeros(1, 16, 16), roi, make_predictor(1, 1, 2), **args)


def test_predictor_with_wrong_output_shape():
    with pytest.raises(ValueError, match="predictor must map"):
        sliding_window_inference(torch.zeros(1, 16, 16), (8, 8), lambda x: x[:, :, :4])


@pytest.mark.parametrize("dims", [2, 3])
def test_mirror_tta_equivariant_predictor_is_unchanged(dims):
    calls = []

    def pointwise(x):  # commutes with every flip
        calls.append(1)
        return torch.sigmoid(2 * x[:, :1] - x[:, 1:]) * x[:, :1]

    x = torch.randn(2, 2, *(7, 5, 6)[:dims])
    torch.testing.assert_close(mirror_tta(pointwise, dims)(x), pointwise(x))
    assert len(calls) == 2**dims + 1


@pytest.mark.parametrize("dims", [2, 3])
def test_mirror_tta_averages_flipped_ramps(dims):
    """Return i and i**2 along each axis: TTA gives (n-1)/2 and (i**2 + (n-1-i)**2)/2."""
    spatial = (7, 5, 6)[:dims]

    def ramps(x):  # ignores the input's values
        channels = []
        for axis, n in enumerate(spatial):
            i = ramp(n, axis, dims)
            channels += [i.expand(spatial), (i**2).expand(spatial)]
        return torch.stack(channels).expand(x.shape[0], -1, *spatial)

    out = mirror_tta(ramps, dims)(torch.zeros(3, 1, *spatial))
    assert out.shape == (3, 2 * dims, *spatial) and out.dtype == torch.float32
    for axis, n in enumerate(spatial):
        i = ramp(n, axis, dims)
        expected = ((i**2 + (n - 1 - i) ** 2) / 2).expand(3, *spatial)
        torch.testing.assert_close(out[:, 2 * axis], torch.full((3, *spatial), (n - 1) / 2))
        torch.testing.assert_close(out[:, 2 * axis + 1], expected)


def test_mirror_tta_rejects_wrong_spatial_dims():
    with pytest.raises(ValueError, match="spatial axes"):
        mirror_tta(lambda x: x, 3)(torch.zeros(1, 1, 4, 4))
