"""Every external command kata-ipu runs goes through an :class:`Executor`.

This is os-brick's habit: code that needs ``mkfs.ext4``, ``losetup`` or ``umoci`` takes an
``Executor`` argument (defaulting to :data:`DEFAULT`), so tests can inject a recording or
failing executor instead of patching :mod:`subprocess`, and every command is logged in one place
with its duration.

Lifecycle: an executor is stateless; ``run`` blocks the calling thread, ``arun`` is the asyncio
variant (the child is killed if the awaiting task is cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kata_ipu.errors import DeadlineExceeded, FailedPrecondition, Internal

log = logging.getLogger("kata_ipu.executor")


@dataclass(frozen=True, slots=True)
class Completed:
    """The result of a finished command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


class CommandNotFound(FailedPrecondition):
    """The program is not installed (or not on PATH)."""

    def __init__(self, program: str) -> None:
        super().__init__(f"required program {program!r} not found on PATH")
        self.program = program


class CommandFailed(Internal):
    """A command exited non-zero; keeps argv, exit code and the tail of stderr."""

    def __init__(self, result: Completed) -> None:
        tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        detail = "; ".join(tail) if tail else "no stderr"
        super().__init__(
            f"{result.argv[0]} exited with status {result.returncode}: {detail}"
        )
        self.result = result


class CommandTimeout(DeadlineExceeded):
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(f"{argv[0]} did not finish within {timeout:g}s")
        self.argv = tuple(argv)


class Executor:
    """Runs external commands. Subclass and override :meth:`_spawn` to inject fakes."""

    def which(self, program: str) -> str:
        path = shutil.which(program)
        if path is None:
            raise CommandNotFound(program)
        return path

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Completed:
        argv = tuple(str(a) for a in argv)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                timeout=timeout,
                env=None if env is None else dict(env),
                cwd=cwd,
                check=False,
            )
        except FileNotFoundError as exc:
            raise CommandNotFound(argv[0]) from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(argv, timeout or 0.0) from exc
        result = Completed(argv, proc.returncode, proc.stdout, proc.stderr,
                           time.monotonic() - start)
        log.debug("exec", extra={"argv": list(argv), "rc": proc.returncode,
                                 "seconds": round(result.seconds, 6)})
        if check and proc.returncode != 0:
            raise CommandFailed(result)
        return result

    async def arun(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Completed:
        argv = tuple(str(a) for a in argv)
        start = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        except FileNotFoundError as exc:
            raise CommandNotFound(argv[0]) from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except BaseException as exc:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if isinstance(exc, TimeoutError):
                raise CommandTimeout(argv, timeout or 0.0) from exc
            raise
        assert proc.returncode is not None
        result = Completed(argv, proc.returncode, out, err, time.monotonic() - start)
        log.debug("exec", extra={"argv": list(argv), "rc": proc.returncode,
                                 "seconds": round(result.seconds, 6)})
        if check and proc.returncode != 0:
            raise CommandFailed(result)
        return result


DEFAULT = Executor()
