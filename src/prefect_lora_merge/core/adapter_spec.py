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
        if not text:
            raise LoraMergeError("--adapter is empty: give an adapter directory or URI, optionally PATH:WEIGHT")
        head, sep, tail = text.rpartition(":")
        head, tail = head.strip(), tail.strip()
        if sep and not tail:
            raise LoraMergeError(
                f"--adapter {text}: nothing after the last colon; give a weight (PATH:0.5) or leave the colon out"
            )
        numeric = _WEIGHT.fullmatch(tail) is not None
        if sep and (_NOT_FINITE.fullmatch(tail) or numeric and not math.isfinite(float(tail))):
            raise LoraMergeError(f"--adapter {text}: the weight after the last colon must be a finite number")
        if not (sep and numeric):
            return cls(uri=text)
        if not head:
            raise LoraMergeError(f"--adapter {text}: no adapter before the weight; give PATH:WEIGHT")
        if float(tail) == 0:
            raise LoraMergeError(
                f"--adapter {text}: weight 0 leaves the adapter out of the merge; drop this --adapter instead"
            )
        return cls(uri=head, weight=float(tail))

    def __str__(self) -> str:
        """`PATH[:WEIGHT]` that parses back to this spec."""
        ambiguous = ":" in self.uri and _WEIGHT.fullmatch(self.uri.rpartition(":")[2]) is not None
        return f"{self.uri}:{self.weight!r}" if self.weight != 1 or ambiguous else self.uri
