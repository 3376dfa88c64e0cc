"""The import contract: data flows one way, no import cycles, no private name imported across modules.

The layers and cycles are import-linter contracts in pyproject.toml (``lint-imports``); the private names are read
here from the source with ``ast``.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "torchnormfit"

KNOWN_PRIVATE_IMPORTS = {
    ("torchnormfit.streams", "torchnormfit.fingerprint", "_global_names"),  # until key/ replaces both (helper key)
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts of pyproject.toml, on the package under ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.argv[0] = 'lint-imports'; lint_imports_command()", "--no-cache", "--no-logo"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract bites: a pass importing the transform (a layer above it) is reported by name."""
    shutil.copytree(PACKAGE, tmp_path / "torchnormfit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "torchnormfit" / "passes" / "mapped.py", "a") as source:
        source.write("\nfrom ..transform import FitNormalize  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "torchnormfit.passes is not allowed to import torchnormfit.transform" in result.stdout
    assert "- torchnormfit.passes.mapped -> torchnormfit.transform" in result.stdout
    assert "No cycles are allowed in torchnormfit" in result.stdout


def private_imports(text: str, module: str, is_package: bool = False) -> list[tuple[str, str, str]]:
    """``(module, imported from, name)`` for each ``_name`` the source ``text`` of ``module`` imports from a module
    of the package, and for each private torchvision module it imports."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, node.module] if node.module else base)
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            source, names = "", [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            full = f"{source}.{name}" if source else name
            if source.startswith("torchnormfit") and name.startswith("_") and not name.startswith("__"):
                found.append((module, source, name))
            elif full.startswith("torchvision") and any(part.startswith("_") for part in full.split(".")[1:]):
                found.append((module, source, name))
    return found


def test_no_private_name_is_imported_across_modules():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found |= set(private_imports(path.read_text(), module, path.name == "__init__.py"))
    assert found <= KNOWN_PRIVATE_IMPORTS, sorted(found - KNOWN_PRIVATE_IMPORTS)


def test_the_private_import_check_finds_each_kind():
    text = ("from ..stats import _FIELDS, ChannelStats\nfrom . import _private\nfrom .._warn import warn\n"
            "from .._version import __version__\nfrom torchvision.transforms.v2._transform import Transform\n"
            "import torchvision.transforms._functional_tensor\nfrom torchvision.transforms.v2 import Transform\n")
    assert private_imports(text, "torchnormfit.passes.probe") == [
        ("torchnormfit.passes.probe", "torchnormfit.stats", "_FIELDS"),
        ("torchnormfit.passes.probe", "torchnormfit.passes", "_private"),
        ("torchnormfit.passes.probe", "torchvision.transforms.v2._transform", "Transform"),
        ("torchnormfit.passes.probe", "", "torchvision.transforms._functional_tensor"),
    ]
