import os
from pathlib import Path

import pytest


def _cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )  # macOS: no affinity


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the cores are shared out, one share a worker
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // _workers))  # before torch starts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_NPZ = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    from meddiff.data.phantom_dataset import write_phantom_folder

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_folder(out, n=60, size=32, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny trained run directory (a few steps; for plumbing tests, not quality)."""
    from meddiff.data.spec import load_dataset
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        data="phantom:?n=64&seed=3",
        out=str(out),
        max_steps=4,
        batch_size=8,
        checkpoint_every=0,
        lr_warmup_steps=1,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
    )
    train(cfg, load_dataset(cfg.data, 32), progress=False)
    return out


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Preprocessed-array cache and the patient-pseudonym key in temporary folders, never the user's ~/.cache or
    ~/.config."""
    os.environ["MEDDIFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    config = tmp_path_factory.mktemp("config")
    os.environ["XDG_CONFIG_HOME"] = str(config)
    # A fixed key, not a random one: pseudonymised patient ids (and so the patient-level splits of tests that read
    # DICOM PatientIDs) are the same on every machine. A random key once left a 7-patient test split empty on CI.
    os.environ.pop("MEDDIFF_PATIENT_KEY", None)
    key = config / "meddiff" / "patient.key"
    key.parent.mkdir(parents=True)
    key.write_text("meddiff-test-suite-patient-key-0123456789\n")
    key.chmod(0o600)
    yield


@pytest.fixture(scope="session")
def tiny_run_b(tmp_path_factory):
    """A second tiny model (other seed): different weights."""
    from meddiff.data.spec import load_dataset
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import train

    out = tmp_path_factory.mktemp("run_b")
    cfg = TrainConfig(
        data="phantom:?n=64&seed=3",
        out=str(out),
        max_steps=2,
        batch_size=8,
        checkpoint_every=0,
        seed=1,
        lr_warmup_steps=1,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
    )
    train(cfg, load_dataset(cfg.data, 32), progress=False)
    return out


MAX_WORKERS = 4  # each worker holds torch and its models (about 1 GiB); more rarely pays on the tests' small tensors


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core up to MAX_WORKERS; conftest then gives each worker its
    share of the cores as torch threads (2 cores: 2 workers of 1 thread, about 1.45x the throughput of one process of
    2 threads on the small tensors tests use)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # the user's count (xdist reads it)
    return max(1, min(MAX_WORKERS, _cores()))


def pytest_collection_modifyitems(config, items):
    """Tests marked `extended` run only when asked for: by a non-empty `-m` expression (`-m extended`,
    `-m "slow or not slow"`) or by naming the test (`tests/test_bench.py::test_peer_bench...`, from any folder).
    Tests marked `run_first` are moved to the front. Tests marked `gpu` need CUDA: skipped (with the reason shown) on
    machines without it."""
    import torch

    if not config.option.markexpr:
        here = Path(config.invocation_params.dir)
        parts = [a.partition("::") for a in config.args if "::" in a]
        named = {((here / file).resolve(), test.split("[")[0]) for file, _, test in parts}
        wanted = lambda item: (item.path.resolve(), item.nodeid.partition("::")[2].split("[")[0]) in named  # noqa: E731
        kept, dropped = [], []
        for item in items:
            (dropped if "extended" in item.keywords and not wanted(item) else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    # the longest tests start first: on parallel workers a 20-minute test started late is the whole suite's tail
    first = [item for item in items if "run_first" in item.keywords]
    if first:
        items[:] = first + [item for item in items if "run_first" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_DEFAULT_THREADS: list[int] = []


def pytest_sessionstart(session):
    import torch  # (commands that must not import torch are checked in subprocesses)

    _DEFAULT_THREADS.append(torch.get_num_threads())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test starts with torch's own thread count: a run with `threads: 1` (TrainConfig.threads calls
    torch.set_num_threads) must not slow every later test of the session down to one core."""
    import torch

    if _DEFAULT_THREADS and torch.get_num_threads() != _DEFAULT_THREADS[0]:
        torch.set_num_threads(_DEFAULT_THREADS[0])
