"""Name resolution: the tensor a checkpoint stores under the name PEFT saw (the in-memory module name).

`resolve_name` is a pure function of the name, the checkpoint's catalog and config.json: exact name first, then
known layout rewrites (multimodal prefixes, MoE renames), then a unique suffix, then the embedding a tied head
shares; it returns what it decided on the way (a head's update landing on a tied embedding). `NameResolver` is the
planner's record over one plan: those decisions, and the head an untied output gains.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

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


class Resolution(NamedTuple):
    """What a name means in a checkpoint: the stored tensor, or why there is none, and what was decided on the way."""

    stored: str | None
    why: str | None = None
    decision: str | None = None  # a head's update landing on the embedding it is tied to


def resolve_name(name: str, catalog: dict[str, TensorEntry], config: dict[str, Any]) -> Resolution:
    """The tensor `catalog` stores under `name` as PEFT saw it: exact, then known rewrites, then a unique suffix,
    then the embedding a tied head shares. A pure function of its arguments."""
    found, why = stored_name(name, catalog)
    if found is not None or why is not None:
        return Resolution(found, why)
    embedding = tied_embedding(catalog, config) if HEAD_WEIGHT.search(name) else None
    if embedding is not None:
        return Resolution(
            embedding,
            decision=(
                f"tied embeddings: the checkpoint stores only {embedding}, shared with lm_head; the adapter's "
                f"lm_head update is applied to {embedding} after the embedding's own, as PEFT's merge does to the "
                "shared tensor (the unmerged PEFT model applies each delta on its own path only; no tied tensor can "
                "reproduce both)"
            ),
        )
    return Resolution(None, f"{name} has no matching tensor in the base checkpoint")


def stored_name(name: str, catalog: dict[str, TensorEntry]) -> tuple[str | None, str | None]:
    """The tensor the checkpoint stores under `name`, as `resolve_name` finds it, but never through a tied head:
    (name, None), (None, why it is ambiguous) or (None, None)."""
    if name in catalog:
        return name, None
    found = sorted({c for c in rewrites(name) if c in catalog})
    if len(found) == 1:
        return found[0], None
    if len(found) > 1:
        return None, f"{name} is ambiguous: it could be any of {found}"
    matches = _suffix_matches(name, catalog)
    if len(matches) == 1:
        return matches[0], None
    if len(matches) > 1:
        return None, f"{name} is ambiguous: it matches {matches[:4]} by suffix"
    return None, None


def tied_embedding(catalog: dict[str, TensorEntry], config: dict[str, Any]) -> str | None:
    """The one embedding the output head shares, when the config ties them and the checkpoint stores no head."""
    if not ties_embeddings(config) or any(HEAD_WEIGHT.search(n) for n in catalog):
        return None
    embeddings = sorted(n for n in catalog if n.endswith(EMBEDDING_NAMES) and "vision" not in n)
    return embeddings[0] if len(embeddings) == 1 else None


def _suffix_matches(name: str, catalog: dict[str, TensorEntry]) -> list[str]:
    parts = name.split(".")
    for start in range(len(parts) - 1):
        # Never strip a layer or expert number: those are identity, not prefix.
        if any(p.isdigit() for p in parts[:start]):
            break
        tail = ".".join(parts[start:])
        matches = sorted(n for n in catalog if n == tail or n.endswith("." + tail))
        if matches:
            return matches
    return []


class NameResolver:
    """One plan's use of `resolve_name`: the catalog it resolves against (which gains the head of an untied
    output), and what resolving decided over the whole plan: its decisions, the modules redirected to a tied
    embedding. The planner appends its other decisions here too, so the plan reports them in one list."""

    def __init__(self, catalog: dict[str, TensorEntry], config: dict[str, Any]) -> None:
        self.catalog = catalog
        self.config = config
        self.decisions: list[str] = []
        self.tied_redirects: set[str] = set()  # modules whose updates land on the tied embedding
        self.untied: tuple[str, str] | None = None  # (embedding, head) once the output gets a head of its own
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        self.model_type = str(config.get("model_type") or text.get("model_type") or "")

    def resolve(self, name: str) -> tuple[str | None, str | None]:
        """(checkpoint name, None) or (None, why not), recording what `resolve_name` decided."""
        found = resolve_name(name, self.catalog, self.config)
        if found.decision is not None:
            self.tied_redirects.add(name.rpartition(".")[0])
            if found.decision not in self.decisions:
                self.decisions.append(found.decision)
        return found.stored, found.why

    def stored(self, name: str) -> tuple[str | None, str | None]:
        return stored_name(name, self.catalog)

    def tied_embedding(self) -> str | None:
        return tied_embedding(self.catalog, self.config)

    def untie(self) -> tuple[str, str]:
        """Give the output a head of its own: (embedding, head). The head joins the catalog as the embedding's
        twin (its base value is the embedding's), so every name of the head resolves to it from now on."""
        embedding = self.tied_embedding()
        assert embedding is not None, "untie() needs a tied checkpoint"
        head = _head_name(embedding)
        self.catalog = {**self.catalog, head: self.catalog[embedding].model_copy(update={"name": head})}
        self.untied = (embedding, head)
        return self.untied


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
