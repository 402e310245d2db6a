"""meddiff uses the public APIs of the libraries it builds on. The one private call it needs (accelerate has no public
way to forget its process-wide state) lives in one helper, and these tests fail when an upgrade removes it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from meddiff.precision import reset_accelerate_state

SRC = Path(__file__).resolve().parents[1] / "src" / "meddiff"
#: (file, private name): each wrapped in one helper that says why, and tested below.
ALLOWED = {("precision.py", "_reset_state")}


def _third_party_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> top-level package, for names imported from packages outside the standard library and meddiff."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = node.module.split(".")[0]
    return {k: v for k, v in names.items() if v not in sys.stdlib_module_names and v != "meddiff"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[tuple[str, int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    outside = _third_party_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in outside.values() and any(map(_private, parts[1:] + [a.name for a in node.names])):
                found.append((path.name, node.lineno, node.module))
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in outside:
                found.append((path.name, node.lineno, node.attr))
    return found


def test_private_third_party_apis_are_used_in_one_wrapped_place_only():
    found = [use for path in sorted(SRC.rglob("*.py")) for use in private_uses(path)]
    unexpected = [use for use in found if (use[0], use[2]) not in ALLOWED]
    assert not unexpected, (
        f"private APIs of other libraries (use a public one, or wrap it like "
        f"meddiff.precision.reset_accelerate_state): {unexpected}"
    )
    assert {(name, attr) for name, _, attr in found} == ALLOWED  # an allowance no longer needed is removed


def test_the_scan_finds_a_private_use(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nfrom accelerate.state import AcceleratorState\nfrom torch._dynamo import config\n"
        "torch._C._foo()\nAcceleratorState._reset_state()\nimport argparse\nargparse._ArgumentGroup\n"
    )
    assert {use[2] for use in private_uses(sample)} == {"torch._dynamo", "_C", "_foo", "_reset_state"}


def test_accelerate_still_has_the_private_reset_meddiff_relies_on():
    from accelerate.state import AcceleratorState

    assert callable(getattr(AcceleratorState, "_reset_state", None)), (
        "accelerate removed AcceleratorState._reset_state: update meddiff.precision.reset_accelerate_state"
    )


def test_a_second_accelerator_may_use_another_precision_after_the_reset():
    from accelerate import Accelerator

    reset_accelerate_state()
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"
    with pytest.raises(ValueError, match="already been initialized"):  # why the reset is needed
        Accelerator(mixed_precision="bf16", cpu=True)
    reset_accelerate_state()
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    reset_accelerate_state()
