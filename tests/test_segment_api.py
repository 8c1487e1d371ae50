"""The segment Python API: ensembles, NMF iterations, co-registration of grids, options; and
``factorizer_cli.api``, the functions the command calls (load, plan, segment a case or a dataset)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from factorizer_cli.errors import ConfigError, DeviceError
from factorizer_cli.io import read_image
from factorizer_cli.nn import NMF
from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter
from factorizer_cli.zoo.package import save_package

from .oracle import oracle_card, oracle_package, oracle_weights, phantom, write_case


def test_ensemble_averages_the_folds_probabilities(tmp_path):
    images, _ = phantom()
    paths = write_case(tmp_path / "case", images, np.eye(4))
    strong, silent = oracle_weights(), oracle_weights()
    silent["weight"] = torch.zeros_like(silent["weight"])
    silent["bias"] = torch.full_like(silent["bias"], -50.0)  # probability ~0 everywhere
    single = Segmenter(save_package(tmp_path / "one", oracle_card(), [strong]),
                       InferenceOptions(device="cpu"))
    pair = Segmenter(save_package(tmp_path / "two", oracle_card(), [strong, silent]),
                     InferenceOptions(device="cpu"))
    case = [read_image(p) for p in paths]
    p1 = single(case, keep_probabilities=True).probabilities
    p2 = pair(case, keep_probabilities=True).probabilities
    np.testing.assert_allclose(p2, p1 / 2, atol=1e-6)


def _factorizer_card(tmp_path):
    card = oracle_card(roi=(32, 32, 32)).to_dict()
    card["architecture"] = {
        "class": "SegmentationFactorizer", "in_channels": 4, "out_channels": 3, "spatial_size": [32, 32, 32],
        "encoder_depth": [1, 1, 1], "encoder_width": [8, 16, 32], "strides": [1, 2, 2], "decoder_depth": [1, 1],
        "stem": {"class": "Conv3d", "kernel_size": 3, "padding": 1, "bias": False},
        "nmf": {"class": "FactorizerSubblock", "tensorize": {"class": "SWMatricize", "head_dim": 8, "patch_size": 4},
                "factorize": {"class": "NMF"}, "rank": 1, "num_iters": 5},
        "mlp": {"class": "MLP"},
    }
    from factorizer_cli.families import build
    from factorizer_cli.zoo.card import ModelCard

    torch.manual_seed(0)
    card = ModelCard.from_dict(card)
    return save_package(tmp_path / "factorizer", card, [build(dict(card.architecture)).state_dict()])


def test_fewer_nmf_iterations_reach_every_nmf_layer(tmp_path):
    package = _factorizer_card(tmp_path)
    segmenter = Segmenter(package, InferenceOptions(device="cpu", knobs={"nmf_iters": 2}))
    layers = [m for m in segmenter.networks[0].modules() if isinstance(m, NMF)]
    assert layers and all(m.num_iters == 2 for m in layers)
    images, _ = phantom(shape=(36, 40, 34))
    paths = write_case(tmp_path / "case", images, np.eye(4))
    case = [read_image(p) for p in paths]
    fast = segmenter(case, keep_probabilities=True).probabilities
    full = Segmenter(package, InferenceOptions(device="cpu"))(case, keep_probabilities=True).probabilities
    assert fast.shape == full.shape and not np.allclose(fast, full)
    with pytest.raises(ConfigError, match="at least 1"):
        Segmenter(package, InferenceOptions(device="cpu", knobs={"nmf_iters": 0}))


def test_modalities_on_another_grid_are_resampled_onto_the_first(tmp_path):
    images, expected = phantom()
    affine = np.eye(4)
    paths = write_case(tmp_path / "case", images, affine)
    # FLAIR stored on a grid shifted by 0.5 mm and stored LPS: same world content, other voxels.
    flair = nib.load(paths[3])
    shifted = affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 0.5]
    data = np.asarray(flair.dataobj)
    resampled = np.stack([data[:, :, :-1], data[:, :, 1:]]).mean(0)  # the FLAIR seen from +0.5 mm
    nib.save(nib.Nifti1Image(resampled, shifted), paths[3])
    segmenter = Segmenter(oracle_package(tmp_path / "model"), InferenceOptions(device="cpu"))
    result = segmenter([read_image(p) for p in paths])
    assert result.notes == [f"resampled {paths[3].name} onto the grid of {paths[0].name}"]
    assert result.labels.shape == expected.shape
    whole = expected > 0
    found = result.labels > 0
    assert 2 * (whole & found).sum() / (whole.sum() + found.sum()) > 0.95


def test_options_are_checked_before_any_work(tmp_path):
    package = oracle_package(tmp_path / "model")
    with pytest.raises(ConfigError, match="no label convention 'brats2019'"):
        Segmenter(package, InferenceOptions(device="cpu", label_convention="brats2019"))
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        Segmenter(package, InferenceOptions(device="cpu", precision="fp16"))
    with pytest.raises(DeviceError, match="unknown device"):
        Segmenter(package, InferenceOptions(device="tpu"))


def test_mirror_tta_on_a_symmetric_case_keeps_the_labels(tmp_path):
    images, expected = phantom()
    paths = write_case(tmp_path / "case", images, np.eye(4))
    segmenter = Segmenter(oracle_package(tmp_path / "model"), InferenceOptions(device="cpu", tta=True))
    # The oracle is voxel-wise, so flipping commutes with it: TTA must give the same labels.
    np.testing.assert_array_equal(segmenter([read_image(p) for p in paths]).labels, expected)


# --- factorizer_cli.api: the functions the command calls ----------------------------------------

def test_load_segmenter_then_segment_case_writes_every_output(tmp_path):
    from factorizer_cli.api import load_segmenter, segment_case

    images, expected = phantom()
    paths = write_case(tmp_path / "case", images, np.eye(4))
    oracle_package(tmp_path / "model")
    segmenter = load_segmenter(str(tmp_path / "model"), device="cpu", tta=False)
    out = tmp_path / "out"
    out.mkdir()
    result = segment_case(segmenter, tmp_path / "case", out / "seg.nii.gz", stats=out / "seg.json",
                          preview=out / "seg.png")
    np.testing.assert_array_equal(result.labels, expected)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "seg.nii.gz").dataobj), expected)
    stats = json.loads((out / "seg.json").read_text())
    assert stats["model"] == "oracle" and stats["device"] == "cpu" and stats["inputs"] == [str(p) for p in paths]
    assert sorted(p.name for p in out.iterdir()) == ["seg.json", "seg.nii.gz", "seg.png"]
    # files named by modality, in any order (aliases), give the same labels
    reordered = segment_case(segmenter, [paths[3], paths[0], paths[2], paths[1]], out / "b.nii.gz",
                             modalities=["flair", "t1", "t2", "t1ce"])
    np.testing.assert_array_equal(reordered.labels, expected)


def test_plan_case_refuses_bad_inputs_and_outputs_before_any_work(tmp_path):
    from factorizer_cli.api import plan_case
    from factorizer_cli.errors import InputError, OutputError

    images, _ = phantom()
    paths = write_case(tmp_path / "case", images, np.eye(4))
    card = oracle_card()
    with pytest.raises(OutputError, match="must end in .nii.gz"):
        plan_case(card, tmp_path / "case", tmp_path / "seg.txt")
    with pytest.raises(OutputError, match="given for two outputs"):
        plan_case(card, tmp_path / "case", tmp_path / "seg.nii.gz", probabilities=tmp_path / "seg.nii.gz")
    with pytest.raises(OutputError, match="would overwrite the input"):
        plan_case(card, tmp_path / "case", paths[0])
    with pytest.raises(InputError, match="takes 4"):
        plan_case(card, paths[:3], tmp_path / "seg.nii.gz", modalities=["t1", "t1ce", "t2"])
    with pytest.raises(InputError, match="needs the PyTorch backend"):
        plan_case(card, tmp_path / "case", tmp_path / "seg.nii.gz", components=tmp_path / "maps", backend="onnx")
    plan = plan_case(card, tmp_path / "case", tmp_path / "seg.nii.gz", components=tmp_path / "maps",
                     component_blocks=["network"], component_dtype="float16")
    assert plan.images == tuple(paths) and plan.request.blocks == ("network",) and plan.request.dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]  # planning writes nothing


def test_segment_dataset_reports_each_case_and_names_the_shard_summary(tmp_path):
    from factorizer_cli.api import load_segmenter, plan_dataset, segment_dataset
    from factorizer_cli.errors import InputError

    images, expected = phantom(shape=(30, 32, 28))
    data = tmp_path / "data"
    for name in ("BraTS-GLI-00000-000", "BraTS-GLI-00001-000"):
        write_case(data / name, images, np.eye(4))
    (data / "BraTS-GLI-00009-000").mkdir()  # no images: reported, not dropped
    segmenter = load_segmenter(oracle_package(tmp_path / "model").root, device="cpu")
    report = segment_dataset(segmenter, data, tmp_path / "out")
    assert report.counts == {"done": 2, "skipped": 0, "failed": 1} and report.failed == 1 and not report.stopped
    assert report.write() == tmp_path / "out" / "summary.json"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "oracle" and summary["shard"] == "1/1"
    assert [c["status"] for c in summary["cases"]] == ["done", "done", "failed"]
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "BraTS-GLI-00001-000.nii.gz").dataobj),
                                  expected)
    again = segment_dataset(segmenter, data, tmp_path / "out")
    assert again.counts == {"done": 0, "skipped": 2, "failed": 1}

    # of 2 workers, BraTS-GLI-00000-000 goes to the second, BraTS-GLI-00001-000 to the first (test_batch pins it)
    plan = plan_dataset(segmenter.card, data, tmp_path / "shard", shard="1/2")
    names = [c.name for c in plan.cases]
    assert "BraTS-GLI-00001-000" in names and "BraTS-GLI-00000-000" not in names
    assert plan.run(segmenter).write().name == "summary-1-of-2.json"
    with pytest.raises(InputError, match="no cases found"):
        plan_dataset(segmenter.card, tmp_path / "model", tmp_path / "none")


def test_open_model_refuses_torch_for_an_onnx_file_before_reading_it(tmp_path):
    from factorizer_cli.api import open_model

    with pytest.raises(ConfigError, match="runs with --backend onnx"):
        open_model(tmp_path / "missing.onnx", backend="torch")
    with pytest.raises(ConfigError, match="unknown backend"):
        open_model(tmp_path / "model", backend="tensorflow")
