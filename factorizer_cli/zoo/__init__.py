"""Model zoo: model cards, model packages, weight integrity, and upstream checkpoint import."""

from ..safe_pickle import load_checkpoint
from .card import LabelRule, Modality, ModelCard
from .package import ModelPackage, open_package, save_package
from .upstream import load_upstream

__all__ = [
    "ModelCard", "Modality", "LabelRule", "ModelPackage", "open_package", "save_package",
    "load_upstream", "load_checkpoint",
]
