"""The block target's typed records: the same JSON on disk, typed in memory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kata_ipu.block.model import Device, ExportKind, State
from kata_ipu.block.records import BaseRecord, Kind, VolumeRecord
from kata_ipu.block.store import Store


def test_records_keep_the_on_disk_json_shape() -> None:
    base = BaseRecord("b1", State.READY, 4096, "sha256:aa", 1.5)
    assert base.to_json() == {"id": "b1", "state": "ready", "size": 4096,
                              "digest": "sha256:aa", "created": 1.5}
    dev = Device("v1", ExportKind.HOST_BLOCK, "/dev/loop1", 4096, "v1", major=7, minor=1)
    vol = VolumeRecord("v1", "b1", State.EXPORTED, 4096, dev)
    assert vol.to_json() == {"id": "v1", "base": "b1", "state": "exported", "size": 4096,
                             "export": dev.to_json()}
    assert BaseRecord.from_json(base.to_json()) == base
    assert VolumeRecord.from_json(vol.to_json()) == vol
    assert VolumeRecord.from_json({"id": "v2", "base": "b1", "state": "creating",
                                   "size": 1, "export": None}).export is None
    assert (Kind.BASES.singular, Kind.VOLUMES.singular) == ("base", "volume")
    assert vol.listed and not dataclasses.replace(vol, state=State.CREATING).listed


def test_store_reads_and_writes_typed_records(tmp_path: Path) -> None:
    store = Store(tmp_path, durable=False)
    store.create()
    vol = VolumeRecord("v1", "b1", State.READY, 1)
    store.put(vol)
    store.put(BaseRecord("b1", State.READY, 1, "sha256:aa", 2.0))
    assert store.volume("v1") == vol and store.current(vol) == vol
    assert store.read("volumes", "v1") == vol.to_json()  # the raw layer, by directory name
    assert json.loads((tmp_path / "volumes" / "v1.json").read_text())["base"] == "b1"
    assert [b.id for b in store.bases()] == ["b1"] and store.volume("nope") is None
    # the lock files keep their names: <first letter of the kind><stripe>
    with store.lock(Kind.VOLUMES, "v1"), store.lock("volumes", "v1", blocking=False) as held:
        assert not held  # one flock per open file: taken, even by this process
    assert {p.name[0] for p in (tmp_path / "locks").iterdir()} == {"v"}
