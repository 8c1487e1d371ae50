"""Choosing where and in which precision the network runs."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from ..errors import DeviceError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "--device cuda was asked for but no CUDA GPU is available (is a CUDA build of PyTorch "
                "installed?); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"no GPU {device.index}: this machine has {torch.cuda.device_count()}")
    if device.type == "mps" and not (torch.backends.mps.is_available()):
        raise DeviceError("--device mps was asked for but Apple MPS is not available; use cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """Mixed precision on CUDA (fp16 by default, or bf16); full precision elsewhere.

    The networks' NMF iterations are kept in float32 by autocast's matmul rules only for the parts
    that autocast promotes; results are blended in float32 by the sliding window either way.
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            raise DeviceError(f"--precision {precision} needs a CUDA GPU; on {device.type} use fp32 or auto")
        return nullcontext()
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)
