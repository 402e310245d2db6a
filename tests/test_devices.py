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


def test_a_brand_only_cpu_name_gets_its_family_and_model():
    from meddiff.devices import cpu_model_from_cpuinfo

    block = "processor\t: {n}\ncpu family\t: {f}\nmodel\t\t: {m}\nmodel name\t: {name}\nflags\t\t: avx2\n"
    # a VM that shows only the brand: Zen 1 (family 23) and Zen 4 (family 25) must not read the same
    two = block.format(n=0, f=23, m=1, name="AMD EPYC") + "\n" + block.format(n=1, f=25, m=17, name="other")
    assert cpu_model_from_cpuinfo(two) == "AMD EPYC family 23 model 1"
    assert cpu_model_from_cpuinfo(block.format(n=0, f=25, m=17, name="AMD EPYC")) == "AMD EPYC family 25 model 17"
    full = "Intel(R) Xeon(R) Platinum 8480+"  # a full model name is kept as it is
    assert cpu_model_from_cpuinfo(block.format(n=0, f=6, m=143, name=full)) == full
    gcp = "Intel(R) Xeon(R) CPU @ 2.20GHz"  # a cloud VM's name: only the clock has digits
    assert cpu_model_from_cpuinfo(block.format(n=0, f=6, m=85, name=gcp)) == f"{gcp} family 6 model 85"
    assert cpu_model_from_cpuinfo("processor\t: 0\n") == ""  # no model name (e.g. some ARM kernels)


def test_machine_description_names_the_gpu_of_the_device_it_is_given(monkeypatch):
    names = {0: "GPU zero", 1: "GPU one"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: names[torch.device(d).index or 0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert machine_description("cuda:1") == "GPU one" and machine_description("cuda:0") == "GPU zero"
