"""Train a small model on phantoms for a few minutes and check that conditioning works: a classifier trained
on real phantoms recognises Cardiomegaly and Pleural Effusion in images generated for those labels."""

import json

import pytest

from meddiff.data.phantom_dataset import write_phantom_folder
from meddiff.training.config import EvalConfig, TrainConfig
from meddiff.workflow import train_and_report


@pytest.mark.slow
def test_label_conditioned_generation_is_faithful(tmp_path):
    data = tmp_path / "phantoms"
    write_phantom_folder(data, n=1500, size=64, seed=3, progress=False)
    config = TrainConfig(
        data=f"phantom:{data}",
        out=str(tmp_path / "run"),
        resolution=32,
        max_steps=900,
        checkpoint_every=0,
        eval=EvalConfig(fidelity_samples=256, classifier_epochs=8, grid_per_label=8),
    )
    summary = train_and_report(config, progress=False)
    fid = summary["fidelity"]
    print(json.dumps(fid, indent=1))
    assert fid["real_auc"]["Cardiomegaly"] > 0.9
    assert fid["synthetic_auc"]["Cardiomegaly"] >= 0.8, fid
    assert fid["synthetic_auc"]["Pleural Effusion"] >= 0.8, fid
    assert (tmp_path / "run" / "samples" / "grid_pleural_effusion.png").is_file()
