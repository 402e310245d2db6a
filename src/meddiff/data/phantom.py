"""Procedural frontal chest radiograph phantoms with exactly known findings.

SYNTHETIC TEST DATA, NOT MEDICAL DATA. The phantoms exist so that meddiff can be trained, tested and
demonstrated on any machine without downloading patient data, while the ground truth of every finding is
known exactly (it is drawn, not annotated).

Geometry lives in a canonical frame (x, y in [-1, 1], x to the image right = patient's left, y down), so
one phantom renders at any size from 32 to 256 px; acquisition variation (rotation, scale, shift,
exposure, blur, noise) is applied on top. Brightness follows radiographic convention: dense = bright.

Findings use CheXpert names and are drawn the way a radiologist would look for them:
- Cardiomegaly: cardiothoracic ratio (heart width / thoracic width) above 0.5 (normal hearts 0.38-0.47).
- Pleural Effusion: dependent basal opacity with a meniscus rising laterally; blunts the costophrenic angle.
- Pneumothorax: apical/lateral lucency without lung markings, bounded by a thin visible pleural line.
- Consolidation: lobar airspace opacity with a sharp fissural border and air bronchograms.
- Edema: bilateral perihilar ("bat-wing") haze with indistinct vessels and Kerley B lines at the bases.
- No Finding: none of the above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Edema")
NO_FINDING = "No Finding"
CTR_THRESHOLD = 0.5
MIN_SIZE, MAX_SIZE = 32, 256


@dataclass
class Phantom:
    """One rendered phantom: the image in [0, 1], its findings, masks of what was drawn, and metadata."""

    image: np.ndarray  # float32 (H, W) in [0, 1]
    findings: dict[str, int]  # CheXpert name -> 0/1, including "No Finding"
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # float32 soft masks in the image frame
    meta: dict[str, object] = field(default_factory=dict)  # ctr, sex, age, view, sides, ...


def sample_findings(rng: np.random.Generator, p_normal: float = 0.25, p_finding: float = 0.3) -> dict[str, int]:
    """Random multi-label finding set: `p_normal` of cases have none, the rest at least one."""
    present = {name: 0 for name in FINDINGS}
    if rng.random() >= p_normal:
        while not any(present.values()):
            present = {name: int(rng.random() < p_finding) for name in FINDINGS}
    present[NO_FINDING] = int(not any(present.values()))
    return present


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of `signed < 0` with an edge of width `edge` (anti-aliased at every size)."""
    return 1.0 / (1.0 + np.exp(np.clip(signed / edge, -40, 40)))


def _segment_distance(x, y, p0, p1):
    """Distance from every grid point to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy))


class _Anatomy:
    """Patient-specific geometry in the canonical frame, sampled once per phantom."""

    def __init__(self, rng: np.random.Generator, cardiomegaly: bool):
        self.half_width = rng.uniform(0.66, 0.80)  # thoracic half width (patient size)
        self.mediastinum = rng.uniform(0.11, 0.15)  # half width of the mediastinal gap between lungs
        self.apex = rng.uniform(-0.80, -0.70)  # lung apex height
        self.dome_right = rng.uniform(0.36, 0.46)  # image-left hemidiaphragm (patient right, higher)
        self.dome_left = self.dome_right + rng.uniform(0.02, 0.07)
        self.dome_depth = rng.uniform(0.10, 0.16)  # how far the dome rises above the costophrenic angle
        ctr = rng.uniform(0.53, 0.64) if cardiomegaly else rng.uniform(0.38, 0.47)
        self.ctr = float(ctr)
        self.heart_tilt = rng.uniform(0.35, 0.6)  # long axis tilt (radians)
        self.heart_aspect = rng.uniform(0.72, 0.85)  # minor/major axis ratio
        self.heart_shift = rng.uniform(0.05, 0.11)  # heart sits to the patient's left
        self.body_extra = rng.uniform(0.10, 0.18)  # soft tissue outside the ribs

    def lung_center(self, side: int) -> tuple[float, float]:
        """side = -1 for image left (patient right), +1 for image right (patient left)."""
        cx = side * (self.half_width + self.mediastinum) / 2
        return cx, self.dome(side)

    def dome(self, side: int) -> float:
        return self.dome_right if side < 0 else self.dome_left


def _lung_mask(x, y, a: _Anatomy, side: int, edge: float, shrink: float = 0.0):
    """Soft mask of one lung: a boxy upper half-superellipse closed below by the diaphragm dome.

    `shrink` > 0 gives a lung collapsed towards its hilum (used for pneumothorax)."""
    cx, cy = a.lung_center(side)
    ax = (a.half_width - a.mediastinum) / 2
    ay = cy - a.apex
    hx, hy = side * (a.mediastinum + 0.08), -0.05  # hilum
    if shrink > 0:
        cx, cy = cx + (hx - cx) * shrink, cy + (hy - cy) * shrink * 0.5
        ax, ay = ax * (1 - shrink), ay * (1 - shrink * 0.7)
    u, v = (x - cx) / ax, (y - cy) / ay
    body = np.abs(u) ** 2.6 + np.maximum(-v, 0) ** 2.2 - 1.0  # superellipse, upper half
    dome_y = cy - a.dome_depth * (1.0 - np.clip(u, -1, 1) ** 2)  # domes peak mid-lung; recess laterally
    below = y - dome_y
    medial = a.mediastinum - np.abs(x)  # lungs stop at the mediastinum
    inside = np.maximum.reduce([body * ax, below, medial])
    return _soft(inside, edge)


def render_phantom(
    seed: int, size: int = 64, findings: dict[str, int] | None = None, patient: int | None = None
) -> Phantom:
    """Render one phantom. Deterministic in (seed, size, findings); geometry does not depend on size. `patient`: a
    patient seed for repeat studies: the anatomy, sex and age come from it (the same person), while the findings,
    acquisition and texture come from `seed` (another study)."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"phantom size must be between {MIN_SIZE} and {MAX_SIZE} px, got {size}")
    rng = np.random.default_rng(seed)
    if findings is None:
        findings = sample_findings(rng)
    findings = {name: int(findings.get(name, 0)) for name in FINDINGS}
    findings[NO_FINDING] = int(not any(findings.values()))
    # independent streams so that adding a finding never changes the anatomy or acquisition
    geo_rng, find_rng, acq_rng, tex_rng, who_rng = (np.random.default_rng([seed, k]) for k in range(5))
    if patient is not None:
        geo_rng, who_rng = np.random.default_rng([patient, 0, 1]), np.random.default_rng([patient, 4, 1])
    a = _Anatomy(geo_rng, bool(findings["Cardiomegaly"]))
    # sex and age shape the anatomy (so that demographic conditioning is testable): women have breast shadows over
    # the lower lung zones and a slightly narrower chest; with age the aortic knob unfolds (larger, denser) and the
    # bones thin (less dense)
    female = bool(who_rng.integers(0, 2))
    age = int(who_rng.integers(18, 91))
    ageing = (age - 18) / 72
    view = "AP" if who_rng.random() < 0.3 else "PA"  # AP (bedside): the scapulae project over the upper lungs
    if female:
        a.half_width *= 0.94
    a.dome_right += 0.10 * ageing  # older lungs: hyperinflated, lower and flatter domes
    a.dome_left += 0.10 * ageing
    a.dome_depth *= 1 - 0.5 * ageing

    # acquisition geometry: map image pixels back into the canonical frame
    angle = acq_rng.uniform(-4, 4) * np.pi / 180
    scale = acq_rng.uniform(0.93, 1.05)
    shift = acq_rng.uniform(-0.04, 0.04, size=2)
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    yi, xi = np.meshgrid(coords, coords, indexing="ij")
    xs, ys = (xi - shift[0]) / scale, (yi - shift[1]) / scale
    x = np.cos(angle) * xs + np.sin(angle) * ys
    y = -np.sin(angle) * xs + np.cos(angle) * ys
    px = 2.0 / size / scale  # one pixel in canonical units
    edge = max(px * 0.6, 0.004)

    # --- anatomy -------------------------------------------------------------------------------
    torso_w = a.half_width + a.body_extra
    shoulders = np.clip((y + 0.95) / 0.35, 0, 1)
    body = _soft((np.abs(x) - torso_w * (0.75 + 0.25 * shoulders)), edge * 3)
    lungs = {s: _lung_mask(x, y, a, s, edge) for s in (-1, 1)}

    # heart: tilted ellipse whose horizontal extent is exactly ctr * thoracic width
    thoracic_width = 2 * a.half_width
    t, q = a.heart_tilt, a.heart_aspect
    half_extent = a.ctr * thoracic_width / 2
    major = half_extent / np.sqrt(np.cos(t) ** 2 + (q * np.sin(t)) ** 2)
    minor = major * q
    hcx = a.heart_shift * (1 + (a.ctr - 0.42))
    vertical_half = np.sqrt((major * np.sin(t)) ** 2 + (minor * np.cos(t)) ** 2)
    hcy = a.dome_right + 0.04 - vertical_half  # the heart sits on the diaphragm
    hx, hy = x - hcx, y - hcy
    hu = (np.cos(t) * hx + np.sin(t) * hy) / major
    hv = (-np.sin(t) * hx + np.cos(t) * hy) / minor
    heart = _soft((np.sqrt(hu**2 + hv**2) - 1.0) * minor, edge)
    aortic_knob = (0.8 + 0.6 * ageing) * _soft(
        np.hypot(x - (a.mediastinum * 0.6), y + 0.38) - (0.04 + 0.07 * ageing), edge
    )
    mediastinum = aortic_knob  # the rest of the mediastinum is soft tissue where no lung is

    # lung markings: tapering vessels branching from each hilum
    vessels = np.zeros_like(x)
    for s in (-1, 1):
        hil = np.array([s * (a.mediastinum + 0.07), -0.06])
        for _ in range(14):
            ang = tex_rng.uniform(-1.25, 1.1)  # from lateral-horizontal; negative points upwards
            direction = np.array([s * np.cos(ang), np.sin(ang)])
            length = tex_rng.uniform(0.35, 0.6)
            p0 = hil
            width = tex_rng.uniform(0.010, 0.016)
            for k in range(3):
                bend = tex_rng.normal(0, 0.25)
                c, sn = np.cos(bend), np.sin(bend)
                direction = np.array([c * direction[0] - sn * direction[1], sn * direction[0] + c * direction[1]])
                p1 = p0 + direction * length / 3
                d = _segment_distance(x, y, p0, p1)
                vessels = np.maximum(vessels, (0.7 - 0.2 * k) * _soft(d - width * (1 - 0.28 * k), max(edge, 0.006)))
                p0 = p1
    markings = vessels

    # ribs: posterior arcs from the spine curving laterally and downwards, plus clavicles
    bones = np.zeros_like(x)
    n_ribs = 9
    for s in (-1, 1):
        for i in range(n_ribs):
            y0 = a.apex + 0.02 + i * (a.dome(s) - a.apex + 0.08) / n_ribs
            lateral = np.clip(s * x - 0.05, 0, None)
            curve = (
                y0 - 0.10 * np.sin(np.clip(lateral / a.half_width, 0, 1) * np.pi) + 0.18 * (lateral / a.half_width) ** 2
            )
            band = (
                _soft(np.abs(y - curve) - 0.022, edge)
                * _soft(s * x * -1 + 0.05, edge)
                * _soft(np.abs(x) - a.half_width - 0.03, edge)
            )
            bones = np.maximum(bones, 0.55 * band)
        clav = _segment_distance(x, y, (s * 0.08, a.apex + 0.06), (s * (a.half_width * 0.85), a.apex - 0.06))
        bones = np.maximum(bones, 0.9 * _soft(clav - 0.028, edge))
    spine = _soft(np.abs(x) - 0.065, edge) * (0.55 + 0.25 * (np.cos((y + 1) * np.pi * 9) > -0.2))

    # --- findings ------------------------------------------------------------------------------
    masks: dict[str, np.ndarray] = {}
    meta: dict[str, object] = {"ctr": a.ctr}
    lung_air = {s: lungs[s].copy() for s in (-1, 1)}
    opacity = np.zeros_like(x)  # extra density inside lungs
    lucency = np.zeros_like(x)  # extra air (pneumothorax)
    marking_weight = np.ones_like(x)

    if findings["Pleural Effusion"]:
        sides = [(-1,), (1,), (-1, 1)][find_rng.integers(0, 3)]
        meta["effusion_sides"] = list(sides)
        eff = np.zeros_like(x)
        for s in sides:
            cx, cy = a.lung_center(s)
            ax = (a.half_width - a.mediastinum) / 2
            lateral = np.clip((s * (x - cx)) / ax * 0.5 + 0.5, 0, 1)  # 0 medial .. 1 lateral
            level = cy - find_rng.uniform(0.10, 0.24)
            rise = find_rng.uniform(0.12, 0.22)
            surface = level - rise * lateral**2  # meniscus: fluid climbs the lateral chest wall
            fluid = _soft(surface - y, edge * 2.5) * _soft(s * -x + a.mediastinum * 0.5, edge)
            eff = np.maximum(eff, fluid * lungs[s])
        masks["Pleural Effusion"] = eff
        opacity = np.maximum(opacity, 0.95 * eff)
        marking_weight *= 1 - eff

    if findings["Pneumothorax"]:
        s = (-1, 1)[find_rng.integers(0, 2)]
        meta["pneumothorax_side"] = s
        shrink = find_rng.uniform(0.28, 0.42)
        collapsed = _lung_mask(x, y, a, s, edge, shrink=shrink)
        ptx = np.clip(lungs[s] - collapsed, 0, 1)
        pleural_line = np.clip(_lung_mask(x, y, a, s, edge, shrink=shrink - 1.5 * px) - collapsed, 0, 1)
        masks["Pneumothorax"] = ptx
        lucency = np.maximum(lucency, ptx)
        marking_weight *= 1 - ptx
        masks["pleural line"] = pleural_line
        lung_air[s] = np.maximum(lung_air[s], ptx)

    if findings["Consolidation"]:
        s = (-1, 1)[find_rng.integers(0, 2)]
        lobe = ("upper", "lower")[find_rng.integers(0, 2)]
        meta["consolidation"] = (s, lobe)
        cx, cy = a.lung_center(s)
        fissure_y = -0.05 + find_rng.uniform(-0.05, 0.08)
        region = _soft(y - fissure_y, edge) if lobe == "upper" else _soft(fissure_y - y, edge)
        blobs = np.zeros_like(x)
        for _ in range(4):
            bx = cx + find_rng.uniform(-0.12, 0.12)
            by = (fissure_y - 0.2 if lobe == "upper" else fissure_y + 0.2) + find_rng.uniform(-0.08, 0.08)
            blobs = np.maximum(blobs, _soft(np.hypot(x - bx, (y - by) * 1.2) - find_rng.uniform(0.14, 0.22), 0.03))
        cons = blobs * region * lungs[s]
        # air bronchograms: dark branching tubes inside the opacity
        bronch = np.zeros_like(x)
        for _ in range(3):
            p0 = np.array([s * (a.mediastinum + 0.08), -0.05])
            p1 = p0 + np.array([s * find_rng.uniform(0.15, 0.3), find_rng.uniform(-0.3, 0.3)])
            bronch = np.maximum(bronch, _soft(_segment_distance(x, y, p0, p1) - 0.010, max(edge, 0.005)))
        masks["Consolidation"] = cons
        opacity = np.maximum(opacity, 0.75 * cons * (1 - 0.5 * bronch))

    if findings["Edema"]:
        haze = np.zeros_like(x)
        for s in (-1, 1):
            hcx_, hcy_ = s * (a.mediastinum + 0.16), -0.02
            haze = np.maximum(haze, np.exp(-(((x - hcx_) / 0.26) ** 2 + ((y - hcy_) / 0.34) ** 2)))
        lung_all = np.maximum(lungs[-1], lungs[1])
        kerley = np.zeros_like(x)
        for s in (-1, 1):
            for k in range(4):
                yk = a.dome(s) - 0.08 - 0.05 * k
                seg = _segment_distance(x, y, (s * (a.half_width - 0.10), yk), (s * (a.half_width - 0.01), yk))
                kerley = np.maximum(kerley, 0.5 * _soft(seg - 0.006, max(edge, 0.004)))
        masks["Edema"] = haze * lung_all
        opacity = np.maximum(opacity, 0.55 * haze * lung_all + kerley * lung_all)
        markings = ndimage.gaussian_filter(markings, sigma=max(0.7, size / 64))

    # --- compose (dense = bright) ----------------------------------------------------------------
    lung_all = np.maximum(lung_air[-1], lung_air[1])
    img = 0.08 + 0.50 * body  # air outside, soft tissue inside
    img = img + 0.10 * np.clip((y - a.dome_right) / 0.2, 0, 1) * body  # abdomen below the domes
    img = img - 0.36 * lung_all * (1 - heart)  # aerated lung is dark
    img = img + 0.12 * markings * marking_weight * lung_all
    img = img + 0.14 * heart + 0.10 * mediastinum
    density = 1.3 - 0.7 * ageing
    img = img + 0.10 * density * bones * body + 0.12 * density * spine * (1 - 0.5 * lung_all)
    if view == "AP":
        scapulae = np.zeros_like(x)
        for s in (-1, 1):
            sx, sy = s * (a.half_width - 0.06), a.apex + 0.34
            scapulae = np.maximum(scapulae, _soft(np.hypot((x - sx) / 0.45, y - sy) - 0.30, 0.03))
        masks["scapulae"] = scapulae * body
        img = img + 0.15 * scapulae * body
    if female:
        breasts = np.zeros_like(x)
        for s in (-1, 1):
            bx, by = s * a.half_width * 0.58, a.dome(s) - 0.14
            breasts = np.maximum(breasts, _soft(np.hypot((x - bx) / 1.15, y - by) - 0.26, 0.06))
        masks["breast shadows"] = breasts * body
        img = img + 0.18 * breasts * body
    img = img + 0.34 * opacity * (1 - 0.6 * heart)
    img = img - 0.10 * lucency
    if "pleural line" in masks:
        img = img + 0.30 * masks["pleural line"]
    # gastric bubble under the left hemidiaphragm
    img = img - 0.12 * _soft(np.hypot((x - 0.35) / 1.4, y - a.dome_left - 0.12) - 0.07, edge * 2) * body

    # --- acquisition -----------------------------------------------------------------------------
    blur = acq_rng.uniform(0.3, 0.9) * size / 128
    if blur > 0.25:
        img = ndimage.gaussian_filter(img, sigma=blur)
    gamma = acq_rng.uniform(0.8, 1.25)
    contrast, brightness = acq_rng.uniform(0.85, 1.15), acq_rng.uniform(-0.06, 0.06)
    img = np.clip(img, 0, 1) ** gamma * contrast + brightness
    img = img + acq_rng.normal(0, acq_rng.uniform(0.008, 0.025), size=img.shape)
    img = np.clip(img, 0, 1).astype(np.float32)

    thorax = np.maximum(_lung_mask(x, y, a, -1, edge), _lung_mask(x, y, a, 1, edge))
    masks.update({"heart": heart, "lungs": thorax, "lung markings": markings * marking_weight * lung_all})
    masks = {k: v.astype(np.float32) for k, v in masks.items()}
    meta.update(
        {
            "sex": "Female" if female else "Male",
            "age": age,
            "view": view,
        }
    )
    return Phantom(image=img, findings=findings, masks=masks, meta=meta)


def measure_ctr(phantom: Phantom) -> float:
    """Cardiothoracic ratio measured on the rendered masks: widest heart extent / widest lung extent.

    Uses soft masks with sub-pixel interpolation of the 0.5 crossing, so it is accurate at small sizes."""

    def extent(mask: np.ndarray) -> float:
        profile = mask.max(axis=0)  # horizontal occupancy
        inside = np.nonzero(profile >= 0.5)[0]
        if inside.size == 0:
            return 0.0
        lo, hi = inside[0], inside[-1]

        def crossing(i_out: int, i_in: int) -> float:
            if i_out < 0 or i_out >= profile.size:
                return float(i_in)
            p_out, p_in = profile[i_out], profile[i_in]
            return i_in + (i_out - i_in) * (p_in - 0.5) / max(p_in - p_out, 1e-6)

        return crossing(hi + 1, hi) - crossing(lo - 1, lo)

    return extent(phantom.masks["heart"]) / max(extent(phantom.masks["lungs"]), 1e-6)
