"""CLI behaviour, including one-line errors (no traceback) for bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from meddiff.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "meddiff", *args], capture_output=True, text=True, timeout=1200)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("meddiff: error")]
    assert "Traceback" not in err and len(errors) == 1, err  # progress lines (logging) may precede the error
    assert errors[0] == err.splitlines()[-1] and pattern in errors[0], err


def test_data_errors(capsys, tmp_path):
    one_line_error(capsys, ["data", "inspect", "nope:x"], "unknown dataset kind 'nope'")
    one_line_error(capsys, ["data", "inspect", f"phantom:{tmp_path / 'missing'}"], "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["data", "inspect", f"phantom:{tmp_path / 'empty'}"], "no train.csv")
    one_line_error(capsys, ["data", "phantom", "--out", str(tmp_path / "p"), "--size", "8"], "between 32 and 256")


def test_train_errors(capsys, tmp_path, phantom_dir):
    one_line_error(capsys, ["train", "--data", "nope:x", "--out", str(tmp_path)], "unknown dataset kind")
    one_line_error(
        capsys,
        [
            "train",
            "--data",
            f"phantom:{phantom_dir}",
            "--out",
            str(tmp_path / "r"),
            "--resume",
            "latest",
            "--max-steps",
            "2",
        ],
        "no checkpoint",
    )
    one_line_error(capsys, ["train", "--out", str(tmp_path)], "no training data")
    one_line_error(
        capsys,
        ["train", "--data", f"phantom:{phantom_dir}", "--out", str(tmp_path), "--config", str(tmp_path / "none.yaml")],
        "config file",
    )


def test_generate_errors(capsys, tmp_path, tiny_run):
    one_line_error(
        capsys,
        ["generate", "--model", str(tmp_path / "none"), "--labels", "Edema", "--out", str(tmp_path / "o")],
        "does not exist",
    )
    (tmp_path / "half").mkdir()
    one_line_error(
        capsys,
        ["generate", "--model", str(tmp_path / "half"), "--labels", "Edema", "--out", str(tmp_path / "o")],
        "incomplete",
    )
    one_line_error(
        capsys,
        ["generate", "--model", str(tiny_run), "--labels", "Cardiomegaly,Broken Heart", "--out", str(tmp_path / "o")],
        "unknown label 'Broken Heart'",
    )


def test_generate_balance_writes_equal_counts_per_label(tmp_path, tiny_run):
    out = tmp_path / "bal"
    command = ["generate", "--model", str(tiny_run), "--balance", "--per-condition", "2", "--out", str(out)]
    assert main([*command, "--steps", "1"]) == 0
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    names = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Edema"]
    present = [[n for n in names if r.get(n) == "1.0"] for r in rows]
    assert all(len(p) == 1 for p in present)  # each image: one label present, the others absent
    assert sorted(p[0] for p in present) == sorted(names * 2)


def test_generate_writes_images_and_manifest(tmp_path, tiny_run):
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_run),
                "--labels",
                "Cardiomegaly,Pleural Effusion",
                "--n",
                "3",
                "--out",
                str(out),
                "--steps",
                "3",
                "--seed",
                "7",
                "--scheduler",
                "ddim",
            ]
        )
        == 0
    )
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all((out / r["Path"]).is_file() for r in rows)
    assert rows[0]["Cardiomegaly"] == "1.0" and rows[0]["Pleural Effusion"] == "1.0" and rows[0]["Edema"] == "0.0"
    assert len({r["seed"] for r in rows}) == 3
    assert rows[0]["steps"] == "3" and rows[0]["guidance"] == "2.0" and rows[0]["scheduler"] == "ddim"
    from PIL import Image

    im = Image.open(out / rows[0]["Path"])
    assert im.mode == "L" and im.size == (32, 32) and "SYNTHETIC" in im.text["meddiff"]
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_run),
                "--unconditional",
                "--n",
                "2",
                "--out",
                str(tmp_path / "u"),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    with open(tmp_path / "u" / "manifest.csv") as f:
        assert list(csv.DictReader(f))[0]["Cardiomegaly"] == ""


def test_subprocess_error_has_no_traceback(tmp_path):
    code, _, err = run_cli("generate", "--model", str(tmp_path), "--labels", "x", "--out", str(tmp_path / "o"))
    assert code == 2 and "Traceback" not in err and err.startswith("meddiff: error:")


@pytest.mark.slow
def test_train_command_writes_a_complete_run(tmp_path, phantom_dir):
    run = tmp_path / "run"
    train = ("train", "--data", f"phantom:{phantom_dir}", "--out", str(run), "--batch-size", "8")
    small_grids = ("--eval.grid-per-label", "2", "--sample-steps", "4")  # the default grids: most of the time
    code, out, err = run_cli(*train, "--max-steps", "6", *small_grids)
    assert code == 0, err
    for name in (
        "pipeline/model_index.json",
        "pipeline/pipeline.py",
        "config.yaml",
        "README.md",
        "metrics.json",
        "samples/grid_cardiomegaly.png",
        "samples/grid_unconditional.png",
        "training.json",
    ):
        assert (run / name).is_file(), name
    card = (run / "README.md").read_text()
    assert "not for diagnosis" in card.lower() and "Cardiomegaly" in card
    # a 6-step run is too short to judge: grids, but no fidelity table, and the card and metrics.json say why
    assert "(not measured)" in card and "6 training steps is too short to judge" in card
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fidelity"] is None and "eval.min_steps 200" in metrics["evaluation_note"]
    code, out, err = run_cli(*train, "--max-steps", "8", "--resume", "latest", "--no-eval")
    assert code == 0 and "resumed from" in err and "step 6" in err, err  # logged: stderr


def test_report_commands_run_on_the_main_launch_process_only(tmp_path, monkeypatch, capsys, tiny_run):
    """Under accelerate launch / torchrun, evaluate and fidelity write one report: the other processes stop."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert (
        main(["evaluate", "--real", "phantom:?n=8", "--synthetic", str(tmp_path), "--out", str(tmp_path / "ev")]) == 0
    )
    assert main(["fidelity", "--model", str(tiny_run), "--data", "phantom:?n=8", "--out", str(tmp_path / "fi")]) == 0
    out = capsys.readouterr().out
    assert out.count("runs on the main process only") == 2 and "process 1 of 2" in out
    assert not (tmp_path / "ev").exists() and not (tmp_path / "fi").exists()


def test_every_recipe_key_is_a_flag_of_each_training_command():
    """Options come from TrainConfig: each key is listed in --help (nested keys as --section.key, the command's own
    section also unprefixed); kept spellings from earlier versions still parse to the same keys."""
    from meddiff.cli import build_parser
    from meddiff.options import walk
    from meddiff.training.config import TrainConfig

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for command, home in (("train", ""), ("finetune", "finetune"), ("train-autoencoder", "autoencoder")):
        text = subparsers.choices[command].format_help()
        for key, _, _ in walk(TrainConfig):
            if key == "method" and home:
                continue  # the command fixes it
            flag = "--" + (key.split(".", 1)[1] if home and key.startswith(home + ".") else key).replace("_", "-")
            assert flag in text, (command, key)
    from meddiff.sampling.generate import SamplingSettings

    generate = subparsers.choices["generate"].format_help()
    for key, _, _ in walk(SamplingSettings):
        assert "--" + key.replace("_", "-") in generate, key


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            [
                "train",
                "--prediction",
                "v_prediction",
                "--no-eval",
                "--autoencoder",
                "AE",
                "--text-encoder",
                "E",
                "--train-text-encoder",
                "--shuffle-findings",
                "--max-steps",
                "3",
            ],
            {
                "model.prediction_type": "v_prediction",
                "eval.fidelity": False,
                "latent.autoencoder": "AE",
                "text.encoder": "E",
                "text.train_encoder": True,
                "text.shuffle_findings": True,
                "max_steps": 3,
            },
        ),
        (
            [
                "finetune",
                "--method",
                "lora",
                "--lora-rank",
                "4",
                "--use-8bit-adam",
                "--no-ema",
                "--snr-gamma",
                "0",
                "--caption-dropout",
                "0.2",
                "--validation-prompt",
                "a",
                "--validation-prompt",
                "b",
                "--text-encoder",
                "E",
                "--train-text-encoder",
            ],
            {
                "finetune.method": "lora",
                "finetune.lora_rank": 4,
                "optimizer": "adamw8bit",
                "ema": False,
                "snr_gamma": None,
                "cond_dropout": 0.2,
                "finetune.validation_prompts": ["a", "b"],
                "finetune.text_encoder": "E",
                "finetune.train_text_encoder": True,
            },
        ),
        (
            [
                "train-autoencoder",
                "--kind",
                "vq",
                "--downsample",
                "8",
                "--codebook-size",
                "64",
                "--model.layers-per-block",
                "3",
            ],
            {
                "autoencoder.kind": "vq",
                "autoencoder.downsample": 8,
                "autoencoder.codebook_size": 64,
                "model.layers_per_block": 3,
            },
        ),
    ],
)
def test_flags_map_to_config_keys(argv, expected):
    from meddiff.cli import build_parser
    from meddiff.options import given

    assert given(build_parser().parse_args(argv)) == expected


def test_bad_recipe_and_flag_values_are_one_line(capsys, tmp_path, phantom_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  prediction_type: v-pred\n")
    data = ["--data", f"phantom:{phantom_dir}", "--out", str(tmp_path / "run")]
    one_line_error(
        capsys,
        ["train", *data, "--config", str(recipe)],
        "config key 'model.prediction_type' = 'v-pred' is not one of epsilon, v_prediction",
    )
    recipe.write_text("bach_size: 4\n")
    one_line_error(capsys, ["train", *data, "--config", str(recipe)], "did you mean batch_size")
    recipe.write_text("- a list\n")
    one_line_error(capsys, ["train", *data, "--config", str(recipe)], "must hold a mapping")
    with pytest.raises(SystemExit) as info:
        main(["train", *data, "--model.prediction-type", "x"])
    assert info.value.code == 2 and "is not one of epsilon, v_prediction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--lora-rank", "0"])
    assert "below the minimum 1" in capsys.readouterr().err


def test_finetune_method_defaults_sit_below_recipe_and_flags(monkeypatch, tmp_path):
    import meddiff.workflow as workflow

    seen = []
    monkeypatch.setattr(workflow, "finetune_and_report", lambda config: seen.append(config))
    base = ["finetune", "--pretrained", "SD", "--data", "phantom:?n=4", "--out", str(tmp_path / "run")]
    assert main([*base, "--method", "lora"]) == 0
    assert (seen[-1].method, seen[-1].resolution, seen[-1].batch_size) == ("finetune", 512, 4)
    assert seen[-1].learning_rate == workflow.FINETUNE_LEARNING_RATES["lora"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resolution: 256\nfinetune:\n  method: textual-inversion\n")
    assert main([*base, "--config", str(recipe), "--batch-size", "2"]) == 0
    cfg = seen[-1]
    assert (cfg.resolution, cfg.batch_size, cfg.finetune.method) == (256, 2, "textual-inversion")
    assert cfg.learning_rate == workflow.FINETUNE_LEARNING_RATES["textual-inversion"]


def test_pixel_defaults_follow_the_image_size_below_recipe_and_flags(monkeypatch, tmp_path):
    import meddiff.workflow as workflow
    from meddiff.training.recipes import PIXEL_64, size_defaults

    assert size_defaults(28, None) == ({}, None) and size_defaults(64, "latent") == ({}, None)
    assert size_defaults(64, "pixel")[0] == PIXEL_64 and "latent model" in str(size_defaults(128, None)[1])
    seen = []
    monkeypatch.setattr(workflow, "train_and_report", lambda config: seen.append(config))
    base = ["train", "--data", "phantom:?n=4", "--out", str(tmp_path / "run")]
    assert main(base) == 0  # 32 px: the built-in (28 px) recipe
    assert (seen[-1].model.block_out_channels, seen[-1].model.objective) == ([32, 64, 128], "diffusion")
    assert main([*base, "--resolution", "64"]) == 0
    m = seen[-1].model
    assert (m.block_out_channels, m.layers_per_block, m.attention_max_resolution, m.objective) == (
        [32, 64, 128, 128], 1, 16, "flow",
    )  # fmt: skip
    assert main([*base, "--resolution", "64", "--model.objective", "diffusion", "--model.layers-per-block", "2"]) == 0
    assert (seen[-1].model.objective, seen[-1].model.layers_per_block) == ("diffusion", 2)  # flags win
    assert seen[-1].model.block_out_channels == [32, 64, 128, 128]
    assert main([*base, "--resolution", "64", "--model.prediction-type", "v_prediction"]) == 0
    m = seen[-1].model  # a diffusion-only flag keeps the diffusion objective (flow would ignore it)
    assert (m.objective, m.prediction_type, m.block_out_channels) == ("diffusion", "v_prediction", [32, 64, 128, 128])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resolution: 64\n")
    assert main([*base, "--config", str(recipe)]) == 0  # a recipe is taken as it is
    assert (seen[-1].resolution, seen[-1].model.objective, seen[-1].model.block_out_channels) == (
        64, "diffusion", [32, 64, 128],
    )  # fmt: skip


def test_commands_without_recipes_do_not_import_the_training_stack():
    """`meddiff env --check` must work when torch is broken: its parser builds no config flags."""
    code = (
        "import sys; from meddiff.cli import build_parser; build_parser(config_flags=()).parse_args(['env']); "
        "print('torch' in sys.modules, 'meddiff.training.config' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.split() == ["False", "False"]


def test_the_64_px_default_recipe_is_the_shipped_brain_mri_recipe():
    """PIXEL_64 and configs/alzheimer-mri-64.yaml say the same model: the default is what was measured."""
    import yaml

    from meddiff.training.recipes import PIXEL_64

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "alzheimer-mri-64.yaml").read_text())
    assert {f"model.{k}": v for k, v in recipe["model"].items()} == PIXEL_64
