"""`meddiff data inspect SPEC`: what a dataset holds and every problem in it, before any training."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import cast

from tqdm.auto import tqdm

from meddiff.data.io import is_dicom, is_nifti
from meddiff.data.records import RecordTable
from meddiff.data.spec import LOADERS, DatasetSpec, check_options, load_dataset, parse_spec


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


def inspect_spec(text: str, progress: bool = True) -> dict:
    import meddiff.data.loaders  # noqa: F401

    spec: DatasetSpec = parse_spec(text)
    check_options(spec)
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


def format_report(report: dict, max_problems: int = 20) -> str:
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
