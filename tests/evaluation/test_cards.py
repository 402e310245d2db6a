"""Each command's model card (train, train-autoencoder, finetune): written by the one writer, metadata that
huggingface_hub parses, and the fields that command's card has always carried."""

import pytest
from huggingface_hub import ModelCard

from meddiff.evaluation.cards import write_autoencoder_card, write_finetune_card, write_model_card
from meddiff.evaluation.results import (
    AutoencoderReport,
    FidelityReport,
    LatentSummary,
    PromptResponseReport,
    RunSummary,
)
from meddiff.training.config import FinetuneConfig, TrainConfig
from meddiff.training.summary import AutoencoderTraining, FinetuneSummary

NAMES = ["Cardiomegaly", "Pleural Effusion"]
COMBO = "chest x-ray with cardiomegaly and pleural effusion"


def _run_summary(conditioning="labels", latent=None, fidelity=True, prompts=False):
    response = PromptResponseReport(
        n_per_prompt=4,
        label_names=NAMES,
        positive_rate={COMBO: {"Cardiomegaly": 0.75, "Pleural Effusion": 0.5}},
        mean_probability={COMBO: {"Cardiomegaly": 0.7, "Pleural Effusion": 0.4}},
        real_positive_rate={COMBO: {"Cardiomegaly": 1.0, "Pleural Effusion": None}},
        real_count={COMBO: 3},
    )
    report = FidelityReport(
        real_auc={"Cardiomegaly": 0.97, "Pleural Effusion": None},
        synthetic_auc={"Cardiomegaly": 0.81, "Pleural Effusion": 0.66},
        mean_real_auc=0.97,
        mean_synthetic_auc=0.735,
        n_real_heldout=20,
        n_synthetic=16,
        sampling={"steps": 2, "guidance": 2.0, "scheduler": "ddim"},
        seconds=3.0,
        prompt_response=response if prompts else None,
    )
    return RunSummary(
        data="phantom:DIR",
        dataset="60 chest phantoms",
        label_names=NAMES,
        method="pixel",
        conditioning=conditioning,
        resolution=32,
        latent=latent,
        parameters=2_500_000,
        steps=6,
        batch_size=8,
        train_minutes=0.5,
        images_per_second=12.5,
        precision="fp32",
        prediction_type="v_prediction",
        cond_dropout=0.1,
        fidelity=report if fidelity else None,
        timings={"train_s": 30.0},
        grids={"unconditional": "samples/grid_unconditional.png"},
    )


def _card(path):
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text


def test_train_card(tmp_path):
    data, text = _card(write_model_card(tmp_path, _run_summary()))
    assert {
        "meddiff",
        "medical-imaging",
        "diffusers",
        "synthetic",
        "diffusion",
        "synthetic-data",
        "phantom",
        "label-conditional",
    } <= set(data["tags"])
    assert data["library_name"] == "diffusers" and data["license"] == "other" and "pipeline_tag" not in data
    for field in (
        "# meddiff model: phantom:DIR",
        "- spec: `phantom:DIR`",
        "- 60 chest phantoms",
        "- labels: Cardiomegaly, Pleural Effusion",
        "2.50 M parameters",
        "steps: 6, batch 8, 0.5 min",
        "12.5 img/s, precision fp32",
        "prediction: v_prediction; classifier-free guidance dropout 0.1",
        "conditioning: labels; pixel space",
        "| Cardiomegaly | 0.970 | 0.810 |",
        "| Pleural Effusion | n/a | 0.660 |",
        "16 generated",
        '--labels "Pleural Effusion"',
        "custom_pipeline='pipeline'",
        "Sample grids per label: `samples/`.",
        "## Intended use",
    ):
        assert field in text, field
    assert "not for diagnosis" in text.lower() and "Prompt response" not in text
    assert "--init-from" not in text
    started = _run_summary()
    started.init_from = "runs/public"  # --init-from: the card names the model it started from
    _, text = _card(write_model_card(tmp_path / "started", started))
    assert "- started from the trained U-Net of `runs/public` (`--init-from`)" in text


def test_text_latent_train_card_has_prompts_and_loads_as_stable_diffusion(tmp_path):
    latent = LatentSummary(autoencoder="AutoencoderKL", latent_channels=4, latent_size=8, scaling_factor=0.5123)
    data, text = _card(write_model_card(tmp_path, _run_summary("text", latent, prompts=True)))
    assert data["pipeline_tag"] == "text-to-image" and "latent-diffusion" in data["tags"]
    assert "latent space of a AutoencoderKL (4x8x8, scaling factor 0.5123)" in text
    assert f"| {COMBO} | 0.75 | 0.50 |" in text
    assert "| *real held-out images with these findings (n=3)* | 1.000 | n/a |" in text
    assert "StableDiffusionPipeline.from_pretrained('pipeline'" in text and "--prompt" in text
    assert "Sample grids per label" not in text


def test_train_card_without_fidelity_and_unconditional(tmp_path):
    summary = _run_summary("none", fidelity=False)
    summary.label_names = []
    data, text = _card(write_model_card(tmp_path, summary))
    assert data["pipeline_tag"] == "unconditional-image-generation" and "label-conditional" not in data["tags"]
    assert "(not measured)" in text and "- labels: (unconditional)" in text


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_card(tmp_path, kind):
    config = TrainConfig(data="medmnist:x.npz", out=str(tmp_path), method="autoencoder", resolution=32)
    report = AutoencoderReport(
        heldout_images=40,
        mse=0.00123,
        psnr=29.1,
        ssim=0.9123,
        ms_ssim=None,
        kind=kind,
        downsample=4,
        latent_shape=[4, 8, 8],
        scaling_factor=0.8765,
    )
    training = AutoencoderTraining(
        dataset="100 MedMNIST images",
        steps=30,
        train_minutes=1.25,
        images_per_second=9.0,
        precision="fp32",
        parameters=1000,
        config={"kind": kind},
    )
    data, text = _card(write_autoencoder_card(tmp_path, config, report, training))
    assert {"autoencoder", "medmnist", "medical-imaging"} <= set(data["tags"]) and "pipeline_tag" not in data
    model = "VQModel" if kind == "vq" else "AutoencoderKL"
    for field in (
        "# meddiff autoencoder: medmnist:x.npz",
        f"(diffusers {model})",
        "32 px -> latent 4x8x8 (downsample 4)",
        "latent scaling factor 0.8765",
        "- 100 MedMNIST images",
        "- 30 steps, 1.2 min",
        "40 images: MSE 0.00123, PSNR 29.10 dB, SSIM 0.9123",
        f"--autoencoder {tmp_path} --data medmnist:x.npz",
        f"{model}.from_pretrained('{tmp_path}/autoencoder')",
        "## Intended use",
        "not for diagnosis",
    ):
        assert field in text, field
    assert "MS-SSIM" not in text


@pytest.mark.parametrize("method", ["lora", "textual-inversion", "dreambooth"])
def test_finetune_card(tmp_path, method):
    ft = FinetuneConfig(
        pretrained="org/stable-diffusion",
        method=method,
        placeholder_token="<cxr>",
        num_vectors=2,
        instance_prompt="sks chest x-ray",
        class_prompt="chest x-ray",
    )
    config = TrainConfig(
        data="chexpert:DIR",
        out=str(tmp_path),
        method="finetune",
        resolution=64,
        batch_size=2,
        gradient_accumulation=3,
        finetune=ft,
    )
    export = tmp_path / "export"
    summary = FinetuneSummary(
        method=method,
        pretrained=ft.pretrained,
        dataset="12 CheXpert images",
        steps=5,
        train_minutes=0.25,
        images_per_second=4.5,
        precision="bf16",
        trainable_parameters=99,
        export=str(export),
    )
    data, text = _card(write_finetune_card(tmp_path, config, summary))
    assert data["base_model"] == "org/stable-diffusion" and data["pipeline_tag"] == "text-to-image"
    assert {method, "stable-diffusion", "chexpert", "medical-imaging", "diffusers"} <= set(data["tags"])
    for field in (
        f"# meddiff fine-tune ({method}) of org/stable-diffusion",
        "- data: 12 CheXpert images",
        "5 steps at 64 px, batch 2 x 3 accumulation, 0.25 min, 4.5 img/s, bf16",
        "three equal channels",
        "validation/final.png",
        f"meddiff serve --model {tmp_path}",
        "(BASE = org/stable-diffusion)",
        "not for diagnosis",
        "the terms of the training data and of the base model apply",
    ):
        assert field in text, field
    use = {
        "lora": f"pipe.load_lora_weights('{export}')",
        "textual-inversion": "token='<cxr>'",
        "dreambooth": f"from_pretrained('{export}', safety_checker=None)",
    }
    assert use[method] in text
    assert ("placeholder <cxr> (2 vectors)" in text) == (method == "textual-inversion")
    assert ("instance prompt 'sks chest x-ray'" in text) == (method == "dreambooth")


@pytest.mark.slow
def test_every_command_writes_its_card_through_the_writer(tmp_path, phantom_dir):
    """train-autoencoder, train and finetune on the command line: RUN/README.md parses, with each command's fields."""
    from meddiff.cli import main
    from meddiff.testing import build_tiny_stable_diffusion

    data = f"phantom:{phantom_dir}"
    ae, run, ft = tmp_path / "ae", tmp_path / "run", tmp_path / "ft"
    assert (
        main(
            [
                "train-autoencoder",
                "--data",
                data,
                "--kind",
                "kl",
                "--resolution",
                "32",
                "--downsample",
                "4",
                "--out",
                str(ae),
                "--max-steps",
                "2",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    meta, text = _card(ae / "README.md")
    assert "autoencoder" in meta["tags"] and "Held-out reconstruction" in text and "PSNR" in text
    assert (
        main(
            [
                "train",
                "--data",
                data,
                "--resolution",
                "32",
                "--out",
                str(run),
                "--max-steps",
                "2",
                "--batch-size",
                "8",
                "--no-eval",
            ]
        )
        == 0
    )
    meta, text = _card(run / "README.md")
    assert "diffusion" in meta["tags"] and "phantom" in meta["tags"] and "(not measured)" in text
    labels = next(line for line in text.splitlines() if line.startswith("- labels: "))
    assert "Cardiomegaly" in labels and "## Intended use" in text
    base = build_tiny_stable_diffusion(tmp_path / "base")
    assert (
        main(
            [
                "finetune",
                "--pretrained",
                str(base),
                "--data",
                data,
                "--method",
                "lora",
                "--resolution",
                "32",
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--out",
                str(ft),
            ]
        )
        == 0
    )
    meta, text = _card(ft / "README.md")
    assert meta["base_model"] == str(base) and "lora" in meta["tags"] and "load_lora_weights" in text
    for folder in (ae, run, ft):
        assert "not for diagnosis" in (folder / "README.md").read_text()


def test_every_card_has_a_privacy_section_that_calibration_fills_in(tmp_path):
    import json

    from meddiff.models.card import CardContent, update_privacy_section, write_card

    card = write_card(CardContent(title="a model"), tmp_path)
    text = card.read_text()
    assert "## Privacy" in text and "Not audited" in text and "shows no training images" in text
    assert text.index("## Privacy") < text.index("## Intended use")
    note = {
        "n_training_images": 300,
        "halves": "by patient (40 patients)",
        "calibration": {"alpha": 0.01, "detectors": ["pixel", "aligned"]},
        "measured": {
            "false_flag_rate": 0.008,
            "false_flag_interval": [0.003, 0.02],
            "n_test_negatives": 500,
            "recall": {"exact": 1.0, "shift": 0.95},
            "recall_interval": {"exact": [0.99, 1.0], "shift": [0.93, 0.97]},
            "n_positives": {"exact": 500, "shift": 500},
        },
    }
    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / "calibration.json").write_text(json.dumps(note))
    update_privacy_section(tmp_path)
    text = card.read_text()
    assert "Not audited" not in text and "measured 0.0080 [0.0030, 0.0200] on 500 new real images" in text
    assert "shift 0.950 [0.930, 0.970]" in text and "misses some shift copies" in text
    assert text.count("## Privacy") == 1 and text.count("## Intended use") == 1
    assert update_privacy_section(tmp_path / "nowhere") is None
    assert "Memorisation was not monitored" in text and "held-out image(s) duplicate" not in text
    # the checks during training (training.json) and held-out duplicates are stated
    note["heldout_duplicates"] = 8
    (tmp_path / "privacy" / "calibration.json").write_text(json.dumps(note))
    row = {"step": 500, "samples": 128, "alpha": 0.01, "copy_rate": 0.0, "copy_rate_low": 0.0, "copy_rate_high": 0.03}
    late = {"step": 1000, "copy_rate": 0.2, "copy_rate_low": 0.14, "copy_rate_high": 0.28, "warning": "x"}
    rows = [{**row, "training_images_hit": 0, "loss_gap": 0.002}, {**row, **late, "training_images_hit": 9}]
    (tmp_path / "training.json").write_text(json.dumps({"checks": {"privacy": rows}}))
    update_privacy_section(tmp_path)
    text = card.read_text()
    assert "Memorisation checks during training: 2 (steps 500-1000, 128 fixed-seed samples" in text
    assert "copy rate 0.200 [0.140, 0.280], 9 training image(s) hit" in text and "warnings at steps 1000" in text
    assert "8 held-out image(s) duplicate a training image" in text
    assert "Fusion: the largest standardised detector score." in text
    fusion = {"weights": {"aligned": 0.9, "pixel_margin": 0.5}, "n_fit": {"negatives": 250, "copies": 2000}}
    note["calibration"] |= {"n_calibration": 251, **fusion}
    (tmp_path / "privacy" / "calibration.json").write_text(json.dumps(note))
    update_privacy_section(tmp_path)
    assert (
        "Fusion: learned non-negative weights over aligned, pixel_margin (fitted on 2000 known copies of other "
        "training images against 250 held-out images; threshold read from 251 more)" in card.read_text()
    )
