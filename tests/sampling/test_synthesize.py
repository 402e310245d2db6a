import csv
import hashlib

import numpy as np
import pytest

from meddiff.cli import main
from meddiff.conditioning.labels import LabelCodec
from meddiff.data.io import read_image
from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from meddiff.models.storage import load_pipeline
from meddiff.sampling import export, synthesize
from meddiff.sampling.generate import SamplingSettings, image_seed
from meddiff.sampling.plan import make_plan
from meddiff.sampling.synthesize import generate_dataset


def hashes(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())}


def pixels(folder):
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").iterdir())}


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return load_pipeline(tiny_run)


@pytest.fixture(scope="module")
def conditions_csv(phantom_dir):
    return phantom_dir / "train.csv"


def run(pipe, tiny_run, out, plan, batch=16, **kw):
    return generate_dataset(
        pipe, tiny_run, plan, SamplingSettings(steps=2, batch_size=batch, seed=5), out, progress=False, **kw
    )


def test_seeds_are_distinct_and_stable():
    seeds = {image_seed(0, i) for i in range(10000)} | {image_seed(1, i) for i in range(10000)}
    assert len(seeds) == 20000 and image_seed(3, 7) == image_seed(3, 7)


def test_conditions_mirror_a_label_table_and_read_back(pipe, tiny_run, conditions_csv, tmp_path):
    plan = make_plan(LabelCodec(pipe.label_names), conditions=str(conditions_csv))
    result = run(pipe, tiny_run, tmp_path, plan)
    real = rows(conditions_csv)
    out = rows(result.manifest)
    assert len(out) == len(real) == result.written
    assert list(out[0])[:5] == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    assert {"prompt", "seed", "guidance", "steps", "scheduler", "model"} <= set(out[0])
    for r, o in zip(real, out):
        for name in ("Cardiomegaly", "Pleural Effusion", "Edema", "No Finding"):
            assert float(r[name]) == float(o[name])
        assert o["Fracture"] == ""
    back = load_dataset(f"chexpert:{result.manifest}?labels=Cardiomegaly,Edema", 32)
    assert len(back) == len(out)
    assert back.labels[:, 0].tolist() == [float(o["Cardiomegaly"]) for o in out]
    assert len(load_dataset(f"csv:{result.manifest}?split=all", 32)) == len(out)


def test_batch_size_does_not_change_images(pipe, tiny_run, tmp_path):
    plan = make_plan(LabelCodec(pipe.label_names), labels_text="Cardiomegaly", n=6)
    run(pipe, tiny_run, tmp_path / "b1", plan, batch=1)
    run(pipe, tiny_run, tmp_path / "b16", plan, batch=16)
    one, sixteen = pixels(tmp_path / "b1"), pixels(tmp_path / "b16")
    assert one.keys() == sixteen.keys() and len(one) == 6
    for name in one:  # the same image up to float rounding (a batch's kernels may sum in another order)
        a, b = one[name], sixteen[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= np.iinfo(a.dtype).max // 255, name
        assert (a != b).mean() < 0.01, name


def test_kill_and_resume_gives_the_identical_set(pipe, tiny_run, tmp_path, monkeypatch):
    plan = make_plan(LabelCodec(pipe.label_names), labels_text="Edema", n=10)
    run(pipe, tiny_run, tmp_path / "straight", plan, batch=4)
    real_write = export.write_image
    written = []

    def dying_write(*a, **k):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(1)
        return real_write(*a, **k)

    monkeypatch.setattr(synthesize, "write_image", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(pipe, tiny_run, tmp_path / "killed", plan, batch=4)
    monkeypatch.setattr(synthesize, "write_image", real_write)
    assert len(list((tmp_path / "killed" / "images").glob("*.png"))) == 5
    assert not (tmp_path / "killed" / "manifest.csv").exists()
    result = run(pipe, tiny_run, tmp_path / "killed", plan, batch=4)
    assert result.skipped == 5 and result.written == 5
    assert hashes(tmp_path / "killed") == hashes(tmp_path / "straight")
    assert (tmp_path / "killed" / "manifest.csv").read_text() == (tmp_path / "straight" / "manifest.csv").read_text()


def test_shards_merge_into_the_same_set(pipe, tiny_run, tmp_path):
    plan = make_plan(LabelCodec(pipe.label_names), labels_text="Pneumothorax", n=7)
    run(pipe, tiny_run, tmp_path / "one", plan)
    first = run(pipe, tiny_run, tmp_path / "sharded", plan, shard=(0, 2))
    assert first.manifest is None and first.written == 4
    second = run(pipe, tiny_run, tmp_path / "sharded", plan, shard=(1, 2))
    assert second.manifest is not None and second.written == 3
    assert hashes(tmp_path / "one") == hashes(tmp_path / "sharded")
    assert (tmp_path / "one" / "manifest.csv").read_text() == (tmp_path / "sharded" / "manifest.csv").read_text()
    assert len(rows(tmp_path / "sharded" / "manifest.part-1-of-2.csv")) == 3


def test_refuses_other_model_settings_or_foreign_folder(pipe, tiny_run, tiny_run_b, tmp_path):
    plan = make_plan(LabelCodec(pipe.label_names), labels_text="Edema", n=2)
    run(pipe, tiny_run, tmp_path / "g", plan)
    with pytest.raises(MeddiffError, match="different model"):
        run(load_pipeline(tiny_run_b), tiny_run_b, tmp_path / "g", plan)
    with pytest.raises(MeddiffError, match="other settings"):
        generate_dataset(pipe, tiny_run, plan, SamplingSettings(steps=3, seed=5), tmp_path / "g", progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(MeddiffError, match="not empty"):
        run(pipe, tiny_run, tmp_path / "foreign", plan)


def test_dicom_export_is_synthetic_and_reads_back(pipe, tiny_run, tmp_path):
    import pydicom

    plan = make_plan(LabelCodec(pipe.label_names), labels_text="Cardiomegaly", n=2)
    result = generate_dataset(
        pipe, tiny_run, plan, SamplingSettings(steps=2, seed=5), tmp_path, fmt="dicom", progress=False
    )
    files = sorted((tmp_path / "images").glob("*.dcm"))
    assert len(files) == 2 and result.manifest
    ds = pydicom.dcmread(files[0])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert "SYNTHETIC" in str(ds.PatientName) and "SYNTHETIC" in ds.ImageComments and ds.BitsStored == 16
    assert ds.SOPInstanceUID != pydicom.dcmread(files[1]).SOPInstanceUID
    assert read_image(files[0]).shape == (32, 32)
    back = load_dataset(f"chexpert:{result.manifest}?labels=Cardiomegaly", 32)
    assert len(back) == 2 and back.labels[:, 0].tolist() == [1.0, 1.0]


def test_png16_and_text_chunk(pipe, tiny_run, tmp_path):
    from PIL import Image

    plan = make_plan(LabelCodec(pipe.label_names), unconditional=True, n=1)
    generate_dataset(pipe, tiny_run, plan, SamplingSettings(steps=2), tmp_path, fmt="png16", progress=False)
    im = Image.open(next((tmp_path / "images").glob("*.png")))
    assert im.mode.startswith("I;16") and "SYNTHETIC" in im.text["meddiff"]
    assert len(np.unique(np.asarray(im))) > 256 or np.asarray(im).max() > 255


def test_bad_conditions(pipe, tmp_path):
    codec = LabelCodec(pipe.label_names)
    (tmp_path / "c.csv").write_text("Path,Site\na.png,x\n")
    with pytest.raises(MeddiffError, match="no column matching the model's labels"):
        make_plan(codec, conditions=str(tmp_path / "c.csv"))
    with pytest.raises(MeddiffError, match="unknown label 'Nope'"):
        make_plan(codec, labels_text="Nope")
    plan = make_plan(codec, labels_text="Edema", per_condition=3)
    assert len(plan) == 3


def test_cli_generate_conditions_and_summary(tiny_run, conditions_csv, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_run),
                "--conditions",
                str(conditions_csv),
                "--n",
                "5",
                "--out",
                str(tmp_path / "g"),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "generated 5 images (0 already present)" in out and "per condition:" in out
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_run),
                "--conditions",
                str(conditions_csv),
                "--n",
                "5",
                "--out",
                str(tmp_path / "g"),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert "generated 0 images (5 already present)" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_run), "--prompt", "chest x-ray", "--out", str(tmp_path / "p")]) == 2
    assert "not text-conditioned" in capsys.readouterr().err


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_multi_process_launch_shards_by_rank(tiny_run, tmp_path):
    """torchrun / accelerate launch set WORLD_SIZE and RANK: each process takes its shard, one manifest results."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: other tests may launch at the same time (pytest-xdist)
        "--nproc-per-node",
        "2",
        "-m",
        "meddiff",
        "generate",
        "--model",
        str(tiny_run),
        "--labels",
        "Edema",
        "--out",
        str(tmp_path / "mp"),
        "--steps",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("generated 8 images") == 2
    main(["generate", "--model", str(tiny_run), "--labels", "Edema", "--out", str(tmp_path / "single"), "--steps", "2"])
    assert hashes(tmp_path / "mp") == hashes(tmp_path / "single")
    assert (tmp_path / "mp" / "manifest.csv").read_text() == (tmp_path / "single" / "manifest.csv").read_text()
