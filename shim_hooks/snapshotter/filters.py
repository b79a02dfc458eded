"""containerd's filter syntax, as snapshotters see it in ``List`` (``Walk``) requests.

A request carries a list of filters; a snapshot is listed when *any* of them matches. One
filter is a comma-separated conjunction of selectors::

    selector  := fieldpath [ ("==" | "!=" | "~=") value ]     (no operator: "is present")
    fieldpath := field { "." field }
    field     := identifier | quoted
    value     := quoted | characters up to the next ","
    quoted    := "..." with backslash escapes

Fields of a snapshot (containerd's ``adaptSnapshot``): ``kind`` (``active``, ``view``,
``committed``), ``name``, ``parent`` — always present, so ``parent==""`` selects the first
snapshot of a chain — and ``labels.<key>`` (the rest of the path is the key, so a key with
dots must be quoted: ``labels."containerd.io/snapshot.ref"==sha256:...``). containerd's
metadata layer finds a remote snapshot this way after a Prepare answered ALREADY_EXISTS.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kata_ipu.errors import InvalidArgument
from shim_hooks.snapshotter.model import Info, Kind

_IDENT = re.compile(r"[A-Za-z0-9_]+")
_KINDS = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


@dataclass(frozen=True, slots=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "", "==", "!=", "~="
    value: str = ""

    def matches(self, info: Info) -> bool:
        value, present = _field(info, self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        return present and re.search(self.value, value) is not None


Filter = tuple[Selector, ...]


def _field(info: Info, path: tuple[str, ...]) -> tuple[str, bool]:
    head, rest = path[0], path[1:]
    if head == "kind" and not rest:
        return _KINDS.get(info.kind, ""), True
    if head == "name" and not rest:
        return info.name, True
    if head == "parent" and not rest:
        return info.parent, True
    if head == "labels" and rest:
        key = ".".join(rest)
        return info.labels.get(key, ""), key in info.labels
    return "", False


class FilterError(InvalidArgument):
    def __init__(self, text: str, at: int, why: str) -> None:
        super().__init__(f"filter {text!r}: {why} at offset {at}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> FilterError:
        return FilterError(self.text, self.pos, why)

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def quoted(self) -> str:
        out: list[str] = []
        self.pos += 1  # the opening quote
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                if self.pos >= len(self.text):
                    break
                esc = self.text[self.pos]
                self.pos += 1
                out.append({"n": "\n", "t": "\t", "r": "\r"}.get(esc, esc))
            else:
                out.append(ch)
        raise self.fail("unterminated quoted string")

    def field(self) -> str:
        if self.peek('"'):
            return self.quoted()
        m = _IDENT.match(self.text, self.pos)
        if m is None:
            raise self.fail("expected a field name")
        self.pos = m.end()
        return m.group()

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek("."):
            self.pos += 1
            path.append(self.field())
        for op in ("==", "!=", "~="):
            if self.peek(op):
                self.pos += 2
                break
        else:
            if self.pos < len(self.text) and not self.peek(","):
                raise self.fail("expected an operator (==, != or ~=)")
            return Selector(tuple(path), "")
        if self.peek('"'):
            value = self.quoted()
        else:
            end = self.text.find(",", self.pos)
            end = len(self.text) if end < 0 else end
            value, self.pos = self.text[self.pos:end], end
        if op == "~=":
            try:
                re.compile(value)
            except re.error as exc:
                raise self.fail(f"bad regular expression {value!r}: {exc}") from None
        return Selector(tuple(path), op, value)

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while self.peek(","):
            self.pos += 1
            selectors.append(self.selector())
        if self.pos != len(self.text):
            raise self.fail("unexpected text")
        return tuple(selectors)


def parse(text: str) -> Filter:
    return _Parser(text.strip()).parse()


def matcher(filters: Sequence[str]) -> Callable[[Info], bool]:
    """A predicate for a List request's filters (none: everything matches)."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda _info: True
    return lambda info: any(all(s.matches(info) for s in f) for f in parsed)
