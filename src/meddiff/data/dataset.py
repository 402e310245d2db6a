"""The one dataset shape every loader returns: 1-channel images in [-1, 1], named multi-hot labels with a
mask of which labels are known, and a prompt per image.

Images are either a float tensor (small in-memory sets: rendered phantoms) or MappedImages, read on demand from
a prepared store's uint8/uint16 memory maps; both index the same way. The training loader fetches whole batches
with `__getitems__`, which returns the stored integers (converted to floats on the accelerator)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from meddiff.data.prompts import prompt_from_labels, shuffle_findings
from meddiff.data.store import MappedImages


@dataclass
class ImageLabelDataset(torch.utils.data.Dataset):
    images: torch.Tensor | MappedImages  # (N, 1, R, R) in [-1, 1] when indexed
    labels: torch.Tensor  # float32 (N, K): 1 present, 0 absent (value irrelevant where not known)
    known: torch.Tensor  # bool (N, K): False where the label is blank/uncertain-ignored
    label_names: list[str]
    prompts: Sequence[str] = field(default_factory=list)
    source: str = ""  # the spec it came from
    skipped: int = 0  # files that could not be read (reported, never silent)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) for every skipped file
    multiclass: bool = False  # exactly one label per image (e.g. normal vs pneumonia)
    prompts_from_labels: bool = False  # set when the prompts were built here from the labels (not free text)
    store_key: str = ""  # the prepared store the images are mapped from ("" in memory)
    patients: Sequence[str] = ()  # patient id per image where the source has one (splits, privacy); () if none

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, R, R), got {tuple(self.images.shape)}")
        if self.labels.shape != (n, len(self.label_names)) or self.known.shape != self.labels.shape:
            raise ValueError("labels/known must be (N, K) with K = len(label_names)")
        if not self.prompts:
            self.prompts = [self.prompt_for(i) for i in range(n)]
            self.prompts_from_labels = True

    def positive_counts(self) -> dict[str, int]:
        """Images with each label known-present."""
        present = (self.labels > 0.5) & self.known
        return {name: int(present[:, k].sum()) for k, name in enumerate(self.label_names)}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, object]:
        return {
            "image": self.images[index],
            "labels": self.labels[index],
            "known": self.known[index],
            "prompt": self.prompts[index],
        }

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """One batch for the training loader: stored integers (uint8; 16-bit data as int32) or floats in [-1, 1]
        (in-memory sets), turned into model-range floats on the accelerator by `raw_to_model_range`."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if isinstance(self.images, MappedImages):
            raw = self.images.raw(idx.numpy())
            image = torch.from_numpy(raw if raw.dtype == np.uint8 else raw.astype(np.int32)).unsqueeze(1)
        else:
            image = self.images[idx]
        return {"index": idx, "image": image, "labels": self.labels[idx], "known": self.known[idx]}

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageLabelDataset:
        """The images at `indices`, in that order, with their labels, prompts and patient ids, as floats in memory
        (for splits of small sets, e.g. a public part and a private part; a store's memory maps are not kept)."""
        positions = np.asarray(indices)
        if positions.dtype == bool:
            raise TypeError("subset takes indices, not a mask (np.flatnonzero(mask) gives them)")
        idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"subset indices must be within 0..{len(self) - 1}")
        rows = idx.tolist()
        return replace(
            self,
            images=torch.as_tensor(self.images[idx], dtype=torch.float32),
            labels=self.labels[idx],
            known=self.known[idx],
            prompts=[self.prompts[i] for i in rows],
            patients=[self.patients[i] for i in rows] if self.patients else (),
            store_key="",
            skipped=0,  # the files skipped while loading belong to the whole set
            problems=[],
        )

    def fingerprint(self) -> str:
        """What identifies these images (the store key, or a hash of in-memory pixels): keys derived caches."""
        if self.store_key:
            return self.store_key
        h = hashlib.sha1()
        images = self.images if isinstance(self.images, torch.Tensor) else torch.as_tensor(np.asarray(self.images))
        h.update(str(tuple(images.shape)).encode())
        h.update(images.contiguous().numpy().tobytes())
        return h.hexdigest()[:20]

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def prompt_for(self, index: int) -> str:
        present = [
            name for k, name in enumerate(self.label_names) if self.known[index, k] and self.labels[index, k] > 0.5
        ]
        return prompt_from_labels(present)

    def shuffled_prompt(self, index: int, generator: torch.Generator) -> str:
        """The prompt with its findings in a random order when it was built from labels (a caption augmentation
        that teaches a text model that "effusion and cardiomegaly" means "cardiomegaly and effusion")."""
        prompt = self.prompts[index]
        if not self.prompts_from_labels:
            return prompt
        return shuffle_findings(
            prompt, self.label_names, torch.rand(len(self.label_names), generator=generator).tolist()
        )

    def label_counts(self) -> dict[str, int]:
        positive = ((self.labels > 0.5) & self.known).sum(0)
        return {name: int(c) for name, c in zip(self.label_names, positive)}

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.label_counts().items())
        skip = f", {self.skipped} unreadable files skipped" if self.skipped else ""
        return f"{len(self)} images at {self.resolution} px from {self.source} ({counts}{skip})"


def to_model_range(images01: np.ndarray) -> torch.Tensor:
    """(N, H, W) floats in [0, 1] -> (N, 1, H, W) float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images01, dtype=np.float32)).unsqueeze(1) * 2 - 1
