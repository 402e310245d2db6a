"""On a CUDA GPU (skipped elsewhere; bench/gpu_check.sh runs them): training in bf16/fp16 on the GPU, every model a
command uses on the run's device, fine-tune validation and export, the fidelity classifier and the latent cache."""

import pytest
import torch

from meddiff.devices import misplaced_components, run_device
from meddiff.precision import tf32_enabled

pytestmark = pytest.mark.gpu


def _tiny(tmp_path, **kw):
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import TrainConfig

    return TrainConfig(
        data="phantom:?n=32&seed=3",
        out=str(tmp_path),
        max_steps=6,
        batch_size=8,
        checkpoint_every=3,
        lr_warmup_steps=1,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
        **kw,
    )


def test_pixel_training_uses_the_gpu_in_mixed_precision_and_samples_there(tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.models.storage import load_pipeline
    from meddiff.sampling.generate import SamplingSettings, sample
    from meddiff.training.loop import train

    config = _tiny(tmp_path)
    result = train(config, load_dataset(config.data, 32), progress=False)
    assert result.precision in ("bf16", "fp16")
    assert tf32_enabled()  # fp32 matmuls left outside autocast use TF32 tensor cores
    pipe = load_pipeline(result.pipeline_dir, device=run_device())
    assert pipe.device.type == "cuda" and misplaced_components(pipe, run_device()) == []
    images = sample(pipe, torch.zeros(4, 0), SamplingSettings(steps=4, precision=result.precision), progress=False)
    assert images.shape[0] == 4 and torch.isfinite(torch.as_tensor(images)).all()


def test_resume_on_the_gpu_continues_the_stream(tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.training.loop import train

    data = load_dataset("phantom:?n=32&seed=3", 32)
    train(_tiny(tmp_path / "a", max_steps=3), data, progress=False)
    resumed = train(_tiny(tmp_path / "a", resume="latest"), data, progress=False)
    assert resumed.steps == 6


def test_finetune_lora_and_unet_validate_and_export_on_the_gpu(tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.testing import build_tiny_stable_diffusion
    from meddiff.training.config import FinetuneConfig, TrainConfig
    from meddiff.training.loop import train

    base = build_tiny_stable_diffusion(tmp_path / "sd")
    data = load_dataset("phantom:?n=40&seed=5", 32)  # more than one encoding batch (32)
    for mode in ("lora", "unet"):
        out = tmp_path / mode
        config = TrainConfig(
            data="phantom:?n=40&seed=5",
            out=str(out),
            method="finetune",
            resolution=32,
            batch_size=4,
            max_steps=2,
            checkpoint_every=0,
            lr_warmup_steps=1,
            finetune=FinetuneConfig(
                pretrained=str(base),
                method=mode,
                validation_every=1,
                validation_images=1,
                validation_prompts=["chest x-ray"],
            ),
        )
        train(config, data, progress=False)
        assert (out / "validation" / "final.png").is_file() and (out / "validation" / "step-0000001.png").is_file()


def test_fidelity_classifier_trains_on_the_gpu(tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.classifier import predict, train_classifier

    data = load_dataset("phantom:?n=32&seed=3", 32)
    model = train_classifier(data, epochs=1, batch_size=8)
    assert next(model.parameters()).device.type == "cuda"
    assert predict(model, data.images[:4]).shape == (4, len(data.label_names))
