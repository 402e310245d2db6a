"""The latent workflow through the command line: train-autoencoder -> train --method latent -> generate with a
prompt and --animate (one GIF per image, noise to image, latent beside it)."""

import json

import pytest
from PIL import Image

from meddiff.cli import main


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_latent_workflow_on_the_command_line(phantom_dir, tmp_path, capsys):
    ae, ld, gen = tmp_path / "ae", tmp_path / "ld", tmp_path / "gen"
    assert (
        main(
            [
                "train-autoencoder",
                "--data",
                f"phantom:{phantom_dir}",
                "--kind",
                "kl",
                "--resolution",
                "32",
                "--downsample",
                "4",
                "--out",
                str(ae),
                "--max-steps",
                "3",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "held-out PSNR" in out and "scaling factor" in out
    metrics = json.loads((ae / "metrics.json").read_text())
    assert metrics["latent_shape"] == [4, 8, 8] and metrics["psnr"] > 0 and metrics["ssim"] is not None
    assert (ae / "reconstructions.png").is_file() and (ae / "report.html").is_file() and (ae / "README.md").is_file()

    assert (
        main(
            [
                "train",
                "--method",
                "latent",
                "--autoencoder",
                str(ae),
                "--data",
                f"phantom:{phantom_dir}",
                "--resolution",
                "32",
                "--conditioning",
                "text",
                "--out",
                str(ld),
                "--max-steps",
                "2",
                "--batch-size",
                "8",
                "--no-eval",
            ]
        )
        == 0
    )
    summary = json.loads((ld / "metrics.json").read_text())
    assert summary["conditioning"] == "text" and summary["latent"]["autoencoder"] == "AutoencoderKL"
    assert "StableDiffusionPipeline" in (ld / "README.md").read_text()

    assert (
        main(
            [
                "generate",
                "--model",
                str(ld),
                "--prompt",
                "chest x-ray with edema",
                "--negative-prompt",
                "normal chest x-ray",
                "--n",
                "2",
                "--steps",
                "3",
                "--animate",
                "--out",
                str(gen),
            ]
        )
        == 0
    )
    gifs = sorted((gen / "animations").glob("*.gif"))
    assert [g.name for g in gifs] == ["0000000.gif", "0000001.gif"]
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 3 and gif.size == (128 * 2 + 4, 128)  # decoded image | latent channels
    assert "chest x-ray with edema" in (gen / "manifest.csv").read_text()

    # labels on a text model become prompts; a labels-only model refuses prompts
    assert (
        main(
            [
                "generate",
                "--model",
                str(ld),
                "--labels",
                "Edema",
                "--n",
                "1",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "g2"),
            ]
        )
        == 0
    )
    assert "chest x-ray with edema" in (tmp_path / "g2" / "manifest.csv").read_text()
    assert (
        main(
            [
                "train",
                "--method",
                "latent",
                "--data",
                f"phantom:{phantom_dir}",
                "--out",
                str(tmp_path / "x"),
                "--max-steps",
                "1",
            ]
        )
        == 2
    )
    assert "needs a trained autoencoder" in capsys.readouterr().err


def test_pixel_generate_animate_has_no_latent_panel(tiny_run, tmp_path):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_run),
                "--labels",
                "Edema",
                "--n",
                "1",
                "--steps",
                "2",
                "--animate",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "g" / "animations" / "0000000.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (128, 128)
