"""BraTS case discovery and the survival table: text survival values, missing and broken volumes."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from meddiff.errors import MeddiffError
from meddiff.survival.cases import discover_cases, load_case, parse_survival
from meddiff.survival.synthetic import write_synthetic_brats


@pytest.mark.parametrize(
    "text, status, days, censored",
    [
        ("289", "known", 289.0, None),
        (" 1227.0 ", "known", 1227.0, None),
        ("ALIVE (361 days later)", "censored", None, 361.0),
        ("alive (30 days later)", "censored", None, 30.0),
        ("", "missing", None, None),
        ("NA", "missing", None, None),
        ("about a year", "unparseable", None, None),
        ("-5", "unparseable", None, None),
    ],
)
def test_parse_survival(text, status, days, censored):
    value = parse_survival(text)
    assert (value.status, value.days, value.censored_days) == (status, days, censored)


@pytest.fixture()
def brats(tmp_path):
    return write_synthetic_brats(tmp_path / "brats", n=8, size=16, seed=1)


def _set_survival(root, case_id, value):
    path = root / "survival_info.csv"
    lines = path.read_text().splitlines()
    lines = [
        ",".join([p[0], p[1], value, p[3]]) if p[0] == case_id else line
        for line, p in ((line, line.split(",")) for line in lines)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_bad_cases_are_skipped_with_their_reason(brats):
    _set_survival(brats, "BraTS20_Training_001", "ALIVE (361 days later)")
    _set_survival(brats, "BraTS20_Training_002", "soon")
    (brats / "BraTS20_Training_003" / "BraTS20_Training_003_flair.nii.gz").unlink()
    shutil.rmtree(brats / "BraTS20_Training_004")
    table = discover_cases(brats)
    assert len(table.cases) == 4
    assert table.skipped == {
        "BraTS20_Training_001": "survival censored (alive at 361 days; true survival unknown)",
        "BraTS20_Training_002": "survival unparseable ('soon')",
        "BraTS20_Training_003": "missing modality: flair",
        "BraTS20_Training_004": "no case folder",
    }
    # only the modalities asked for are required
    assert len(discover_cases(brats, ("t1", "t2")).cases) == 5


def test_empty_segmentation_and_mismatched_shapes_are_named(brats):
    table = discover_cases(brats)
    case = table.cases[0]
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)), str(case.paths["seg"]))
    with pytest.raises(MeddiffError, match="empty segmentation"):
        load_case(case, ("t1",))
    other = table.cases[1]
    nib.save(nib.Nifti1Image(np.ones((16, 16, 12), np.float32), np.eye(4)), str(other.paths["t2"]))
    with pytest.raises(MeddiffError, match=r"mismatched shapes: seg \(16, 16, 16\).*t2 \(16, 16, 12\)"):
        load_case(other, ("t1", "t2"))
    other.paths["t1"].write_bytes(b"not a nifti file")
    with pytest.raises(MeddiffError, match="unreadable volume"):
        load_case(other, ("t1",))


def test_table_and_folder_errors_are_one_line(tmp_path, brats):
    with pytest.raises(MeddiffError, match="is not a folder"):
        discover_cases(tmp_path / "missing")
    with pytest.raises(MeddiffError, match="unknown modality t3; choose from"):
        discover_cases(brats, ("t1", "t3"))
    (brats / "survival_info.csv").write_text("id_of_case,Years\nBraTS20_Training_001,3\n")
    with pytest.raises(MeddiffError, match="lacks the column"):
        discover_cases(brats)
    (brats / "survival_info.csv").unlink()
    with pytest.raises(MeddiffError, match="no survival_info.csv"):
        discover_cases(brats)
