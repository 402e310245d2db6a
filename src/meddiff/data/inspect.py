"""`meddiff data inspect SPEC`: what a dataset holds and every problem in it, before any training.

Volume specs (`volumes:`, `phantom3d:`) are read the way training reads them: loading one decodes its cases once
into the memory-mapped store in the cache (meddiff.data.volume_dataset), and the report describes that store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import cast

from tqdm.auto import tqdm

from meddiff.data.io import is_dicom, is_nifti
from meddiff.data.records import RecordTable
from meddiff.data.spec import LOADERS, DatasetSpec, check_options, load_dataset, parse_spec
from meddiff.data.volume_dataset import VolumeDataset
from meddiff.errors import MeddiffError

VOLUME_KINDS = ("volumes", "phantom3d")
INTENSITY_SAMPLES = 1_000_000  # voxels per channel behind the intensity percentiles
# why a volume case was skipped, by words of its message (meddiff.data.volume_io/volume_prepare/volume_sources)
SKIP_KINDS = (
    ("is missing", "missing file"),
    ("no file for", "missing modality"),
    ("files match", "ambiguous modality"),
    ("no DICOM slices", "unreadable DICOM series"),
    ("NIfTI files; choose", "ambiguous case folder"),
    ("4D series", "4D series (not one volume)"),
    ("2D image", "2D image (not a volume)"),
    ("single DICOM slice", "2D image (not a volume)"),
    ("not a readable", "unreadable file"),
    ("unreadable", "unreadable file"),
    ("modality shapes differ", "modalities of different shapes"),
    ("mask", "mask of another shape"),
    ("constant", "constant intensity"),
    ("no foreground", "no foreground"),
)


def _header(path: Path) -> tuple[str, str]:
    """(size, bit depth) from the file header, without decoding pixels; raises on unreadable files."""
    if is_nifti(path):
        import nibabel as nib

        img = cast(nib.spatialimages.SpatialImage, nib.load(str(path)))  # nibabel types load() as any file image
        return "x".join(map(str, img.shape)), str(img.get_data_dtype())
    if is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return f"{ds.Columns}x{ds.Rows}", f"{ds.BitsStored}-bit DICOM {ds.PhotometricInterpretation}"
    from PIL import Image

    with Image.open(path) as im:
        depth = {"I;16": "16-bit", "I;16B": "16-bit", "I": "32-bit int", "F": "32-bit float", "1": "1-bit"}
        return f"{im.width}x{im.height}", f"{depth.get(im.mode, '8-bit')} {im.mode}"


def inspect_table(table: RecordTable, check_files: bool = True, progress: bool = True) -> dict:
    names = table.label_names
    values: dict[str, Counter[str]] = {n: Counter() for n in names}
    views: Counter[str] = Counter()
    sexes: Counter[str] = Counter()
    ages: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    depths: Counter[str] = Counter()
    problems: list[tuple[str, str]] = []
    for rec in table.records:
        for n in names:
            v = rec.values.get(n)
            values[n]["blank" if v is None else {1.0: "1", 0.0: "0", -1.0: "-1"}[float(v)]] += 1
        views[rec.view or "unknown"] += 1
        sexes[rec.sex or "unknown"] += 1
        ages["unknown" if rec.age is None else f"{int(rec.age // 10 * 10)}-{int(rec.age // 10 * 10) + 9}"] += 1
    seen = set()
    if check_files:
        for rec in tqdm(
            table.records, desc="check files", unit="file", disable=not progress or len(table.records) < 500
        ):
            if rec.path in seen:
                continue
            seen.add(rec.path)
            if not rec.path.exists():
                problems.append((str(rec.path), "missing"))
                continue
            try:
                size, depth = _header(rec.path)
                sizes[size] += 1
                depths[depth] += 1
            except Exception as exc:  # any unreadable header is a problem to list
                problems.append((str(rec.path), f"unreadable: {type(exc).__name__}: {str(exc)[:80]}"))
    return {
        "source": table.source,
        "images": len(table.records),
        "labels": {n: dict(c) for n, c in values.items()},
        "views": dict(views),
        "sex": dict(sexes),
        "age": dict(sorted(ages.items())),
        "sizes": dict(sizes.most_common()),
        "bit_depths": dict(depths),
        "problems": problems,
        "problem_counts": dict(Counter(p[1].split(":")[0] for p in problems)),
        "filters": table.notes,
    }


def is_volume_spec(spec: DatasetSpec) -> bool:
    return spec.kind in VOLUME_KINDS


def load_volume_dataset(spec: DatasetSpec, edge: int) -> VolumeDataset:
    """A volume spec's dataset (decoded into its cache store unless it is there)."""
    return cast(VolumeDataset, load_dataset(spec, edge))


def volume_store(dataset: VolumeDataset) -> Path:
    """The cache folder a loaded VolumeDataset is mapped from (volume_dataset.build_volume_dataset names it)."""
    from meddiff.data.cache import cache_root

    return cache_root() / f"volumes-{dataset.key}"


def skip_kind(reason: str) -> str:
    """The kind of problem a skipped case's message names (for counts; the message itself is listed too)."""
    return next((kind for words, kind in SKIP_KINDS if words in reason), "other")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _label_summary(dataset: VolumeDataset) -> dict[str, dict]:
    """Per label: cases where it is known, positives (> 0.5), prevalence among the known, and the value range where
    the label is not binary (e.g. a tumour volume in mL)."""
    import numpy as np

    labels, known = dataset.labels.numpy(), dataset.known.numpy()
    out: dict[str, dict] = {}
    for k, name in enumerate(dataset.label_names):
        values = labels[known[:, k], k]
        positive = int((values > 0.5).sum())
        entry: dict = {
            "known": int(values.size),
            "positive": positive,
            "prevalence": round(positive / values.size, 4) if values.size else None,
        }
        if values.size and not np.isin(values, (0.0, 1.0)).all():
            entry.update(min=float(values.min()), mean=float(values.mean()), max=float(values.max()))
        out[name] = entry
    return out


def _intensities(dataset: VolumeDataset) -> dict[str, dict[str, float]]:
    """Per channel, the stored voxel values (what models train on, in [-1, 1]): min, mean, max over every voxel,
    and the 1st/99th percentiles of an even sample."""
    import numpy as np

    images = dataset.images
    n, channels = int(images.shape[0]), int(images.shape[1])
    low = np.full(channels, np.inf)
    high = np.full(channels, -np.inf)
    total = np.zeros(channels)
    voxels = int(np.prod(images.shape[2:]))
    stride = max(1, (n * voxels) // INTENSITY_SAMPLES)
    samples: list[list] = [[] for _ in range(channels)]
    for i in range(n):
        case = np.asarray(images[i], dtype=np.float32).reshape(channels, -1)
        low, high = np.minimum(low, case.min(1)), np.maximum(high, case.max(1))
        total += case.sum(1, dtype=np.float64)
        for c in range(channels):
            samples[c].append(case[c, (i * voxels) % stride :: stride])
    out = {}
    for c, name in enumerate(dataset.channel_names or [f"channel {c}" for c in range(channels)]):
        sample = np.concatenate(samples[c]) if samples[c] else np.zeros(1, np.float32)
        p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
        out[name] = {
            "min": round(float(low[c]), 4),
            "p1": round(p1, 4),
            "mean": round(float(total[c] / max(1, n * voxels)), 4),
            "p99": round(p99, 4),
            "max": round(float(high[c]), 4),
        }
    return out


def inspect_volumes(spec: DatasetSpec, edge: int) -> dict:
    """A volume spec at a grid edge of `edge` voxels (unless its shape= says otherwise): cases, skipped cases and
    why, the grid, channels, labels, stored intensities and the store (built here when it is not there yet)."""
    check_options(spec)
    dataset = load_volume_dataset(spec, edge)
    problems = [(str(case), str(why)) for case, why in dataset.problems]
    store = volume_store(dataset)
    return {
        "source": str(spec),
        "kind": "volumes",
        "split": spec.options.get("split", "train"),
        "cases": len(dataset),
        "skipped": len(problems),
        "skip_reasons": dict(Counter(skip_kind(why) for _, why in problems).most_common()),
        "shape": list(dataset.shape[1:]),
        "spacing": [round(v, 4) for v in dataset.spacing],
        "channels": list(dataset.channel_names),
        "labels": _label_summary(dataset),
        "intensity": _intensities(dataset),
        "store": str(store),
        "store_bytes": _folder_bytes(store),
        "problems": problems,
    }


def inspect_spec(text: str, progress: bool = True, volume_edge: int | None = None) -> dict:
    """The report of a dataset spec. Volume specs need `volume_edge`, the grid edge in voxels to build their store
    at (the CLI passes what `meddiff train` would use)."""
    import meddiff.data.loaders  # noqa: F401

    spec: DatasetSpec = parse_spec(text)
    check_options(spec)
    if is_volume_spec(spec):
        if volume_edge is None:
            raise MeddiffError(f"{spec}: a volume spec needs the grid edge in voxels (volume_edge=, e.g. 64)")
        return inspect_volumes(spec, volume_edge)
    if volume_edge is not None:
        raise MeddiffError(
            f"{spec.kind}: is not volume data; a grid edge (--resolution) is for volumes: and phantom3d:"
        )
    loader = LOADERS[spec.kind]
    if loader.index is not None and spec.path:
        return inspect_table(loader.index(spec), progress=progress)
    ds = load_dataset(spec, 28)  # array datasets (MedMNIST, in-memory phantoms)
    counts = {n: {"1": int(c), "0": len(ds) - int(c)} for n, c in ds.label_counts().items()}
    return {
        "source": str(spec),
        "images": len(ds),
        "labels": counts,
        "views": {},
        "sex": {},
        "age": {},
        "sizes": {},
        "bit_depths": {},
        "problems": ds.problems,
        "problem_counts": {},
        "filters": [],
    }


def human_bytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.0f} kB"


def format_volume_report(report: dict, max_problems: int = 20) -> str:
    skipped = f", {report['skipped']} skipped" if report["skipped"] else ""
    cases = f"{report['cases']} volume case{'' if report['cases'] == 1 else 's'}"
    lines = [
        f"{report['source']}: {cases} (split {report['split']}){skipped}",
        f"grid: {'x'.join(map(str, report['shape']))} voxels at {' x '.join(f'{v:g}' for v in report['spacing'])} mm"
        f"; channels: {', '.join(report['channels'])}",
    ]
    if report["labels"]:
        lines.append(f"{'label':<28}{'known':>7}{'1':>7}{'prevalence':>12}  values")
        for name, c in report["labels"].items():
            prevalence = "-" if c["prevalence"] is None else f"{c['prevalence']:.1%}"
            values = f"{c['min']:g} to {c['max']:g} (mean {c['mean']:.3g})" if "min" in c else "0/1"
            lines.append(f"{name:<28}{c['known']:>7}{c['positive']:>7}{prevalence:>12}  {values}")
    else:
        lines.append("labels: none (unconditional)")
    for name, v in report["intensity"].items():
        lines.append(
            f"intensity {name} (stored, [-1, 1]): min {v['min']:g}, 1% {v['p1']:g}, mean {v['mean']:g}, "
            f"99% {v['p99']:g}, max {v['max']:g}"
        )
    lines.append(f"store: {report['store']} ({human_bytes(report['store_bytes'])}; training on this spec maps it)")
    if report["problems"]:
        counts = ", ".join(f"{v} {k}" for k, v in list(report["skip_reasons"].items())[:5])
        lines.append(f"skipped cases: {len(report['problems'])} ({counts})")
        lines += [f"  {case}: {why}" for case, why in report["problems"][:max_problems]]
        if len(report["problems"]) > max_problems:
            lines.append(f"  ... {len(report['problems']) - max_problems} more (see --json)")
    else:
        lines.append("skipped cases: none")
    return "\n".join(lines)


def format_report(report: dict, max_problems: int = 20) -> str:
    if report.get("kind") == "volumes":
        return format_volume_report(report, max_problems)
    lines = [f"{report['source']}: {report['images']} images"]
    if report["filters"]:
        lines.append("filters: " + "; ".join(report["filters"]))
    lines.append(f"{'label':<28}{'1':>7}{'0':>7}{'-1':>7}{'blank':>7}")
    for name, c in report["labels"].items():
        lines.append(f"{name:<28}" + "".join(f"{c.get(k, 0):>7}" for k in ("1", "0", "-1", "blank")))
    for key in ("views", "sex", "age", "sizes", "bit_depths"):
        if report[key]:
            lines.append(f"{key}: " + ", ".join(f"{k}={v}" for k, v in list(report[key].items())[:12]))
    problems = report["problems"]
    if problems:
        counts = ", ".join(f"{v} {k}" for k, v in report["problem_counts"].items())
        lines.append(f"problems: {len(problems)} ({counts})")
        lines += [f"  {path}: {why}" for path, why in problems[:max_problems]]
        if len(problems) > max_problems:
            lines.append(f"  ... {len(problems) - max_problems} more (see --json)")
    else:
        lines.append("problems: none")
    return "\n".join(lines)
