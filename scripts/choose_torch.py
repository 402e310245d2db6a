"""Which torch build scripts/install.sh installs on this machine (standard library only; installs nothing).

Order of choice:
  1. MEDDIFF_TORCH_INDEX=URL           torch from that index (pip --index-url URL)
     MEDDIFF_TORCH=cpu|cu126|rocm6.3|... torch from https://download.pytorch.org/whl/<that>
     MEDDIFF_TORCH=default               PyPI's torch (CUDA build on Linux x86_64, MPS on Apple silicon)
  2. torch >= TORCH_MIN already installed in .venv: kept, nothing new is installed for torch
  3. Linux with an NVIDIA GPU (`nvidia-smi -L` lists one): PyPI's torch, a CUDA build
  4. Linux without one: a `+cpu` torch wheel in pip's configured find-links folders, else an index with CPU builds
     already configured for pip, else PyPI's torch (a CUDA build that also runs on the CPU; MEDDIFF_TORCH=cpu is
     smaller and is suggested)
  5. macOS on Apple silicon and everything else: PyPI's torch

Usage: python scripts/choose_torch.py [--installed auto|none|VERSION] [--json | --shell]
  --installed auto: look at the torch installed for this Python (install.sh passes it when .venv exists);
  none (default): plan for a new, empty venv. Output: a readable plan, one JSON object, or bash assignments.
Exit status 2 with one line on stderr when no torch >= TORCH_MIN can be installed here or a setting is wrong.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

TORCH_MIN = "2.6"  # meddiff uses torch.accelerator (2.6+); keep pyproject.toml's torch line equal to this
PYTORCH_INDEX = "https://download.pytorch.org/whl"
PYPI_INDEX = "https://pypi.org/simple"
FLAVOR = re.compile(r"^(cpu|cu\d{3}|rocm\d+(\.\d+)*|xpu)$")
AUTO_VALUES = ("", "auto")
DEFAULT_VALUES = ("default", "pypi")


class ChoiceError(Exception):
    """No torch can be chosen; the message names the problem and what to do."""


@dataclass
class Plan:
    action: str  # "install" | "keep"
    requirement: str  # what pip is asked for ("torch==2.13.0+cpu", "torch>=2.6", ...)
    index_url: str | None  # --index-url for the torch step; None: pip's configured indexes (PyPI by default)
    build: str  # expected build: cpu | cuda | rocm | xpu | mps | default (PyPI's build for this platform)
    reason: str  # why, in one line
    note: str = ""  # advice shown with the plan (empty: none)
    cpu_only: bool = False  # the chosen torch must not bring CUDA (nvidia-*) packages; install.sh checks
    replace: bool = False  # uninstall the installed torch first (an explicit choice of another build)
    system: str = ""
    machine: str = ""
    gpus: list[str] = field(default_factory=list)

    def pip_args(self) -> list[str]:
        args = [self.requirement]
        if self.index_url:
            args += ["--index-url", self.index_url]
        return args


def _version_key(version: str) -> tuple[int, ...]:
    public = version.split("+", 1)[0]
    return tuple(int(part) for part in re.findall(r"\d+", public)[:4])


def _at_least_min(version: str) -> bool:
    return _version_key(version) >= _version_key(TORCH_MIN)


def _local_label(version: str) -> str:
    return version.split("+", 1)[1] if "+" in version else ""


def uname() -> tuple[str, str]:
    """(system, machine) from the `uname` command (so tests can put a fake one on PATH), else the platform module."""
    try:
        system = subprocess.run(["uname", "-s"], capture_output=True, text=True, timeout=10).stdout.strip()
        machine = subprocess.run(["uname", "-m"], capture_output=True, text=True, timeout=10).stdout.strip()
        if system and machine:
            return system, machine
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.system(), platform.machine()


def nvidia_gpus() -> list[str]:
    """GPU lines of `nvidia-smi -L` ("GPU 0: NVIDIA H100 ..."); empty when it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU ")]


def pip_config() -> dict[str, list[str]]:
    """pip's effective settings (config files and PIP_* variables): option name -> values, from `pip config list`."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    config: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        name = key.rsplit(".", 1)[-1].replace("_", "-")
        config.setdefault(name, []).extend(str(value).split())
    return config


def _local_folder(link: str) -> Path | None:
    if link.startswith("file:"):
        return Path(unquote(urlparse(link).path))
    if "://" in link:
        return None
    return Path(link)


def local_cpu_wheels(find_links: list[str], machine: str) -> list[tuple[str, Path]]:
    """(version, file) of `+cpu` torch wheels >= TORCH_MIN for this Python and machine in the find-links folders,
    newest first."""
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    found: list[tuple[str, Path]] = []
    for link in find_links:
        folder = _local_folder(link)
        if folder is None or not folder.is_dir():
            continue
        for wheel in folder.glob("torch-*.whl"):
            parts = wheel.name[:-4].split("-")
            if len(parts) < 5:
                continue
            version, python_tag, platform_tag = parts[1], parts[-3], parts[-1]
            if (
                _local_label(version) == "cpu"
                and tag in python_tag.split(".")
                and "linux" in platform_tag
                and machine in platform_tag
                and _at_least_min(version)
            ):
                found.append((version, wheel))
    return sorted(found, key=lambda item: _version_key(item[0]), reverse=True)


def installed_torch(mode: str) -> str | None:
    """The installed torch version for --installed auto (this Python's site-packages), a given one, or None."""
    if mode == "none":
        return None
    if mode != "auto":
        return mode
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _explicit(flavor: str, index: str, installed: str | None, base: dict) -> Plan | None:
    """The plan for MEDDIFF_TORCH / MEDDIFF_TORCH_INDEX, or None when neither is set."""
    requirement = f"torch>={TORCH_MIN}"
    if index:
        wanted = index.rstrip("/").rsplit("/", 1)[-1]
        wanted = wanted if FLAVOR.match(wanted) else ""
        build = re.sub(r"\d.*", "", wanted) or "default"
        build = "cuda" if build == "cu" else build
        reason = f"MEDDIFF_TORCH_INDEX={index}"
    elif flavor in DEFAULT_VALUES:
        wanted, build, index, reason = "", "default", "", f"MEDDIFF_TORCH={flavor}: PyPI's torch"
    elif FLAVOR.match(flavor):
        wanted = flavor
        build = "cuda" if flavor.startswith("cu") else re.sub(r"\d.*", "", flavor)
        index, reason = f"{PYTORCH_INDEX}/{flavor}", f"MEDDIFF_TORCH={flavor}"
    elif flavor in AUTO_VALUES:
        return None
    else:
        raise ChoiceError(
            f"MEDDIFF_TORCH={flavor!r} is not one of auto, default, cpu, cuNNN (e.g. cu126), rocmX.Y, "
            "xpu; or set MEDDIFF_TORCH_INDEX=URL for another index"
        )
    plan = Plan("install", requirement, index or None, build, reason, cpu_only=build == "cpu", **base)
    if installed is not None and _at_least_min(installed):
        label = _local_label(installed)
        # PyPI's build: anything but a CPU-only build of the installed torch is it (a +cpu one is replaced)
        same = label != "cpu" if (not wanted and not index) else label == wanted
        if same or (index and not wanted):
            plan.action, plan.requirement = "keep", f"torch=={installed}"
            plan.reason += f"; torch {installed} is already installed"
            if not same:
                plan.note = f"to reinstall torch from {index}: .venv/bin/pip uninstall -y torch, then run this again"
        else:
            plan.replace = True
            plan.reason += f"; replaces the installed torch {installed}"
    return plan


def choose(installed_mode: str = "none", environ: dict[str, str] | None = None) -> Plan:
    env = os.environ if environ is None else environ
    system, machine = uname()
    gpus = nvidia_gpus() if system != "Darwin" else []
    base = {"system": system, "machine": machine, "gpus": gpus}
    installed = installed_torch(installed_mode)
    flavor = env.get("MEDDIFF_TORCH", "").strip().lower()
    plan = _explicit(flavor, env.get("MEDDIFF_TORCH_INDEX", "").strip(), installed, base)
    if plan is not None:
        return plan
    if installed is not None and _at_least_min(installed):
        label = _local_label(installed)
        return Plan(
            "keep",
            f"torch=={installed}",
            None,
            "cpu" if label == "cpu" else (label or "default"),
            f"torch {installed} is already installed; set MEDDIFF_TORCH to install another build",
            cpu_only=label == "cpu",
            **base,
        )
    requirement = f"torch>={TORCH_MIN}"
    if system == "Darwin":
        if machine != "arm64":
            raise ChoiceError(
                f"PyPI has no torch >= {TORCH_MIN} for macOS on {machine} (Intel); use Apple silicon "
                "or Linux, or install torch >= 2.6 yourself into .venv and run this again"
            )
        return Plan(
            "install",
            requirement,
            None,
            "mps",
            "macOS on Apple silicon: PyPI's torch (uses the GPU through MPS)",
            **base,
        )
    if system != "Linux":
        return Plan("install", requirement, None, "default", f"{system}: PyPI's torch", **base)
    config = pip_config()
    if gpus:
        # exclude CPU wheels lying in find-links folders, so that the GPU is used
        for version, _ in local_cpu_wheels(config.get("find-links", []), machine):
            requirement += f",!={version}"
        indexes = config.get("index-url", []) + config.get("extra-index-url", [])
        # a configured CPU index would win (a +cpu local version sorts above the plain one): ask PyPI directly
        index = PYPI_INDEX if any(url.rstrip("/").endswith("/whl/cpu") for url in indexes) else None
        return Plan(
            "install",
            requirement,
            index,
            "cuda",
            f"NVIDIA GPU found ({gpus[0]}): PyPI's torch, a CUDA build",
            note="another CUDA version: MEDDIFF_TORCH=cu126 (or cu128, ...) bash scripts/install.sh",
            **base,
        )
    local = local_cpu_wheels(config.get("find-links", []), machine)
    if local:
        version, wheel = local[0]
        return Plan(
            "install",
            f"torch=={version}",
            None,
            "cpu",
            f"no NVIDIA GPU; the CPU wheel {wheel.name} lies in pip's find-links folder {wheel.parent}",
            cpu_only=True,
            **base,
        )
    indexes = config.get("index-url", []) + config.get("extra-index-url", [])
    cpu_index = next((url for url in indexes if url.rstrip("/").endswith("/whl/cpu")), None)
    if cpu_index:
        return Plan(
            "install",
            requirement,
            None,
            "cpu",
            f"no NVIDIA GPU; pip is configured with the CPU index {cpu_index}",
            cpu_only=True,
            **base,
        )
    return Plan(
        "install",
        requirement,
        None,
        "default",
        "no NVIDIA GPU found: PyPI's torch (a CUDA build of several GB; it also runs on the CPU)",
        note="for the much smaller CPU build: MEDDIFF_TORCH=cpu bash scripts/install.sh",
        **base,
    )


CUDA_FLAVORS = ("cu118", "cu121", "cu124", "cu126", "cu128", "cu129", "cu130")  # PyTorch's CUDA indexes


def cuda_flavor_for(driver: str) -> str | None:
    """The newest PyTorch CUDA index a driver supporting CUDA `driver` ("12.4", from nvidia-smi) can run."""
    want = _version_key(driver)[:2]
    fits = [f for f in CUDA_FLAVORS if (int(f[2:-1]), int(f[-1])) <= want]
    return fits[-1] if fits else None


def describe(plan: Plan) -> str:
    where = f"from {plan.index_url}" if plan.index_url else "from pip's configured indexes (PyPI by default)"
    verb = "keep (installs nothing for torch)" if plan.action == "keep" else f"install {where}"
    lines = [
        f"torch requirement: {plan.requirement}",
        f"torch index: {plan.index_url or 'pip default (PyPI plus any configured find-links/indexes)'}",
        f"torch action: {verb}{'; uninstalls the installed torch first' if plan.replace else ''}",
        f"torch build: {plan.build}",
        f"why: {plan.reason}",
    ]
    if plan.note:
        lines.append(f"note: {plan.note}")
    return "\n".join(lines)


def shell(plan: Plan) -> str:
    values = {
        "TORCH_ACTION": plan.action,
        "TORCH_REQ": plan.requirement,
        "TORCH_BUILD": plan.build,
        "TORCH_CPU_ONLY": "1" if plan.cpu_only else "",
        "TORCH_REPLACE": "1" if plan.replace else "",
    }
    lines = [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    lines.append("TORCH_PIP_ARGS=(" + " ".join(shlex.quote(arg) for arg in plan.pip_args()) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--installed", default="none", help="auto | none | a torch version (default none)")
    parser.add_argument(
        "--cuda-flavor-for",
        metavar="X.Y",
        help="print the PyTorch CUDA index (cuNNN) for a driver that supports CUDA X.Y, and exit",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--shell", action="store_true")
    args = parser.parse_args(argv)
    if args.cuda_flavor_for:
        flavor = cuda_flavor_for(args.cuda_flavor_for)
        print(flavor or "none")
        return 0 if flavor else 2
    try:
        plan = choose(args.installed)
    except ChoiceError as exc:
        print(f"install: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(plan), "pip_args": plan.pip_args()}))
    elif args.shell:
        print(shell(plan))
    else:
        print(describe(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
