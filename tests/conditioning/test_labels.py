import pytest
import torch

from meddiff.conditioning.labels import LabelCodec
from meddiff.errors import MeddiffError

NAMES = ["No Finding", "Cardiomegaly", "Pleural Effusion"]


def test_encode_and_null():
    codec = LabelCodec(NAMES)
    labels = torch.tensor([[0, 1, 1.0], [1, 0, 0]])
    known = torch.tensor([[True, True, False], [True, True, True]])
    cond = codec.encode(labels, known)
    assert cond.tolist() == [[0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]]
    assert codec.null(2).abs().sum() == 0 and codec.dim == 6


def test_parse_case_insensitive_and_unspecified():
    codec = LabelCodec(NAMES)
    labels, known = codec.parse("cardiomegaly, Pleural Effusion")
    assert labels.tolist() == [0, 1, 1] and known.all()
    labels, known = codec.parse("Cardiomegaly", unspecified="unknown")
    assert known.tolist() == [False, True, False]
    with pytest.raises(MeddiffError, match="unknown label 'Fracture'.*Cardiomegaly"):
        codec.parse("Fracture")
    with pytest.raises(MeddiffError, match="empty"):
        codec.parse(" , ")


def test_condition_dropout_rate():
    codec = LabelCodec(NAMES)
    cond = codec.encode(torch.ones(4000, 3))
    dropped = codec.drop(cond, 0.1, torch.Generator().manual_seed(0))
    rate = float((dropped.abs().sum(1) == 0).float().mean())
    assert 0.08 < rate < 0.12
    assert torch.equal(codec.drop(cond, 0.0, torch.Generator()), cond)


def test_condition_columns_keep_0_1_labels_and_leave_measurements_out():
    import torch

    from meddiff.conditioning.labels import condition_columns

    names = ["Tumour", "Tumour volume mL", "Left", "Blank"]
    labels = torch.tensor([[1, 20.5, 1, 0], [0, 0, 0, 0], [1, 6.1, 0, 7]], dtype=torch.float32)
    known = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)  # Blank: never known
    keep, measured = condition_columns(names, labels, known)
    assert keep == [0, 2] and measured == ["Tumour volume mL"]  # a never-known column is neither
