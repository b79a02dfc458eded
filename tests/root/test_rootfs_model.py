"""Hypothesis: random stacks of layers applied by the builder equal a small in-memory model.

The model is the OCI layer semantics written as plainly as possible: a dict from path to node,
where a whiteout removes what *lower* layers put at a path (never what the same layer wrote,
nor the directories leading to it), an opaque marker does that to every child of a directory,
a non-directory replaces anything, a directory merges into a directory, and a hard link shares
the inode of a file that exists at that moment. Layers are generated entry by entry against the
model, so every entry is one a real tool could write (parents are declared before children).
"""

from __future__ import annotations

import io
import itertools
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_ipu.rootfs.apply import Applier
from kata_ipu.testing.ocibuild import LayerBuilder
from kata_ipu.testing.prereq import require_root

P = tuple[str, ...]
NAMES = ("a", "b", "c")
_inode_ids = itertools.count()


@dataclass
class Node:
    kind: str  # dir | file | symlink
    mode: int = 0o755
    uid: int = 0
    data: bytes = b""
    target: str = ""
    inode: int = field(default_factory=lambda: next(_inode_ids))


@dataclass
class Model:
    tree: dict[P, Node] = field(default_factory=dict)
    upper: set[P] = field(default_factory=set)
    keep: set[P] = field(default_factory=set)

    def new_layer(self) -> None:
        self.upper.clear()
        self.keep.clear()

    def _mark(self, p: P) -> None:
        self.upper.add(p)
        for i in range(len(p) + 1):
            self.keep.add(p[:i])

    def _remove(self, p: P) -> None:
        for q in [q for q in self.tree if q[:len(p)] == p]:
            del self.tree[q]

    def through_symlink(self, p: P) -> bool:
        """Whether resolving ``p`` as a directory would follow a symlink. The builder follows
        it inside the root (umoci does too); whiteouts through symlinks are outside the model."""
        return any(self.tree.get(p[:i], Node("dir")).kind == "symlink"
                   for i in range(1, len(p) + 1))

    def children(self, p: P) -> list[P]:
        return [q for q in self.tree if len(q) == len(p) + 1 and q[:len(p)] == p]

    def put(self, p: P, node: Node) -> None:
        old = self.tree.get(p)
        if node.kind == "dir" and old is not None and old.kind == "dir":
            old.mode, old.uid = node.mode, node.uid
        else:
            self._remove(p)
            self.tree[p] = node
        self._mark(p)

    def remove_lower(self, p: P) -> None:
        if p in self.upper or p not in self.tree:
            return
        if p in self.keep and self.tree[p].kind == "dir":
            for c in self.children(p):
                self.remove_lower(c)
            return
        self._remove(p)

    def whiteout(self, p: P) -> None:
        if p[:-1] and (p[:-1] not in self.tree or self.tree[p[:-1]].kind != "dir"):
            return
        self.remove_lower(p)

    def opaque(self, d: P) -> None:
        if d in self.tree and self.tree[d].kind == "dir":
            for c in self.children(d):
                self.remove_lower(c)


paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple)
modes = st.sampled_from([0o755, 0o700, 0o4755, 0o2750, 0o1777, 0o644, 0o600])


def _add_entry(draw: st.DrawFn, model: Model, lb: LayerBuilder, p: P, op: str) -> None:
    """Draw the details of one ``op`` at ``p``; add it to the layer and to the model."""
    if op == "file":
        data, mode, uid = draw(st.binary(max_size=64)), draw(modes), draw(st.integers(0, 3))
        lb.file("/".join(p), data, mode=mode, uid=uid)
        model.put(p, Node("file", mode, uid, data))
    elif op == "dir":
        mode, uid = draw(modes), draw(st.integers(0, 3))
        lb.dir("/".join(p), mode=mode, uid=uid)
        model.put(p, Node("dir", mode, uid))
    elif op == "symlink":
        target = draw(st.sampled_from(["a", "../b", "/c/a", "nowhere"]))
        lb.symlink("/".join(p), target)
        model.put(p, Node("symlink", 0o777, 0, target=target))
    elif op == "hardlink":
        files = sorted(q for q, n in model.tree.items()
                       if n.kind == "file" and q != p and q[:len(p)] != p)
        if not files:
            return
        src = draw(st.sampled_from(files))
        lb.hardlink("/".join(p), "/".join(src))
        model.put(p, model.tree[src])
    elif op == "whiteout":
        if model.through_symlink(p[:-1]):
            return
        lb.whiteout("/".join(p))
        model.whiteout(p)
    else:
        if model.through_symlink(p):
            return
        lb.opaque("/".join(p))
        model.opaque(p)


@st.composite
def layer_stack(draw: st.DrawFn) -> tuple[list[bytes], Model]:
    model = Model()
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        model.new_layer()
        lb = LayerBuilder()
        for _ in range(draw(st.integers(0, 12))):
            p = draw(paths)
            op = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink",
                                       "whiteout", "whiteout", "opaque"]))
            parents_exist = all(model.tree.get(p[:i], Node("file")).kind == "dir"
                                for i in range(1, len(p)))
            if op in ("file", "dir", "symlink", "hardlink") and not (
                    parents_exist and draw(st.booleans())):
                # Declare the parents first, like most layer writers do (some rely on the
                # parents already existing in a lower layer: then they are not "upper").
                for i in range(1, len(p)):
                    lb.dir("/".join(p[:i]), mode=0o755)
                    model.put(p[:i], Node("dir", 0o755))
            _add_entry(draw, model, lb, p, op)
        layers.append(lb.build())
    return Layers(layers), model


class Layers(list[bytes]):
    """Layer tars with a readable repr (entry names) for Hypothesis failure reports."""

    def __repr__(self) -> str:
        out = []
        for raw in self:
            with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
                out.append([f"{m.name}{'->' + m.linkname if m.linkname else ''}"
                            for m in tf.getmembers()])
        return repr(out)


def real_tree(root: Path) -> tuple[dict[P, tuple[object, ...]], set[frozenset[P]]]:
    out: dict[P, tuple[object, ...]] = {}
    by_inode: dict[int, set[P]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = Path(dirpath) / n
            p = full.relative_to(root).parts
            s = os.lstat(full)
            if stat.S_ISDIR(s.st_mode):
                out[p] = ("dir", stat.S_IMODE(s.st_mode), s.st_uid)
            elif stat.S_ISLNK(s.st_mode):
                out[p] = ("symlink", os.readlink(full))
            else:
                out[p] = ("file", stat.S_IMODE(s.st_mode), s.st_uid, full.read_bytes())
                by_inode.setdefault(s.st_ino, set()).add(p)
    return out, {frozenset(v) for v in by_inode.values() if len(v) > 1}


def model_tree(model: Model) -> tuple[dict[P, tuple[object, ...]], set[frozenset[P]]]:
    out: dict[P, tuple[object, ...]] = {}
    by_inode: dict[int, set[P]] = {}
    for p, n in model.tree.items():
        if n.kind == "dir":
            out[p] = ("dir", n.mode, n.uid)
        elif n.kind == "symlink":
            out[p] = ("symlink", n.target)
        else:
            out[p] = ("file", n.mode, n.uid, n.data)
            by_inode.setdefault(n.inode, set()).add(p)
    return out, {frozenset(v) for v in by_inode.values() if len(v) > 1}


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layer_stack())
def test_applier_equals_model(tmp_path_factory: pytest.TempPathFactory,
                              stack: tuple[list[bytes], Model]) -> None:
    require_root()
    layers, model = stack
    root = tmp_path_factory.mktemp("model")
    with Applier(str(root)) as a:
        for layer in layers:
            a.apply_layer(io.BytesIO(layer))
    assert real_tree(root) == model_tree(model)
