"""SPiN in the 3D pipeline: its inference form, slice-wise training, in-plane TTA and ONNX export.

No fixtures needed: a narrow SPiN with random weights (BatchNorm statistics drawn away from identity)
on small phantoms. Parity with upstream itself is ``test_spin_parity.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.export import export_onnx
from factorizer_cli.families import TrainingView, build, family_of
from factorizer_cli.io.images import read_image
from factorizer_cli.nn.spin_inference import phase_weights
from factorizer_cli.pipeline.segment import SLICES_PER_CALL, InferenceOptions, Segmenter
from factorizer_cli.pipeline.sliding_window import mirror_tta, sliding_window_inference
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.onnx_file import open_onnx
from factorizer_cli.zoo.package import open_package, save_package

from .oracle import oblique, phantom

NARROW = {
    "class": "SPiNModel", "input_channels": 5,
    "encoder_type_subpixel_embedding": ["resnet5_subpixel_embedding"],
    "n_filters_encoder_subpixel_embedding": [8, 8, 8], "decoder_type_subpixel_embedding": ["subpixel"],
    "output_channels_subpixel_embedding": 4, "n_filter_decoder_subpixel_embedding": 8,
    "output_func_subpixel_embedding": "linear", "encoder_type_segmentation": ["resnet18"],
    "n_filters_encoder_segmentation": [8, 16, 32, 40, 40], "resolutions_subpixel_guidance": [0, 1],
    "n_filters_subpixel_guidance": [4, 4], "n_convolutions_subpixel_guidance": [1, 1],
    "decoder_type_segmentation": ["subpixel_guidance", "learnable_downsampler"],
    "n_filters_decoder_segmentation": [40, 32, 16, 8, 8, 8],
    "n_filters_learnable_downsampler": [8, 8], "kernel_sizes_learnable_downsampler": [3, 3],
}

CARD = {
    "name": "tiny-spin", "task": "lesion, slice by slice", "inputs": [{"name": "t1"}],
    "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, None], "crop_foreground": None,
                      "normalization": {"kind": "fixed", "mean": 30.0, "std": 35.0}, "slice_context": 2},
    "roi": [32, 36, 1], "outputs": ["lesion"], "labels": [{"region": "lesion", "label": 1}],
    "architecture": NARROW,
}


def narrow_spin(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build(NARROW).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if "batch_norm" in name and name.endswith(("weight", "running_var")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif "batch_norm" in name and name.endswith(("bias", "running_mean")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return network


@pytest.mark.parametrize("size", [(197, 233), (64, 80), (33, 47)])
def test_the_inference_form_computes_the_training_form(size):
    network = narrow_spin()
    prepared = family_of(network).prepare(network)
    x = torch.randn(2, 5, *size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected, got = network(x), prepared(x)
    for e, g in zip(expected, got):  # out2x and out1x
        assert e.shape == g.shape
        assert (e - g).abs().max() <= 1e-5 * max(1.0, float(e.abs().max()))
    assert all(n.shape == p.shape for n, p in zip(network.state_dict().values(), network.state_dict().values()))
    assert network.memory_format is torch.contiguous_format  # the training form is untouched


@pytest.mark.parametrize("resolutions", [[0, 1], [0, 2]])
def test_the_full_resolution_levels_run_one_slice_at_a_time_with_the_same_numbers(resolutions):
    """The inference form batches the coarse levels and runs the 2H×2W and H×W ones slice by slice,
    unless guidance joins a coarse level (it then needs every slice's embedding first)."""
    network = build({**NARROW, "resolutions_subpixel_guidance": resolutions}).eval()
    prepared = family_of(network).prepare(network)
    embedding_batches = []
    prepared.decoder_subpixel_embedding.register_forward_hook(lambda m, i, o: embedding_batches.append(len(o)))
    x = torch.randn(3, 5, 41, 45, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        sliced = prepared(x)
        prepared.slice_by_slice = False
        whole = prepared(x)
        expected = network(x)
    assert embedding_batches == ([1, 1, 1, 3] if resolutions == [0, 1] else [3, 3])
    for s, w, e in zip(sliced, whole, expected):  # oneDNN may pick other kernels for other batch sizes
        torch.testing.assert_close(s, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, e, atol=1e-5, rtol=1e-5)


def test_phase_weights_are_a_resize_then_a_conv():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(1, 6, 9, 11, generator=generator), torch.randn(5, 6, 3, 3, generator=generator),
                       torch.randn(5, generator=generator))
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    phased, phased_bias = phase_weights(weight, bias)
    subpixels = F.conv2d(x, phased, phased_bias, padding=1)  # (1, 4·5, 9, 11) in (row, column, channel) order
    got = subpixels.reshape(1, 2, 2, 5, 9, 11).permute(0, 3, 4, 1, 5, 2).reshape(1, 5, 18, 22)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_in_plane_tta_mirrors_rows_and_columns_only():
    seen = []

    def predictor(x):
        seen.append(x.clone())
        return x[:, :1]

    x = torch.randn(1, 5, 4, 6, 1)
    out = mirror_tta(predictor, spatial_dims=3, mirrored_dims=2)(x)
    assert len(seen) == 4  # none, rows, columns, both; never the one-voxel slice axis
    torch.testing.assert_close(out, x[:, :1])  # each flip undone before the mean
    assert any(torch.equal(s, x.flip(2)) for s in seen) and any(torch.equal(s, x.flip(2, 3)) for s in seen)


def test_training_supervises_out1x_slice_by_slice():
    network = narrow_spin()
    view = TrainingView(network, slice_wise=True)
    x = torch.randn(2, 5, 32, 36, 1)
    heads = view(x)
    assert heads.shape == (2, 1, 32, 36, 1)  # out1x only (as upstream's loss), the slice axis back
    torch.testing.assert_close(heads[..., 0], network.predict(x[..., 0]))


def _t1_case(folder: Path, seed: int) -> tuple[Path, Path]:
    """A T1-like phantom on an oblique grid with thick slices, its lesion the phantom's core."""
    images, labels = phantom(shape=(40, 44, 10), seed=seed)
    affine = oblique(8.0, spacing=(1.0, 1.0, 3.0))
    folder.mkdir(parents=True)
    t1, seg = folder / f"{folder.name}_t1.nii.gz", folder / f"{folder.name}_seg.nii.gz"
    nib.save(nib.Nifti1Image((images[0] * 60).astype(np.float32), affine), t1)
    nib.save(nib.Nifti1Image((labels == 1).astype(np.uint8), affine), seg)
    return t1, seg


def test_a_spin_card_trains_segments_and_exports(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    for i in range(3):
        _t1_case(data / f"case{i}", seed=i)
    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--card", str(card), "-o", str(run), "--steps", "4",
                                      "--batch-size", "2", "--validate-every", "2", "--validation-cases", "1",
                                      "--warmup-steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    package = open_package(run / "last")
    t1 = data / "case0" / "case0_t1.nii.gz"
    segmenter = Segmenter(package, InferenceOptions(device="cpu", sw_batch_size=4, tta=True))
    segmentation = segmenter([t1], keep_probabilities=True)
    source = nib.load(t1)
    assert segmentation.labels.shape == source.shape
    (exported,) = export_onnx(package, tmp_path / "spin.onnx")
    assert max(exported.max_abs_diff.values()) <= 1e-4
    onnx_result = Segmenter(open_onnx(tmp_path / "spin.onnx"), InferenceOptions(device="cpu"))(
        [read_image(t1)], keep_probabilities=True)
    segmenter = Segmenter(package, InferenceOptions(device="cpu"))
    slices_per_call, predictor = [], segmenter.predictor
    segmenter.predictor = lambda x: slices_per_call.append(x.shape[0]) or predictor(x)
    torch_result = segmenter([t1], keep_probabilities=True)
    assert max(slices_per_call) == SLICES_PER_CALL  # batches of slices by default, not one at a time
    assert np.abs(torch_result.probabilities - onnx_result.probabilities).max() <= 1e-4


def test_a_spin_package_of_upstream_weights_segments(tmp_path):
    """A package saved from the training form segments with the inference form (the zoo's path)."""
    card = ModelCard.from_dict(CARD)
    package = save_package(tmp_path / "pkg", card, [narrow_spin().state_dict()])
    t1, _ = _t1_case(tmp_path / "case", seed=5)
    result = Segmenter(package, InferenceOptions(device="cpu"))([t1], keep_probabilities=True)
    assert result.probabilities.shape == (1, *nib.load(t1).shape)
    assert np.isfinite(result.probabilities).all()


def test_blank_slices_reach_the_network_once(tmp_path):
    """An atlas grid's empty slices (one value after normalisation) run once per case, same numbers."""
    card = ModelCard.from_dict(CARD)
    package = save_package(tmp_path / "pkg", card, [narrow_spin().state_dict()])
    volume = np.random.default_rng(0).uniform(0, 100, (32, 36, 20)).astype(np.float32)
    volume[:, :, 12:] = 0.0  # eight blank slices
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 1.5, 1.0])), path)
    segmenter = Segmenter(package, InferenceOptions(device="cpu"))
    windows, predictor = [], segmenter.predictor
    segmenter.predictor = lambda x: windows.append(x.shape[0]) or predictor(x)
    prepared = segmenter.prepare([path])
    reused = segmenter.infer(prepared)
    # the stacks of slices 14..17 are blank throughout (12, 13 see slices before, 18, 19 the edge fill)
    assert sum(windows) == 20 - 4 + 1
    with torch.inference_mode():
        every = sliding_window_inference(torch.from_numpy(prepared.array), card.roi, predictor,
                                          overlap=card.overlap, sw_batch_size=SLICES_PER_CALL)
    np.testing.assert_allclose(reused, every.numpy(), rtol=0, atol=1e-5)


def test_the_stroke_example_card_builds_a_registered_slice_wise_spin():
    card = ModelCard.load(Path(__file__).parent.parent / "examples" / "stroke-spin.json")
    assert card.preprocessing.register == "mni152-2009a" and card.preprocessing.slice_context == 2
    assert card.roi == (197, 233, 1) and card.in_channels == 5 and card.slice_wise and card.weights == ()
    network = build(card.architecture)
    assert sum(p.numel() for p in network.parameters()) == 260_072  # the fixtures' narrow widths
