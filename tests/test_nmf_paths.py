"""One NMF computation, four formulations: they must agree on every output head within 1e-4.

- textbook: eval mode with autograd on (``NMF.decompose``'s iterations, out-of-place window loop);
- inference: autograd off, channels last (rank-1 HALS on the Gram matrix: for ReLU rank 1 from the
  statistics of half-window blocks, ``nn.swin_gram``; otherwise, and for rank 1 once more with the
  blocks off, slabs of windows folded back in place, the reconstruction written over its input), with
  every chunk and slab size forced small so that each loop runs several times and ends on a ragged piece;
- recorded: the component capture's path (factors kept and handed to a recorder);
- exported: ``ExportGraph``, the formulation the ONNX exporter traces (channels last, windows as
  Gathers, all heads' Gram matrices at once, a tensor ε), evaluated in PyTorch.

Over {SegmentationFactorizer, Factorizer} × {ReLU, GELU} × {HALS rank 1, HALS rank 2, MU}. Part of the
input is zero, so whole windows are zero and ε decides their factors (0/0 without it). With ReLU the
SegmentationFactorizer's ε is 1e-2, large enough that a misplaced ε in any formulation shows at 1e-4;
otherwise ε keeps its default (1e-8; the Factorizer's 1e-16): MU on signed input (GELU) divides by
denominators that can cross zero, where a large ε turns rounding differences into O(1) ones.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import factorizer_cli as ft
from factorizer_cli.nn import blocks, factorization, layers, matricize, swin_gram
from factorizer_cli.nn.components import capture
from factorizer_cli.nn.export_graph import ExportGraph

TOLERANCE = 1e-4
SPATIAL = (16, 16, 16)
# Windows of 2×4×4: 8 rows of windows along the first axis of the 16³ level, 4 at 8³.
SWIN = (ft.SWMatricize, {"head_dim": 4, "patch_size": (2, 4, 4)})
SOLVERS = {
    "hals-rank1": {"solver": "hals", "rank": 1},
    "hals-rank2": {"solver": "hals", "rank": 2},
    "mu": {"solver": "mu", "rank": 1},
}
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


def network(kind: str, act: str, solver: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(in_channels=2, out_channels=3, spatial_size=SPATIAL, encoder_depth=(1, 1), encoder_width=(8, 16),
                  strides=(1, 2), decoder_depth=(1,), num_deep_supr=2)
    nmf = {"act": ACTS[act], "num_iters": 3, **SOLVERS[solver]}
    if kind == "SegmentationFactorizer":
        if act == "relu":
            nmf["eps"] = 1e-2
        return ft.SegmentationFactorizer(**common, nmf=(ft.FactorizerSubblock, {"tensorize": SWIN, **nmf}),
                                         mlp=(ft.MLP, {"ratio": 2})).eval()
    return ft.Factorizer(**common, reshape=SWIN, mlp_ratio=2, **nmf).eval()


def example_input() -> torch.Tensor:
    x = torch.randn(2, 2, *SPATIAL, generator=torch.Generator().manual_seed(1))
    x[..., :10] = 0  # all-zero windows at full resolution, plain and shifted
    return x


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1500 voxels at 8 channels (1500, 1500, 1096 of 4096); slabs of 3 of 8 window rows at
    the 16³ level (3, 3, 2); in-place reconstructions 9 windows at a time. Records the slabs cut."""
    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 8 * 1500)
    monkeypatch.setattr(blocks, "_SLAB_ELEMENTS", 3 * 8192)  # the 16³ map: 2 × 8 × 4096
    monkeypatch.setattr(factorization, "_OVERWRITE_ELEMENTS", 9 * 4 * 32)
    slabs = []
    cut = matricize.Matricize.forward

    def recording_cut(self, x, rows=None):
        slabs.append((self.grid_size[0], rows))
        return cut(self, x, rows)

    monkeypatch.setattr(matricize.Matricize, "forward", recording_cut)
    return slabs


def _recording(fn, calls: list):
    def recorded(*args, **kwargs):
        calls.append(args[0].shape)
        return fn(*args, **kwargs)
    return recorded


def _heads(out) -> list[torch.Tensor]:
    return [o.detach() for o in (out if isinstance(out, list) else [out])]


def _assert_agree(name: str, got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape
        err = (g - e).abs().max().item()
        assert err <= TOLERANCE, f"{name} head {i}: max abs difference {err:.3g} from the textbook path"


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ["SegmentationFactorizer", "Factorizer"])
def test_textbook_inference_recorded_and_exported_paths_agree(kind, act, solver, small_chunks, monkeypatch):
    net, x = network(kind, act, solver), example_input()
    with torch.enable_grad():
        textbook = _heads(net(x))
    assert all(torch.isfinite(t).all() for t in textbook)
    assert len(textbook) == 2

    # ReLU, rank-1 HALS and two half-shifted partitions of even windows (every published Swin
    # Factorizer): inference runs on half-window blocks (nn.swin_gram), never cutting windows; the
    # windowed path, which serves every other configuration, is checked here with the blocks turned off.
    blocks_apply = act == "relu" and solver == "hals-rank1"
    block_calls = []
    monkeypatch.setattr(swin_gram, "swin_gram_residual", _recording(swin_gram.swin_gram_residual, block_calls))
    small_chunks.clear()
    with torch.no_grad():
        inference = _heads(net(x))
    assert bool(block_calls) == blocks_apply
    assert all(t.is_contiguous() for t in inference), "channels-last inference must hand back the usual layout"
    _assert_agree("inference", inference, textbook)
    if blocks_apply:
        assert not small_chunks, "a window was cut although the blocks apply"
        monkeypatch.setattr(swin_gram, "applies", lambda *args: False)
        with torch.no_grad():
            windowed = _heads(net(x))
        _assert_agree("windowed inference", windowed, textbook)
    assert (8, (0, 3)) in small_chunks and (8, (6, 8)) in small_chunks, "the slab loop was not exercised"

    with torch.no_grad(), capture(net, ["encoder.0", "bottleneck", "decoder.0"]) as recorders:
        recorded = _heads(net(x))
    assert len(recorders) == 3 and all(r.maps is not None for r in recorders)
    _assert_agree("recorded", recorded, textbook)

    with torch.no_grad():
        exported = ExportGraph(net)(x)
    _assert_agree("exported", [exported], textbook[:1])


@pytest.mark.slow
def test_onnx_runtime_runs_the_exported_formulation():
    """The real exporter and its graph optimizer: the Factorizer's ε (1e-16) must survive as a tensor, or
    the zero windows' 0/0 turns the output into NaN."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    net, x = network("Factorizer", "relu", "hals-rank1"), example_input()
    with torch.enable_grad():
        textbook = _heads(net(x))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ExportGraph(net), (x,), dynamo=True, opset_version=20, optimize=True,
                                    external_data=False, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    _assert_agree("onnxruntime", [got], textbook[:1])
