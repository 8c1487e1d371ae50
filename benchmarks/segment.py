"""The whole `segment` job on CPU, read to write: ours against the equivalent MONAI pipeline.

A seeded BraTS-sized case (t1n, t1c, t2w, t2f; 240x240x155, 1 mm, int16, BraTS's affine diag(-1,
-1, 1) at (0, 239, 0)) as .nii.gz: an ellipsoidal brain (grey and white matter, ventricles, noise),
zero outside, an off-centre tumour (oedema, enhancing rim, necrosis). Both sides segment it with
the same network and weights, saved as our model package:

- ours: ``Segmenter(open_package(model), InferenceOptions(device="cpu", tta=False))`` given the
  paths (read by ``factorizer_cli.io.read_image``), then ``Segmentation.write``, as the CLI does;
- MONAI: LoadImaged (4 files) -> EnsureChannelFirstd -> Orientationd(RAS) -> CropForegroundd
  (nonzero in any channel, the card's 10 mm margin, as ours) -> Spacingd(1 mm) ->
  NormalizeIntensityd(nonzero, channel-wise) -> sliding_window_inference(128^3, overlap 0.5,
  gaussian, sigmoid of ``net.predict``) -> Invertd -> threshold 0.5 -> BraTS labels -> SaveImage.

The network is the seed README's Swin Factorizer (see benchmarks/forward.py), seeded random weights,
our implementation on both sides, or with ``--upstream CHECKOUT`` upstream's on the MONAI side (the
pipeline a MONAI user assembles today: MONAI transforms around pashtari/factorizer);
``--trivial`` swaps in a 1x1x1 Conv3d oracle (WT: FLAIR bright, TC: T1 dark, ET: T1c bright), so the
time is the pipeline's overhead and both label maps must equal the phantom's truth. Each run is a
fresh process (peak RSS above the RSS before reading the images); rounds alternate.

    python benchmarks/segment.py --trivial                              # about half a minute
    python benchmarks/segment.py --rounds 2 --json /tmp/segment.json   # full network, minutes
"""

from __future__ import annotations

# ruff: noqa: E402  (the CPU runtime is configured before anything imports torch)
from factorizer_cli.runtime import configure_cpu_runtime

configure_cpu_runtime()  # as the `factorizer` command runs; every worker, ours and the reference, inherits it

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import load_file

from factorizer_cli.families import build
from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.package import open_package, save_package

MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
CONV, ROI = {"class": "Conv3d"}, [128, 128, 128]
SEED_NETWORK = {  # the seed README's Swin Factorizer, as data
    "class": "SegmentationFactorizer", "in_channels": 4, "out_channels": 3, "spatial_size": ROI,
    "encoder_depth": [1] * 5, "encoder_width": [32, 64, 128, 256, 512], "strides": [1, 2, 2, 2, 2],
    "decoder_depth": [1] * 4, "stem": {**CONV, "kernel_size": 3, "padding": 1, "bias": False},
    "downsample": {**CONV, "kernel_size": 2, "bias": False}, "head": {**CONV, "kernel_size": 1},
    "upsample": {"class": "ConvTranspose3d", "kernel_size": 2}, "num_deep_supr": 3, "dropout": 0.1,
    "nmf": {"class": "FactorizerSubblock", "act": {"class": "ReLU"}, "factorize": {"class": "NMF"},
            "tensorize": {"class": "SWMatricize", "head_dim": 8, "patch_size": 8}, "rank": 1,
            "num_iters": 5, "init": "uniform", "solver": "hals", "dropout": 0.1},
    "mlp": {"class": "MLP", "ratio": 2, "dropout": 0.1},
}
TRIVIAL_NETWORK = {**CONV, "in_channels": 4, "out_channels": 3, "kernel_size": 1}


def make_case(folder: Path, seed: int = 0) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Write the phantom's four modalities; return their paths, the true labels and the brain."""
    rng, shape = np.random.default_rng(seed), (240, 240, 155)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]

    def inside(c, r):
        return ((i - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((k - c[2]) / r[2]) ** 2 < 1

    c, t = (120, 128, 70), (150, 96, 88)  # brain and tumour centres
    tissue = np.select([inside(t, (8, 7, 6)), inside(t, (14, 12, 11)), inside(t, (26, 22, 20)),
                        inside((120, 132, 78), (9, 22, 10)), inside(c, (54, 68, 48)),
                        inside(c, (70, 85, 65))], [6, 5, 4, 3, 2, 1], 0)
    # t1n, t1c, t2w, t2f of: background, GM, WM, CSF, oedema, enhancing rim, necrosis
    table = np.array([[0, 0, 0, 0], [600, 620, 900, 700], [850, 870, 650, 550],
                      [420, 430, 1800, 150], [560, 580, 1400, 1400], [260, 1800, 1200, 1100],
                      [120, 200, 1700, 900]])
    folder.mkdir(parents=True)
    paths = []
    for channel, name in enumerate(MODALITIES):
        noisy = table[tissue, channel] * (1 + 0.03 * rng.standard_normal(shape, np.float32))
        image = nib.Nifti1Image(np.rint(noisy).astype(np.int16), AFFINE)
        image.set_qform(AFFINE, code=1)
        image.set_sform(AFFINE, code=1)
        paths.append(folder / f"BraTS-GLI-00000-000-{name}.nii.gz")
        nib.save(image, paths[-1])
    return paths, np.array([0, 0, 0, 0, 2, 3, 1], np.uint8)[tissue], tissue > 0


def make_package(folder: Path, trivial: bool) -> None:
    torch.manual_seed(0)
    net = build(TRIVIAL_NETWORK if trivial else SEED_NETWORK)
    if trivial:  # logit 20 (z - t): TC: T1 z < -2.75, WT: FLAIR z > 2.2, ET: T1c z > 4
        weight = torch.zeros(3, 4, 1, 1, 1)
        weight[0, 0], weight[1, 3], weight[2, 1] = -20.0, 20.0, 20.0
        net.load_state_dict({"weight": weight, "bias": torch.tensor([-55.0, -44.0, -80.0])})
    inputs = [{"name": n, "aliases": [a]} for n, a in zip(MODALITIES, "t1 t1ce t2 flair".split())]
    labels = [{"region": r, "label": n} for r, n in (("WT", 2), ("TC", 1), ("ET", 3))]
    save_package(folder, ModelCard.from_dict({
        "name": "bench", "task": "brats", "inputs": inputs, "spacing": [1.0] * 3, "roi": ROI,
        "outputs": ["TC", "WT", "ET"], "labels": labels, "activation": "sigmoid", "overlap": 0.5,
        "architecture": TRIVIAL_NETWORK if trivial else SEED_NETWORK,
    }), [net.state_dict()])


def ours(paths, model, out):
    segmenter = Segmenter(open_package(model), InferenceOptions(device="cpu", tta=False))

    def job(clock):
        segmentation = segmenter(paths)  # reads them, keeping only the reference past preprocessing
        clock("segment")
        segmentation.write(out)
        clock("write")
        return segmentation.seconds  # read + preprocess, inference, postprocess: inside "segment"
    return job


def monai(paths, model, out, upstream=None):
    from monai import transforms as mt
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    package = open_package(model)
    if upstream and package.card.architecture != TRIVIAL_NETWORK:  # the network a MONAI user has
        from forward import import_upstream  # noqa: I001  (benchmarks/ is on sys.path here)

        from factorizer_cli.examples.seed_network import seed_network

        net = seed_network(ROI[0], patch_size=8, ft=import_upstream(upstream)).eval()
        net.load_state_dict(load_file(package.weight_files[0]), strict=True)

        def forward(x):
            return net(x)[0]  # upstream has no predict(): all heads, keep the full-resolution one
    else:
        net = build(dict(package.card.architecture))
        net.load_state_dict(load_file(package.weight_files[0]))
        forward = net.eval().predict if hasattr(net, "predict") else net.eval()
    margin = math.ceil(package.card.preprocessing.crop_margin_mm / 1.0)  # voxels at the case's 1 mm
    pre = mt.Compose([mt.LoadImaged("image"), mt.EnsureChannelFirstd("image"),
                      mt.Orientationd("image", axcodes="RAS"),
                      # as ours: crop to the voxels nonzero in any channel, grown by the card's margin
                      mt.CropForegroundd("image", source_key="image", select_fn=lambda x: x != 0,
                                         margin=margin, allow_smaller=True),
                      mt.Spacingd("image", pixdim=(1.0, 1.0, 1.0), mode="bilinear"),
                      mt.NormalizeIntensityd("image", nonzero=True, channel_wise=True)])
    invert = mt.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    name = {"subject": Path(out).name.removesuffix(".nii.gz")}
    save = mt.SaveImage(output_dir=str(Path(out).parent), output_postfix="", separate_folder=False,
                        output_dtype=np.uint8, print_log=False, output_name_formatter=lambda *_: name)

    def job(clock):
        data = pre({"image": [str(p) for p in paths]})
        clock("read + preprocess")
        data["pred"] = sliding_window_inference(
            data["image"][None], ROI, 1, lambda x: torch.sigmoid(forward(x)),
            overlap=0.5, mode="gaussian")[0]
        clock("inference")
        pred = invert(data)["pred"]
        on = pred > 0.5  # channels TC, WT, ET; painted WT -> 2, TC -> 1, ET -> 3
        labels = torch.zeros(on.shape[1:], dtype=torch.uint8)
        labels[on[1]], labels[on[0]], labels[on[2]] = 2, 1, 3
        clock("postprocess")
        save(MetaTensor(labels[None], meta=pred.meta))  # the meta holds the input's affine again
        clock("write")
        return {}
    return job


def worker(args: argparse.Namespace) -> None:
    """One implementation, one case, in this fresh process; timings and memory to OUT.json."""
    warnings.simplefilter("ignore", FutureWarning)  # MONAI's notice on Orientationd's `labels`
    torch.set_num_threads(args.threads)
    job = (ours(args.paths, args.model, args.out) if args.worker == "ours"
           else monai(args.paths, args.model, args.out, args.upstream))
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    seconds, marks, cpu = {}, [time.perf_counter()], time.process_time()

    def clock(stage):  # wall time since the previous mark
        marks.append(time.perf_counter())
        seconds[stage] = marks[-1] - marks[-2]
    with torch.inference_mode():
        seconds.update(job(clock))
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20
    Path(args.out + ".json").write_text(json.dumps(
        {"total_s": marks[-1] - marks[0], "cpu_s": time.process_time() - cpu,  # cpu < threads x
         "peak_mib": peak_mib, "stages_s": seconds}))  # total_s: the machine was busy elsewhere


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:  # 1.0 where neither has the label
    x, y = a == label, b == label
    return 2 * float((x & y).sum()) / int(x.sum() + y.sum()) if x.any() or y.any() else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trivial", action="store_true", help="1x1x1 conv: pipeline overhead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--upstream", help="checkout of pashtari/factorizer (72d3636): the MONAI side "
                        "runs upstream's network with the same weights, as a MONAI user would")
    for hidden, nargs in (("--worker", None), ("--model", None), ("--out", None), ("--paths", 4)):
        parser.add_argument(hidden, nargs=nargs, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    impls, runs = ["ours", "monai"], {"ours": [], "monai": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths, truth, brain = make_case(Path(tmp) / "case")
        make_package(Path(tmp) / "model", args.trivial)
        for round_ in range(args.rounds):
            for impl in impls if round_ % 2 == 0 else impls[::-1]:
                out = f"{tmp}/{impl}.nii.gz"
                subprocess.run([sys.executable, __file__, "--worker", impl, "--model",
                                f"{tmp}/model", "--out", out, "--threads", str(args.threads),
                                "--paths", *map(str, paths)]
                               + (["--upstream", args.upstream] if args.upstream else []), check=True)
                r = json.loads(Path(out + ".json").read_text())
                runs[impl].append(r)
                print(f"round {round_ + 1} {impl}: {r['total_s']:.2f} s (cpu {r['cpu_s']:.0f} s), "
                      f"+{r['peak_mib']:.0f} MiB; "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items()), flush=True)
        outputs = {impl: nib.load(f"{tmp}/{impl}.nii.gz") for impl in impls}
        labels = {impl: np.asarray(img.dataobj) for impl, img in outputs.items()}  # read while here

    network = "trivial 1x1x1 conv" if args.trivial else "seed README Swin Factorizer" + (
        " (MONAI side: upstream's implementation)" if args.upstream else "")
    summary = {"network": network, "threads": args.threads, "torch": torch.__version__}
    print(f"\nsegment: one BraTS-sized case (4 x 240x240x155), {network}, CPU, "
          f"{args.threads} threads\n{'':>5} {'median s':>9} {'peak MiB':>9} {'overhead s':>11} "
          f"{'geometry':>9}  Dice vs truth (labels 1, 2, 3)")
    for impl in impls:
        img, rs = outputs[impl], runs[impl]
        summary[impl] = s = {
            "median_s": statistics.median(r["total_s"] for r in rs), "runs": rs,
            "max_peak_mib": max(r["peak_mib"] for r in rs),
            "overhead_s": statistics.median(  # all but the sliding window; everything if trivial
                r["total_s"] - (not args.trivial) * r["stages_s"]["inference"] for r in rs),
            "geometry_ok": bool(img.shape == truth.shape and np.allclose(img.affine, AFFINE)
                                and img.get_data_dtype() == np.uint8),
            "dice_vs_truth": [dice(labels[impl], truth, lab) for lab in (1, 2, 3)],
        }
        print(f"{impl:>5} {s['median_s']:>9.2f} {s['max_peak_mib']:>9.0f} {s['overhead_s']:>11.2f} "
              f"{'ok' if s['geometry_ok'] else 'WRONG':>9}  "
              + ", ".join(f"{d:.4f}" for d in s["dice_vs_truth"]))
    a, b = labels["ours"], labels["monai"]
    summary.update({
        "speedup": summary["monai"]["median_s"] / summary["ours"]["median_s"],
        "memory_ratio": summary["ours"]["max_peak_mib"] / summary["monai"]["max_peak_mib"],
        "agreement": float((a == b).mean()), "agreement_in_brain": float((a == b)[brain].mean()),
        "dice_ours_monai": {lab: dice(a, b, lab) for lab in (1, 2, 3)},
    })
    print(f"speed-up {summary['speedup']:.2f}x, peak memory {summary['memory_ratio']:.2f}x of "
          f"MONAI's; the label maps agree on {100 * summary['agreement']:.3f}% of voxels "
          f"({100 * summary['agreement_in_brain']:.3f}% in the brain); Dice ours/MONAI per label: "
          + ", ".join(f"{k}: {v:.4f}" for k, v in summary["dice_ours_monai"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
