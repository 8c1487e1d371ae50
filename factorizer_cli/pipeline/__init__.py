"""From images to label maps: preprocess (with its recorded inverse), sliding-window inference,
postprocess, and batches of cases. ``Segmenter`` is the entry point; ``run_batch`` runs folders."""

from .batch import Case, CaseResult, find_cases, run_batch
from .segment import InferenceOptions, Segmentation, Segmenter

__all__ = ["Segmenter", "InferenceOptions", "Segmentation", "Case", "CaseResult", "find_cases", "run_batch"]
