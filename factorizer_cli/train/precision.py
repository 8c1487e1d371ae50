"""The arithmetic a training run computes in: float32, or mixed precision under autocast.

bf16 keeps float32's range, so it needs no loss scaling: on CUDA GPUs, and on CPUs that compute in it
natively (AVX-512 BF16 or AMX; elsewhere it would be emulated, slower than float32, and is refused). fp16 needs a gradient scaler against
underflow and is offered on CUDA only. The loss is always computed in float32 from the heads, and
the NMF iterations leave autocast for float32 themselves (``nn.factorization``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from ..errors import DeviceError

TRAINING_PRECISIONS = ("fp32", "bf16", "fp16")


def training_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The context the forward and the loss run in; refuses what ``device`` cannot do, in one line."""
    if precision not in TRAINING_PRECISIONS:
        raise DeviceError(f"unknown training precision {precision!r}; use one of {', '.join(TRAINING_PRECISIONS)}")
    if precision == "fp32":
        return nullcontext()
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--precision {precision} trains on CPUs or CUDA GPUs, not {device.type}; use fp32")
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 trains on CUDA GPUs only (it needs loss scaling there); on the CPU "
                          "use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise DeviceError("--precision bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), where it "
                          "would be slower than fp32; use fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (PyTorch's own probes; assumed so if they are gone)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return not probes or any(probe() for probe in probes)


def gradient_scaler(device: torch.device, precision: str, saved: dict | None = None) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (None for the others), continuing from a resumed run's ``saved`` state so that
    its scale, and so its skipped steps, stay those of an uninterrupted run."""
    if precision != "fp16":
        return None
    scaler = torch.amp.GradScaler(device.type)
    if saved:
        scaler.load_state_dict(saved)
    return scaler
