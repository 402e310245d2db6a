"""meddiff.devices: one rule for where a command's models sit, tested with the CPU as the device."""

import pytest
import torch

from meddiff.devices import cpu_model, launch_rank, machine_description, misplaced_components, run_device, same_device
from meddiff.errors import MeddiffError


def test_run_device_auto_and_explicit(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    auto = run_device()
    if torch.cuda.is_available():
        assert auto == torch.device("cuda", 0)
    else:
        assert auto.type in ("cpu", "mps")
    assert run_device("cpu") == torch.device("cpu") and run_device("auto") == auto
    if not torch.cuda.is_available():
        with pytest.raises(MeddiffError, match="no.*CUDA|none is available"):
            run_device("cuda")


def test_launch_rank_reads_the_launcher_variables(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert launch_rank() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert launch_rank() == (3, 4)


def test_misplaced_components_finds_a_module_left_behind(tmp_path):
    from meddiff.testing import build_tiny_stable_diffusion

    assert same_device("cpu", torch.device("cpu"))
    base = build_tiny_stable_diffusion(tmp_path / "sd")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    assert misplaced_components(pipe, "cpu") == []
    pipe.vae.to(torch.float64)  # dtype is not placement
    assert misplaced_components(pipe, "cpu") == []
    meta = torch.nn.Linear(2, 2, device="meta")  # a module elsewhere is reported by name
    assert misplaced_components(meta, "cpu") == ["weight", "bias"]


def test_finetune_validation_pipeline_has_every_component_on_the_run_device(tmp_path):
    """The bug this guards: the U-Net on the GPU, the autoencoder and text encoder left on the CPU."""
    from meddiff.data.spec import load_dataset
    from meddiff.testing import build_tiny_stable_diffusion
    from meddiff.training.config import FinetuneConfig, TrainConfig
    from meddiff.training.methods.finetune import StableDiffusionFinetune

    base = build_tiny_stable_diffusion(tmp_path / "sd")
    data = load_dataset("phantom:?n=4&seed=2", 32)
    for mode in ("lora", "unet+text"):
        config = TrainConfig(
            data="phantom:?n=4&seed=2",
            out=str(tmp_path / mode),
            method="finetune",
            resolution=32,
            precision="fp32",
            finetune=FinetuneConfig(pretrained=str(base), method=mode),
        )
        method = StableDiffusionFinetune(config, data, None)
        pipe = method._pipeline(method.model)
        assert misplaced_components(pipe, method.device) == []
        assert next(method.text_encoder.parameters()).device == method.device


def test_machine_description_names_the_cpu_its_kernels_and_threads(monkeypatch):
    from meddiff import devices

    model = cpu_model()
    assert model and model != "unknown CPU"
    for fast, words in ((True, "fast bf16"), (False, "no fast bf16")):
        monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda fast=fast: fast)
        line = machine_description("cpu")
        assert line.startswith(model) and f"{words})" in line and ("no fast" in line) != fast, line
        assert f"{torch.get_num_threads()} thread" in line
        assert torch.backends.cpu.get_cpu_capability() in line  # AVX2 / AVX512 / ...: what sets CPU speed
