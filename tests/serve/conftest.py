import pytest


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A tiny text-only (prompt-conditioned) pixel model: a few steps, for plumbing tests."""
    from meddiff.data.spec import load_dataset
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import train

    out = tmp_path_factory.mktemp("text_run")
    cfg = TrainConfig(
        data="phantom:?n=32&seed=3",
        out=str(out),
        max_steps=2,
        batch_size=8,
        checkpoint_every=0,
        lr_warmup_steps=1,
        conditioning="text",
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
    )
    train(cfg, load_dataset(cfg.data, 32), progress=False)
    return out


@pytest.fixture(scope="session")
def volume_run(tmp_path_factory):
    """A tiny 3D latent diffusion run on 16^3 brain phantoms (autoencoder and U-Net, two steps each; plumbing, not
    quality): RUN/pipeline/volume_pipeline.json, conditioned on Tumour (the data's "Tumour volume mL" is a
    measurement, no condition)."""
    from meddiff.data.spec import load_dataset
    from meddiff.models.volume import VolumeModelConfig
    from meddiff.models.volume_autoencoder import VolumeAutoencoderConfig
    from meddiff.models.volume_unet import VolumeUNetConfig
    from meddiff.training.config import LatentConfig, TrainConfig
    from meddiff.training.loop import train

    root = tmp_path_factory.mktemp("volume_run")
    tiny = VolumeModelConfig(
        size=16,
        autoencoder=VolumeAutoencoderConfig(channels=[8, 16, 16], norm_num_groups=8, scale_samples=4),
        unet=VolumeUNetConfig(
            channels=[16, 32], attention_levels=[False, True], norm_num_groups=8, num_head_channels=8
        ),
    )
    dataset = load_dataset("phantom3d:?n=8&size=16", 16)
    common = dict(
        max_steps=2, batch_size=2, checkpoint_every=0, lr_warmup_steps=1, precision="fp32", threads=1, volume=tiny
    )
    train(TrainConfig(out=str(root / "ae"), method="volume-autoencoder", **common), dataset, progress=False)
    latent = LatentConfig(autoencoder=str(root / "ae"))
    result = train(
        TrainConfig(out=str(root / "run"), method="volume-latent", latent=latent, **common), dataset, progress=False
    )
    return result.run_dir
