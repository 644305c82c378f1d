"""References between pipeline steps: ``{"$from": "EXPR"}`` inside a step's arguments.

EXPR is JMESPath (the ``jmespath`` library) evaluated over the item's scope, ``{"input": ...,
"steps": {NAME: OUTPUT}}``. Everything here is pure: finding references, checking them at
submit, and resolving them at run time.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

FROM = "$from"
SCOPE_ROOTS = ("input", "steps", "context")  # a pipeline step's scope (context: its session's)
SUMMARY_ROOTS = ("total", "successful", "failed")  # a reduce's scope: the job summary

# Node types whose first child is evaluated against the same value as the node itself; the others
# (projections' right side, filter conditions, pipes' right side) see something else.
_FIRST_CHILD_IN_SCOPE = {"index_expression", "projection", "value_projection", "flatten"}
_ALL_CHILDREN_IN_SCOPE = {
    "function_expression",
    "multi_select_list",
    "multi_select_dict",
    "key_val_pair",
    "comparator",
    "or_expression",
    "and_expression",
    "not_expression",
}


@dataclass(frozen=True)
class Reference:
    """One ``{"$from": EXPR}`` found in a step's arguments, at ``path`` (keys and list indexes)."""

    path: tuple[str | int, ...]
    expression: Any
    other_keys: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return ".".join(["arguments", *(str(p) for p in self.path)])


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and FROM in value


def find_references(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[Reference]:
    """Every reference inside ``value`` (a step's arguments), depth first."""
    if is_reference(value):
        yield Reference(path, value[FROM], tuple(sorted(k for k in value if k != FROM)))
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from find_references(inner, (*path, key))
    elif isinstance(value, list):
        for position, inner in enumerate(value):
            yield from find_references(inner, (*path, position))


@lru_cache(maxsize=1024)
def compiled(expression: str) -> ParsedResult:
    return jmespath.compile(expression)


def _chain(node: Mapping[str, Any]) -> list[str] | None:
    """The path a node reads if it is a plain chain of fields (``@`` being the empty chain)."""
    kind = node["type"]
    if kind in ("current", "identity"):
        return []
    if kind == "field":
        return [node["value"]]
    if kind == "subexpression":
        path: list[str] = []
        for child in node["children"]:
            sub = _chain(child)
            if sub is None:
                return None
            path += sub
        return path
    return None


def scope_paths(node: Mapping[str, Any]) -> Iterator[list[str]]:
    """The field chains of a parsed expression that are read from the scope itself: for
    ``join(',', steps.fetch.content[].text)`` that is ``["steps", "fetch", "content"]``, and for
    ``steps.{a: fetch.text}`` it is ``["steps", "fetch", "text"]``."""
    kind = node["type"]
    children: list[Mapping[str, Any]] = node.get("children", [])
    chain = _chain(node)
    if chain is not None:
        if chain:
            yield chain
        return
    if kind in ("subexpression", "pipe"):
        prefix: list[str] = []
        for position, child in enumerate(children):
            sub = _chain(child)
            if sub is None:
                if position == 0:  # what follows reads this child's value, not the scope
                    yield from scope_paths(child)
                    return
                if prefix:
                    yield prefix
                for path in scope_paths(child):
                    yield [*prefix, *path]
                return
            prefix += sub
        if prefix:
            yield prefix
    elif kind in _FIRST_CHILD_IN_SCOPE or kind == "filter_projection":
        yield from scope_paths(children[0])
    elif kind in _ALL_CHILDREN_IN_SCOPE:
        for child in children:
            yield from scope_paths(child)


def check_reference(
    reference: Reference,
    earlier_steps: Collection[str],
    roots: Sequence[str] = SCOPE_ROOTS,
    needs: Collection[str] = (),
) -> str | None:
    """Why a reference cannot work, or None: bad JMESPath, a name outside the scope, or a step that
    does not run before the one referring to it."""
    expression = reference.expression
    if reference.other_keys:
        others = ", ".join(reference.other_keys)
        return f"{reference.where}: $from must be the only key of its object (also: {others})"
    if not isinstance(expression, str) or not expression.strip():
        return f"{reference.where}: $from must be a JMESPath expression (a non-empty string)"
    try:
        parsed = compiled(expression)
    except JMESPathError as exc:
        reason = str(exc).splitlines()[0]
        return f"{reference.where}: $from {expression!r} is not valid JMESPath ({reason})"
    for path in scope_paths(parsed.parsed):
        root = path[0]
        if root not in roots:
            allowed = f"{', '.join(roots[:-1])} or {roots[-1]}" if len(roots) > 1 else roots[0]
            return f"{reference.where}: $from {expression!r} reads {root!r}, not in scope (use {allowed})"
        if root == "steps" and len(path) > 1 and path[1] not in earlier_steps:
            return (
                f"{reference.where}: $from {expression!r} refers to step {path[1]!r}, "
                "which does not run before this one"
            )
        if root == "needs" and len(path) > 1 and path[1] not in needs:
            return (
                f"{reference.where}: $from {expression!r} refers to {path[1]!r}, which the item does not need"
            )
    return None


def resolve(value: Any, scope: Mapping[str, Any]) -> Any:
    """``value`` with every reference replaced by its expression's value over ``scope``."""
    if is_reference(value):
        return compiled(value[FROM]).search(scope)
    if isinstance(value, dict):
        return {key: resolve(inner, scope) for key, inner in value.items()}
    if isinstance(value, list):
        return [resolve(inner, scope) for inner in value]
    return value


# Schema keywords that judge a value by its parts: their complaint about a value holding a
# reference is about what the reference will give, unknown until run time.
_COMBINATORS = {"anyOf", "oneOf", "allOf", "not", "if", "then", "else"}


def within_reference(
    path: Collection[str | int], references: Collection[Reference], keyword: str | None = None
) -> bool:
    """Whether a schema complaint at ``path`` (by ``keyword``) is about a reference's value: the
    location is a reference or inside one, or a combinator judged a value that holds one. It
    waits until run time, when the reference is resolved."""
    located = tuple(path)
    if any(located[: len(r.path)] == r.path for r in references):
        return True
    return keyword in _COMBINATORS and any(r.path[: len(located)] == located for r in references)
