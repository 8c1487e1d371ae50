"""The batches of a run, step by step, made in DataLoader workers or in the training process.

The batch of step ``s`` is a pure function of ``(seed, s)``: its crops and augmentations are drawn
from ``np.random.default_rng([seed, s])`` and nothing else. The loader is a map-style dataset over
step numbers (from the step a run starts or resumes at), read in order; PyTorch hands item ``i`` to
worker ``i mod N`` and returns the items in order, so any number of workers (0: in this process)
yields the very batches of an uninterrupted single-process run, and ``--resume`` stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import FactorizerError, InputError
from .data import TrainingCase, augment, sample_batch


class StepBatches(Dataset):
    """Item ``i``: the augmented ``(image, target)`` batch of step ``start + i``."""

    def __init__(self, cases: Sequence[TrainingCase], roi: Sequence[int], batch_size: int,
                 foreground_fraction: float, seed: int, start: int, stop: int):
        self.cases, self.roi, self.batch_size = list(cases), tuple(roi), batch_size
        self.foreground_fraction, self.seed, self.start, self.stop = foreground_fraction, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_of_step(self.cases, self.roi, self.batch_size, self.foreground_fraction, self.seed,
                             self.start + index)


def batch_of_step(cases: Sequence[TrainingCase], roi: Sequence[int], batch_size: int, foreground_fraction: float,
                  seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops and augmentations of ``step`` (the same wherever and whenever it is computed)."""
    rng = np.random.default_rng([seed, step])
    return augment(*sample_batch(cases, roi, batch_size, foreground_fraction, rng), rng)


def step_batches(cases: Sequence[TrainingCase], roi: Sequence[int], batch_size: int, foreground_fraction: float,
                 seed: int, start: int, stop: int, workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of steps ``start .. stop - 1`` in order, made by ``workers`` processes (0: here).

    The loader gets its own generator, so creating it leaves the global torch RNG (the one the loop
    seeds per step) untouched.
    """
    dataset = StepBatches(cases, roi, batch_size, foreground_fraction, seed, start, stop)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                        prefetch_factor=2 if workers else None)
    return _one_line_errors(iter(loader))


def _one_line_errors(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches; a worker's failure as the one-line error the command shows (PyTorch re-raises a
    worker's exception with the worker's traceback folded into its message)."""
    try:
        yield from batches
    except FactorizerError as err:
        raise type(err)(_original_message(err)) from None
    except FileNotFoundError as err:
        raise InputError(f"a file of the training cache vanished while the run read it ({_original_message(err)}); "
                         "check that nothing deletes the cache during a run, then rerun with --resume") from None


def _original_message(err: BaseException) -> str:
    """The message raised in the worker: the last line of the traceback PyTorch folded in, if any."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    last = lines[-1].strip()
    return last.partition(f"{type(err).__name__}: ")[2] or last

