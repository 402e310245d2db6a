"""CLI behaviour, including one-line errors (no traceback) for bad input."""

import csv
import subprocess
import sys

import pytest

from meddiff.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "meddiff", *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert pattern in err, err


def test_data_errors(capsys, tmp_path):
    one_line_error(capsys, ["data", "inspect", "nope:x"], "unknown dataset kind 'nope'")
    one_line_error(capsys, ["data", "inspect", f"phantom:{tmp_path / 'missing'}"], "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["data", "inspect", f"phantom:{tmp_path / 'empty'}"], "no train.csv")
    one_line_error(capsys, ["data", "phantom", "--out", str(tmp_path / "p"), "--size", "8"], "between 32 and 256")


def test_train_errors(capsys, tmp_path, phantom_dir):
    one_line_error(capsys, ["train", "--data", "nope:x", "--out", str(tmp_path)], "unknown dataset kind")
    one_line_error(capsys, ["train", "--data", f"phantom:{phantom_dir}", "--out", str(tmp_path / "r"),
                            "--resume", "latest", "--max-steps", "2"], "no checkpoint")
    one_line_error(capsys, ["train", "--out", str(tmp_path)], "no training data")
    one_line_error(capsys, ["train", "--data", f"phantom:{phantom_dir}", "--out", str(tmp_path),
                            "--config", str(tmp_path / "none.yaml")], "config file")


def test_generate_errors(capsys, tmp_path, tiny_run):
    one_line_error(capsys, ["generate", "--model", str(tmp_path / "none"), "--labels", "Edema", "--out",
                            str(tmp_path / "o")], "does not exist")
    (tmp_path / "half").mkdir()
    one_line_error(capsys, ["generate", "--model", str(tmp_path / "half"), "--labels", "Edema", "--out",
                            str(tmp_path / "o")], "incomplete")
    one_line_error(capsys, ["generate", "--model", str(tiny_run), "--labels", "Cardiomegaly,Broken Heart",
                            "--out", str(tmp_path / "o")], "unknown label 'Broken Heart'")


def test_generate_writes_images_and_manifest(tmp_path, tiny_run):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_run), "--labels", "Cardiomegaly,Pleural Effusion", "--n", "3",
                 "--out", str(out), "--steps", "3", "--seed", "7", "--scheduler", "ddim"]) == 0
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all((out / r["Path"]).is_file() for r in rows)
    assert rows[0]["Cardiomegaly"] == "1.0" and rows[0]["Pleural Effusion"] == "1.0" and rows[0]["Edema"] == "0.0"
    assert len({r["seed"] for r in rows}) == 3
    assert rows[0]["steps"] == "3" and rows[0]["guidance"] == "2.0" and rows[0]["scheduler"] == "ddim"
    from PIL import Image

    im = Image.open(out / rows[0]["Path"])
    assert im.mode == "L" and im.size == (32, 32) and "SYNTHETIC" in im.text["meddiff"]
    assert main(["generate", "--model", str(tiny_run), "--unconditional", "--n", "2", "--out",
                 str(tmp_path / "u"), "--steps", "2"]) == 0
    with open(tmp_path / "u" / "manifest.csv") as f:
        assert list(csv.DictReader(f))[0]["Cardiomegaly"] == ""


def test_subprocess_error_has_no_traceback(tmp_path):
    code, _, err = run_cli("generate", "--model", str(tmp_path), "--labels", "x", "--out", str(tmp_path / "o"))
    assert code == 2 and "Traceback" not in err and err.startswith("meddiff: error:")


@pytest.mark.slow
def test_train_command_writes_a_complete_run(tmp_path, phantom_dir):
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--data", f"phantom:{phantom_dir}", "--out", str(run), "--max-steps", "6",
                             "--batch-size", "8")
    assert code == 0, err
    for name in ("pipeline/model_index.json", "pipeline/pipeline.py", "config.yaml", "README.md", "metrics.json",
                 "samples/grid_cardiomegaly.png", "samples/grid_unconditional.png", "training.json"):
        assert (run / name).is_file(), name
    card = (run / "README.md").read_text()
    assert "not for diagnosis" in card.lower() and "Cardiomegaly" in card and "synthetic AUC" in card
    code, out, err = run_cli("train", "--data", f"phantom:{phantom_dir}", "--out", str(run), "--max-steps", "8",
                             "--batch-size", "8", "--resume", "latest", "--no-eval")
    assert code == 0 and "resumed from" in err and "step 6" in err, err  # logged: stderr


def test_report_commands_run_on_the_main_launch_process_only(tmp_path, monkeypatch, capsys, tiny_run):
    """Under accelerate launch / torchrun, evaluate and fidelity write one report: the other processes stop."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["evaluate", "--real", "phantom:?n=8", "--synthetic", str(tmp_path), "--out", str(tmp_path / "ev")]) == 0
    assert main(["fidelity", "--model", str(tiny_run), "--data", "phantom:?n=8", "--out", str(tmp_path / "fi")]) == 0
    out = capsys.readouterr().out
    assert out.count("runs on the main process only") == 2 and "process 1 of 2" in out
    assert not (tmp_path / "ev").exists() and not (tmp_path / "fi").exists()
