"""meddiff.evaluation.downstream: the bootstrap AUC interval and the real + synthetic training set."""

import numpy as np
import pytest
import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.errors import MeddiffError
from meddiff.evaluation.downstream import bootstrap_auc, combine


def test_perfect_scores_give_auc_one_with_a_degenerate_interval():
    y = np.array([0, 0, 0, 1, 1, 1], bool)
    probs = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert bootstrap_auc([probs], y, n_boot=50) == (1.0, 1.0, 1.0)
    assert bootstrap_auc([1 - probs], y, n_boot=50) == (0.0, 0.0, 0.0)


def test_auc_is_averaged_over_seeds_and_the_interval_brackets_it():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    noisy = [y + rng.normal(0, s, 200) for s in (0.6, 1.2)]
    full, lo, hi = bootstrap_auc(noisy, y, n_boot=200)
    from sklearn.metrics import roc_auc_score

    assert full == pytest.approx(np.mean([roc_auc_score(y, p) for p in noisy]))
    assert lo < full < hi and 0.5 < lo and hi < 1.0 and hi - lo < 0.2
    assert bootstrap_auc(noisy, y, n_boot=200, seed=0) == (full, lo, hi)  # seeded


def test_rank_auc_and_the_interval_are_sklearn_s_on_every_resample():
    """The vectorised AUC is roc_auc_score's, ties included, and the interval is the one one-call-per-resample
    scoring gives (same resample stream)."""
    from sklearn.metrics import roc_auc_score

    from meddiff.evaluation.downstream import rank_auc

    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.3
    probs = [np.round(y * 0.3 + rng.random(60), 1) for _ in range(3)]  # rounded: many ties
    assert rank_auc(y, np.stack(probs)) == pytest.approx([roc_auc_score(y, p) for p in probs], abs=1e-12)
    full, lo, hi = bootstrap_auc(probs, y, n_boot=100, seed=4)
    draws = np.random.default_rng(4)
    boots = []
    for _ in range(100):
        i = draws.integers(0, 60, 60)
        if 0 < y[i].sum() < 60:
            boots.append(np.mean([roc_auc_score(y[i], p[i]) for p in probs]))
    assert full == pytest.approx(np.mean([roc_auc_score(y, p) for p in probs]), abs=1e-12)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])), abs=1e-12)


def test_a_large_test_set_is_scored_in_chunks_with_the_same_interval():
    """Many images: the resamples are scored a chunk at a time (bounded memory), with the same result."""
    from meddiff.evaluation.downstream import rank_auc

    rng = np.random.default_rng(2)
    y = rng.random(20_000) < 0.2
    probs = [y * 0.2 + rng.random(20_000) for _ in range(3)]  # 3 seeds x 20k: chunks of 69 resamples
    full, lo, hi = bootstrap_auc(probs, y, n_boot=150, seed=1)
    draws = np.random.default_rng(1)
    boots = [
        rank_auc(y[i], np.stack([p[i] for p in probs])).mean()
        for i in (draws.integers(0, 20_000, 20_000) for _ in range(150))
    ]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])), abs=1e-12)
    assert lo < full < hi


def test_nan_scores_are_a_one_line_error():
    from meddiff.errors import MeddiffError

    with pytest.raises(MeddiffError, match="NaN"):
        bootstrap_auc([np.array([0.2, np.nan, 0.5])], np.array([True, False, True]))


def test_a_missing_class_gives_none():
    assert bootstrap_auc([np.array([0.2, 0.4])], np.array([True, True])) is None
    assert bootstrap_auc([np.array([0.2, 0.4])], np.array([False, False])) is None


def test_combine_concatenates_images_labels_and_prompts():
    def data(n, value, prompt):
        return ImageLabelDataset(
            torch.full((n, 1, 4, 4), value),
            torch.full((n, 2), value),
            torch.ones(n, 2, dtype=bool),
            ["A", "B"],
            prompts=[prompt] * n,
        )

    both = combine(data(3, 1.0, "real"), data(2, 0.0, "synthetic"))
    assert len(both) == 5 and both.label_names == ["A", "B"]
    assert both.labels[:, 0].tolist() == [1, 1, 1, 0, 0] and both.images[3:].abs().sum() == 0
    assert list(both.prompts) == ["real"] * 3 + ["synthetic"] * 2


def _labelled(n, rare, size=16, seed=0, signal=0.0):
    """n noise images; the first `rare` have label A (brighter by `signal`), all have label B's opposite of A."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    labels = torch.zeros(n, 2)
    labels[:rare, 0] = 1
    labels[rare:, 1] = 1
    images[:rare] += signal
    return ImageLabelDataset(images.clamp(-1, 1), labels, torch.ones(n, 2, dtype=bool), ["A", "B"], multiclass=True)


def test_real_fraction_is_stratified_and_keeps_a_rare_class():
    from meddiff.evaluation.downstream import real_fraction

    data = _labelled(200, rare=8)
    part = real_fraction(data, 0.25)
    assert int(part.labels[:, 0].sum()) == 2 and int(part.labels[:, 1].sum()) == 48 and part.multiclass
    tiny = real_fraction(data, 0.01)
    assert int(tiny.labels[:, 0].sum()) == 1  # at least one image of every combination
    assert torch.equal(real_fraction(data, 0.25).images, part.images)  # seeded


def test_label_pos_weight_is_negatives_over_positives_where_known():
    from meddiff.evaluation.classifier import label_pos_weight

    data = _labelled(100, rare=10)
    data.known[:50, 1] = False  # B known on 50 images, all positive there: no negatives -> weight 1
    assert label_pos_weight(data).tolist() == pytest.approx([9.0, 1.0])


def test_class_reweighting_moves_the_best_constant_guess_for_a_rare_label_to_one_half():
    from meddiff.evaluation.classifier import classification_loss, label_pos_weight

    data = _labelled(160, rare=10)  # A: 1 in 16
    weight = label_pos_weight(data)
    grid = torch.linspace(-4, 4, 801)

    def best(pos_weight):  # the constant logit for label A that minimises the loss
        losses = [
            classification_loss(g.expand(160, 1), data.labels[:, :1], data.known[:, :1], pos_weight) for g in grid
        ]
        return torch.sigmoid(grid[int(torch.stack(losses).argmin())]).item()

    assert best(None) == pytest.approx(1 / 16, abs=0.01)  # unweighted: the prior, so a rare class is rarely called
    assert best(weight[:1]) == pytest.approx(0.5, abs=0.01)  # reweighted: as if balanced
    data.known[:80, 0] = False  # unknown entries do not count
    manual = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(80), data.labels[80:, 0])
    assert classification_loss(torch.zeros(160, 1), data.labels[:, :1], data.known[:, :1]) == pytest.approx(
        manual.item()
    )


def test_fine_tuning_continues_from_the_given_classifier():
    from meddiff.evaluation.classifier import train_classifier

    data = _labelled(64, rare=32, signal=0.5)
    first = train_classifier(data, epochs=1, seed=0, device="cpu")
    before = [p.detach().clone() for p in first.parameters()]
    tuned = train_classifier(data, epochs=1, seed=1, device="cpu", init=first)
    assert tuned is first and any(not torch.equal(a, b) for a, b in zip(before, tuned.parameters()))
    other = ImageLabelDataset(data.images, data.labels[:, :1], data.known[:, :1], ["A"])
    with pytest.raises(ValueError, match="number of labels"):
        train_classifier(other, epochs=1, init=first, device="cpu")


def test_downstream_protocols_and_real_fractions():
    from meddiff.evaluation.downstream import PROTOCOLS, downstream

    real, synthetic, test = (
        _labelled(96, 24, signal=0.8),
        _labelled(64, 32, seed=1, signal=0.8),
        _labelled(64, 16, seed=2, signal=0.8),
    )
    out = downstream(real, synthetic, test, seeds=1, epochs=1, protocols=tuple(PROTOCOLS), fractions=(0.5,))
    assert list(out) == [*PROTOCOLS, "real 50%", "real 50%+synthetic"]
    assert out["synthetic->real"]["n_train"] == 96 and out["real 50%"]["n_train"] == 48
    assert out["real 50%+synthetic"]["n_train"] == 48 + 64 and out["real+synthetic"]["n_train"] == 160
    for name, entry in out.items():
        assert entry["protocol"] and 0 <= entry["mean_auc"] <= 1, name
        assert set(entry["recall"]) == {"A", "B"} and all(0 <= r <= 1 for r in entry["recall"].values())


def test_a_diverged_classifier_stops_the_protocols_at_once(monkeypatch):
    """NaN scores from the first classifier: one line naming the training set and seed, and nothing more is trained."""
    import meddiff.evaluation.downstream as ds

    trained = []
    monkeypatch.setattr(ds, "train_classifier", lambda data, **kw: trained.append(len(data)) or object())
    monkeypatch.setattr(ds, "predict", lambda model, images: np.full((len(images), 2), np.nan, dtype=np.float32))
    real, synthetic, test = _labelled(32, 8), _labelled(16, 8, seed=1), _labelled(16, 4, seed=2)
    with pytest.raises(MeddiffError, match=r"trained on 'real' \(seed 0\) gave NaN or infinite scores"):
        ds.downstream(real, synthetic, test, seeds=3, epochs=1, protocols=("real", "synthetic"))
    assert trained == [32]


@pytest.mark.parametrize(
    ("protocols", "fractions", "message"),
    [(("real", "imagined"), (), "unknown downstream protocol 'imagined'"), (("real",), (1.0,), "outside (0, 1)")],
)
def test_bad_protocols_and_fractions_are_one_line_errors(protocols, fractions, message):
    from meddiff.errors import MeddiffError
    from meddiff.evaluation.downstream import check_protocols

    with pytest.raises(MeddiffError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_protocols(protocols, fractions)


def test_evaluate_refuses_an_unknown_protocol_before_reading_data(tmp_path, capsys):
    from meddiff.cli import main

    code = main(
        [
            "evaluate",
            "--real",
            "phantom:/nonexistent",
            "--synthetic",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--protocols",
            "real,bogus",
        ]
    )
    assert code == 2 and "unknown downstream protocol 'bogus'" in capsys.readouterr().err
