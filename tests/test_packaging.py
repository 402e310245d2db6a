"""pyproject.toml declares every package the library imports, with floors that the installed versions meet."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "meddiff"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: imported only where an optional extra or a user's own install is asked for, each failing in one line without it
OPTIONAL = {"radiomics", "SimpleITK", "gradio", "lpips", "torchxrayvision", "torchvision", "bitsandbytes", "opacus"}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def declared() -> dict[str, Requirement]:
    return {_normal(r.name): r for r in map(Requirement, PROJECT["dependencies"])}


def imported_packages() -> set[str]:
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "meddiff"} - OPTIONAL


def test_every_imported_package_is_a_declared_dependency():
    distributions = packages_distributions()
    deps = declared()
    missing = []
    for module in sorted(imported_packages()):
        dists = {_normal(d) for d in distributions.get(module, [module])}
        if not dists & deps.keys():
            missing.append(f"{module} ({', '.join(sorted(dists))})")
    assert not missing, f"imported by src/meddiff but not in [project] dependencies: {missing}"


def test_installed_versions_meet_the_declared_floors():
    below = []
    for name, requirement in declared().items():
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            below.append(f"{name}: not installed")
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            below.append(f"{name} {installed} (needs {requirement.specifier})")
    assert not below, below


def test_floors_cover_the_apis_the_code_calls():
    """Floors a call needs (the first release with it, the release before it)."""
    needs = {
        "torch": ("2.6", "2.5.1"),  # torch.accelerator
        "pydicom": ("3.0", "2.4.4"),  # pydicom.pixels, dcmwrite(enforce_file_format=...)
        "peft": ("0.17", "0.16.0"),  # diffusers' PEFT backend (LoRA)
        "huggingface-hub": ("0.21", "0.20.3"),  # ModelCardData(base_model=...)
        "pillow": ("9.1", "9.0.1"),  # Image.Resampling
    }
    deps = declared()
    for name, (first, before) in needs.items():
        assert deps[name].specifier.contains(first) and not deps[name].specifier.contains(before), name


def test_typed_marker_is_shipped():
    assert (SRC / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["meddiff"]
    assert "py.typed" in data
    for pattern in data:  # no package data that does not exist
        assert list(SRC.glob(pattern)), pattern
