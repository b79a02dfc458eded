"""The package layering of issue 15 holds: leaves import nothing above them, no folder cycles.

Read from the source (every ``import``/``from`` statement, deferred ones included), so a
violation is caught even in a branch no test executes. Import-time checks run in a fresh
interpreter, so that modules other tests imported do not hide a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(package: str) -> dict[str, set[str]]:
    """``module path -> project modules it imports`` for every module under ``package``."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        out[str(path.relative_to(ROOT))] = {
            n for n in names if n.split(".")[0] in ("kata_ipu", "shim_hooks", "guest_hooks")
        }
    return out


def _outside(package: str, allowed: tuple[str, ...]) -> dict[str, set[str]]:
    def ok(name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in (package, *allowed))

    bad = {mod: {n for n in names if not ok(n)} for mod, names in _imports(package).items()}
    return {mod: names for mod, names in bad.items() if names}


def test_oci_is_a_leaf_above_errors_only() -> None:
    assert _outside("kata_ipu.oci", ("kata_ipu.errors",)) == {}


def test_content_does_not_import_image() -> None:
    allowed = ("kata_ipu.oci", "kata_ipu.osutil", "kata_ipu.errors")
    assert _outside("kata_ipu.content", allowed) == {}


def test_osutil_is_the_ground_floor() -> None:
    assert _outside("kata_ipu.osutil", ("kata_ipu.errors",)) == {}


def _loaded_after(statement: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return set(out.stdout.split())


def test_the_installed_packages_do_not_import_guest_hooks() -> None:
    loaded = _loaded_after("import kata_ipu, shim_hooks")
    assert not {m for m in loaded if m.split(".")[0] == "guest_hooks"}


TESTING = sorted(p.stem for p in (ROOT / "kata_ipu" / "testing").glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.parametrize("module", TESTING)
def test_public_testing_fixtures_do_not_import_guest_hooks(module: str) -> None:
    loaded = _loaded_after(f"import kata_ipu.testing.{module}")
    assert not {m for m in loaded if m.split(".")[0] == "guest_hooks"}


def test_the_guest_payload_holds_every_project_module_it_imports() -> None:
    """The VM guest runs the payload with Debian's python3 and nothing else of the project:
    a module a payload file imports but the payload lacks fails only at guest boot."""
    from tests.support.guestimage import project_payload

    payload = {p.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
               for p in project_payload()}
    missing: dict[str, set[str]] = {}
    for rel, data in project_payload().items():
        for node in ast.walk(ast.parse(data, rel)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and node.level == 0 else [])
            for name in names:
                if name.split(".")[0] in ("kata_ipu", "guest_hooks", "tests") and \
                        name not in payload:
                    missing.setdefault(rel, set()).add(name)
    assert missing == {}


# docs/layout.md: what each package may import of the project (besides itself). The leaves
# every package may use: errors, the executor, JSON logging, the protobuf wire helpers.
LEAVES = ("kata_ipu.errors", "kata_ipu.executor", "kata_ipu.log", "kata_ipu.protowire")
MAY_IMPORT = {
    "kata_ipu.ttrpc": ("kata_ipu.osutil",),
    "kata_ipu.block": ("kata_ipu.osutil",),
    "kata_ipu.rootfs": ("kata_ipu.osutil", "kata_ipu.block", "kata_ipu.oci"),
    "kata_ipu.image": ("kata_ipu.oci", "kata_ipu.content", "kata_ipu.osutil"),
    "kata_ipu.cli": ("kata_ipu.api", "kata_ipu.ttrpc", "kata_ipu.__version__"),
    "shim_hooks": ("kata_ipu.osutil", "kata_ipu.ttrpc", "kata_ipu.api", "kata_ipu.image"),
    "guest_hooks": (),
}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_only_what_the_layout_allows(package: str) -> None:
    allowed = MAY_IMPORT[package] + (LEAVES if package != "guest_hooks" else ())
    bad = _outside(package, allowed)
    # ``from kata_ipu import log`` names the package itself: judged by the name it imports
    bad = {m: {n for n in names if n != "kata_ipu"} for m, names in bad.items()}
    assert {m: n for m, n in bad.items() if n} == {}
