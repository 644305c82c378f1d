"""Dependencies between the items of a job (``needs``), the pure part: which item needs which,
checked at submit for unknown keys, ambiguous keys and cycles (``graphlib`` finds them)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter

from shared.models import ItemSpec


@dataclass(frozen=True)
class Needs:
    """``of[i]``: the (key, index) pairs item i needs; ``dependents[j]``: the items that need j."""

    of: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    dependents: dict[int, list[int]] = field(default_factory=dict)

    @property
    def waiting(self) -> dict[int, int]:
        """Items that wait, and for how many needs."""
        return {index: len(pairs) for index, pairs in self.of.items()}


def plan_needs(items: Sequence[ItemSpec]) -> tuple[Needs, list[str]]:
    """The job's dependency graph and what is wrong with it: a need naming no item's key, a needed
    key that several items carry, and cycles (each with the lines involved)."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        if item.key is not None:
            by_key[item.key].append(index)
    errors: list[str] = []
    of: dict[int, list[tuple[str, int]]] = {}
    dependents: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        if not item.needs:
            continue
        where = item.where(index + 1)
        pairs = []
        for key in dict.fromkeys(item.needs):
            holders = by_key.get(key, [])
            if not holders:
                errors.append(f"{where}: needs {key!r}, which no item of the job has as its key")
            elif len(holders) > 1:
                lines = ", ".join(items[h].where(h + 1) for h in holders)
                errors.append(f"{where}: needs {key!r}, which several items have as their key ({lines})")
            elif holders[0] == index:
                errors.append(f"{where}: needs {key!r}, its own key")
            else:
                pairs.append((key, holders[0]))
                dependents[holders[0]].append(index)
        of[index] = pairs
    if not errors:
        graph = {index: [need for _, need in pairs] for index, pairs in of.items()}
        try:
            TopologicalSorter(graph).prepare()
        except CycleError as exc:
            cycle = exc.args[1]
            errors.append("a cycle of needs: " + " → ".join(items[i].where(i + 1) for i in cycle))
    return Needs(of=of, dependents=dict(dependents)), errors
