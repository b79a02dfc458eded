"""Call metadata: ordered key/value pairs where a key may repeat (Go's ``map[string][]string``).

containerd sends its namespace as ``containerd-namespace-ttrpc``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

NAMESPACE_KEY = "containerd-namespace-ttrpc"


class Metadata:
    """An immutable multi-map of call metadata, kept in wire order."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._pairs: tuple[tuple[str, str], ...] = tuple((str(k), str(v)) for k, v in pairs)

    @classmethod
    def of(cls, mapping: Mapping[str, str | Iterable[str]]) -> Metadata:
        pairs: list[tuple[str, str]] = []
        for key, values in mapping.items():
            if isinstance(values, str):
                pairs.append((key, values))
            else:
                pairs.extend((key, v) for v in values)
        return cls(pairs)

    def get(self, key: str) -> list[str]:
        """All values of ``key`` in order (empty if absent)."""
        return [v for k, v in self._pairs if k == key]

    def first(self, key: str) -> str | None:
        for k, v in self._pairs:
            if k == key:
                return v
        return None

    def with_values(self, key: str, *values: str) -> Metadata:
        return Metadata(self._pairs + tuple((key, v) for v in values))

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return self._pairs

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Metadata) and other._pairs == self._pairs

    def __hash__(self) -> int:
        return hash(self._pairs)

    def __repr__(self) -> str:
        return f"Metadata({list(self._pairs)!r})"
