"""runc's command line as containerd's go-runc (v1.0) writes it, parsed just enough.

``runc [global flags] COMMAND [command flags] [ID] [ARGS]``. Flags come as ``--x v``, ``-x v``
or ``--x=v`` (urfave/cli accepts all three). The wrapper needs the global ``--root`` and
``--log``, the command, ``create``'s ``--bundle`` and the container id; everything else is
carried along untouched, so the real runc receives exactly the original argv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Global flags of runc 1.1 that take a value (every other global flag is a boolean).
GLOBAL_VALUE_FLAGS = frozenset({"root", "log", "log-format", "criu", "rootless"})
# Flags with a value of the commands the wrapper looks into.
COMMAND_VALUE_FLAGS = {
    "create": frozenset({"bundle", "b", "pid-file", "console-socket", "preserve-fds",
                         "pidfd-socket"}),
    "delete": frozenset(),
}


@dataclass(frozen=True, slots=True)
class RuncArgs:
    argv: tuple[str, ...]  # everything after the program name, unchanged
    globals: dict[str, str] = field(default_factory=dict)
    command: str = ""
    options: dict[str, str] = field(default_factory=dict)
    positional: tuple[str, ...] = ()

    @property
    def root(self) -> str:
        return self.globals.get("root", "/run/runc")

    @property
    def log(self) -> str | None:
        return self.globals.get("log")

    @property
    def container_id(self) -> str | None:
        return self.positional[0] if self.positional else None

    @property
    def bundle(self) -> str | None:
        return self.options.get("bundle") or self.options.get("b")


def _flag(arg: str) -> tuple[str, str | None] | None:
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    name, eq, value = arg.lstrip("-").partition("=")
    return name, (value if eq else None)


def parse(argv: list[str] | tuple[str, ...]) -> RuncArgs:
    args = tuple(argv)
    globals_: dict[str, str] = {}
    i = 0
    while i < len(args):
        flag = _flag(args[i])
        if flag is None:
            break
        name, value = flag
        if name in GLOBAL_VALUE_FLAGS and value is None:
            value = args[i + 1] if i + 1 < len(args) else ""
            i += 1
        globals_[name] = value if value is not None else "true"
        i += 1
    if i >= len(args):
        return RuncArgs(args, globals_)
    command = args[i]
    i += 1
    value_flags = COMMAND_VALUE_FLAGS.get(command, frozenset())
    options: dict[str, str] = {}
    positional: list[str] = []
    while i < len(args):
        arg = args[i]
        flag = _flag(arg)
        if arg == "--":
            positional.extend(args[i + 1:])
            break
        if flag is None:
            positional.append(arg)
        else:
            name, value = flag
            if name in value_flags and value is None:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            options[name] = value if value is not None else "true"
        i += 1
    return RuncArgs(args, globals_, command, options, tuple(positional))
