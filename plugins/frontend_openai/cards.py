"""Model cards of things /v1/models does not list but can find."""

from __future__ import annotations

from loraserve.errors import UserError
from loraserve.lora.composition import is_composition, parse_spelling


def composition_card(model_id: str, cards: dict, base: str) -> dict | None:
    """The card of a weighted composition of loaded adapters (``a*0.7+b*0.3``, optionally after
    ``BASE:``), or None: a composition is not listed (any weights make one), but it can be looked up."""
    text = model_id[len(base) + 1 :] if model_id.startswith(base + ":") else model_id
    if not is_composition(text):
        return None
    try:
        components = parse_spelling(text)
    except UserError:
        return None
    if any(name not in cards or name == base for name, _ in components):
        return None
    return {
        **cards[base],
        "id": model_id,
        "root": None,
        "parent": base,
        "composition": [{"name": name, "weight": weight} for name, weight in components],
    }
