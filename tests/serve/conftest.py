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
