"""Parity of the Genesis family and the self-restoration corruptions with upstream
(fhaghighi/SemanticGenesis at bed8d90, MrGiovanni/ModelsGenesis), through the one door
(``zoo.load_upstream``) and the pure transformation functions.

Fixtures made by running upstream (``../shared/fixtures/semantic_genesis``, beside ``FIXTURES``; its
README says how): ``UNet3D`` and ``YNet3D`` at base width 8 with random BatchNorm statistics, saved as
upstream's training scripts save them, with their outputs; and one cube through each corruption, with
every draw upstream made (Python ``random`` results in the JSON, NumPy streams from ``RandomState(seed)``).
The NumPy-scalar checkpoint tests at the end need no fixture.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from factorizer_cli.errors import (
    CheckpointError,
    ConfigError,
    InputShapeError,
    UnsafeCheckpointError,
)
from factorizer_cli.families import build, family_of, full_resolution_logits
from factorizer_cli.genesis import transforms as T
from factorizer_cli.nn.unet3d import ContBatchNorm3d, UNet3D, YNet3D
from factorizer_cli.safe_pickle import Unpickler, load_checkpoint
from factorizer_cli.zoo import load_upstream

from .conftest import FIXTURES

GENESIS = FIXTURES.parent / "semantic_genesis"  # ../shared/fixtures/semantic_genesis by default
UNET, YNET, CUBES = "sg_unet3d_w8_seed0", "sg_ynet3d_w8_seed0", "sg_transforms_seed0"


def _meta(name: str) -> dict:
    path = GENESIS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"Semantic Genesis parity fixtures not found at {GENESIS} (they sit beside the clone in "
                    "CI; set FACTORIZER_FIXTURES to their sibling 'upstream' folder to run these tests)")
    return json.loads(path.read_text())


def _config(meta: dict, **changes) -> dict:
    return {"class": meta["class"], "base_width": meta["base_width"], **meta["kwargs"], **changes}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.detach() - b).abs().max().item()


def _load(name: str, **changes):
    meta = _meta(name)
    return meta, load_upstream(GENESIS / meta["checkpoint"], _config(meta, **changes))


# ---------------------------------------------------------------------------------------- networks


def test_unet3d_matches_upstream():
    meta, model = _load(UNET)
    assert isinstance(model, UNet3D) and not isinstance(model, YNet3D) and not model.training
    assert family_of(model).name == "genesis"
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"] == 1_193_761
    assert len(model.state_dict()) == meta["num_state_dict_tensors"]
    out = load_file(GENESIS / f"{UNET}.io.safetensors")
    assert list(out["input"].shape) == meta["input_shape"]
    with torch.no_grad():
        probabilities = model(out["input"])
        logits = full_resolution_logits(model, out["input"])
        bottleneck = model.encode(out["input"])
    errors = {"output": _err(probabilities, out["output"]), "encoder_out512": _err(bottleneck, out["encoder_out512"]),
              "sigmoid(logits)": _err(torch.sigmoid(logits), out["output"])}
    assert max(errors.values()) <= 1e-4, f"max abs errors {errors}"
    assert logits.min() < 0 < logits.max()  # logits, not the probabilities upstream's forward returns


def test_ynet3d_matches_upstream():
    meta, model = _load(YNET)
    assert isinstance(model, YNet3D) and family_of(model).name == "genesis"
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"] == 2_090_573
    assert len(model.state_dict()) == meta["num_state_dict_tensors"]
    out = load_file(GENESIS / f"{YNET}.io.safetensors")
    with torch.no_grad():
        segmentation, classes = model(out["input"])
        errors = {"output": _err(segmentation, out["output"]), "output_cls": _err(classes, out["output_cls"]),
                  "cls_logits": _err(model.classify(out["input"]), out["cls_logits"]),
                  "encoder_out512": _err(model.encode(out["input"]), out["encoder_out512"]),
                  "predict": _err(torch.sigmoid(model.predict(out["input"])), out["output"])}
    assert max(errors.values()) <= 1e-4, f"max abs errors {errors}"
    assert classes.shape == (1, 44) and torch.allclose(classes.sum(1), torch.ones(1))


@pytest.mark.parametrize("name", [UNET, YNET])
def test_batch_of_two(name):
    """Batch statistics: a batch of the fixture's input twice has the same statistics as the input alone,
    so both items reproduce upstream's output; another batch mate changes the output (upstream's
    ContBatchNorm3d), which ``norm="batch"`` in eval mode does not."""
    meta, model = _load(name)
    out = load_file(GENESIS / f"{name}.io.safetensors")
    x = out["input"]
    with torch.no_grad():
        twice = full_resolution_logits(model, torch.cat([x, x]))
        errors = [_err(torch.sigmoid(twice[i:i + 1]), out["output"]) for i in range(2)]
        assert max(errors) <= 1e-4, f"max abs errors {errors}"
        mate = torch.rand_like(x, generator=torch.Generator().manual_seed(1))
        mixed = full_resolution_logits(model, torch.cat([x, mate]))
        assert _err(torch.sigmoid(mixed[:1]), out["output"]) > 1e-3

        plain = load_upstream(GENESIS / meta["checkpoint"], _config(meta, norm="batch"))
        alone = plain.predict(x)
        assert _err(plain.predict(torch.cat([x, mate]))[:1], alone) <= 1e-5
        # running statistics in eval mode are not upstream's semantics: the fixture tells them apart
        assert _err(torch.sigmoid(alone), out["output"]) > 1e-3


def test_running_statistics_are_never_used():
    _, model = _load(UNET)
    out = load_file(GENESIS / f"{UNET}.io.safetensors")
    norms = [m for m in model.modules() if isinstance(m, ContBatchNorm3d)]
    assert len(norms) == 14
    before = norms[0].running_mean.clone()
    for norm in norms:
        norm.running_mean.add_(5.0)
        norm.running_var.mul_(3.0)
    with torch.no_grad():
        assert _err(model(out["input"]), out["output"]) <= 1e-4
    assert not torch.equal(norms[0].running_mean, before + 5.0)  # updated by the forward, as upstream's are


def _unet_config(meta: dict, **changes) -> dict:
    return {"class": "UNet3D", "base_width": meta["base_width"], "n_class": 1, "act": "relu", **changes}


def test_ynet3d_checkpoint_into_unet3d_drops_the_head_as_upstreams_fine_tuning_does():
    meta = _meta(YNET)
    model = load_upstream(GENESIS / meta["checkpoint"], _unet_config(meta))
    assert type(model) is UNet3D
    out = load_file(GENESIS / f"{YNET}.io.safetensors")
    with torch.no_grad():
        assert _err(model(out["input"]), out["output"]) <= 1e-4


def test_ynet3d_config_wants_the_head():
    meta = _meta(UNET)
    with pytest.raises(CheckpointError) as err:
        load_upstream(GENESIS / meta["checkpoint"], {**_unet_config(meta), "class": "YNet3D"})
    message = str(err.value)
    assert "\n" not in message and "clc_out." in message and "missing" in message


@pytest.mark.parametrize("prefix", ["module.", ""])
@pytest.mark.parametrize("name", [UNET, YNET])
def test_plain_state_dict_format(tmp_path, name, prefix):
    """``torch.save(model.state_dict())``, with or without DataParallel's prefix, gives the same network."""
    meta = _meta(name)
    weights = load_checkpoint(GENESIS / meta["checkpoint"])["state_dict"]
    path = tmp_path / "plain.pt"
    torch.save({prefix + k.removeprefix("module."): v for k, v in weights.items()}, path)
    model = load_upstream(path, _config(meta))
    out = load_file(GENESIS / f"{name}.io.safetensors")
    with torch.no_grad():
        result = model(out["input"])
    assert _err(result[0] if isinstance(result, list) else result, out["output"]) <= 1e-4


def test_training_checkpoint_formats_read_only_the_state_dict():
    for name, extra in [(UNET, set()), (YNET, {"num_epoch_no_improvement", "best_loss", "best_acc"})]:
        checkpoint = load_checkpoint(GENESIS / _meta(name)["checkpoint"])
        assert set(checkpoint) == {"epoch", "state_dict", "optimizer_state_dict"} | extra
        assert all(k.startswith("module.") for k in checkpoint["state_dict"])
    assert type(checkpoint["best_loss"]) is np.float64  # upstream's np.average


def test_wrong_width_is_refused_naming_the_shapes():
    meta = _meta(UNET)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*down_tr64\.ops\.0\.conv1\.weight"):
        load_upstream(GENESIS / meta["checkpoint"], _config(meta, base_width=16))


def test_published_width_has_upstreams_parameter_count_and_keys():
    meta = _meta(YNET)
    fixture_keys = {k.removeprefix("module.") for k in load_checkpoint(GENESIS / meta["checkpoint"])["state_dict"]}
    unet, ynet = build({"class": "UNet3D"}), build({"class": "YNet3D"})
    assert sum(p.numel() for p in unet.parameters()) == 19_073_665  # upstream's UNet3D, as the issue reports
    assert sum(p.numel() for p in ynet.parameters()) == 33_277_613  # + conv 512→1024 k3, BN, fc 1024→44
    assert set(ynet.state_dict()) == fixture_keys
    assert set(unet.state_dict()) == {k for k in fixture_keys if not k.startswith("clc_out.")}
    assert ynet.clc_out.conv1.weight.shape == (1024, 512, 3, 3, 3) and ynet.clc_out.fc1.weight.shape == (44, 1024)


# ---------------------------------------------------------------------------- network options (no fixture)


def test_options_shapes_and_errors():
    model = build({"class": "YNet3D", "base_width": 4, "in_channels": 3, "n_class": 2, "act": "prelu",
                   "lst_act": "sigmoid", "cls_classes": 5, "norm": "batch"}).eval()
    with torch.no_grad():
        segmentation, classes = model(torch.randn(2, 3, 16, 24, 8))
    assert segmentation.shape == (2, 2, 16, 24, 8) and classes.shape == (2, 5)
    assert not torch.allclose(classes.sum(1), torch.ones(2))  # sigmoid, not softmax
    assert not any(isinstance(m, ContBatchNorm3d) for m in model.modules())
    assert "down_tr64.ops.0.activation.weight" in model.state_dict()  # PReLU's slopes, upstream's key
    with pytest.raises(InputShapeError, match="multiples of 8"):
        model(torch.randn(1, 3, 16, 20, 8))
    with pytest.raises(InputShapeError, match=r"\(N, 3, X, Y, Z\)"):
        model(torch.randn(1, 1, 16, 16, 8))
    for bad in ({"norm": "group"}, {"act": "gelu"}, {"base_width": 0}):
        with pytest.raises(ConfigError) as err:
            build({"class": "UNet3D", **bad})
        assert next(iter(bad)) in str(err.value)


def test_cont_batch_norm_is_not_converted_to_sync_batch_norm():
    """SyncBatchNorm would use running statistics in eval mode: a silent change of the network."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(UNet3D(base_width=2))
    assert sum(isinstance(m, ContBatchNorm3d) for m in model.modules()) == 14
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


# ----------------------------------------------------------------------------------- corruptions


def _cubes():
    meta = _meta(CUBES)
    return meta["transforms"], load_numpy(GENESIS / f"{CUBES}.safetensors")


def _results(entry: dict, method: str | None = None) -> list:
    calls = entry["python_random_calls"]
    assert method is None or all(c[0] == method for c in calls)
    return [c[2] for c in calls]


def _box(sizes, origins) -> T.Box:
    return T.Box(tuple(int(v) for v in origins), tuple(int(v) for v in sizes))


def _check_unchanged(function, image, params, expected):
    """Same result as upstream's code to float64 rounding: bitwise on the machine that made the
    fixtures, a few ulps apart on CPUs whose libm/SIMD paths round transcendental functions differently."""
    before = image.copy()
    result = function(image, params)
    assert np.array_equal(image, before), "the input was modified"
    assert result.dtype == expected.dtype and result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-12)


def test_nonlinear_transformation_matches_upstream():
    entries, cubes = _cubes()
    entry = entries["nonlinear_transformation"]
    x1, y1, x2, y2, flip = _results(entry, "random")
    params = T.BezierMap(((x1, y1), (x2, y2)), invert=flip < 0.5)
    assert entry["params"]["points"][1:3] == [[x1, y1], [x2, y2]] and not params.invert  # recorded: monotone
    _check_unchanged(T.nonlinear_transformation, cubes["input"], params, cubes["nonlinear_transformation"])


def test_local_pixel_shuffling_matches_upstream():
    entries, cubes = _cubes()
    entry = entries["local_pixel_shuffling"]
    draws = _results(entry, "randint")
    assert len(draws) == 6 * 5
    boxes = tuple(_box(draws[i:i + 3], draws[i + 3:i + 6]) for i in range(0, 30, 6))
    assert [(b.origin, b.size) for b in boxes] == [((b["x"], b["y"], b["z"]), (b["size_x"], b["size_y"], b["size_z"]))
                                                   for b in entry["params"]["blocks"]]
    permutations = tuple(cubes[f"local_pixel_shuffling.perm{i}"] for i in range(5))
    # upstream's np.random.shuffle calls, replayed: the same permutations as RandomState(seed).permutation
    stream = np.random.RandomState(entry["numpy_seed"])
    assert all(np.array_equal(stream.permutation(len(p)), p) for p in permutations)
    _check_unchanged(T.local_pixel_shuffling, cubes["input"], T.Shuffle(boxes, permutations),
                     cubes["local_pixel_shuffling"])


def test_in_painting_matches_upstream_without_touching_its_input():
    entries, cubes = _cubes()
    entry = entries["image_in_painting"]
    draws = _results(entry, "randint")
    box = _box(draws[:3], draws[3:])
    fill = np.random.RandomState(entry["numpy_seed"]).rand(*box.size)  # drawn after the geometry
    # upstream wrote into its argument (the recorded call got a copy); ours leaves the input as it is
    _check_unchanged(T.image_in_painting, cubes["input"], T.InPaint(box, fill), cubes["image_in_painting"])


def test_out_painting_matches_upstream():
    entries, cubes = _cubes()
    entry = entries["image_out_painting"]
    draws = _results(entry, "randint")
    spatial = cubes["input"].shape[1:]
    box = _box([d - r for d, r in zip(spatial, draws[:3])], draws[3:])
    fill = np.random.RandomState(entry["numpy_seed"]).rand(*cubes["input"].shape)  # drawn before the geometry
    assert box.size == (34, 28, 15)
    _check_unchanged(T.image_out_painting, cubes["input"], T.OutPaint(box, fill), cubes["image_out_painting"])


def _elastic(seed: int, spatial) -> T.Elastic:
    """Upstream's unseeded RandomState, as the fixture's run got it: RandomState(seed); dx drawn first."""
    stream = np.random.RandomState(seed)
    return T.Elastic(col_noise=stream.rand(*spatial) * 2 - 1, row_noise=stream.rand(*spatial) * 2 - 1)


def test_elastic_transform_matches_upstream():
    entries, cubes = _cubes()
    entry = entries["elastic_transform"]
    params = _elastic(entry["numpy_seed"], cubes["input"].shape[1:])
    assert (params.alpha, params.sigma) == (entry["params"]["alpha"], entry["params"]["sigma"])
    _check_unchanged(T.elastic_transform, cubes["input"], params, cubes["elastic_transform"])


def test_training_pair_matches_upstreams_loader():
    entries, cubes = _cubes()
    entry = entries["luna_loader"]
    choice, *draws = _results(entry)
    kind = T.corruption_for(choice)
    assert kind == entry["y_trans"] == "in-paint"
    box = _box(draws[:3], draws[3:])
    corruption = T.Corruption(kind, T.InPaint(box, np.random.RandomState(entry["numpy_seed"]).rand(*box.size)),
                              _elastic(entry["numpy_seed"], cubes["input"].shape[1:]))
    _check_unchanged(T.corrupt, cubes["input"], corruption, cubes["luna_loader"])
    assert entry["target_is_input"]  # the target is the original cube, which corrupt() leaves untouched


# ------------------------------------------------------------------------ corruptions beyond upstream


def test_elastic_transform_takes_any_shape():
    """Upstream's grid is right only for rows == cols; ours treats X and Y alike for any shape."""
    rng = np.random.default_rng(0)
    image = rng.random((2, 24, 40, 16))
    params = T.draw_elastic(image.shape, rng)
    result = T.elastic_transform(image, params)
    swapped = T.elastic_transform(image.transpose(0, 2, 1, 3).copy(), T.Elastic(
        col_noise=params.row_noise.transpose(1, 0, 2).copy(), row_noise=params.col_noise.transpose(1, 0, 2).copy()))
    assert result.shape == image.shape
    np.testing.assert_allclose(swapped.transpose(0, 2, 1, 3), result, atol=1e-12)
    assert not np.allclose(result, image)
    zero = np.zeros(image.shape[1:])
    assert np.array_equal(T.elastic_transform(image, T.Elastic(zero, zero)), image)
    single = T.elastic_transform(image[:1], params)
    assert np.array_equal(single[0], result[0])  # every channel deformed alike


def test_draws_are_within_upstreams_ranges_and_deterministic():
    shape = (1, 64, 64, 32)
    rng = np.random.default_rng(7)
    for _ in range(50):
        shuffle = T.draw_local_shuffling(shape, rng)
        assert len(shuffle.boxes) == 5
        for box, permutation in zip(shuffle.boxes, shuffle.permutations):
            assert all(1 <= s <= d // 10 and 0 <= o <= d - s for o, s, d in zip(box.origin, box.size, shape[1:]))
            assert sorted(permutation) == list(range(math.prod(box.size)))
        inpaint = T.draw_in_painting(shape, rng)
        assert inpaint.fill.shape == (1, *inpaint.box.size) and 0 <= inpaint.fill.min() <= inpaint.fill.max() < 1
        assert all(d // 6 <= s <= d // 3 and 3 <= o <= d - s - 3
                   for o, s, d in zip(inpaint.box.origin, inpaint.box.size, shape[1:]))
        outpaint = T.draw_out_painting(shape, rng)
        assert outpaint.fill.shape == shape
        assert all(d - 4 * d // 7 <= s <= d - 3 * d // 7 and 3 <= o <= d - s - 3
                   for o, s, d in zip(outpaint.box.origin, outpaint.box.size, shape[1:]))
    a, b = (T.draw_corruption(shape, np.random.default_rng(3)) for _ in range(2))
    assert a.kind == b.kind and np.array_equal(a.elastic.col_noise, b.elastic.col_noise)
    with pytest.raises(InputShapeError, match="at least 14"):
        T.draw_out_painting((1, 64, 13, 32), rng)


def test_corruption_choice_is_a_quarter_each():
    assert [T.corruption_for(r) for r in (0.0, 0.25, 0.2500001, 0.5, 0.75, 0.7500001, 0.999)] == [
        "local-shuffle", "local-shuffle", "non-linear", "non-linear", "in-paint", "out-paint", "out-paint"]
    rng = np.random.default_rng(0)
    kinds = [T.draw_corruption((1, 16, 16, 16), rng, elastic=False).kind for _ in range(800)]
    counts = {k: kinds.count(k) for k in T.CORRUPTIONS}
    assert all(150 <= c <= 250 for c in counts.values()), counts


def test_bezier_maps_are_monotone_or_inverted_through_the_corners():
    image = np.linspace(0, 1, 101).reshape(1, 101, 1, 1)
    for invert in (False, True):
        params = T.BezierMap(((0.8, 0.2), (0.3, 0.9)), invert=invert)
        mapped = T.nonlinear_transformation(image, params).ravel()
        ends = (mapped[0], mapped[-1])
        np.testing.assert_allclose(ends, (1.0, 0.0) if invert else (0.0, 1.0), atol=1e-9)
        if not invert:
            assert np.all(np.diff(mapped) >= 0)
    assert isinstance(T.draw_nonlinear(np.random.default_rng(0)).invert, bool)


def test_several_channels_share_the_geometry():
    rng = np.random.default_rng(1)
    image = np.repeat(rng.random((1, 32, 32, 16)), 2, axis=0)
    shape = image.shape
    for function, params in [(T.local_pixel_shuffling, T.draw_local_shuffling(shape, rng)),
                             (T.nonlinear_transformation, T.draw_nonlinear(rng)),
                             (T.elastic_transform, T.draw_elastic(shape, rng))]:
        result = function(image, params)
        assert np.array_equal(result[0], result[1]) and not np.array_equal(result, image)
    inpaint = T.draw_in_painting(shape, rng)
    result = T.image_in_painting(image, inpaint)
    assert np.array_equal(result[inpaint.box.slices], inpaint.fill)
    with pytest.raises(ConfigError, match="does not fit the box"):
        T.image_in_painting(image, T.InPaint(inpaint.box, np.zeros(7)))
    with pytest.raises(ConfigError, match="not inside"):
        T.image_in_painting(image, T.InPaint(T.Box((30, 0, 0), (5, 5, 5)), 0.0))


# --------------------------------------------------------------------- NumPy scalars in checkpoints


def test_numpy_scalars_load_and_stay_numpy_scalars(tmp_path):
    values = {"best_loss": np.float64(0.0123), "acc": np.float32(0.5), "epoch": np.int64(-3), "ok": np.bool_(True),
              "byte": np.uint8(7), "z": np.complex128(1 + 2j), "raw": b"\x00\xff"}
    path = tmp_path / "scalars.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, **values}, path)
    loaded = load_checkpoint(path)
    for key, value in values.items():
        assert type(loaded[key]) is type(value) and loaded[key] == value, key


def _refused(obj, tmp_path) -> str:
    path = tmp_path / "refused.pt"
    torch.save({"w": torch.zeros(1), "extra": obj}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    return str(err.value)


def test_other_numpy_objects_are_still_refused(tmp_path):
    assert "_reconstruct" in _refused(np.arange(3.0), tmp_path)  # arrays: numpy's reconstructor is not called
    assert "numpy.dtype('O8'" in _refused(np.dtype("O"), tmp_path)  # only numeric scalar types
    path = tmp_path / "function.pt"
    torch.save({"f": np.ones}, path)
    function = load_checkpoint(path)["f"]  # a numpy function named as a value is an inert stand-in
    assert function is not np.ones
    with pytest.raises(UnsafeCheckpointError, match="would call numpy"):
        function(3)

    def crafted(*ops: bytes) -> bytes:
        return b"\x80\x02" + b"".join(ops) + b"."

    scalar = b"cnumpy._core.multiarray\nscalar\n"
    dtype = b"cnumpy\ndtype\n"
    cases = {
        "object dtype": scalar + dtype + b"X\x01\x00\x00\x00O\x89\x88\x87RX\x00\x00\x00\x00\x86R",
        "structured dtype": dtype + b"X\x06\x00\x00\x00f8,i4,\x89\x88\x87R",
        "wrong byte count": scalar + dtype + b"X\x02\x00\x00\x00f8\x89\x88\x87RC\x03abc\x86R",
        "scalar of a non-dtype": scalar + b"X\x02\x00\x00\x00f8C\x08abcdefgh\x86R",
        "codecs other than latin1": b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R",
        "numpy load": b"cnumpy\nload\nX\x01\x00\x00\x00a\x85R",
    }
    for name, ops in cases.items():
        with pytest.raises(UnsafeCheckpointError):
            Unpickler(io.BytesIO(crafted(ops))).load()
            pytest.fail(name)


def test_numpy_dtype_state_is_checked():
    state = b"(K\x03X\x01\x00\x00\x00!NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    ops = b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R" + state
    with pytest.raises(UnsafeCheckpointError, match="state"):
        Unpickler(io.BytesIO(b"\x80\x02" + ops + b".")).load()
