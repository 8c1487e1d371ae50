"""Train a model card's network on a labelled dataset folder, resumably."""

from .loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
