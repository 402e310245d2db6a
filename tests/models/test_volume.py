"""3D models: MONAI autoencoder and conditioned U-Net, and the VolumePipeline saved and loaded in one call."""

import json

import pytest
import torch

from meddiff.errors import MeddiffError
from meddiff.models.volume import VolumeModelConfig, volume_preset
from meddiff.models.volume_autoencoder import VolumeAutoencoder, VolumeAutoencoderConfig
from meddiff.models.volume_pipeline import VolumeGrid, VolumePipeline
from meddiff.models.volume_unet import VolumeUNet, VolumeUNetConfig, build_volume_sampler

TINY_AE = VolumeAutoencoderConfig(channels=[8, 16, 16], norm_num_groups=8)
TINY_UNET = VolumeUNetConfig(channels=[16, 32], attention_levels=[False, True], norm_num_groups=8, num_head_channels=8)
LABELS = ["tumour", "left"]


def tiny_pipeline(size=16, channels=2, labels=LABELS, seed=0) -> VolumePipeline:
    torch.manual_seed(seed)
    autoencoder = VolumeAutoencoder(TINY_AE, in_channels=channels, scaling_factor=0.8)
    unet = VolumeUNet(TINY_UNET, autoencoder.latent_channels, len(labels))
    names = ["flair", "t1c"][:channels]
    grid = VolumeGrid(shape=[size] * 3, spacing=[1.0, 1.0, 1.5], channel_names=names)
    return VolumePipeline(autoencoder, unet, build_volume_sampler(TINY_UNET), grid, labels, trained_on="random test")


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("size,channels", [(16, 1), (32, 2)])
def test_autoencoder_shapes(kind, size, channels):
    ae = VolumeAutoencoder(VolumeAutoencoderConfig(kind=kind, channels=[8, 16, 16], norm_num_groups=8), channels)
    x = torch.rand(2, channels, size, size, size) * 2 - 1
    moments = ae.encode(x).latent_dist
    assert moments.mean.shape == (2, 4, size // 4, size // 4, size // 4) == moments.std.shape
    assert ae.latent_shape([size] * 3) == (4, size // 4, size // 4, size // 4)
    recon, regulariser = ae.round_trip(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and regulariser.ndim == 0 and torch.isfinite(regulariser)
    assert (moments.std == 0).all() == (kind == "vq")
    decoded = ae.decode_latents(moments.mean)
    assert decoded.shape == x.shape and decoded.abs().max() <= 1


def test_bad_volumes_are_one_line_errors():
    ae = VolumeAutoencoder(TINY_AE, 1)
    with pytest.raises(MeddiffError, match="divisible"):
        ae.encode(torch.zeros(1, 1, 18, 16, 16))
    with pytest.raises(MeddiffError, match=r"\(N, 1, D, H, W\)"):
        ae.encode(torch.zeros(1, 16, 16, 16))  # a 2D batch where volumes are expected
    with pytest.raises(MeddiffError, match="norm_num_groups"):
        VolumeAutoencoder(VolumeAutoencoderConfig(channels=[12, 16, 16], norm_num_groups=8), 1)
    with pytest.raises(MeddiffError, match="attention level"):
        VolumeUNet(VolumeUNetConfig(channels=[16, 32], attention_levels=[False, False], norm_num_groups=8), 4, 2)
    with pytest.raises(MeddiffError, match="is not"):
        VolumeAutoencoderConfig(downsample=3)
    unet = VolumeUNet(TINY_UNET, 4, 2)
    with pytest.raises(MeddiffError, match=r"\(B, 4\)"):
        unet(torch.zeros(1, 4, 4, 4, 4), torch.tensor([1]), torch.zeros(1, 3))


def test_unet_conditioning_changes_the_prediction_and_zero_is_unconditional():
    torch.manual_seed(0)
    unet = VolumeUNet(TINY_UNET, 4, 2).eval()
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([500, 500])
    with torch.no_grad():
        for p in unet.net.parameters():  # MONAI zero-initialises output projections; wake them up
            p.add_(0.05 * torch.randn_like(p))
        zero = unet(x, t, torch.zeros(2, 4))
        none = unet(x, t, None)
        cond = unet(x, t, torch.tensor([[1.0, 0, 1, 1], [0, 0, 1, 1]]))
    assert zero.shape == x.shape
    assert torch.equal(zero, none)
    assert (cond - zero).abs().max() > 1e-4
    assert (cond[0] - cond[1]).abs().max() > 1e-4  # tumour vs no tumour differ on the same noise


def test_labels_reach_the_unet_through_the_timestep_embedding_too(tmp_path):
    torch.manual_seed(0)
    unet = VolumeUNet(TINY_UNET, 4, 2).eval()
    x, t = torch.randn(1, 4, 4, 4, 4).expand(2, -1, -1, -1, -1), torch.tensor([500, 500])  # the same noise
    tumour = torch.tensor([[1.0, 0, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        for p in unet.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, p in unet.net.named_parameters():  # cut the cross-attention path: only the embedding is left
            if "attn2.to_k" in name or "attn2.to_v" in name:
                p.zero_()
        cond = unet(x, t, tumour)
        assert (cond[0] - cond[1]).abs().max() > 1e-4
        unet.net.class_embedding.weight.zero_()  # and without that one the labels change nothing
        cond = unet(x, t, tumour)
        assert torch.allclose(cond[0], cond[1], atol=1e-6)
    # a model saved before the option existed (its config has no label_embedding) loads without that path
    old = VolumeUNet(VolumeUNetConfig(**{**TINY_UNET.to_dict(), "label_embedding": False}), 4, 2)
    folder = old.save_pretrained(tmp_path / "old")
    meta = json.loads((folder / "config.json").read_text())
    del meta["config"]["label_embedding"]
    (folder / "config.json").write_text(json.dumps(meta))
    loaded = VolumeUNet.from_pretrained(folder)
    assert loaded.net.num_class_embeds is None and not loaded.config.label_embedding
    assert VolumeUNet.from_pretrained(unet.save_pretrained(tmp_path / "new")).config.label_embedding


def test_unconditional_unet_when_there_are_no_labels():
    unet = VolumeUNet(TINY_UNET, 4, 0)
    assert unet.condition_width == 0 and unet.net.with_conditioning is False
    assert unet(torch.randn(1, 4, 4, 4, 4), torch.tensor(3)).shape == (1, 4, 4, 4, 4)


def test_pipeline_generates_volumes_in_range():
    pipe = tiny_pipeline()
    volumes = pipe(
        pipe.encode_labels([["tumour"], []]), num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert volumes.shape == (2, 2, 16, 16, 16)
    assert volumes.dtype == torch.float32 and volumes.min() >= -1 and volumes.max() <= 1
    assert pipe(num_volumes=3, num_inference_steps=1).shape == (3, 2, 16, 16, 16)


def test_guidance_doubles_the_batch():
    pipe = tiny_pipeline()
    batches = []
    pipe.unet.net.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    conditions = pipe.encode_labels([["tumour"], ["left"], []])
    pipe(conditions, guidance_scale=3.0, num_inference_steps=2)
    assert batches == [6, 6]
    batches.clear()
    pipe(conditions, guidance_scale=1.0, num_inference_steps=2)  # scale 1 is the conditional model alone
    assert batches == [3, 3]


def test_guidance_follows_the_formula():
    pipe = tiny_pipeline()
    with torch.no_grad():
        for p in pipe.unet.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t, c = torch.randn(2, 4, 4, 4, 4), torch.tensor(400), pipe.encode_labels([["tumour"], []])
        uncond, cond = pipe.unet(x, t, torch.zeros_like(c)), pipe.unet(x, t, c)
        guided = pipe.predict(x, t, c, 2.5)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    pipe = tiny_pipeline(channels=2)
    folder = pipe.save_pretrained(tmp_path / "pipe")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "autoencoder/config.json",
        "autoencoder/model.safetensors",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/model.safetensors",
        "volume_pipeline.json",
    ]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    card = (folder / "README.md").read_text()
    assert "not for diagnosis" in card.lower()
    assert "tumour, left" in card and "[1.0, 1.0, 1.5]" in card and "flair" in card
    loaded = VolumePipeline.from_pretrained(folder, device="cpu")
    assert loaded.label_names == LABELS and loaded.grid == pipe.grid
    assert loaded.autoencoder.scaling_factor == pytest.approx(0.8)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    conditions = pipe.encode_labels([["tumour", "left"], []])
    a = pipe(conditions, num_inference_steps=3, generator=torch.Generator().manual_seed(7))
    b = loaded(conditions, num_inference_steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = loaded(conditions, num_inference_steps=3, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)


def test_loading_bad_folders_is_one_line(tmp_path):
    with pytest.raises(MeddiffError, match="no volume pipeline"):
        VolumePipeline.from_pretrained(tmp_path)
    folder = tiny_pipeline(channels=1).save_pretrained(tmp_path / "pipe")
    meta = json.loads((folder / "unet" / "config.json").read_text())
    meta["num_labels"] = 3  # the weights no longer fit the network the config describes
    (folder / "unet" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(MeddiffError, match="does not fit"):
        VolumePipeline.from_pretrained(folder)
    (folder / "unet" / "model.safetensors").write_bytes(b"not a safetensors file")
    meta["num_labels"] = 2
    (folder / "unet" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(MeddiffError, match="could not read"):
        VolumePipeline.from_pretrained(folder)


def test_pipeline_checks_its_parts():
    ae = VolumeAutoencoder(TINY_AE, 1)
    with pytest.raises(MeddiffError, match="label names"):
        VolumePipeline(
            ae, VolumeUNet(TINY_UNET, 4, 2), build_volume_sampler(TINY_UNET), VolumeGrid(shape=[16] * 3), ["tumour"]
        )
    with pytest.raises(MeddiffError, match="unknown label"):
        tiny_pipeline().encode_labels([["cardiomegaly"]])
    with pytest.raises(MeddiffError, match="3 sizes"):
        VolumeGrid(shape=[16, 16])


def test_grid_default_affine_holds_the_spacing():
    grid = VolumeGrid(shape=[8, 8, 8], spacing=[1, 2, 3])
    assert [grid.affine[i][i] for i in range(4)] == [1.0, 2.0, 3.0, 1.0]


def test_to_moves_every_network():
    pipe = tiny_pipeline().to("cpu")
    devices = {p.device for m in (pipe.autoencoder, pipe.unet) for p in m.parameters()}
    assert devices == {torch.device("cpu")} and pipe.device == torch.device("cpu")


def test_presets():
    cpu = volume_preset("cpu64")
    assert cpu == VolumeModelConfig() and cpu.size // cpu.autoencoder.downsample == 16
    gpu = volume_preset("gpu128")
    assert gpu.size == 128 and gpu.size // gpu.autoencoder.downsample == 32
    with pytest.raises(MeddiffError):
        volume_preset("tpu")


def test_zero_condition_with_guidance_is_the_unconditional_sample():
    pipe = tiny_pipeline()
    zero = pipe(
        torch.zeros(2, 4), guidance_scale=3.0, num_inference_steps=2, generator=torch.Generator().manual_seed(1)
    )
    plain = pipe(num_volumes=2, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-5)
