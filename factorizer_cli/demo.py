"""The demo: a phantom case with known truth, segmented by the bundled demo model, and scored.

Everything it needs ships with the package (phantom generator, model card, weights), so it runs
offline on a fresh install and shows the whole pipeline: read → preprocess → sliding window →
postprocess → write, then the Dice against the truth the phantom was drawn from. The card records the
Dice of this very case, so a user can see that their install reproduces it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .io.atomic import write_json_atomic
from .io.images import read_image
from .phantom import MODALITIES, case_id, generate, write_case
from .pipeline.metrics import evaluate_case
from .pipeline.preview import write_preview
from .pipeline.segment import InferenceOptions, Segmenter
from .zoo.registry import zoo_card
from .zoo.resolve import fetch_zoo_model

DEMO_MODEL = "demo"
DEMO_SEED, DEMO_INDEX = 3, 0  # a series the demo model never saw in training (seed 1)


@dataclass
class DemoResult:
    case_dir: Path
    segmentation: Path
    preview: Path
    stats: Path
    dice: dict[str, float]  # this run, per region
    hd95: dict[str, float]
    card_dice: dict[str, float]  # what the model card recorded for this case
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(out_dir: str | Path, options: InferenceOptions = InferenceOptions()) -> DemoResult:
    """Generate the demo case in ``out_dir``, segment it, write label map and preview, score it."""
    out = Path(out_dir)
    seconds = {}
    start = time.perf_counter()
    name = case_id(DEMO_SEED, DEMO_INDEX)
    phantom = generate(DEMO_SEED, DEMO_INDEX)
    paths = write_case(phantom, out, name)
    seconds["phantom"] = time.perf_counter() - start

    start = time.perf_counter()
    package = fetch_zoo_model(zoo_card(DEMO_MODEL), offline=True).package  # the zoo's, whatever folders are here
    segmenter = Segmenter(package, options)
    result = segmenter([paths[m] for m in MODALITIES])
    segmentation, preview = out / f"{name}-pred.nii.gz", out / f"{name}-preview.png"
    result.write(segmentation)
    flair = read_image(paths["t2f"])
    write_preview(preview, flair.array, result.labels, flair.affine)
    seconds["segment"] = time.perf_counter() - start

    scores = evaluate_case(result.labels, phantom.labels, flair.spacing, "brats")
    card_dice = package.card.metrics.get("demo_case", {}).get("dice", {})
    demo = DemoResult(out / name, segmentation, preview, out / f"{name}-stats.json",
                      {k: round(v["dice"], 4) for k, v in scores.items()},
                      {k: round(v["hd95"], 2) for k, v in scores.items()},
                      dict(card_dice), seconds)
    report = {"model": package.card.name, "case": name, **result.volumes(), "dice": demo.dice,
              "hd95_mm": demo.hd95, "card_dice": demo.card_dice,
              "seconds": {k: round(v, 2) for k, v in {**seconds, **result.seconds}.items()}}
    write_json_atomic(demo.stats, report)
    return demo
