"""Name resolution: the tensor a checkpoint stores under the name PEFT saw (the in-memory module name).

Exact name first, then known layout rewrites (multimodal prefixes, MoE renames), then a unique suffix, then the
embedding a tied head shares. What it decided on the way (a tied head redirected, an untied one) it records in
`decisions`, which the plan reports.
"""

from __future__ import annotations

import re
from typing import Any

from ..safetensors_format import TensorEntry

# Names transformers uses in memory (what PEFT records) versus names in checkpoints on disk. Each rule rewrites a
# full tensor name; up to two rules are chained (a multimodal prefix plus an MoE rename, say).
KNOWN_REWRITES: tuple[tuple[str, str], ...] = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    (r"\.mlp\.experts\.", ".block_sparse_moe.experts."),
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"^model\.", ""),
    (r"^", "model."),
)
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embeddings.weight")


class NameResolver:
    """Maps a tensor name as PEFT saw it (the in-memory module name) to the name stored in the checkpoint."""

    def __init__(self, catalog: dict[str, TensorEntry], config: dict[str, Any]) -> None:
        self.catalog = catalog
        self.config = config
        self.decisions: list[str] = []
        self.tied_redirects: set[str] = set()  # modules whose updates land on the tied embedding
        self.untied: tuple[str, str] | None = None  # (embedding, head) once the output gets a head of its own
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        self.model_type = str(config.get("model_type") or text.get("model_type") or "")

    def resolve(self, name: str) -> tuple[str | None, str | None]:
        """(checkpoint name, None) or (None, why not). Exact, then known rewrites, then a unique suffix, then the
        embedding a tied head shares."""
        found, why = self.stored(name)
        if found is not None or why is not None:
            return found, why
        tied = self._tied_embedding(name)
        if tied:
            self.tied_redirects.add(name.rpartition(".")[0])
            return tied, None
        return None, f"{name} has no matching tensor in the base checkpoint"

    def stored(self, name: str) -> tuple[str | None, str | None]:
        """The tensor the checkpoint stores under `name`, as `resolve` finds it, but never through a tied head."""
        if name in self.catalog:
            return name, None
        found = sorted({c for c in rewrites(name) if c in self.catalog})
        if len(found) == 1:
            return found[0], None
        if len(found) > 1:
            return None, f"{name} is ambiguous: it could be any of {found}"
        matches = self._suffix_matches(name)
        if len(matches) == 1:
            return matches[0], None
        if len(matches) > 1:
            return None, f"{name} is ambiguous: it matches {matches[:4]} by suffix"
        return None, None

    def tied_embedding(self) -> str | None:
        """The one embedding the output head shares, when the config ties them and the checkpoint stores no head."""
        if not ties_embeddings(self.config) or any(HEAD_WEIGHT.search(n) for n in self.catalog):
            return None
        embeddings = sorted(n for n in self.catalog if n.endswith(EMBEDDING_NAMES) and "vision" not in n)
        return embeddings[0] if len(embeddings) == 1 else None

    def untie(self) -> tuple[str, str]:
        """Give the output a head of its own: (embedding, head). The head joins the catalog as the embedding's
        twin (its base value is the embedding's), so every name of the head resolves to it from now on."""
        embedding = self.tied_embedding()
        assert embedding is not None, "untie() needs a tied checkpoint"
        head = _head_name(embedding)
        self.catalog = {**self.catalog, head: self.catalog[embedding].model_copy(update={"name": head})}
        self.untied = (embedding, head)
        return self.untied

    def _suffix_matches(self, name: str) -> list[str]:
        parts = name.split(".")
        for start in range(len(parts) - 1):
            # Never strip a layer or expert number: those are identity, not prefix.
            if any(p.isdigit() for p in parts[:start]):
                break
            tail = ".".join(parts[start:])
            matches = sorted(n for n in self.catalog if n == tail or n.endswith("." + tail))
            if matches:
                return matches
        return []

    def _tied_embedding(self, name: str) -> str | None:
        if not HEAD_WEIGHT.search(name):
            return None
        embedding = self.tied_embedding()
        if embedding is None:
            return None
        decision = (
            f"tied embeddings: the checkpoint stores only {embedding}, shared with lm_head; the adapter's "
            f"lm_head update is applied to {embedding} after the embedding's own, as PEFT's merge does to the "
            "shared tensor (the unmerged PEFT model applies each delta on its own path only; no tied tensor can "
            "reproduce both)"
        )
        if decision not in self.decisions:
            self.decisions.append(decision)
        return embedding


HEAD_WEIGHT = re.compile(r"(^|\.)lm_head\.weight$")
# The output head's name beside a tied embedding, in the checkpoint's own layout: `<outer>lm_head.weight` for an
# embedding `<outer><text model body><embedding>.weight` (`model.`, `transformer.`, v5 multimodal
# `model.language_model.`; `language_model.model.` in older multimodal checkpoints keeps `language_model.`).
_EMBEDDING_LAYOUT = re.compile(
    r"^(?P<outer>.*?)(model\.language_model\.|model\.|transformer\.)?"
    r"(embed_tokens|wte|word_embeddings|embeddings)\.weight$"
)


def _head_name(embedding: str) -> str:
    match = _EMBEDDING_LAYOUT.match(embedding)
    return f"{match['outer'] if match else ''}lm_head.weight"


def ties_embeddings(config: dict[str, Any]) -> bool:
    for scope in (config, config.get("text_config") or {}):
        if isinstance(scope, dict) and scope.get("tie_word_embeddings") is not None:
            return bool(scope["tie_word_embeddings"])
    # transformers' PretrainedConfig default is True for most architectures that do not say.
    return True


def rewrites(name: str) -> list[str]:
    seen, frontier = {name}, [name]
    for _ in range(2):
        nxt = []
        for current in frontier:
            for pattern, repl in KNOWN_REWRITES:
                candidate = re.sub(pattern, repl, current, count=1)
                if candidate not in seen:
                    seen.add(candidate)
                    nxt.append(candidate)
        frontier = nxt
    seen.discard(name)
    return sorted(seen)
