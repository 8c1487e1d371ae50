"""NMF component maps: capture the factors ``X ≈ U Vᵀ`` of chosen Factorizer subblocks during a forward.

Capture is opt-in and costs nothing when off: a ``FactorizerSubblock`` has ``recorder = None`` and its
forward checks that one attribute; nothing is hooked, copied or slowed down. ``capture(network)``
sets a recorder on the chosen subblocks for the duration of a ``with`` block; those subblocks then run
the plain (non-slabbed) NMF and hand their factors over, and still return the same output up to
floating-point rounding.

What a *component* is. A subblock matricizes its features into one ``head_dim × P`` matrix per (head,
window) and factorizes each as ``U Vᵀ`` with rank ``R``: ``U`` (head_dim × R) are channel loadings,
``V`` (P × R) a spatial pattern over the window's P voxels. Component ``(head h, rank index r)`` is
column r of those factors, in every window. Its map is ``V[:, r] · ‖U[:, r]‖``, the Euclidean norm of
that rank-1 term's contribution to the features at each voxel, so a window's arbitrary split of scale
between U and V cancels and windows can be compared. Each window's map is put back in place with the
matricize inverse; with shifted windows (SWMatricize) the maps of the shifts are averaged after each
shift's inverse, as the subblock averages its reconstructions. For rank > 1 the index r matches across
windows and shifts only through the shared initial factors (NMF gives no other correspondence); the
published Factorizers use rank 1.

The mean channel loadings of a component are its unit-norm ``U[:, r]`` averaged over every window
(and shift, and forward pass), weighted by the term's energy ``‖U[:, r]‖·‖V[:, r]‖``, so empty
windows do not count.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .blocks import FactorizerSubblock
from .factorization import NMF
from .matricize import fold_mean

_IN_UNET = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.block\.blocks\.(\d+)(?:\.(.+))?$")


@dataclass(frozen=True)
class Site:
    """One Factorizer subblock of a network, named for people: ``encoder.0.0``, ``bottleneck.0``, ...

    ``stage`` is ``encoder.N``, ``decoder.N`` or ``bottleneck`` (the deepest encoder stage) in a U-Net,
    else the module's qualified name (``network`` for the network itself); ``block`` the index of the
    block in its stage; ``subblock`` the subblock's name inside its block.
    """

    name: str
    stage: str
    block: int
    subblock: str
    module: FactorizerSubblock = field(repr=False, compare=False)

    @property
    def windows(self) -> list[nn.Module]:
        """The window partitions (one Matricize per shift)."""
        return self.module.windows

    def describe(self) -> dict:
        """The facts a reader of the maps needs: heads, rank, window size, shifts, grid."""
        first = self.windows[0]
        return {
            "stage": self.stage, "block": self.block, "subblock": self.subblock,
            "heads": first.num_heads, "head_dim": first.head_dim, "rank": int(self.module.factorize.rank),
            "window_size": list(first.patch_size),
            "shifts": [list(w.shifts or (0,) * len(first.patch_size)) for w in self.windows],
            "grid": [g * p for g, p in zip(first.grid_size, first.patch_size)],
        }


def component_sites(network: nn.Module) -> dict[str, Site]:
    """Every Factorizer subblock of ``network`` with an NMF factorization, by site name, in order."""
    found = [(q, m) for q, m in network.named_modules()
             if isinstance(m, FactorizerSubblock) and isinstance(m.factorize, NMF)]
    encoder_levels = len(getattr(getattr(network, "encoder", None), "blocks", ()))
    per_block: dict[tuple[str, int], list[tuple[str, FactorizerSubblock]]] = {}
    for qualified, module in found:
        match = _IN_UNET.match(qualified)
        if match:
            path, level, block, rest = match.groups()
            stage = f"{path}.{level}"
            if path == "encoder" and int(level) == encoder_levels - 1:
                stage = "bottleneck"
            sub = (rest or "").removeprefix("blocks.").split(".")[0] or "subblock"
            key = (stage, int(block))
        else:
            key, sub = (qualified or "network", 0), "subblock"
        per_block.setdefault(key, []).append((sub, module))
    sites = {}
    for (stage, block), subs in per_block.items():
        for sub, module in subs:
            name = f"{stage}.{block}" if len(subs) == 1 else f"{stage}.{block}.{sub}"
            sites[name] = Site(name, stage, block, sub, module)
    return sites


DEFAULT_BLOCKS = ("encoder.0", "bottleneck")


def select_sites(network: nn.Module, blocks: Sequence[str] | None = None) -> list[Site]:
    """The sites named by ``blocks``: a stage (``encoder.0``, ``bottleneck``, ``decoder.1``: all its
    blocks), a block (``encoder.0.1``) or a site name; ``encoder.N`` of the deepest level is the
    bottleneck. None: the encoder's first stage and the bottleneck, or every site of a network that
    is not a U-Net."""
    sites = component_sites(network)
    if not sites:
        raise ConfigError("this network has no Factorizer subblock with NMF: no component maps to capture")
    levels = len(getattr(getattr(network, "encoder", None), "blocks", ()))
    if blocks is None:
        stages = {s.stage for s in sites.values()}
        blocks = [b for b in DEFAULT_BLOCKS if b in stages] or list(sites)
    chosen: dict[str, Site] = {}
    for selector in blocks:
        selector = selector.strip()
        if levels and (selector == f"encoder.{levels - 1}" or selector.startswith(f"encoder.{levels - 1}.")):
            selector = "bottleneck" + selector[len(f"encoder.{levels - 1}"):]
        hits = [s for n, s in sites.items()
                if n == selector or n.startswith(selector + ".") or s.stage == selector]
        if not hits:
            stages = sorted({s.stage for s in sites.values()})
            raise ConfigError(f"no Factorizer block {selector!r} in this network; blocks are: "
                              f"{', '.join(stages)} (add .N for one block of a stage)")
        chosen.update((s.name, s) for s in hits)
    return list(chosen.values())


class SiteRecorder:
    """What one subblock hands over in a forward: its component maps and running loading sums."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.maps: Tensor | None = None  # (B, H·R, *grid) of the latest forward
        self.loadings: Tensor | None = None  # (H, head_dim, R): energy-weighted sum of unit-norm U
        self.energy: Tensor | None = None  # (H, R): summed energy

    @torch.no_grad()
    def record(self, windows: Sequence[nn.Module], factors: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Turn the factors ``(U, V)`` of each shift's matrices (``(B·H) × G × d × R`` and
        ``(B·H) × G × P × R``) into maps over the block's grid, and add up the loadings."""
        heads = windows[0].num_heads
        patterns = []  # per shift: V·‖U‖, (BH, G, R, P), folded back below as the subblock folds X
        for u, v in factors:
            u, v = u.detach().float(), v.detach().float()
            scale = torch.linalg.vector_norm(u, dim=-2, keepdim=True)  # (BH, G, 1, R)
            patterns.append((v * scale).mT.contiguous())
            energy = scale * torch.linalg.vector_norm(v, dim=-2, keepdim=True)  # (BH, G, 1, R)
            weighted = (u / scale.clamp_min(torch.finfo(u.dtype).tiny) * energy)
            loadings = weighted.unflatten(0, (-1, heads)).sum((0, 2))  # (H, d, R)
            energy = energy.unflatten(0, (-1, heads)).sum((0, 2))[:, 0]  # (H, R)
            self.loadings = loadings if self.loadings is None else self.loadings + loadings
            self.energy = energy if self.energy is None else self.energy + energy
        self.maps = fold_mean(windows, patterns)  # (B, H·R, *grid)

    def mean_loadings(self) -> Tensor:
        """(H, head_dim, R): the energy-weighted mean of the unit-norm channel loadings."""
        return self.loadings / self.energy[:, None].clamp_min(torch.finfo(self.energy.dtype).tiny)


@contextmanager
def recording(recorders: Sequence[SiteRecorder]) -> Iterator[None]:
    """Set each recorder on its subblock for the ``with`` block, and remove it after."""
    for recorder in recorders:
        if recorder.site.module.recorder is not None:
            raise ConfigError(f"block {recorder.site.name} is already being recorded")
    try:
        for recorder in recorders:
            recorder.site.module.recorder = recorder
        yield
    finally:
        for recorder in recorders:
            recorder.site.module.recorder = None


@contextmanager
def capture(network: nn.Module, blocks: Sequence[str] | None = None) -> Iterator[list[SiteRecorder]]:
    """Record the NMF factors of the chosen blocks (see ``select_sites``) for every forward inside.

    Yields one ``SiteRecorder`` per chosen subblock; after a forward each holds ``maps``, and the
    loadings add up over forwards. On exit the network runs as before.
    """
    recorders = [SiteRecorder(site) for site in select_sites(network, blocks)]
    with recording(recorders):
        yield recorders


__all__ = ["Site", "SiteRecorder", "capture", "component_sites", "select_sites", "recording", "DEFAULT_BLOCKS"]
