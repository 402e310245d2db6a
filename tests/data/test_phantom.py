import numpy as np
import pytest

from meddiff.data.phantom import CTR_THRESHOLD, FINDINGS, measure_ctr, render_phantom, sample_findings

NONE = {name: 0 for name in FINDINGS}


def with_(name):
    return {**NONE, name: 1}


def test_deterministic_and_sized():
    a, b = render_phantom(5, 64), render_phantom(5, 64)
    assert np.array_equal(a.image, b.image) and a.findings == b.findings
    assert not np.array_equal(a.image, render_phantom(6, 64).image)
    for size in (32, 100, 256):
        img = render_phantom(1, size).image
        assert img.shape == (size, size) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1
    with pytest.raises(ValueError):
        render_phantom(0, 16)


@pytest.mark.parametrize("size", [64, 128])
def test_ctr_above_half_exactly_when_cardiomegaly(size):
    for seed in range(30):
        for cardio in (0, 1):
            ph = render_phantom(seed, size, {**NONE, "Cardiomegaly": cardio})
            ctr = measure_ctr(ph)
            assert (ctr > CTR_THRESHOLD) == bool(cardio), (seed, cardio, ctr)
            assert abs(ctr - ph.meta["ctr"]) < 0.02


def test_no_finding_label_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(200):
        f = sample_findings(rng)
        assert f["No Finding"] == int(not any(f[n] for n in FINDINGS))
    assert render_phantom(1, 32, NONE).findings["No Finding"] == 1
    assert render_phantom(1, 32, with_("Edema")).findings["No Finding"] == 0


def test_findings_change_only_their_region():
    # anatomy and acquisition are drawn from streams independent of the findings
    base = render_phantom(11, 128, NONE)
    for name in ("Pleural Effusion", "Consolidation", "Edema", "Pneumothorax"):
        ph = render_phantom(11, 128, with_(name))
        mask = ph.masks[name] > 0.5
        assert mask.sum() > 20, name
        diff = ph.image - base.image
        outside = ~(ph.masks[name] > 0.02)
        if name == "Pneumothorax":
            outside &= ~(ph.masks["pleural line"] > 0.02)
        assert np.abs(diff[outside]).mean() < 0.03, name


def test_effusion_is_basal_opacity_with_meniscus():
    for seed in range(8):
        base = render_phantom(seed, 128, NONE)
        ph = render_phantom(seed, 128, with_("Pleural Effusion"))
        mask = ph.masks["Pleural Effusion"] > 0.5
        assert (ph.image - base.image)[mask].mean() > 0.1  # opacity
        rows, cols = np.nonzero(mask)
        assert rows.mean() > 64  # basal: lower half of the image
        side = ph.meta["effusion_sides"][0]
        sel = (cols < 64) if side < 0 else (cols >= 64)
        r, c = rows[sel], cols[sel]
        lateral = np.abs(c - 64) > np.percentile(np.abs(c - 64), 75)
        medial = np.abs(c - 64) < np.percentile(np.abs(c - 64), 25)
        assert r[lateral].min() < r[medial].min()  # meniscus: fluid climbs higher laterally


def test_pneumothorax_is_lucent_without_markings():
    for seed in range(6):
        base = render_phantom(seed, 128, NONE)
        ph = render_phantom(seed, 128, with_("Pneumothorax"))
        core = ph.masks["Pneumothorax"] > 0.9
        assert core.sum() > 30
        assert ph.image[core].mean() < base.image[core].mean() - 0.02  # darker
        # no lung markings in the lucent region, and a visible pleural line at its edge
        assert ph.masks["lung markings"][core].max() < 0.05
        line = ph.masks["pleural line"] > 0.5
        assert line.sum() > 5 and ph.image[line].mean() > ph.image[core].mean() + 0.05
    # markings exist elsewhere in the lungs
    assert render_phantom(0, 128, NONE).masks["lung markings"].max() > 0.3


def test_edema_is_bilateral():
    ph = render_phantom(3, 128, with_("Edema"))
    base = render_phantom(3, 128, NONE)
    diff = ph.image - base.image
    assert diff[:, :60].mean() > 0.01 and diff[:, 68:].mean() > 0.01
