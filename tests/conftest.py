"""Test tiers by directory, and no silent skips under KATA_IPU_NO_SKIP=1.

Each test is marked with its tier from the directory it lives in (tests/unit -> ``unit``,
tests/root -> ``root``, tests/vm -> ``vm``, tests/interop -> ``interop``, tests/bench ->
``bench``); tox envs select tiers with ``-m``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_TIERS = ("unit", "root", "vm", "interop", "bench")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
                break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("KATA_IPU_NO_SKIP") == "1" and report.skipped and not hasattr(
        report, "wasxfail"
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under KATA_IPU_NO_SKIP=1 (a prerequisite is missing): {reason}"
