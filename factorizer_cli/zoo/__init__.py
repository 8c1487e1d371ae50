"""Model zoo: model cards, model packages, weight integrity, and upstream checkpoint import."""

from .card import LabelRule, Modality, ModelCard
from .package import ModelPackage, open_package, save_package
from .safe_pickle import load_checkpoint
from .upstream import config_from_hparams, extract_state_dict, load_upstream

__all__ = [
    "ModelCard", "Modality", "LabelRule", "ModelPackage", "open_package", "save_package",
    "load_upstream", "load_checkpoint", "extract_state_dict", "config_from_hparams",
]
