"""Re-identification: a network trained on the training patients' repeat studies tells held-out patients' studies
apart (same patient vs different patients) far better than one trained on image identity; bad input is one line."""

import numpy as np
import pytest

from meddiff.errors import MeddiffError
from meddiff.evaluation.copy_descriptor import DescriptorSettings, train_descriptor
from meddiff.evaluation.reidentification import reid_metrics, repeat_patients, train_reid

SETTINGS = DescriptorSettings(steps=150, batch_size=64, width=16, dim=64)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from meddiff.data.phantom_dataset import write_phantom_folder
    from meddiff.data.spec import load_dataset

    root = tmp_path_factory.mktemp("studies")
    write_phantom_folder(root, n=480, size=32, seed=4, studies=4, progress=False)
    to01 = lambda d: ((d.images[:].numpy()[:, 0] + 1) / 2).astype(np.float32)  # noqa: E731
    train, held = load_dataset(f"phantom:{root}", 32), load_dataset(f"phantom:{root}?split=valid", 32)
    return to01(train), list(train.patients), to01(held), list(held.patients)


def test_a_reid_network_recognises_held_out_patients(studies):
    train, train_ids, held, held_ids = studies
    assert not set(train_ids) & set(held_ids) and repeat_patients(held_ids).all()
    reid = reid_metrics(train_reid(train, train_ids, SETTINGS), held, held_ids)
    identity = reid_metrics(train_descriptor(train, SETTINGS), held, held_ids)
    assert reid.auc > 0.9 and reid.auc > identity.auc + 0.05, (reid, identity)
    assert reid.same_pairs == reid.patients * 6 and 0 <= reid.tpr_at_1e3 <= 1  # 4 studies: 6 pairs each


def test_bad_input_is_one_line(studies):
    train, train_ids, held, _ = studies
    with pytest.raises(MeddiffError, match="at least two images per patient"):
        train_reid(train[:10], [str(i) for i in range(10)], SETTINGS)
    with pytest.raises(MeddiffError, match="at least 2 patients"):
        reid_metrics(train_descriptor(train[:20], DescriptorSettings(steps=2)), held[:4], ["a"] * 4)
    with pytest.raises(MeddiffError, match="one id per image"):
        train_descriptor(train[:20], SETTINGS, groups=np.zeros(3))


def test_pair_scores_are_exact_in_blocks_and_sampled_beyond_the_cap(studies):
    """Blocked scoring equals scoring every pair at once; a sample of the different-patient pairs (large held-out
    sets) gives nearly the same AUC."""
    from sklearn.metrics import roc_auc_score

    from meddiff.evaluation.copy_descriptor import embed

    train, _, held, held_ids = studies
    net = train_descriptor(train[:64], DescriptorSettings(steps=3, batch_size=16, width=8, dim=16))
    exact = reid_metrics(net, held, held_ids)
    z = embed(net, held)
    upper = np.triu_indices(len(held), k=1)
    ids = np.asarray(held_ids)
    same = ids[upper[0]] == ids[upper[1]]
    assert not exact.negatives_sampled and exact.different_pairs == int((~same).sum())
    assert exact.auc == pytest.approx(roc_auc_score(same, (z @ z.T)[upper]), abs=1e-6)
    sampled = reid_metrics(net, held, held_ids, max_negative_pairs=3000)
    assert sampled.negatives_sampled and sampled.different_pairs == exact.different_pairs
    assert sampled.same_pairs == exact.same_pairs and abs(sampled.auc - exact.auc) < 0.03
