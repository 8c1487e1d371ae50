"""SPiN on a whole volume on CPU: our slice-wise pipeline against upstream's slice loop, side by side.

The network: SPiN's published ATLAS configuration (5 input slices, ResNet-18 encoder, 5,263,808
parameters; ``../shared/fixtures/spin/spin_published_keys.json`` or the copy below), seeded weights
with every BatchNorm's affine and running statistics drawn away from identity, loaded into both
sides by key (upstream's keys are ours, five sub-modules). The input: one 197×233×189 volume (the
MNI152 template's anatomy when nilearn is installed, scaled to ATLAS's intensities; else smooth noise).

- **upstream**: the loop of its ``validateMRI`` (alexklwong/subpixel-embedding-segmentation at aa3ac95,
  ``src/eval_utils.py``): per slice ``get_n_chunk`` (five neighbours, the dataset mean beyond the
  volume), ``(x - 30.20063) / 35.221165``, ``SPiNModel.forward``, sigmoid of ``out1x``, threshold 0.5,
  to numpy. Its model is its own ``SPiNModel`` class (``device=cpu``).
- **ours**: what ``factorizer segment`` runs after preprocessing: the normalized volume with
  neighbouring slices as channels (``pipeline.preprocess.stack_slices``), the family's inference form
  (``nn.spin_inference``), the sliding window over ``[197, 233, 1]`` windows (``--batch`` slices per
  call; a constant window run once and its output reused, as segment does), sigmoid, threshold.

Both time the whole volume (the best of ``--repeats`` after a warm-up), each in a fresh process (its
peak memory its own; rounds alternate), after the ``factorizer`` command's CPU defaults
(``factorizer_cli.runtime``). Upstream imports torchvision, cv2 and matplotlib for code the loop does
not use; inert stubs stand in for them.

    python benchmarks/spin.py --upstream /tmp/subpixel-embedding-segmentation [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from factorizer_cli.runtime import configure_cpu_runtime  # does not import torch

MEAN, STD = 30.20063, 35.221165  # upstream's ATLAS normalisation
SHAPE = (197, 233, 189)
PUBLISHED: dict[str, Any] = {
    "class": "SPiNModel", "input_channels": 5,
    "encoder_type_subpixel_embedding": ["resnet5_subpixel_embedding"],
    "n_filters_encoder_subpixel_embedding": [16, 16, 16], "decoder_type_subpixel_embedding": ["subpixel"],
    "output_channels_subpixel_embedding": 8, "n_filter_decoder_subpixel_embedding": 16,
    "output_func_subpixel_embedding": "linear", "encoder_type_segmentation": ["resnet18"],
    "n_filters_encoder_segmentation": [32, 64, 128, 196, 196], "resolutions_subpixel_guidance": [0, 1],
    "n_filters_subpixel_guidance": [8, 8], "n_convolutions_subpixel_guidance": [1, 1],
    "decoder_type_segmentation": ["subpixel_guidance", "learnable_downsampler"],
    "n_filters_decoder_segmentation": [196, 128, 64, 32, 16, 16],
    "n_filters_learnable_downsampler": [16, 16], "kernel_sizes_learnable_downsampler": [3, 3],
    "weight_initializer": "kaiming_uniform", "activation_func": "leaky_relu", "use_batch_norm": True,
}


def our_network(seed: int = 0):
    """Our module with seeded weights; BatchNorms drawn away from identity (as the fixtures' training did)."""
    import torch

    from factorizer_cli.families import build

    torch.manual_seed(seed)
    network = build(PUBLISHED).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if "batch_norm" in name and leaf in ("weight", "running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif "batch_norm" in name and leaf in ("bias", "running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return network


def volume():
    """A (197, 233, 189) float32 T1 on ATLAS's scale: the template's anatomy if nilearn is here."""
    import numpy as np

    try:
        from factorizer_cli.atlas.template import template

        array = np.array(template().array, dtype=np.float32)
        return array * np.float32(MEAN / array.mean())
    except Exception:  # no nilearn: smooth noise of the same size and scale
        rng = np.random.default_rng(0)
        coarse = rng.random((13, 15, 12)).astype(np.float32)
        import torch

        up = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None, None], size=SHAPE, mode="trilinear")
        return up[0, 0].numpy() * np.float32(2 * MEAN)


def _stub_upstream_imports() -> None:
    """Inert modules for upstream's imports that the inference loop never calls."""
    for name in ("torchvision", "torchvision.utils", "torchvision.transforms", "torchvision.transforms.functional",
                 "cv2", "sklearn", "sklearn.metrics", "matplotlib", "matplotlib.pyplot", "matplotlib.cm",
                 "matplotlib.image"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["sklearn"].metrics = sys.modules["sklearn.metrics"]
    sys.modules["matplotlib"].pyplot = sys.modules["matplotlib.pyplot"]


def upstream_probabilities(checkout: str, network, array, repeats: int):
    """Upstream's loop over the slices of ``array`` (H, W, D); returns (probabilities (H, W, D), seconds)."""
    import numpy as np
    import torch

    _stub_upstream_imports()
    sys.path.insert(0, str(Path(checkout) / "src"))
    from data_utils import get_n_chunk
    from spin_model import SPiNModel as Upstream

    kwargs = {k: v for k, v in PUBLISHED.items() if k != "class"}
    model = Upstream(**kwargs, device=torch.device("cpu"))
    state = network.state_dict()
    for module in ("encoder_subpixel_embedding", "decoder_subpixel_embedding", "subpixel_guidance",
                   "encoder_segmentation", "decoder_segmentation"):
        prefix = module + "."
        getattr(model, module).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    model.eval()
    # its validation loader's layout: 1 × slices × modalities × H × W, one mean per modality
    scan = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None, :, None]
    probabilities = np.zeros(array.shape, np.float32)

    def run() -> None:
        with torch.no_grad():
            for index in range(scan.shape[1]):
                chunk = get_n_chunk(scan, index, 5, is_torch=True, input_type="BCDHW", constants=[MEAN])
                chunk = (chunk - MEAN) / STD
                sigmoid = torch.sigmoid(model.forward(chunk)[-1])
                segmentation = torch.where(sigmoid < 0.5, torch.zeros_like(sigmoid), torch.ones_like(sigmoid)).long()
                segmentation.cpu().numpy()
                probabilities[..., index] = sigmoid[0, 0].numpy()

    return probabilities, _best_of(run, repeats)


def our_probabilities(network, array, repeats: int, batch: int | None):
    """The pipeline's slice-wise path over ``array`` (H, W, D); returns (probabilities, seconds)."""
    import numpy as np
    import torch

    from factorizer_cli.families import activate, family_of, window_logits
    from factorizer_cli.pipeline.preprocess import stack_slices
    from factorizer_cli.pipeline.segment import SLICES_PER_CALL
    from factorizer_cli.pipeline.sliding_window import (
        reuse_constant_windows,
        sliding_window_inference,
    )

    batch = batch or SLICES_PER_CALL

    prepared = family_of(network).prepare(network)
    result = {}

    def run() -> None:
        stacked = stack_slices(((array - np.float32(MEAN)) / np.float32(STD))[None], 2)
        with torch.inference_mode():
            probs = sliding_window_inference(
                torch.from_numpy(stacked), (*SHAPE[:2], 1),
                reuse_constant_windows(lambda x: activate(window_logits(prepared, x, slice_wise=True), "sigmoid")),
                overlap=0.5, sw_batch_size=batch)
        (probs > 0.5).numpy()
        result["probabilities"] = probs[0].numpy()

    seconds = _best_of(run, repeats)
    return result["probabilities"], seconds


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitives
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(side: str, checkout: str | None, repeats: int, batch: int | None, out: str) -> dict:
    configure_cpu_runtime()
    import numpy as np

    network, array = our_network(), volume()
    if side == "upstream":
        probabilities, seconds = upstream_probabilities(checkout, network, array, repeats)
    else:
        probabilities, seconds = our_probabilities(network, array, repeats, batch)
    np.save(out, probabilities)
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_side(side: str, checkout: str | None, repeats: int, batch: int | None, folder: Path) -> dict:
    out = folder / f"{side}.npy"
    command = [sys.executable, __file__, "--child", side, "--repeats", str(repeats), "--out", str(out)]
    command += (["--upstream", checkout] if checkout else []) + (["--batch", str(batch)] if batch else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "output": out}


def compare(checkout: str | None, repeats: int, rounds: int, batch: int | None) -> dict:
    import numpy as np

    sides = ["ours"] + (["upstream"] if checkout else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for side in sides:
                runs[side].append(run_side(side, checkout, repeats, batch, Path(tmp)))
        row: dict[str, Any] = {"network": "SPiN published", "volume": "x".join(map(str, SHAPE)),
                               "batch": batch or "segment's"}
        for side in sides:
            row[f"{side}_s"] = round(statistics.median(r["seconds"] for r in runs[side]), 2)
            row[f"{side}_peak_mib"] = round(max(r["peak_mib"] for r in runs[side]))
        if checkout:
            ours, theirs = np.load(runs["ours"][0]["output"]), np.load(runs["upstream"][0]["output"])
            row["max_abs_diff"] = float(np.abs(ours - theirs).max())
            row["labels_agree_pct"] = round(float(((ours > 0.5) == (theirs > 0.5)).mean()) * 100, 4)
            row["speedup"] = round(row["upstream_s"] / row["ours_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="alexklwong/subpixel-embedding-segmentation checkout (outside this repo)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch", type=int, help="slices per network call (ours; default: segment's)")
    parser.add_argument("--json", help="write the row here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.upstream, args.repeats, args.batch, args.out)))
        return
    row = compare(args.upstream, args.repeats, args.rounds, args.batch)
    print(f"machine: {os.cpu_count()} CPUs; torch threads default; runtime defaults on both sides")
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
