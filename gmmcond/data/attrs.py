"""Attribute requests by name: ``"triangle,~red,large"`` -> values and a mask of what was specified.

Listed names are present, ``~name`` is absent, and every other attribute is unspecified. A mutually
exclusive group holds exactly one present member: naming it specifies the whole group (``"triangle"``:
circle and square absent), and negating all members but one names that one (``"~circle,~square"`` asks
for a triangle). A request that contradicts a
group (two shapes at once, or every shape negated) is an error naming the group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AttributeSpecError


@dataclass
class AttrRequest:
    """A parsed attribute expression over ``K`` attributes."""

    values: torch.Tensor  # [K] 1 present, 0 absent or unspecified.
    known: torch.Tensor  # [K] 1 where the request specifies the attribute (present or absent).
    text: str


def parse_expr(text: str, attr_names: list[str], groups: list[list[str]] = ()) -> AttrRequest:
    """Parse ``"circle,~red"`` over ``attr_names``; unknown names and group contradictions raise AttributeSpecError."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    present, absent = [], []
    for token in tokens:
        (absent if token.startswith("~") else present).append(token.lstrip("~").strip())
    unknown = [n for n in present + absent if n not in attr_names]
    if unknown:
        raise AttributeSpecError(f"unknown attribute(s) {unknown} in '{text}'; valid attributes: {', '.join(attr_names)}")
    both = sorted(set(present) & set(absent))
    if both:
        raise AttributeSpecError(f"'{text}' asks for {both} both present and absent")
    for group in groups:
        listed = [n for n in present if n in group]
        if len(listed) > 1:
            raise AttributeSpecError(f"'{text}' lists {listed}, but the group {list(group)} is mutually exclusive: "
                                     f"pick at most one")
        if len(group) > 1 and all(n in absent for n in group):
            raise AttributeSpecError(f"'{text}' negates every member of the group {list(group)}: one must be present")
        left = [n for n in group if n not in absent]
        if len(group) > 1 and len(left) == 1 and not listed:  # every other member negated: the one left is present
            present.append(left[0])
            listed = left
        if listed:  # one member present: the others are absent, so the group is specified
            absent.extend(n for n in group if n not in listed and n not in absent)
    values = torch.tensor([float(n in present) for n in attr_names])
    known = torch.tensor([float(n in present or n in absent) for n in attr_names])
    return AttrRequest(values, known, text)


def parse_attrs(text: str, attr_names: list[str], groups: list[list[str]] = ()) -> torch.Tensor:
    """Turn ``"circle,red,large"`` into a 0/1 vector over ``attr_names`` (unlisted attributes are absent)."""
    return parse_expr(text, attr_names, groups).values


def describe(attrs: torch.Tensor, attr_names: list[str]) -> str:
    """Return the comma-separated names of the attributes set in a 0/1 vector."""
    return ",".join(n for n, a in zip(attr_names, attrs.tolist()) if a > 0.5) or "(none)"


def parse_compose(text: str, attr_names: list[str]) -> list[tuple[int, float]]:
    """Parse ``"triangle:2,red:-1"`` into (attribute index, weight) terms for composed guidance."""
    terms = []
    for token in [t.strip() for t in text.split(",") if t.strip()]:
        name, _, weight = token.partition(":")
        name = name.strip()
        if name not in attr_names:
            raise AttributeSpecError(f"unknown attribute '{name}' in --compose '{text}'; valid attributes: {', '.join(attr_names)}")
        try:
            terms.append((attr_names.index(name), float(weight) if weight else 1.0))
        except ValueError:
            raise AttributeSpecError(f"--compose '{text}': the weight of '{name}' must be a number, got '{weight}'") from None
    if not terms:
        raise AttributeSpecError("--compose needs at least one term, e.g. \"triangle:2,red:-1\"")
    return terms


def read_attributes(probs: torch.Tensor, names: list[str], groups: list[list[str]] = ()) -> torch.Tensor:
    """Turn evaluator probabilities [B, K] into 0/1 attributes: the most likely member of each mutually
    exclusive group, and probability > 0.5 for every attribute outside the groups."""
    out = (probs > 0.5).float()
    for group in groups:
        cols = torch.tensor([names.index(g) for g in group])
        out[:, cols] = 0
        out[torch.arange(len(probs)), cols[probs[:, cols].argmax(1)]] = 1
    return out
