"""Model zoo: model cards, weight sources, integrity checks, and upstream checkpoint import."""

from .safe_pickle import load_checkpoint
from .upstream import config_from_hparams, extract_state_dict, load_upstream

__all__ = ["load_upstream", "load_checkpoint", "extract_state_dict", "config_from_hparams"]
