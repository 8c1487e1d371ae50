"""Differentiable nonnegative matrix factorization (NMF), the core layer of Factorizer.

A batch of matrices ``X`` (``... × M × N``) is approximated by ``U @ V.mT`` with ``U`` (``... × M × R``)
and ``V`` (``... × N × R``) nonnegative, starting from fixed random factors (buffers, so they are saved
with the weights) and running ``num_iters`` block-coordinate updates of U then V. The layer returns the
low-rank reconstruction, so it can sit inside a network and be trained end to end.

Semantics follow upstream Factorizer (tag 0.0.2): the same update formulas and ``eps`` placement, the
same rank-from-compression rule, the same FLOP counts, and the same ``num_grad_steps`` rule (iteration
``it`` of ``0..num_iters``, where 0 is the initialisation, is tracked by autograd only when
``it >= num_iters - num_grad_steps + 1``).

Speed: for rank-1 HALS on a nonnegative input (the configuration of every published Factorizer), the
whole iteration can run on the tiny ``M × M`` Gram matrix instead of re-reading ``X`` twice per
iteration: with ``X ≥ 0`` and nonnegative factors every ReLU of HALS is the identity, so each update is
linear in ``X`` and ``X`` enters only through ``X @ X.mT``, ``X @ 1`` and ``X @ v0``. Two passes over
``X`` replace eleven. It is used only when nothing needs gradients, and gives the same numbers up to
floating-point rounding (tested).

The arithmetic is written once, as small pure functions that every path calls: ``in_float32`` (the
half-precision guard), ``iterate`` (the update loop), ``rank1_hals_gram`` (the Gram iterations) and the
solvers' ``update``. The layer, the component capture (``nn.components``) and the ONNX export graph
(``nn.export_graph``, which lays the same algebra out channels last) differ only in how they arrange data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError

INITS = ("uniform", "normal", "uniform-normal", "normal-uniform")
SOLVERS = ("mu", "hals")
HALF = (torch.float16, torch.bfloat16)
# The Gram path writes its reconstruction over its input a few MB of windows at a time.
_OVERWRITE_ELEMENTS = 1 << 22

T = TypeVar("T")
Update = Callable[[Tensor, Tensor, Tensor], Tensor]


# --- kernels: pure functions shared by the training, inference, recording and export paths ----------

def in_float32(fn: Callable[[Tensor], T], x: Tensor) -> T:
    """``fn(x)``, computed in float32 with autocast off when ``x`` is half precision; the caller casts back.

    Half precision cannot hold ε (1e-8 rounds to 0 in fp16: 0/0 on an all-zero window) nor the
    iterations' dynamic range. Autocast is switched off only where it is on, so that a traced graph
    (the ONNX export) holds no autocast region.
    """
    if x.dtype not in HALF:
        return fn(x)
    device = x.device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
        return fn(x.float())


def iterate(
    update: Update,
    x: Tensor,
    u: Tensor,
    v: Tensor,
    num_iters: int,
    tracked: Callable[[int], bool] | None = None,
    log: Callable[[int, Tensor, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """``num_iters`` block-coordinate steps, ``u ← update(x, u, v)`` then ``v ← update(xᵀ, v, u)``.

    ``tracked(it)`` says whether iteration ``it`` (from 1) is recorded by autograd; None enters no
    grad-mode context at all (the export traces plain tensor algebra). ``log(it, u, v)`` is called
    before each iteration (the layer's ``verbose``).
    """
    for it in range(1, num_iters + 1):
        with nullcontext() if tracked is None or tracked(it) else torch.no_grad():
            if log is not None:
                log(it, u, v)
            u = update(x, u, v)
            v = update(x.mT, v, u)
    return u, v


def rank1_hals_gram(
    gram: Tensor, row_sum: Tensor, x_v0: Tensor, v0: Tensor, num_iters: int, eps: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Rank-1 HALS of ``X ≥ 0`` (``... × M × N``) run on its Gram data; returns ``u`` and ``u / (uᵀu + ε)``.

    ``gram = X Xᵀ`` (``... × M × M``), ``row_sum = X 1`` and ``x_v0 = X v0`` (``... × M × 1``), ``v0``
    the initial ``N × 1`` factor, all in the precision the iterations should run in. With ``X ≥ 0`` and
    nonnegative factors every ReLU of HALS is inactive and HALS alternates ``u = (X v + ε) / (vᵀv + ε)``
    and ``v = (Xᵀu + ε) / (uᵀu + ε)``. Writing ``v = (Xᵀw + ε·1) / c`` for the previous ``u = w``:
    ``X v = (K w + ε r) / c`` and ``vᵀv = (wᵀK w + 2ε wᵀr + ε² N) / c²`` with ``K = X Xᵀ``, ``r = X 1``.
    The final reconstruction is ``u vᵀ = (u / c)(uᵀX + ε 1ᵀ)``, ``c = uᵀu + ε``: the caller applies it
    in its own layout. ``eps`` may be a one-element tensor (the export: see ``nn.export_graph.tensor_eps``).
    """
    n = v0.shape[-2]
    u = torch.relu((x_v0 + eps) / (v0.mT @ v0 + eps))  # iteration 1: u from the initial v0
    for _ in range(num_iters - 1):
        c = u.mT @ u + eps
        xv = (gram @ u + eps * row_sum) / c
        vtv = (u.mT @ gram @ u + 2 * eps * (u.mT @ row_sum) + eps * eps * n) / (c * c)
        u = torch.relu((xv + eps) / (vtv + eps))
    return u, u / (u.mT @ u + eps)


class RandomInit(nn.Module):
    """Fixed random initial factors ``u0`` (M × R) and ``v0`` (N × R), drawn once at construction."""

    def __init__(self, size: tuple[int, int], rank: int, method: str = "uniform") -> None:
        super().__init__()
        if method not in INITS:
            raise ConfigError(f"unknown NMF init {method!r}; expected one of {', '.join(INITS)}")
        u_method, _, v_method = method.partition("-")
        v_method = v_method or u_method
        self.register_buffer("u0", _draw(u_method, (size[0], rank)))
        self.register_buffer("v0", _draw(v_method, (size[1], rank)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[:-2]
        return self.u0.expand(*batch, *self.u0.shape), self.v0.expand(*batch, *self.v0.shape)


def _draw(method: str, shape: tuple[int, int]) -> Tensor:
    out = torch.empty(shape)
    return nn.init.uniform_(out) if method == "uniform" else nn.init.normal_(out)


class MultiplicativeUpdate(nn.Module):
    """Lee-Seung multiplicative updates: ``U ← (U ⊙ XV + ε) / (U VᵀV + ε)``, then the same for V."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @staticmethod
    def flops_u(m: int, n: int, r: int) -> int:
        return 2 * r * (m * n + n * r + m * r + 2 * m)

    def update(self, x: Tensor, u: Tensor, v: Tensor, eps: float | Tensor | None = None) -> Tensor:
        """``eps`` overrides ``self.eps`` (the ONNX export passes a tensor its optimizer cannot fold away)."""
        eps = self.eps if eps is None else eps
        a, b = x @ v, v.mT @ v
        return (u * a + eps) / (u @ b + eps)


class HALS(nn.Module):
    """Hierarchical alternating least squares: one projected coordinate step per rank-1 component."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @staticmethod
    def flops_u(m: int, n: int, r: int) -> int:
        return 2 * r * (m * n + n * r + m * r + m)

    def update(self, x: Tensor, u: Tensor, v: Tensor, eps: float | Tensor | None = None) -> Tensor:
        """``eps`` overrides ``self.eps`` (the ONNX export passes a tensor its optimizer cannot fold away)."""
        a, b = x @ v, v.mT @ v
        eps = self.eps if eps is None else eps
        rank = u.shape[-1]
        if rank == 1:
            return torch.relu((a + eps) / (b + eps))
        columns = list(u.unbind(-1))
        for r in range(rank):
            others = [j for j in range(rank) if j != r]
            rest = torch.stack([columns[j] for j in others], -1) @ b[..., others, r : r + 1]
            numerator = a[..., r : r + 1] - rest + eps
            columns[r] = torch.relu(numerator / (b[..., r : r + 1, r : r + 1] + eps))[..., 0]
        return torch.stack(columns, -1)


class NMF(nn.Module):
    """Nonnegative matrix factorization layer: returns ``U @ V.mT`` fitted to the input.

    Args:
        size: ``(M, N)``, the size of each matrix.
        rank: number of components; if None, chosen so that the factors hold ``compression`` times
            fewer numbers than the matrix.
        num_iters: solver iterations; may be changed after construction (fewer iterations at inference
            is the paper's speed-up).
        num_grad_steps: only the last ``num_grad_steps`` iterations are tracked by autograd (the one-step
            gradient trick); None tracks all of them.
        init: ``"uniform"`` (default), ``"normal"``, ``"uniform-normal"`` or ``"normal-uniform"``.
        solver: ``"hals"`` (default) or ``"mu"``.
        eps: the solver's safeguard against division by zero (upstream: 1e-8 until 0.0.2, 1e-16 after).
    """

    def __init__(
        self,
        size: Sequence[int],
        rank: int | None = None,
        compression: float = 10,
        num_iters: int = 5,
        num_grad_steps: int | None = None,
        init: str = "uniform",
        solver: str = "hals",
        eps: float = 1e-8,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if len(size) != 2:
            raise ConfigError(f"NMF size must be (M, N), got {tuple(size)}")
        m, n = self.size = (int(size[0]), int(size[1]))
        if rank is None:
            if compression is None:
                raise ConfigError("NMF needs `rank` or `compression`")
            rank = max(math.ceil(m * n / (compression * (m + n))), 1)
        if solver not in SOLVERS:
            raise ConfigError(f"unknown NMF solver {solver!r}; expected one of {', '.join(SOLVERS)}")
        self.rank = rank
        self.compression = m * n / (rank * (m + n))
        self.num_iters = num_iters
        self.num_grad_steps = num_grad_steps
        self.verbose = verbose
        self.init = RandomInit(self.size, rank, init)
        self.solver = HALS(eps) if solver == "hals" else MultiplicativeUpdate(eps)
        # Set by FactorizerSubblock when its activation guarantees X >= 0 (enables the Gram fast path).
        self.input_is_nonnegative = False

    @property
    def flops(self) -> dict[str, int]:
        """FLOPs per sample, counted as upstream counts them."""
        (m, n), r = self.size, self.rank
        per_iter = self.solver.flops_u(m, n, r) + self.solver.flops_u(n, m, r)
        return {"init": 0, "decompose": self.num_iters * per_iter, "reconstruct": 2 * m * r * n}

    def _tracked(self, it: int) -> bool:
        steps = self.num_iters if self.num_grad_steps is None else self.num_grad_steps
        return it >= self.num_iters - steps + 1

    @property
    def gram_shortcut(self) -> bool:
        """Rank-1 HALS on nonnegative input: the iterations may run on the Gram matrix (``rank1_hals_gram``)."""
        return (self.input_is_nonnegative and self.rank == 1 and isinstance(self.solver, HALS)
                and self.num_iters >= 1)

    def decompose(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Fit the factors ``(U, V)`` to ``x`` (``... × M × N``)."""
        with nullcontext() if self._tracked(0) else torch.no_grad():
            u, v = self.init(x)
            u, v = u.to(x.dtype), v.to(x.dtype)

        def log(it: int, u: Tensor, v: Tensor) -> None:
            print(f"iter {it}, relative error = {relative_error(x, u @ v.mT).mean():.4g}")

        return iterate(self.solver.update, x, u, v, self.num_iters, self._tracked, log if self.verbose else None)

    def fit(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, V, U @ V.mT)`` by the textbook iterations (component capture needs the factors); for a
        half-precision ``x`` the factors stay float32 and the reconstruction comes back in ``x``'s dtype."""

        def factors_and_product(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            u, v = self.decompose(x)
            return u, v, u @ v.mT

        u, v, y = in_float32(factors_and_product, x)
        return u, v, y.to(x.dtype)

    def forward(self, x: Tensor, overwrite_input: bool = False) -> Tensor:
        """The reconstruction ``U @ V.mT``; with ``overwrite_input`` it may be written into ``x``.

        ``overwrite_input`` saves a tensor the size of ``x`` when the caller no longer needs it (the
        Factorizer subblock's matricized features at inference).
        """
        if x.dtype in HALF:  # the float32 copy is ours: it may be overwritten
            return in_float32(lambda x32: self.forward(x32, overwrite_input=True), x).to(x.dtype)
        if self._gram_path_applies(x):
            return self._rank1_hals_gram(x, overwrite_input)
        u, v = self.decompose(x)
        return u @ v.mT

    def _gram_path_applies(self, x: Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in self.parameters()))
        return (
            self.gram_shortcut
            and not needs_grad
            and not self.verbose
            and not torch.jit.is_tracing()
            and x.dtype in (torch.float32, torch.float64)
        )

    def _rank1_hals_gram(self, x: Tensor, overwrite_input: bool = False) -> Tensor:
        """Rank-1 HALS for ``X ≥ 0`` on ``K = X Xᵀ`` (M × M) instead of X (M × N): see ``rank1_hals_gram``.

        One pass over X gathers what the iterations need; they run in float64 on tiny tensors; the
        reconstruction ``(u uᵀ X + ε u 1ᵀ) / c`` is one batched multiply-add, written over ``x`` a few
        MB at a time with ``overwrite_input``.
        """
        eps = self.solver.eps
        m, n = x.shape[-2:]
        small = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
        v0 = self.init.v0.to(x.dtype)
        gram = (x @ x.mT).to(small)  # ... × M × M
        row_terms = (x @ torch.cat([torch.ones_like(v0), v0], dim=1)).to(small)  # ... × M × 2: X 1, X v0
        row_sum, x_v0 = row_terms[..., :1], row_terms[..., 1:]
        u, scaled = rank1_hals_gram(gram, row_sum, x_v0, v0.to(small), self.num_iters, eps)
        projection = (u @ scaled.mT).to(x.dtype).reshape(-1, m, m)
        offset = (eps * scaled).to(x.dtype).reshape(-1, m, 1)
        x3 = x.reshape(-1, m, n)
        if not (overwrite_input and x.is_contiguous()):
            return torch.baddbmm(offset, projection, x3).view(x.shape)
        step = max(1, _OVERWRITE_ELEMENTS // (m * n))
        for i in range(0, x3.shape[0], step):
            x3[i : i + step] = torch.baddbmm(offset[i : i + step], projection[i : i + step], x3[i : i + step])
        return x


def relative_error(x: Tensor, y: Tensor, eps: float = 1e-16) -> Tensor:
    """``‖x − y‖ / ‖x‖`` per batch element, over the last two dimensions."""
    return torch.linalg.matrix_norm(x - y) / (torch.linalg.matrix_norm(x) + eps)
