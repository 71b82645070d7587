"""A toy erasure method for the registry test: one module (this file) and one `register(...)` line plug it in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trce.edit import Edit, fingerprint
from trce.errors import TrceError
from trce.families import family_of


@dataclass(frozen=True)
class ToyConfig:
    scale: float = 0.5  # the text projections are multiplied by this

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise TrceError(f"scale must be in (0, 1], got {self.scale!r}", field="scale")


def run(pipe, specs, config: ToyConfig, context) -> Edit:
    """Scale every text projection (not an eraser: a stand-in with the registry's stage signature)."""
    from trce.concepts import spec_record
    from trce.edit import resolve

    paths = family_of(pipe).text_projections(pipe)
    weights = {p: (resolve(pipe, p).detach() * config.scale).cpu() for p in paths}
    return Edit(weights=weights, method="toy", spec=spec_record(specs), settings={"scale": config.scale},
                base=fingerprint(pipe), info={"seed": context.seed, "tensors": len(weights), "ones": torch.ones(1).item()})
