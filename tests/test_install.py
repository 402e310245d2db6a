"""scripts/install.sh and scripts/choose_torch.py: which torch a machine gets, tested here without a GPU by putting
fake `nvidia-smi` and `uname` commands on PATH; and the health check the install ends with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHOOSE = ROOT / "scripts" / "choose_torch.py"


def fake_tools(
    folder: Path, gpu: str | None = None, system: str | None = None, machine: str | None = None, smi_fails: bool = False
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if gpu is not None or smi_fails:
        body = "exit 9" if smi_fails else f'echo "GPU 0: {gpu} (UUID: GPU-0000)"'
        (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
        (folder / "nvidia-smi").chmod(0o755)
    if system is not None:
        (folder / "uname").write_text(
            f'#!/bin/sh\ncase "$1" in -s) echo {system};; -m) echo {machine};; *) echo {system};; esac\n'
        )
        (folder / "uname").chmod(0o755)
    return folder


def choose(
    tmp_path, *, gpu=None, system=None, machine=None, smi_fails=False, env=None, installed="none", no_pip_config=False
):
    tools = fake_tools(tmp_path / "bin", gpu, system, machine, smi_fails)
    # PATH: the fakes, then only what Python needs (no real nvidia-smi from the machine)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MEDDIFF_TORCH", "PIP_"))}
    environ["PATH"] = f"{tools}:/usr/bin:/bin"
    if no_pip_config:  # a fresh machine: no find-links folder, no extra index
        environ["PIP_CONFIG_FILE"] = os.devnull
    environ.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(CHOOSE), "--installed", installed, "--json"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    return proc


def plan(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_linux_with_an_nvidia_gpu_gets_the_cuda_build_from_pypi(tmp_path):
    p = plan(choose(tmp_path, gpu="NVIDIA H100 80GB HBM3", system="Linux", machine="x86_64", no_pip_config=True))
    assert p["build"] == "cuda" and p["action"] == "install" and p["index_url"] is None
    assert p["requirement"] == "torch>=2.6" and "H100" in p["reason"] and not p["cpu_only"]
    # a CPU wheel lying in pip's find-links folder (as on this machine) is excluded, so that the GPU gets used
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    (wheels / f"torch-2.13.0+cpu-{tag}-{tag}-manylinux_2_28_x86_64.whl").write_bytes(b"")
    p = plan(
        choose(
            tmp_path,
            gpu="NVIDIA H100 80GB HBM3",
            system="Linux",
            machine="x86_64",
            no_pip_config=True,
            env={"PIP_FIND_LINKS": str(wheels)},
        )
    )
    assert p["requirement"] == "torch>=2.6,!=2.13.0+cpu" and p["build"] == "cuda"


def test_a_failing_nvidia_smi_means_no_gpu(tmp_path):
    p = plan(choose(tmp_path, smi_fails=True, system="Linux", machine="x86_64", no_pip_config=True))
    assert p["build"] == "default" and p["gpus"] == []


def test_linux_without_gpu_takes_a_local_cpu_wheel_where_pip_has_one(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    (wheels / f"torch-2.13.0+cpu-{tag}-{tag}-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (wheels / f"torch-2.5.0+cpu-{tag}-{tag}-manylinux_2_28_x86_64.whl").write_bytes(b"")  # too old: ignored
    p = plan(
        choose(tmp_path, system="Linux", machine="x86_64", no_pip_config=True, env={"PIP_FIND_LINKS": str(wheels)})
    )
    assert p["requirement"] == "torch==2.13.0+cpu" and p["build"] == "cpu" and p["cpu_only"]


def test_linux_without_gpu_or_cpu_index_accepts_the_default_wheel_and_says_how_to_get_the_small_one(tmp_path):
    p = plan(choose(tmp_path, system="Linux", machine="x86_64", no_pip_config=True))
    assert p["action"] == "install" and p["build"] == "default" and p["requirement"] == "torch>=2.6"
    assert "MEDDIFF_TORCH=cpu" in p["note"]


def test_a_configured_cpu_index_is_used(tmp_path):
    p = plan(
        choose(
            tmp_path,
            system="Linux",
            machine="x86_64",
            no_pip_config=True,
            env={"PIP_EXTRA_INDEX_URL": "https://download.pytorch.org/whl/cpu"},
        )
    )
    assert p["build"] == "cpu" and p["cpu_only"]


def test_macos_arm64_uses_pypi_torch_with_mps_and_intel_macs_get_one_line(tmp_path):
    p = plan(choose(tmp_path, system="Darwin", machine="arm64", no_pip_config=True))
    assert p["build"] == "mps" and p["requirement"] == "torch>=2.6" and p["index_url"] is None
    proc = choose(tmp_path / "intel", system="Darwin", machine="x86_64", no_pip_config=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Intel" in proc.stderr


def test_explicit_choices_pick_the_pytorch_index_and_replace_another_installed_build(tmp_path):
    p = plan(choose(tmp_path, system="Linux", machine="x86_64", env={"MEDDIFF_TORCH": "cpu"}))
    assert p["index_url"] == "https://download.pytorch.org/whl/cpu" and p["cpu_only"]
    p = plan(
        choose(
            tmp_path,
            gpu="NVIDIA A100",
            system="Linux",
            machine="x86_64",
            env={"MEDDIFF_TORCH": "cu126"},
            installed="2.13.0+cpu",
        )
    )
    assert p["index_url"].endswith("/whl/cu126") and p["build"] == "cuda" and p["replace"]
    p = plan(
        choose(tmp_path, system="Linux", machine="x86_64", env={"MEDDIFF_TORCH_INDEX": "https://example/whl/cu128"})
    )
    assert p["pip_args"] == ["torch>=2.6", "--index-url", "https://example/whl/cu128"] and p["build"] == "cuda"
    proc = choose(tmp_path, system="Linux", machine="x86_64", env={"MEDDIFF_TORCH": "gpu-please"})
    assert proc.returncode == 2 and "MEDDIFF_TORCH" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_an_installed_recent_torch_is_kept(tmp_path):
    p = plan(choose(tmp_path, gpu="NVIDIA A100", system="Linux", machine="x86_64", installed="2.13.0+cu126"))
    assert p["action"] == "keep" and p["requirement"] == "torch==2.13.0+cu126"
    p = plan(choose(tmp_path, system="Linux", machine="x86_64", installed="2.1.0", no_pip_config=True))
    assert p["action"] == "install"  # too old for meddiff: replaced by the plan's choice


def test_install_dry_run_prints_the_plan_and_installs_nothing(tmp_path):
    tools = fake_tools(tmp_path / "bin", gpu="NVIDIA H200", system="Linux", machine="x86_64")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEDDIFF_TORCH")}
    environ["PATH"] = f"{tools}:{environ['PATH']}"
    environ["MEDDIFF_TORCH"] = "cu128"
    before = sorted(p.name for p in (ROOT / ".venv").glob("lib/python*/site-packages/torch-*"))
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch index: https://download.pytorch.org/whl/cu128" in proc.stdout and "torch build: cuda" in proc.stdout
    assert sorted(p.name for p in (ROOT / ".venv").glob("lib/python*/site-packages/torch-*")) == before
    bad = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def _check(tmp_path, shadow: dict[str, str]):
    for name, code in shadow.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(code)
    environ = dict(os.environ, PYTHONPATH=f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "meddiff.environment", "--check"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )


def test_health_check_passes_on_this_install(tmp_path):
    proc = _check(tmp_path, {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("meddiff health: ok: torch ") and "peft" in proc.stdout


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_health_check_names_a_broken_package_in_one_line(tmp_path):
    proc = _check(tmp_path, {"peft": "raise ImportError('peft is broken on purpose')"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "peft" in lines[0] and "broken on purpose" in lines[0] and "install" in lines[0]


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_health_check_blames_a_torchvision_that_breaks_imports(tmp_path):
    proc = _check(tmp_path, {"torchvision": "raise RuntimeError('operator torchvision::nms does not exist')"})
    assert proc.returncode == 1
    assert "torchvision" in proc.stderr and "uninstall -y torchvision" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["torchvision"])
def test_torchvision_stays_out_of_the_dependency_tree(name):
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version(name)
    requires = metadata.requires("meddiff") or []
    assert not [r for r in requires if r.startswith(name) and "extra ==" not in r]


def test_default_replaces_an_installed_cpu_build_and_a_cpu_index_does_not_win_on_a_gpu(tmp_path):
    p = plan(
        choose(
            tmp_path,
            gpu="NVIDIA A100",
            system="Linux",
            machine="x86_64",
            env={"MEDDIFF_TORCH": "default"},
            installed="2.13.0+cpu",
        )
    )
    assert p["action"] == "install" and p["replace"] and p["index_url"] is None
    p = plan(
        choose(
            tmp_path,
            gpu="NVIDIA A100",
            system="Linux",
            machine="x86_64",
            env={"MEDDIFF_TORCH": "default"},
            installed="2.13.0+cu128",
        )
    )
    assert p["action"] == "keep"
    p = plan(
        choose(
            tmp_path,
            gpu="NVIDIA A100",
            system="Linux",
            machine="x86_64",
            no_pip_config=True,
            env={"PIP_EXTRA_INDEX_URL": "https://download.pytorch.org/whl/cpu"},
        )
    )
    assert p["build"] == "cuda" and p["index_url"] == "https://pypi.org/simple"


def test_cuda_index_for_a_driver():
    def flavor(driver):
        proc = subprocess.run(
            [sys.executable, str(CHOOSE), "--cuda-flavor-for", driver], capture_output=True, text=True
        )
        return proc.stdout.strip(), proc.returncode

    assert flavor("12.4") == ("cu124", 0) and flavor("12.7") == ("cu126", 0) and flavor("13.2") == ("cu130", 0)
    assert flavor("11.4") == ("none", 2)
