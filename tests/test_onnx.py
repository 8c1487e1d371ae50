"""ONNX export and the ONNX Runtime backend: the graph equals the network, the file describes itself,
``segment --backend onnx`` gives the torch backend's labels, and bad files are refused cleanly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.errors import ConfigError, DeviceError, ExportError
from factorizer_cli.export import ExportOptions, cached_onnx, export_onnx, verify_model
from factorizer_cli.export.exporter import TOLERANCE_FP32, compare, verification_inputs
from factorizer_cli.families import build, full_resolution_logits
from factorizer_cli.nn.export_graph import ExportGraph
from factorizer_cli.pipeline.predictors import OnnxPredictor, select_providers
from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter
from factorizer_cli.zoo import load_upstream
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.onnx_file import META_VERIFICATION, open_onnx
from factorizer_cli.zoo.package import save_package
from factorizer_cli.zoo.registry import zoo_names

from .conftest import FIXTURE_NAMES, FIXTURES, fixture_meta
from .oracle import oracle_card, oracle_package, phantom, write_case

ort = pytest.importorskip("onnxruntime")
runner = CliRunner()

CONV = {"class": "Conv3d"}
SWIN = {"class": "SWMatricize", "head_dim": 4, "patch_size": 4}


def tiny(nmf: dict | None = None, **changes) -> dict:
    """A two-level Swin Factorizer at 16³: exports in seconds."""
    nmf = {"class": "FactorizerSubblock", "tensorize": SWIN, "act": {"class": "ReLU"},
           "factorize": {"class": "NMF"}, "rank": 1, "num_iters": 5, "solver": "hals", **(nmf or {})}
    return {"class": "SegmentationFactorizer", "in_channels": 4, "out_channels": 3, "spatial_size": [16] * 3,
            "encoder_depth": [1, 1], "encoder_width": [8, 16], "strides": [1, 2], "decoder_depth": [1],
            "stem": {**CONV, "kernel_size": 3, "padding": 1, "bias": False}, "num_deep_supr": 2,
            "nmf": nmf, "mlp": {"class": "MLP", "ratio": 2}, **changes}


CONFIGS = {
    "rank1-hals-gram": tiny(),
    "mu": tiny({"solver": "mu"}),
    "rank2-hals": tiny({"rank": 2, "num_iters": 2}),
    "gelu-act": tiny({"act": {"class": "GELU"}}),
    "one-window-shifts": tiny({"tensorize": {**SWIN, "shifts": [None, 1, [2, 0, 3]]}}),
    "whole-map-matrix": tiny({"tensorize": {"class": "Matricize", "num_heads": 2, "grid_size": 1}}),
    "factmixer": {"class": "Factorizer", "in_channels": 4, "out_channels": 3, "spatial_size": [16] * 3,
                  "encoder_depth": [1, 1], "encoder_width": [8, 16], "strides": [1, 2], "decoder_depth": [1],
                  "reshape": SWIN, "rank": 1, "num_iters": 3, "mlp_ratio": 2},
}


def tiny_card(architecture: dict | None = None, name: str = "tiny") -> ModelCard:
    return ModelCard.from_dict({**oracle_card().to_dict(), "name": name, "architecture": architecture or tiny()})


def seeded(config: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(config).eval()


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    return save_package(tmp_path_factory.mktemp("tiny"), tiny_card(), [seeded(tiny()).state_dict()])


@pytest.fixture(scope="module")
def tiny_onnx(tiny_package, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    (result,) = export_onnx(tiny_package, path)
    return path, result


# --- the graph -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_export_graph_computes_the_network(name):
    net = seeded(CONFIGS[name])
    for x in verification_inputs(tiny_card(CONFIGS[name]), 2).values():
        with torch.inference_mode():
            torch.testing.assert_close(ExportGraph(net)(x), full_resolution_logits(net, x), atol=1e-5, rtol=1e-5)


def test_export_writes_a_checked_self_describing_graph(tiny_onnx, tiny_package):
    onnx = pytest.importorskip("onnx")
    path, result = tiny_onnx
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert ModelCard.from_dict(json.loads(meta["factorizer.card"])).roi == tiny_package.card.roi
    assert meta["factorizer.output"] == "logits" and json.loads(meta["factorizer.nmf_iters"]) == [5]
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Loop", "If", "ScatterND"}, ops  # iterations unrolled, no in-place copies
    assert result.size_bytes == path.stat().st_size and result.seconds > 0
    assert set(result.max_abs_diff) == {"random", "realistic"}
    assert max(result.max_abs_diff.values()) <= 1e-4
    assert json.loads(meta[META_VERIFICATION]) == {k: a.to_dict() for k, a in result.verification.items()}
    assert all(a.labels_agree >= 0.999 for a in result.verification.values())
    opened = open_onnx(path)
    assert opened.card.name == "tiny" and opened.output == "logits" and opened.knob_values("nmf_iters") == [5]


# --- the verification rule ------------------------------------------------------------------------

def _card(activation: str) -> ModelCard:
    return ModelCard.from_dict({**oracle_card().to_dict(), "activation": activation})


def test_rule_allows_rounding_relative_to_the_output_scale_not_a_wrong_output():
    """Differences are judged against the largest |logit|: rounding of large logits passes, an error of a
    hundredth of their scale does not, whatever the label agreement."""
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((1, 3, 8, 8, 8)).astype(np.float32)) * 10
    scale = float(logits.abs().max())
    noise = torch.from_numpy(rng.uniform(-1, 1, logits.shape)).float()
    rounding = logits + TOLERANCE_FP32.rtol * scale / 2 * noise
    for activation in ("sigmoid", "softmax"):
        card = _card(activation)
        same = compare(logits, rounding, card, "logits", TOLERANCE_FP32)
        assert same.max_abs_diff > TOLERANCE_FP32.atol  # a fixed 1e-4 would refuse it
        assert same.max_abs_diff <= same.allowed == pytest.approx(TOLERANCE_FP32.atol + TOLERANCE_FP32.rtol * scale)
        wrong = logits.clone()
        wrong[0, 0, 0, 0, 0] += scale / 100
        assert compare(logits, wrong, card, "logits", TOLERANCE_FP32).max_abs_diff > same.allowed
    nan = logits.clone()
    nan[0, 1, 2, 3, 4] = float("nan")
    assert not compare(logits, nan, _card("softmax"), "logits", TOLERANCE_FP32).max_abs_diff <= scale


def test_rule_counts_voxels_whose_label_decision_changes():
    """Softmax: the winning class; sigmoid: every output's probability above the card's threshold."""
    logits = torch.zeros(1, 3, 10, 10, 10)
    logits[:, 1] = 1.0  # class 1 wins everywhere; every sigmoid output is above 0.5 in channel 1 only
    flipped = logits.clone()
    flipped[0, 2, 0, 0, :2] = 2.0  # two voxels: class 2 wins, channel 2 crosses the threshold
    for activation in ("softmax", "sigmoid"):
        agreement = compare(logits, flipped, _card(activation), "logits", TOLERANCE_FP32)
        assert agreement.labels_agree == pytest.approx(1 - 2 / 1000)
    below = logits.clone()
    below[0, 0, 0, 0, :3] = -0.5  # lower, but still below the threshold (sigmoid) and losing (softmax)
    for activation in ("softmax", "sigmoid"):
        assert compare(logits, below, _card(activation), "logits", TOLERANCE_FP32).labels_agree == 1.0
    probabilities = torch.sigmoid(logits)
    assert compare(probabilities, torch.sigmoid(flipped), _card("sigmoid"), "probabilities",
                   TOLERANCE_FP32).labels_agree == pytest.approx(1 - 2 / 1000)


def test_verification_refuses_a_graph_of_another_network(tiny_onnx):
    path, _ = tiny_onnx
    with pytest.raises(ExportError, match=r"disagree on the random verification input.*labels agree on"):
        verify_model(path, [seeded(tiny(), seed=1)], tiny_card(), "logits")


@pytest.mark.parametrize("name", ["mu", pytest.param("rank2-hals", marks=pytest.mark.slow), "factmixer"])
def test_unrolled_solvers_export(name, tmp_path):
    """The solvers other than rank-1 HALS (no Gram shortcut) also match, zero windows included."""
    package = save_package(tmp_path / "m", tiny_card(CONFIGS[name]), [seeded(CONFIGS[name]).state_dict()])
    (result,) = export_onnx(package, tmp_path / "m.onnx")
    assert max(result.max_abs_diff.values()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_upstream_fixtures_export_within_1e4(name, tmp_path):
    meta = fixture_meta(name)
    net = load_upstream(FIXTURES / meta["checkpoint"], meta["config"])
    card = ModelCard.from_dict({
        "name": name, "inputs": [{"name": f"c{i}"} for i in range(meta["config"]["in_channels"])],
        "spacing": [1, 1, 1], "roi": meta["config"]["spatial_size"],
        "outputs": [f"o{i}" for i in range(meta["config"]["out_channels"])], "labels": [],
        "architecture": meta["config"],
    })
    package = save_package(tmp_path / "m", card, [net.state_dict()])
    (result,) = export_onnx(package, tmp_path / "m.onnx")
    assert max(result.max_abs_diff.values()) <= 1e-4
    io = load_file(FIXTURES / f"{name}.io.safetensors")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": io["input"].numpy()})[0]
    assert np.abs(got - io["output0"].numpy()).max() <= 1e-4  # upstream's own output, full resolution


@pytest.mark.slow
def test_ensemble_average_or_one_file_per_fold(tmp_path):
    card = tiny_card(tiny({"num_iters": 2}))
    package = save_package(tmp_path / "m", card, [seeded(card.architecture, s).state_dict() for s in (0, 1)])
    (average,) = export_onnx(package, tmp_path / "avg.onnx")
    assert average.output == "probabilities" and average.fold is None
    assert open_onnx(tmp_path / "avg.onnx").output == "probabilities"
    folds = export_onnx(package, tmp_path / "f.onnx", ExportOptions(ensemble="folds"))
    assert [(r.path.name, r.fold, r.output) for r in folds] == [("f.fold0.onnx", 0, "logits"),
                                                                  ("f.fold1.onnx", 1, "logits")]
    x = verification_inputs(card, 3)["realistic"]
    torch_probs = Segmenter(package, InferenceOptions(device="cpu")).predict_window(x)
    onnx_probs = OnnxPredictor(open_onnx(tmp_path / "avg.onnx"), "cpu")(x)  # batch 1 graph, 3 windows
    torch.testing.assert_close(onnx_probs, torch_probs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dynamic_batch_half_precision(tiny_package, tmp_path):
    (result,) = export_onnx(tiny_package, tmp_path / "d.onnx", ExportOptions(batch_size=None, fp16=True))
    assert max(result.max_abs_diff.values()) <= 5e-2  # logits, float16 against PyTorch's float32
    predictor = OnnxPredictor(open_onnx(tmp_path / "d.onnx"), "cpu", threads=1)
    assert predictor.batch_size is None and predictor.input_dtype == np.float16
    x = verification_inputs(tiny_package.card, 3)["random"]
    expected = Segmenter(tiny_package, InferenceOptions(device="cpu")).predict_window(x)
    got = predictor(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


# --- segment --backend onnx ----------------------------------------------------------------------

@pytest.fixture
def case(tmp_path):
    images, expected = phantom()
    return write_case(tmp_path / "case", images, np.diag([1.0, 1.0, 1.0, 1.0])), expected


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_onnx_file_alone_segments_like_torch(tiny_onnx, tiny_package, case, tmp_path):
    paths, _ = case
    onnx_path, _ = tiny_onnx
    args = ["segment", str(paths[0].parent), "--quiet", "--device", "cpu", "--threads", "1"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "onnx.nii.gz"), "--model", str(onnx_path),
                                 "--stats", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s.json").read_text())["device"] == "cpu (onnxruntime)"
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "torch.nii.gz"), "--model", str(tiny_package.root)])
    assert result.exit_code == 0, result.output
    agree = (_labels(tmp_path / "onnx.nii.gz") == _labels(tmp_path / "torch.nii.gz")).mean()
    assert agree >= 0.999


def test_backend_onnx_exports_a_package_once_into_the_cache(case, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    paths, expected = case
    model = oracle_package(tmp_path / "oracle")
    for attempt in range(2):
        out = tmp_path / f"seg{attempt}.nii.gz"
        result = runner.invoke(app, ["segment", str(paths[0].parent), "-o", str(out), "--model", str(model.root),
                                     "--backend", "onnx", "--quiet"])
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(_labels(out), expected)
    assert len(list((tmp_path / "home" / "onnx").rglob("*.onnx"))) == 1


def test_export_cli_reports_difference_size_and_time(tmp_path):
    model = oracle_package(tmp_path / "oracle")
    result = runner.invoke(app, ["export-onnx", str(model.root), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 0, result.output
    assert "largest |ONNX Runtime - PyTorch|: random input" in result.output
    text = " ".join(result.output.split())
    assert re.search(r"random input \S+ \(allowed \S+\), realistic input", text), text
    assert re.search(r"labels agree on random \d+\.\d{3}%, realistic \d+\.\d{3}% of voxels", text), text
    assert "MiB" in result.output and "exported in" in result.output
    assert open_onnx(tmp_path / "o.onnx").card.name == "oracle"


# --- bad input: one line, exit code 2, nothing written -------------------------------------------

def _refused(args: list[str], needle: str, out_dir: Path) -> None:
    before = set(out_dir.iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and needle in message, result.output
    assert "Traceback" not in result.output
    assert set(out_dir.iterdir()) == before


@pytest.fixture
def oracle_onnx(tmp_path):
    model = oracle_package(tmp_path / "oracle")
    (result,) = export_onnx(model, tmp_path / "oracle.onnx", verify=False)
    return result.path


def test_corrupt_foreign_and_mismatched_onnx_files_are_refused(case, oracle_onnx, tmp_path):
    onnx = pytest.importorskip("onnx")
    paths, _ = case
    out = tmp_path / "out"
    out.mkdir()
    segment = ["segment", str(paths[0].parent), "-o", str(out / "seg.nii.gz"), "--model"]

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 100)
    _refused([*segment, str(corrupt)], "not a readable ONNX model", out)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(oracle_onnx.read_bytes()[:300])
    _refused([*segment, str(truncated)], "ONNX model", out)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _refused([*segment, str(empty)], "not an ONNX model", out)

    foreign = onnx.load(str(oracle_onnx))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    _refused([*segment, str(tmp_path / "foreign.onnx")], "no Factorizer model card in its metadata", out)

    isles = tmp_path / "isles.json"  # 3 inputs, 64³: not what this graph takes
    isles.write_text(json.dumps({**oracle_card().to_dict(), "inputs": [{"name": "dwi"}, {"name": "adc"},
                                                                         {"name": "flair"}]}))
    _refused([*segment, str(tmp_path / "foreign.onnx"), "--card", str(isles)], "does not match its model card",
             out)
    _refused([*segment, str(tmp_path / "missing.onnx")], "no such ONNX file", out)
    _refused([*segment, str(oracle_onnx), "--backend", "torch"], "--backend onnx", out)
    _refused([*segment, str(oracle_onnx), "--precision", "fp16"], "precision", out)


def test_missing_providers_are_refused(case, oracle_onnx, tmp_path):
    paths, _ = case
    out = tmp_path / "out"
    out.mkdir()
    segment = ["segment", str(paths[0].parent), "-o", str(out / "seg.nii.gz"), "--model", str(oracle_onnx)]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        _refused([*segment, "--device", "cuda"], "CUDA execution provider of ONNX Runtime is not installed", out)
    if "TensorrtExecutionProvider" not in available:
        _refused([*segment, "--device", "tensorrt"], "TensorRT execution provider", out)
    _refused([*segment, "--device", "mps"], "not available with --backend onnx", out)


def test_export_refuses_bad_outputs_before_work(tmp_path):
    model = oracle_package(tmp_path / "oracle")
    out = tmp_path / "out"
    out.mkdir()
    _refused(["export-onnx", str(model.root), "-o", str(out / "model.pt")], "must end in .onnx", out)
    _refused(["export-onnx", str(model.root), "-o", str(out / "no" / "m.onnx")], "does not exist", out)
    _refused(["export-onnx", str(model.root), "-o", str(out / "m.onnx"), "--batch-size", "x"], "dynamic", out)
    _refused(["export-onnx", str(tmp_path / "nothing"), "-o", str(out / "m.onnx")], "nothing", out)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_auto_falls_back_to_cpu_and_explicit_cuda_fails_without_a_gpu(oracle_onnx, monkeypatch):
    """onnxruntime-gpu installed, no GPU: auto warns and runs on the CPU; --device cuda is an error."""
    model = open_onnx(oracle_onnx)
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    if "CUDAExecutionProvider" not in real():  # the session then runs with the CPU provider only
        predictor = OnnxPredictor(model, "auto")
        assert predictor.provider == "CPUExecutionProvider" and "no GPU" in predictor.warnings[0]
        with pytest.raises(DeviceError):
            OnnxPredictor(model, "cuda")
    assert select_providers("cuda:1")[0][0] == ("CUDAExecutionProvider", {"device_id": 1})
    with pytest.raises(DeviceError):
        select_providers("cuda:x")


def test_gpu_provider_runs_when_there_is_one(oracle_onnx):
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    predictor = OnnxPredictor(open_onnx(oracle_onnx), "cuda")
    assert predictor.provider == "CUDAExecutionProvider"
    x = torch.rand(2, 4, 16, 16, 16)
    torch.testing.assert_close(predictor(x), OnnxPredictor(open_onnx(oracle_onnx), "cpu")(x), atol=1e-4, rtol=0)


def test_wrong_nmf_iterations_for_a_graph(tiny_onnx):
    with pytest.raises(ConfigError, match="needs a new export"):
        Segmenter(open_onnx(tiny_onnx[0]), InferenceOptions(knobs={"nmf_iters": 2}))
    Segmenter(open_onnx(tiny_onnx[0]), InferenceOptions(knobs={"nmf_iters": 5}, device="cpu"))


# --- the demo model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_package():
    if "demo" not in zoo_names():
        pytest.skip("no model named 'demo' in the zoo yet (models/demo.json): the demo acceptance tests "
                    "run once it is bundled")
    from factorizer_cli.zoo.resolve import resolve_model

    return resolve_model("demo", offline=True).package


@pytest.mark.slow
def test_demo_model_exports_within_1e4(demo_package, tmp_path):
    (result,) = export_onnx(demo_package, tmp_path / "demo.onnx")
    assert max(result.max_abs_diff.values()) <= 1e-4, result.max_abs_diff


@pytest.mark.slow
def test_demo_case_labels_agree_between_backends(demo_package, tmp_path, monkeypatch):
    from factorizer_cli import phantom as phantoms

    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    paths = phantoms.write_case(phantoms.generate(seed=2024), tmp_path / "case", "demo-case")
    images = [paths[m.name] for m in demo_package.card.modalities]
    torch_labels = Segmenter(demo_package, InferenceOptions(device="cpu"))(images).labels
    onnx_labels = Segmenter(open_onnx(cached_onnx(demo_package)), InferenceOptions(device="cpu"))(images).labels
    agree = float((torch_labels == onnx_labels).mean())
    assert agree >= 0.999, f"labels agree on {agree:.4%} of voxels"
