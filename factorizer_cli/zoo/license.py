"""Which licences let anyone use a model, and the gate in front of those that do not.

A card's ``license`` is text for people that names SPDX identifiers: ``Apache-2.0``, ``Code: MIT, as
stated by ...``, or ``LicenseRef-...`` (SPDX's own form for a licence it does not list, such as a
university's non-commercial academic licence). A licence is *permissive* when it names at least one
identifier and every identifier it names is on ``PERMISSIVE``: use for any purpose, commercial
included, asking at most for attribution. Identifiers are read as SPDX spells them (case matters: a
word is not mistaken for an id): the allow-listed ones, ``LicenseRef-...``, and versioned ids such as
``CC-BY-NC-4.0`` or ``GPL-3.0-only``; so ``Code: MIT. Weights: CC-BY-NC-4.0`` is not permissive.

Fetching or running the weights of a model whose licence is stated and not permissive needs the
user's explicit acceptance: ``--accept-license``, ``accept_license=True`` in Python, or
``FACTORIZER_ACCEPT_LICENSE=1`` for scripts and containers. A card that states no licence (a model
you trained or described yourself) has nothing to accept. Nothing is recorded: the licence is
shown, and accepted, on every use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import LicenseError
from .card import ModelCard

# SPDX ids of licences that allow any use, commercial included, with at most attribution.
PERMISSIVE = ("Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "CC-BY-4.0", "CC0-1.0", "MIT")
ACCEPT_OPTION = "--accept-license"
ACCEPT_ENV = "FACTORIZER_ACCEPT_LICENSE"

_TRUE = {"1", "true", "yes", "on"}
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")
_VERSIONED = re.compile(r"[A-Za-z][A-Za-z0-9+]*(?:-[A-Za-z0-9+]+)*?-\d+(?:\.\d+)+\+?(?:-[A-Za-z]+)*")


@dataclass(frozen=True)
class LicenseTerms:
    """A card's licence text and the SPDX identifiers it names."""

    text: str
    identifiers: tuple[str, ...]  # in order of appearance

    @property
    def stated(self) -> bool:
        return bool(self.text.strip())

    @property
    def permissive(self) -> bool:
        return bool(self.identifiers) and all(i in PERMISSIVE for i in self.identifiers)

    @property
    def needs_acceptance(self) -> bool:
        return self.stated and not self.permissive

    @property
    def label(self) -> str:
        """The licence in a few words: the identifiers off the allow-list, else all of them, else the
        text shortened."""
        restrictive = [i for i in self.identifiers if i not in PERMISSIVE]
        if restrictive or self.identifiers:
            return ", ".join(restrictive or self.identifiers)
        text = " ".join(self.text.split())
        return f'"{text}"' if len(text) <= 60 else f'"{text[:57]}..."'


def license_terms(text: str) -> LicenseTerms:
    """The SPDX identifiers named by a licence text (see the module docstring)."""
    found: list[str] = []
    for token in _TOKEN.findall(text):
        token = token.rstrip(".-")
        named = token in PERMISSIVE or token.startswith("LicenseRef-") or _VERSIONED.fullmatch(token)
        if named and token not in found:
            found.append(token)
    return LicenseTerms(text, tuple(found))


def accepted(requested: bool = False) -> bool:
    """``accept_license``/``--accept-license``, or ``FACTORIZER_ACCEPT_LICENSE`` set to 1/true/yes/on."""
    return requested or os.environ.get(ACCEPT_ENV, "").strip().lower() in _TRUE


def require_accepted(card: ModelCard, accept_license: bool = False) -> None:
    """Raise ``LicenseError`` for a card whose licence needs acceptance that was not given; a call
    before anything of the model is downloaded or run."""
    terms = license_terms(card.license)
    if terms.needs_acceptance and not accepted(accept_license):
        raise LicenseError(
            f"model {card.name} is licensed {terms.label}, not a permissive licence (`factorizer models info "
            f"{card.name}` shows its terms): accept them with {ACCEPT_OPTION} or {ACCEPT_ENV}=1"
        )


def acceptance_note(card: ModelCard) -> str | None:
    """What to remind the user of once a licence that needs acceptance was accepted; None otherwise."""
    terms = license_terms(card.license)
    if not terms.needs_acceptance:
        return None
    return (f"{card.name} is licensed {terms.label} (accepted); `factorizer models info {card.name}` shows its "
            "terms")
