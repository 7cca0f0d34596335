"""What `--adapter PATH[:WEIGHT]` names: an adapter's location and the weight its ΔW is multiplied by. No torch here:
the CLI parses it before Prefect's server starts."""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field

from .errors import LoraMergeError

# A weight at the end of `--adapter PATH:WEIGHT`: a plain decimal number, signed, with an optional exponent.
_WEIGHT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NOT_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


class AdapterSpec(BaseModel):
    """One adapter to merge: where it is, and the weight its ΔW is multiplied by (negative subtracts it)."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(min_length=1, description="PEFT LoRA adapter directory or URI.")
    weight: float = Field(1.0, allow_inf_nan=False, description="Multiplies the adapter's ΔW; may be negative.")

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """`PATH` or `PATH:WEIGHT`. Only a number after the last colon is a weight, so a URI's own colons
        (`s3://bucket/adapter`) stay in the path; a path that itself ends in `:<number>` is written `PATH:1`."""
        text = text.strip()
        head, sep, tail = text.rpartition(":")
        if (
            sep
            and head
            and (
                _NOT_FINITE.fullmatch(tail.strip())
                or _WEIGHT.fullmatch(tail.strip())
                and not math.isfinite(float(tail))
            )
        ):
            raise LoraMergeError(f"--adapter {text}: the weight after the last colon must be a finite number")
        if sep and head and _WEIGHT.fullmatch(tail.strip()):
            return cls(uri=head, weight=float(tail))
        if not text:
            raise LoraMergeError("--adapter is empty: give an adapter directory or URI, optionally PATH:WEIGHT")
        return cls(uri=text)

    def __str__(self) -> str:
        return self.uri if self.weight == 1 else f"{self.uri}:{self.weight:g}"
