"""meddiff.precision: which mixed precision 'auto' picks per device and what each explicit choice allows.

The capability probes (CPU flags, CUDA bf16 support, the macOS version behind mps) are monkeypatched, so every
branch runs on any machine."""

import pytest
import torch

from meddiff import precision
from meddiff.errors import MeddiffError
from meddiff.precision import autocast, resolve_precision


@pytest.fixture
def probes(monkeypatch):
    """Set the three capability probes: probes(cpu_bf16=..., cuda_bf16=..., mps_bf16=...)."""

    def set_probes(cpu_bf16=False, cuda_bf16=False, mps_bf16=False):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: cpu_bf16)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(precision, "mps_supports_bf16", lambda: mps_bf16)

    return set_probes


@pytest.mark.parametrize(
    "device, probe, expected",
    [
        ("cpu", {"cpu_bf16": True}, "bf16"),
        ("cpu", {"cpu_bf16": False}, "no"),
        ("cuda", {"cuda_bf16": True}, "bf16"),
        ("cuda", {"cuda_bf16": False}, "fp16"),
        ("cuda:1", {"cuda_bf16": False}, "fp16"),
        ("mps", {"mps_bf16": True}, "bf16"),
        ("mps", {"mps_bf16": False}, "no"),
    ],
)
def test_auto_picks_by_device_and_support(probes, device, probe, expected):
    probes(**probe)
    assert resolve_precision("auto", device) == expected
    assert resolve_precision(None, device) == expected  # unset means auto
    assert resolve_precision("AUTO", torch.device(device)) == expected


def test_cpu_auto_ignores_the_gpu_probes(probes):
    probes(cpu_bf16=False, cuda_bf16=True, mps_bf16=True)
    assert resolve_precision("auto", "cpu") == "no"


@pytest.mark.parametrize("name, expected", [("fp32", "no"), ("bf16", "bf16"), ("FP32", "no")])
def test_explicit_choices_map_to_accelerate_names_on_the_cpu(probes, name, expected):
    probes(cpu_bf16=False)  # bf16 is allowed on any CPU (slow without AMX, still correct)
    assert resolve_precision(name, "cpu") == expected


def test_explicit_fp16_and_bf16_on_gpus(probes):
    probes(cuda_bf16=True, mps_bf16=True)
    assert resolve_precision("fp16", "cuda") == "fp16"
    assert resolve_precision("fp16", "mps") == "fp16"
    assert resolve_precision("bf16", "cuda:0") == "bf16"
    assert resolve_precision("bf16", "mps") == "bf16"


@pytest.mark.parametrize(
    "name, device, probe, message",
    [
        ("fp16", "cpu", {}, "fp16 needs a CUDA GPU"),
        ("bf16", "cuda", {"cuda_bf16": False}, "does not support bf16"),
        ("bf16", "mps", {"mps_bf16": False}, "macOS 14"),
        ("fp8", "cpu", {}, "precision must be auto, fp32, bf16 or fp16, got 'fp8'"),
    ],
)
def test_impossible_choices_are_one_line_errors(probes, name, device, probe, message):
    probes(**probe)
    with pytest.raises(MeddiffError, match=message) as info:
        resolve_precision(name, device)
    assert "\n" not in str(info.value)


def test_default_device_is_the_runs_device(probes, monkeypatch):
    import meddiff.devices

    probes(cuda_bf16=False)
    monkeypatch.setattr(meddiff.devices, "run_device", lambda prefer=None: torch.device("cuda", 0))
    assert resolve_precision("auto") == "fp16"


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    from pathlib import Path

    real_read = Path.read_text

    def fake_cpuinfo(flags):
        def read_text(self, *a, **k):
            return f"flags\t: fpu sse2 {flags}\n" if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k)

        return read_text

    try:
        for flags, expected in [("avx2 avx512f", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True)]:
            precision.cpu_has_fast_bf16.cache_clear()
            monkeypatch.setattr(Path, "read_text", fake_cpuinfo(flags))
            assert precision.cpu_has_fast_bf16() is expected, flags
        precision.cpu_has_fast_bf16.cache_clear()

        def unreadable(self, *a, **k):
            raise OSError("no /proc here")

        monkeypatch.setattr(Path, "read_text", unreadable)
        assert precision.cpu_has_fast_bf16() is False
    finally:
        precision.cpu_has_fast_bf16.cache_clear()  # the real answer for the rest of the session


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("no", None)])
def test_autocast_matches_the_training_precision(name, dtype):
    layer = torch.nn.Linear(4, 4)
    with autocast(name, "cpu"):
        out = layer(torch.ones(2, 4))
    assert out.dtype == (dtype or torch.float32)
    with autocast(name, torch.device("cpu")):  # a torch.device works too
        assert layer(torch.ones(2, 4)).dtype == (dtype or torch.float32)


def test_tf32_switch_round_trips():
    before = precision.tf32_enabled()
    try:
        assert precision.enable_tf32(True) == torch.cuda.is_available()
        assert precision.tf32_enabled() is True
        precision.enable_tf32(False)
        assert precision.tf32_enabled() is False
    finally:
        precision.enable_tf32(before)
