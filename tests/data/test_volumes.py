"""meddiff.data.volumes: NIfTI volumes in a record table become one record per 2D slice (axis=, slices=)."""

from pathlib import Path

import numpy as np
import pytest

from meddiff.data.records import Record, RecordTable
from meddiff.data.volumes import expand_volumes
from meddiff.errors import MeddiffError

nib = pytest.importorskip("nibabel")


@pytest.fixture
def table(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    (tmp_path / "broken.nii").write_bytes(b"not a volume")
    records = [
        Record(path=Path("a.png"), values={"A": 1.0}),
        Record(path=tmp_path / "v.nii.gz", values={"A": 0.0}, patient="p1"),
        Record(path=tmp_path / "broken.nii", values={}),
    ]
    return RecordTable(records, ["A"], "vols", notes=["kept"])


def slices(table):
    return [(r.path.name, r.slice_index, r.slice_axis) for r in table.records]


def test_each_slice_along_the_axis_becomes_a_record(table):
    out = expand_volumes(table, {})
    assert slices(out) == [("a.png", None, 2)] + [("v.nii.gz", i, 2) for i in range(6)] + [("broken.nii", 0, 2)]
    assert all(r.patient == "p1" and r.values == {"A": 0.0} for r in out.records[1:7])  # metadata copied
    assert out.label_names == ["A"] and out.source == "vols" and out.notes == ["kept"]
    assert len(table.records) == 3  # the input table is not changed
    assert [r.slice_index for r in expand_volumes(table, {"axis": "0"}).records[1:5]] == [0, 1, 2, 3]


def test_a_slice_window_is_clipped_to_the_volume(table):
    assert [s for _, s, _ in slices(expand_volumes(table, {"slices": "2:4"}))[1:3]] == [2, 3]
    clipped = expand_volumes(table, {"axis": "1", "slices": "-3:100"})
    assert [s for name, s, _ in slices(clipped) if name == "v.nii.gz"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"axis": "3"}, "axis= must be 0, 1 or 2"),
        ({"axis": "z"}, "axis= must be 0, 1 or 2"),
        ({"slices": "5"}, "slices= must be START:STOP, got '5'"),
        ({"slices": "a:b"}, "slices= must be START:STOP"),
    ],
)
def test_bad_options_are_one_line(table, options, message):
    with pytest.raises(MeddiffError, match=message):
        expand_volumes(table, options)
