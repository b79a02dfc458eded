"""The runtime options containerd writes on the shim's stdin at ``start`` (a protobuf ``Any``).

* ``containerd.runc.v1.Options`` (``ctr run --runc-*`` flags, or a runc handler's options):
  the runc delegate, and the options are passed on to it unchanged.
* ``runtimeoptions.v1.Options {string type_url = 1; string config_path = 2;}``: what CRI sends
  for any other runtime type (kata-ipu's included), from the handler's ``[... .options]``
  table. Its ``TypeUrl`` selects the delegate per handler (``"io.containerd.runc.v2"`` or
  ``"io.containerd.kata.v2"``); ``ConfigPath`` is Kata's configuration file, so the Kata
  delegate gets the options unchanged and the runc delegate (which cannot decode them) gets
  none.
"""

from __future__ import annotations

from dataclasses import dataclass

from kata_ipu.protowire import WireError, iter_fields

RUNC_OPTIONS = "containerd.runc.v1.Options"
CRI_OPTIONS = "runtimeoptions.v1.Options"
DELEGATE_TYPES = {"io.containerd.runc.v2": "runc", "io.containerd.runc.v1": "runc",
                  "runc": "runc", "io.containerd.kata.v2": "kata", "kata": "kata"}


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    type_url: str = ""
    value: bytes = b""
    delegate: str | None = None  # chosen by the options, if they say
    config_path: str = ""


def _fields(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for number, _wt, value in iter_fields(data):
        if isinstance(value, bytes):
            out[number] = value
    return out


def parse(data: bytes) -> RuntimeOptions:
    if not data:
        return RuntimeOptions()
    try:
        any_ = _fields(data)
        type_url = any_.get(1, b"").decode()
        value = any_.get(2, b"")
        if type_url.endswith(RUNC_OPTIONS):
            return RuntimeOptions(type_url, value, "runc")
        if type_url.endswith(CRI_OPTIONS):
            inner = _fields(value)
            wanted = inner.get(1, b"").decode()
            return RuntimeOptions(type_url, value, DELEGATE_TYPES.get(wanted),
                                  inner.get(2, b"").decode())
    except (WireError, UnicodeDecodeError):
        return RuntimeOptions()
    return RuntimeOptions(type_url, value)


def for_delegate(data: bytes, opts: RuntimeOptions, delegate: str) -> bytes:
    """The stdin the delegate gets: runc cannot decode CRI's generic options."""
    if delegate == "runc" and not opts.type_url.endswith(RUNC_OPTIONS):
        return b""
    return data
