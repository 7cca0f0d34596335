"""Several adapters merged in one pass: the set of adapters a plan carries, each with its weight (`adapter_spec` parses
what `--adapter PATH[:WEIGHT]` names).

The merge writes W + Σ wᵢ·ΔWᵢ, each ΔWᵢ with its own adapter's scaling, in one streaming pass. With more than one
adapter, every adapter tensor is known by a qualified key, `<position>:<key>` (`2:model.layers.0.self_attn.q_proj.
lora_A.weight` is the second adapter's), so two adapters' tensors of the same module never meet under one name;
a single adapter keeps its plain keys, so its plan, fingerprint and manifest are what they were before sets existed.
"""

from __future__ import annotations

from functools import cached_property

import torch
from pydantic import BaseModel, ConfigDict

from .adapter import AdapterIndex, AdapterTensor, read_adapter_tensor
from .adapter_spec import AdapterSpec
from .errors import LoraMergeError


class WeightedAdapter(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: AdapterIndex
    weight: float = 1.0


class AdapterSet(BaseModel):
    """The adapters of one merge, in the order given, each with its weight."""

    model_config = ConfigDict(frozen=True)

    members: tuple[WeightedAdapter, ...]

    @property
    def several(self) -> bool:
        return len(self.members) > 1

    @property
    def plain(self) -> bool:
        """One adapter at weight 1: the merge every release before adapter sets did, identified as it was."""
        return len(self.members) == 1 and self.members[0].weight == 1

    @property
    def first(self) -> AdapterIndex:
        return self.members[0].index

    def qualify(self, position: int, key: str) -> str:
        """The key a plan knows member `position`'s (0-based) tensor `key` by."""
        return f"{position + 1}:{key}" if self.several else key

    def position_of(self, key: str) -> int:
        """The (0-based) member a qualified key belongs to."""
        return int(key.partition(":")[0]) - 1 if self.several else 0

    def member_of(self, key: str) -> tuple[AdapterIndex, str]:
        """The adapter that holds a qualified key, and its key there."""
        if not self.several:
            return self.first, key
        return self.members[self.position_of(key)].index, key.partition(":")[2]

    @cached_property
    def tensors(self) -> dict[str, AdapterTensor]:
        """Every member's tensors, by qualified key."""
        return {self.qualify(i, k): t for i, m in enumerate(self.members) for k, t in m.index.tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        adapter, raw = self.member_of(key)
        return read_adapter_tensor(adapter, raw)

    def describe(self, position: int) -> str:
        """`adapter 2 (URI, weight -0.5)`: how messages name a member."""
        member = self.members[position]
        return f"adapter {position + 1} ({member.index.location.uri}, weight {member.weight:g})"

    @property
    def label(self) -> str:
        """The adapters as `--adapter` would name them: `URI`, or `URI:W + URI2:W2`."""
        return " + ".join(str(AdapterSpec(uri=m.index.location.uri, weight=m.weight)) for m in self.members)

    def check_unchanged(self) -> None:
        """Refuse to merge from an adapter file replaced since the plan read it."""
        for member in self.members:
            adapter = member.index
            if adapter.location.version(adapter.file) != adapter.version:
                raise LoraMergeError(
                    f"{adapter.location.describe(adapter.file)} changed since the merge was planned; plan the merge "
                    "again"
                )
