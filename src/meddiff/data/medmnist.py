"""`medmnist:FILE.npz` datasets, read straight from the npz (medmnist's own classes assert the official
split sizes, which trimmed copies do not have)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from meddiff.data.dataset import ImageLabelDataset, to_model_range
from meddiff.data.io import resize
from meddiff.data.prompts import prompt_from_labels
from meddiff.data.registry import DatasetSpec, register
from meddiff.errors import MeddiffError

ORGANS = [
    "Bladder",
    "Femur Left",
    "Femur Right",
    "Heart",
    "Kidney Left",
    "Kidney Right",
    "Liver",
    "Lung Left",
    "Lung Right",
    "Pancreas",
    "Spleen",
]
# label names of the standard 2D files (the file stem without a size suffix such as _64)
KNOWN_LABELS: dict[str, list[str]] = {
    "pathmnist": [
        "Adipose",
        "Background",
        "Debris",
        "Lymphocytes",
        "Mucus",
        "Smooth Muscle",
        "Normal Colon Mucosa",
        "Cancer-associated Stroma",
        "Colorectal Adenocarcinoma Epithelium",
    ],
    "chestmnist": [
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Pleural Thickening",
        "Hernia",
    ],
    "dermamnist": [
        "Actinic Keratoses",
        "Basal Cell Carcinoma",
        "Benign Keratosis",
        "Dermatofibroma",
        "Melanoma",
        "Melanocytic Nevi",
        "Vascular Lesions",
    ],
    "octmnist": ["Choroidal Neovascularization", "Diabetic Macular Edema", "Drusen", "Normal"],
    "pneumoniamnist": ["Normal", "Pneumonia"],
    "retinamnist": ["Grade 0", "Grade 1", "Grade 2", "Grade 3", "Grade 4"],
    "breastmnist": ["Malignant", "Normal or Benign"],
    "bloodmnist": [
        "Basophil",
        "Eosinophil",
        "Erythroblast",
        "Immature Granulocytes",
        "Lymphocyte",
        "Monocyte",
        "Neutrophil",
        "Platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular Endothelial Cells",
        "Interstitial Endothelial Cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": ORGANS,
    "organcmnist": ORGANS,
    "organsmnist": ORGANS,
}
SUBJECTS = {
    "chestmnist": "chest x-ray",
    "pneumoniamnist": "chest x-ray",
    "breastmnist": "breast ultrasound",
    "octmnist": "retinal OCT",
    "retinamnist": "fundus photograph",
    "dermamnist": "dermatoscopic image",
    "pathmnist": "histology patch",
    "bloodmnist": "blood cell microscopy image",
    "tissuemnist": "kidney tissue microscopy image",
    "organamnist": "abdominal CT slice",
    "organcmnist": "abdominal CT slice",
    "organsmnist": "abdominal CT slice",
}
MULTILABEL = {"chestmnist"}


def _flavour(path: Path) -> str:
    stem = path.stem.lower()
    return stem.split("_")[0]


@register("medmnist", heldout_split="test", options=("split",))
def load_medmnist(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise MeddiffError(f"MedMNIST file {path} not found; pass the .npz, e.g. medmnist:data/pneumoniamnist.npz")
    split = spec.options.get("split", "train")
    try:
        with np.load(path) as npz:
            if f"{split}_images" not in npz.files:
                splits = sorted({k.rsplit("_", 1)[0] for k in npz.files if k.endswith("_images")})
                raise MeddiffError(f"{path} has no split {split!r}; it holds {splits}")
            images = npz[f"{split}_images"]
            raw = npz[f"{split}_labels"]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MeddiffError(f"{path} is not a readable MedMNIST .npz file ({exc})") from None
    if images.ndim == 4:  # RGB MedMNIST: convert explicitly to luminance
        images = images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    images = images.astype(np.float32) / (65535.0 if images.max() > 255 else 255.0)
    flavour = _flavour(path)
    raw = raw.reshape(len(raw), -1)
    if not np.isfinite(raw.astype(np.float64)).all():
        bad = np.nonzero(~np.isfinite(raw.astype(np.float64)).all(1))[0]
        raise MeddiffError(f"{path}: {split}_labels has NaN/inf in {len(bad)} rows (first: row {bad[0]}); fix the file")
    if flavour in MULTILABEL or raw.shape[1] > 1:
        names = KNOWN_LABELS.get(flavour, [f"label_{k}" for k in range(raw.shape[1])])
        labels = raw.astype(np.float32)
        multiclass = False
    else:
        classes = int(raw.max()) + 1
        names = KNOWN_LABELS.get(flavour, [f"class_{k}" for k in range(classes)])
        classes = max(classes, len(names))
        labels = np.eye(classes, dtype=np.float32)[raw[:, 0].astype(int)]
        multiclass = True
    resized = (
        np.stack([resize(im, resolution) for im in images]) if len(images) else np.zeros((0, resolution, resolution))
    )
    lab = torch.from_numpy(labels)
    subject = SUBJECTS.get(flavour, "image")
    prompts = [
        prompt_from_labels([names[k] for k in np.nonzero(row > 0.5)[0]] or ["No Finding"], subject) for row in labels
    ]
    return ImageLabelDataset(
        to_model_range(resized),
        lab,
        torch.ones_like(lab, dtype=torch.bool),
        list(names),
        prompts=prompts,
        multiclass=multiclass,
        prompts_from_labels=True,
    )
