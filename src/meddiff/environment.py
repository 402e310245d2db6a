"""`meddiff env`: what this machine gives meddiff (versions, devices, precision, attention, distributed launch,
extras, hub, caches) and one line of advice per problem; `--check`: the one-line import health check that
scripts/install.sh runs last.

Works without a GPU and without the network: the only network use is a DNS lookup of the hub host, given at
most LOOKUP_SECONDS in a background thread. Nothing here imports torchvision unless it is installed (and then
only to tell whether it breaks imports)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import sys
import threading
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata, util
from pathlib import Path
from urllib.parse import urlparse

LOOKUP_SECONDS = 1.5
MIN_FREE_GB = 10.0
PACKAGES = ("diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "huggingface-hub", "monai")
EXTRAS = {
    "serve": ("gradio",),
    "survival": ("pyradiomics",),
    "bench": ("monai", "einops"),
    "test": ("pytest", "playwright"),
}
# the health check: what meddiff imports at its core, in dependency order
HEALTH_IMPORTS = ("torch", "diffusers", "transformers", "peft", "accelerate")
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


@dataclass
class Versions:
    python: str
    platform: str
    meddiff: str
    torch: str | None
    torch_build: str  # cuda 12.6 | rocm 6.3 | cpu | mps (PyPI's macOS build)
    packages: dict[str, str | None]


@dataclass
class Gpu:
    index: int
    name: str
    capability: str
    total_gb: float | None
    free_gb: float | None


@dataclass
class Devices:
    accelerator: str  # cuda | mps | xpu | cpu
    cuda_available: bool
    gpu_count: int
    gpus: list[Gpu]
    mps_available: bool
    cpu_cores: int
    cpu_cores_usable: int
    torch_threads: int
    nvidia_smi: bool  # an NVIDIA driver tool is on PATH


@dataclass
class Precision:
    bf16: bool  # bf16 works on the accelerator
    bf16_fast: bool  # CUDA with bf16, or a CPU with AMX / AVX512-BF16
    fp16: bool  # CUDA or MPS
    tf32: bool  # an Ampere or newer GPU
    tf32_matmul_enabled: bool
    auto: str  # what --precision auto picks here


@dataclass
class Attention:
    sdpa: bool  # torch.nn.functional.scaled_dot_product_attention
    flash_enabled: bool | None  # CUDA SDPA kernels (None without CUDA)
    flash_hardware: bool | None  # flash kernels need sm80+
    mem_efficient_enabled: bool | None
    cudnn_enabled: bool | None
    math_enabled: bool | None


@dataclass
class Distributed:
    launched: bool
    world_size: int
    rank: int
    local_rank: int
    variables: dict[str, str]
    backends: list[str]


@dataclass
class Hub:
    host: str
    hf_hub_offline: str | None
    transformers_offline: str | None
    resolves: bool | None  # None: no answer within LOOKUP_SECONDS
    detail: str


@dataclass
class Storage:
    meddiff_cache: str
    meddiff_cache_free_gb: float | None
    hf_cache: str
    hf_cache_free_gb: float | None


@dataclass
class Torchvision:
    version: str | None  # None: not installed (as it should be)
    imports: bool | None
    error: str


@dataclass
class Report:
    versions: Versions
    devices: Devices
    precision: Precision
    attention: Attention
    distributed: Distributed
    extras: dict[str, bool]
    extra_packages: dict[str, str | None]
    hub: Hub
    storage: Storage
    torchvision: Torchvision
    advice: list[str] = field(default_factory=list)


class _Lookup:
    """A DNS lookup in a daemon thread: never holds up the report (or the exit) longer than LOOKUP_SECONDS."""

    def __init__(self, host: str) -> None:
        self.host, self.detail = host, f"no answer within {LOOKUP_SECONDS:.1f} s"
        self.result: bool | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            socket.getaddrinfo(self.host, 443)
            self.result, self.detail = True, "resolves"
        except OSError as exc:
            self.result, self.detail = False, _short(exc)

    def wait(self) -> tuple[bool | None, str]:
        self.thread.join(LOOKUP_SECONDS)
        return self.result, self.detail


def free_gb(path: Path) -> float | None:
    """Free space (GB) on the disk holding `path`, or its nearest existing parent."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return round(shutil.disk_usage(candidate).free / 1e9, 1)
            except OSError:
                return None
    return None


def hf_cache_dir() -> Path:
    """Where huggingface_hub caches models (its own precedence of variables)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("HF_HOME", xdg / "huggingface")).expanduser() / "hub"


def _devices(torch) -> Devices:
    from meddiff.devices import mps_available, usable_cores

    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
            free_total = (round(free / 1e9, 1), round(total / 1e9, 1))
        except RuntimeError:
            free_total = (None, round(props.total_memory / 1e9, 1))
        gpus.append(Gpu(i, props.name, f"{props.major}.{props.minor}", free_total[1], free_total[0]))
    mps = mps_available()
    current = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    usable = usable_cores()
    return Devices(
        current.type if current is not None else "cpu",
        cuda,
        len(gpus),
        gpus,
        mps,
        os.cpu_count() or 1,
        usable,
        torch.get_num_threads(),
        shutil.which("nvidia-smi") is not None,
    )


def _precision(torch, devices: Devices) -> Precision:
    from meddiff.precision import cpu_has_fast_bf16, resolve_precision, tf32_enabled

    tf32 = any(float(g.capability) >= 8.0 for g in devices.gpus)
    if devices.cuda_available:
        bf16 = fast = bool(torch.cuda.is_bf16_supported())
    elif devices.accelerator == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            bf16 = fast = True
        except (RuntimeError, TypeError):
            bf16 = fast = False
    else:
        bf16, fast = True, cpu_has_fast_bf16()
    auto = resolve_precision("auto")
    return Precision(
        bf16,
        fast,
        devices.cuda_available or devices.accelerator == "mps",
        tf32,
        tf32_enabled(),
        "fp32" if auto == "no" else auto,
    )


def _attention(torch, devices: Devices) -> Attention:
    sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    if not devices.cuda_available:
        return Attention(sdpa, None, None, None, None, None)
    b = torch.backends.cuda
    cudnn = b.cudnn_sdp_enabled() if hasattr(b, "cudnn_sdp_enabled") else None
    return Attention(
        sdpa,
        b.flash_sdp_enabled(),
        any(float(g.capability) >= 8.0 for g in devices.gpus),
        b.mem_efficient_sdp_enabled(),
        cudnn,
        b.math_sdp_enabled(),
    )


def _distributed(torch) -> Distributed:
    env = {k: os.environ[k] for k in DIST_VARS if k in os.environ}

    def num(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    dist = torch.distributed
    backends = (
        []
        if not dist.is_available()
        else [
            name
            for name, ok in (
                ("nccl", dist.is_nccl_available()),
                ("gloo", dist.is_gloo_available()),
                ("mpi", dist.is_mpi_available()),
            )
            if ok
        ]
    )
    return Distributed("WORLD_SIZE" in env, num("WORLD_SIZE", 1), num("RANK", 0), num("LOCAL_RANK", 0), env, backends)


def _torchvision() -> Torchvision:
    version = _version("torchvision")
    if version is None and util.find_spec("torchvision") is None:
        return Torchvision(None, None, "")
    try:
        import torchvision  # noqa: F401  # only to tell whether an installed one breaks imports

        return Torchvision(version or "?", True, "")
    except Exception as exc:  # noqa: BLE001  # any failure here breaks transformers/diffusers imports
        return Torchvision(version or "?", False, _short(exc))


def _torch_build(torch) -> str:
    if getattr(torch.version, "hip", None):
        return f"rocm {torch.version.hip}"
    if torch.version.cuda:
        return f"cuda {torch.version.cuda}"
    if platform.system() == "Darwin":
        return "mps" if torch.backends.mps.is_built() else "cpu"
    return "cpu"


def advice(r: Report) -> list[str]:
    """One line per problem found, each with what to do."""
    out: list[str] = []
    tv, d, p = r.torchvision, r.devices, r.precision
    if tv.version and tv.imports is False:
        out.append(
            f"torchvision {tv.version} is installed and breaks transformers/diffusers imports ({tv.error}): "
            "pip uninstall -y torchvision (meddiff never needs it)"
        )
    if d.accelerator == "cpu":
        out.append(
            f"no GPU: training and generation run on the CPU ({d.cpu_cores_usable} cores); fine for the demo "
            "and small models, slow for Stable Diffusion fine-tuning"
        )
    if d.nvidia_smi and not r.versions.torch_build.startswith("cuda"):
        out.append(
            "an NVIDIA driver is present but torch is a CPU build: MEDDIFF_TORCH=default bash "
            "scripts/install.sh (or MEDDIFF_TORCH=cu126) installs a CUDA build"
        )
    elif r.versions.torch_build.startswith("cuda") and not d.cuda_available:
        out.append(
            "torch is a CUDA build but no GPU is visible (driver, CUDA_VISIBLE_DEVICES?); on a machine "
            "without one, MEDDIFF_TORCH=cpu bash scripts/install.sh is a much smaller install"
        )
    if not p.bf16_fast:
        fallback = "fp16" if d.cuda_available else "fp32"
        out.append(f"bf16 not supported{' fast' if p.bf16 else ''} here: precision auto uses {fallback}")
    if d.cuda_available and r.attention.flash_enabled is False:
        out.append("flash SDPA is disabled: torch.backends.cuda.enable_flash_sdp(True) for faster attention")
    dist = r.distributed
    if (
        dist.launched
        and d.cuda_available
        and dist.world_size > d.gpu_count
        and "LOCAL_WORLD_SIZE" not in dist.variables
    ):
        out.append(
            f"WORLD_SIZE={dist.world_size} but {d.gpu_count} GPU(s) here: several processes share a GPU "
            "unless this is a multi-node launch"
        )
    if dist.launched and dist.world_size > 1 and d.accelerator == "cpu":
        out.append(
            f"{dist.world_size} processes on the CPU (gloo): each gets about "
            f"{max(1, d.cpu_cores_usable // dist.world_size)} core(s)"
        )
    hub = r.hub
    if hub.resolves is not True and not (hub.hf_hub_offline or hub.transformers_offline):
        out.append(
            f"{hub.host} does not resolve ({hub.detail}): set HF_HUB_OFFLINE=1 and pass local folders "
            "(--pretrained DIR, the default --text-encoder minilm)"
        )
    s = r.storage
    if s.meddiff_cache_free_gb is not None and s.meddiff_cache_free_gb < MIN_FREE_GB:
        out.append(
            f"less than {MIN_FREE_GB:.0f} GB free in the cache ({s.meddiff_cache_free_gb} GB at "
            f"{s.meddiff_cache}): set MEDDIFF_CACHE to a folder on a larger disk"
        )
    if s.hf_cache_free_gb is not None and s.hf_cache_free_gb < MIN_FREE_GB:
        out.append(
            f"less than {MIN_FREE_GB:.0f} GB free in the Hugging Face cache ({s.hf_cache_free_gb} GB at "
            f"{s.hf_cache}): set HF_HOME to a folder on a larger disk"
        )
    return out


def collect() -> Report:
    """Everything `meddiff env` shows; the hub lookup runs while torch imports."""
    from meddiff import __version__
    from meddiff.data.cache import cache_root

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    lookup = _Lookup(host)
    import torch

    versions = Versions(
        platform.python_version(),
        platform.platform(),
        __version__,
        torch.__version__,
        _torch_build(torch),
        {name: _version(name) for name in PACKAGES},
    )
    devices = _devices(torch)
    extra_packages = {pkg: _version(pkg) for pkgs in EXTRAS.values() for pkg in pkgs}
    extras = {name: all(extra_packages[p] for p in pkgs) for name, pkgs in EXTRAS.items()}
    resolves, detail = lookup.wait()
    hub = Hub(host, os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"), resolves, detail)
    cache, hf_cache = cache_root().expanduser(), hf_cache_dir()
    storage = Storage(str(cache), free_gb(cache), str(hf_cache), free_gb(hf_cache))
    report = Report(
        versions,
        devices,
        _precision(torch, devices),
        _attention(torch, devices),
        _distributed(torch),
        extras,
        extra_packages,
        hub,
        storage,
        _torchvision(),
    )
    report.advice = advice(report)
    return report


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def format_report(r: Report) -> str:
    v, d, p, a, dist, h, s = r.versions, r.devices, r.precision, r.attention, r.distributed, r.hub, r.storage
    pkgs = ", ".join(f"{k} {val}" for k, val in v.packages.items() if val)
    lines = [
        f"meddiff {v.meddiff} on {v.platform}",
        f"versions: python {v.python}, torch {v.torch} ({v.torch_build} build), {pkgs}",
        f"devices: {d.accelerator}; {d.gpu_count} CUDA GPU(s), MPS {_yes(d.mps_available)}; "
        f"{d.cpu_cores} CPU cores ({d.cpu_cores_usable} usable), torch threads {d.torch_threads}",
    ]
    lines += [
        f"  GPU {g.index}: {g.name} (sm {g.capability}), {g.total_gb} GB total, {g.free_gb} GB free" for g in d.gpus
    ]
    lines.append(
        f"precision: bf16 {_yes(p.bf16)} (fast {_yes(p.bf16_fast)}), fp16 {_yes(p.fp16)}, TF32 "
        f"{_yes(p.tf32)} (matmul {'on' if p.tf32_matmul_enabled else 'off'}); --precision auto -> {p.auto}"
    )
    kernels = (
        ""
        if a.flash_enabled is None
        else (
            f"; CUDA kernels enabled: flash {_yes(a.flash_enabled)} (hardware {_yes(a.flash_hardware)}), "
            f"mem-efficient {_yes(a.mem_efficient_enabled)}, cudnn {_yes(a.cudnn_enabled)}, math {_yes(a.math_enabled)}"
        )
    )
    lines.append(f"attention: SDPA {_yes(a.sdpa)}{kernels}")
    lines.append(
        f"distributed: world size {dist.world_size}, rank {dist.rank}, local rank {dist.local_rank} "
        f"({', '.join(f'{k}={val}' for k, val in dist.variables.items())}); backends {', '.join(dist.backends)}"
        if dist.launched
        else f"distributed: not launched (no WORLD_SIZE); backends {', '.join(dist.backends)}"
    )

    def extra(name: str) -> str:
        pkgs = ", ".join(f"{pkg} {r.extra_packages.get(pkg) or 'missing'}" for pkg in EXTRAS[name])
        return f"{name} {'yes' if r.extras[name] else 'no'} ({pkgs})"

    lines.append("extras: " + "; ".join(extra(name) for name in EXTRAS))
    lines.append(
        f"hub: HF_HUB_OFFLINE={h.hf_hub_offline or 'unset'}, TRANSFORMERS_OFFLINE="
        f"{h.transformers_offline or 'unset'}; {h.host}: {h.detail}"
    )
    lines.append(
        f"caches: meddiff {s.meddiff_cache} ({s.meddiff_cache_free_gb} GB free); Hugging Face "
        f"{s.hf_cache} ({s.hf_cache_free_gb} GB free)"
    )
    tv = r.torchvision
    lines.append(
        "torchvision: not installed (as it should be)"
        if tv.version is None
        else f"torchvision: {tv.version} installed, imports {_yes(tv.imports)}"
    )
    lines.append("advice:" if r.advice else "advice: none")
    lines += [f"  - {line}" for line in r.advice]
    return "\n".join(lines)


def health() -> tuple[bool, str]:
    """Import what meddiff needs; (ok, one line naming what is broken and what to do)."""
    pip = f"{sys.executable} -m pip"
    failed: dict[str, str] = {}
    culprit_torchvision = False
    for name in HEALTH_IMPORTS:
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001  # a broken install raises anything
            failed[name] = _short(exc)
            frames = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            culprit_torchvision |= "torchvision" in frames
    listed = ", ".join(f"{name} ({error})" for name, error in failed.items())
    tv = _torchvision() if "torch" not in failed else Torchvision(_version("torchvision"), None, "")
    if tv.version and (tv.imports is False or culprit_torchvision):
        detail = f"; {listed}" if failed else f" ({tv.error})"
        return False, (
            f"broken: torchvision {tv.version} is installed and breaks imports{detail}: "
            f"{pip} uninstall -y torchvision (meddiff never needs it)"
        )
    if failed:
        fix = (
            "reinstall torch: rerun bash scripts/install.sh (MEDDIFF_TORCH=cpu for the CPU build)"
            if "torch" in failed
            else f"{pip} install --force-reinstall {' '.join(failed)}, or rerun bash scripts/install.sh"
        )
        return False, f"broken: {listed}: {fix}"
    import torch

    build = _torch_build(torch)
    where = (
        f", {torch.cuda.device_count()} GPU(s)"
        if torch.cuda.is_available()
        else ", MPS"
        if torch.backends.mps.is_available()
        else ", no GPU"
    )
    names = ", ".join(f"{n} {_version(n)}" for n in HEALTH_IMPORTS[1:])
    return True, f"ok: torch {torch.__version__} ({build} build{where}), {names}"


def main(argv: list[str] | None = None) -> int:
    """`meddiff env [--json | --check]` (also `python -m meddiff.environment`)."""
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        ok, line = health()
        print(f"meddiff health: {line}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    report = collect()
    print(json.dumps(asdict(report), indent=1) if "--json" in args else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
