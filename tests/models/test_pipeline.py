import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from meddiff.errors import MeddiffError
from meddiff.models.factory import ModelConfig, build_noise_scheduler, build_unet, make_sampler
from meddiff.models.storage import load_pipeline, resolve_model_dir
from meddiff.sampling.generate import SamplingSettings, sample


def test_unet_is_grayscale_and_attention_only_at_low_resolution():
    unet = build_unet(ModelConfig(), 32, 6)
    assert unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert unet.config.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert unet.config.projection_class_embeddings_input_dim == 12
    assert build_unet(ModelConfig(), 32, 0).config.class_embed_type is None
    # 28 px works although it does not halve evenly three times
    out = build_unet(ModelConfig(block_out_channels=[16, 32, 32]), 28, 2)(
        torch.randn(2, 1, 28, 28), torch.tensor([1, 500]), encoder_hidden_states=None, class_labels=torch.zeros(2, 4)
    ).sample
    assert out.shape == (2, 1, 28, 28)


def test_saved_pipeline_loads_with_plain_diffusers(tiny_run):
    folder = tiny_run / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "MedDiffusionPipeline" and index["label_names"][1] == "Cardiomegaly"
    assert list((folder / "unet").glob("*.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert unet.config.sample_size == 32
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    images = pipe(conditions=pipe.encode_labels([["Cardiomegaly"], []]), num_inference_steps=2).images
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()


def test_per_image_seeds_do_not_depend_on_batch_size(tiny_run):
    pipe = load_pipeline(tiny_run)
    cond = pipe.encode_labels([["Cardiomegaly"], ["Edema"], [], ["Pneumothorax"]])
    a = sample(pipe, cond, SamplingSettings(steps=3, batch_size=4, precision="fp32"), progress=False)
    b = sample(pipe, cond, SamplingSettings(steps=3, batch_size=1, precision="fp32"), progress=False)
    assert np.allclose(a, b, atol=1e-5)
    c = sample(pipe, cond, SamplingSettings(steps=3, batch_size=4, seed=1, precision="fp32"), progress=False)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("name", ["dpm++", "ddim", "pndm", "ddpm"])
def test_every_scheduler_samples(tiny_run, name):
    pipe = load_pipeline(tiny_run)
    images = sample(pipe, pipe.encode_labels([["Edema"]]), SamplingSettings(steps=4, scheduler=name), progress=False)
    assert images.shape == (1, 32, 32) and np.isfinite(images).all()


def test_unknown_scheduler_and_missing_model(tmp_path, tiny_run):
    with pytest.raises(MeddiffError, match="unknown scheduler"):
        make_sampler("euler-magic", load_pipeline(tiny_run).scheduler.config)
    with pytest.raises(MeddiffError, match="does not exist"):
        resolve_model_dir(tmp_path / "nothing")
    (tmp_path / "partial" / "pipeline" / "unet").mkdir(parents=True)
    (tmp_path / "partial" / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(MeddiffError, match="incomplete: unet/config.json is missing"):
        resolve_model_dir(tmp_path / "partial")


@pytest.mark.parametrize("name", ["dpm++", "ddpm", "unipc", "pndm", "flow euler", "flow dpm++", "flow heun"])
def test_image_to_image_starts_from_the_given_images(tiny_run, name):
    """strength s runs the last ~s of the schedule from the noised images: at small s the output stays close to
    them, at s = 1 it does not; the scheduler is left as a plain call expects it."""
    pipe = load_pipeline(tiny_run)
    train_config = pipe.scheduler.config
    if name.startswith("flow "):  # the mechanics only: this U-Net was not trained for flow
        train_config, name = build_noise_scheduler(ModelConfig(objective="flow")).config, name[5:]
    pipe.scheduler = make_sampler(name, train_config)
    cond = pipe.encode_labels([["Cardiomegaly"], ["Edema"]])
    init = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))

    def run(**kw):
        calls.clear()
        gens = [torch.Generator().manual_seed(k) for k in range(2)]
        out = pipe(conditions=cond, num_inference_steps=10, generator=gens, output_type="pt", **kw).images
        return out, len(calls)

    def corr(a, b):
        a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
        return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())

    plain, plain_calls = run()
    near, near_calls = run(init_images=init, strength=0.2)
    far, _ = run(init_images=init, strength=1.0)
    if name in ("pndm", "heun"):  # warm-up / second-order passes: fewer calls, whole steps kept
        assert 0 < near_calls < plain_calls / 3
    else:
        assert near_calls == 2 and plain_calls == 10
    assert corr(near, init) > 0.8 and corr(near, init) > corr(far, init) + 0.3
    again, _ = run()
    assert torch.allclose(plain, again, atol=1e-6)  # no begin index left behind
    with pytest.raises(ValueError, match="strength"):
        pipe(conditions=cond, init_images=init, strength=0.0)


def test_guidance_contrasts_against_the_null_inputs(tiny_run):
    """Guidance scale 0 keeps only the unconditional prediction: the same images as sampling with the pipeline's
    null inputs (all-zero label vectors), unguided."""
    pipe = load_pipeline(tiny_run)
    null = pipe.null_inputs(3)
    assert null["class_labels"].shape == (3, 2 * len(pipe.label_names)) and not null["class_labels"].any()
    assert null["encoder_hidden_states"] is None and "timestep_cond" not in null
    cond = pipe.encode_labels([["Cardiomegaly"], ["Edema"], []])
    g = torch.Generator().manual_seed(0)
    only_null = pipe(conditions=cond, num_inference_steps=3, guidance_scale=0.0, generator=g).images
    g = torch.Generator().manual_seed(0)
    unguided = pipe(conditions=null["class_labels"], num_inference_steps=3, guidance_scale=1.0, generator=g).images
    assert np.allclose(only_null, unguided, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    conditional = pipe(conditions=cond, num_inference_steps=3, guidance_scale=1.0, generator=g).images
    assert not np.allclose(only_null, conditional, atol=1e-4)
