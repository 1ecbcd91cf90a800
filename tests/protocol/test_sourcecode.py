"""Source-level checks of the protocol package (STYLE practice 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import protocol

PACKAGE = Path(protocol.__file__).resolve().parent
FORBIDDEN = frozenset({"trio", "socket", "asyncio", "selectors", "ssl", "threading", "anyio"})
SOURCES = sorted(PACKAGE.rglob("*.py"))


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("__import__", "import_module")
        ):
            names.update(
                arg.value
                for arg in node.args[:1]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            )
    return names


def test_sources_found() -> None:
    assert {path.name for path in SOURCES} >= {"__init__.py", "codec.py", "errors.py", "schema.py"}


@pytest.mark.parametrize("path", SOURCES, ids=[path.name for path in SOURCES])
def test_no_io_imports(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = {name for name in imported_modules(tree) if name.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path.name} imports {sorted(bad)}: protocol/ must stay sans-I/O"


def test_the_check_catches_forbidden_imports() -> None:
    source = "import os\nimport trio.lowlevel\nfrom socket import socket\nfrom . import codec\n"
    found = imported_modules(ast.parse(source))
    assert {name.split(".")[0] for name in found} & FORBIDDEN == {"trio", "socket"}


def test_py_typed_is_shipped() -> None:
    assert (PACKAGE / "py.typed").is_file()
