"""The dataset pattern every loader shares: read a sample's image, or report why it cannot be read."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_io import ImageReadError, load_image


class ReadableImageDataset(Dataset):
    """A file that cannot be read yields {"image": None, "error": reason} instead of stopping the job.

    Subclasses turn a readable image into model input with `item(image)`, which returns at least
    "image" and "size".
    """

    def __init__(self, samples: Sequence, input_size: int):
        self.samples = list(samples)
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        try:
            image = load_image(self.samples[index].path)
        except ImageReadError as error:
            return {"index": index, "image": None, "error": str(error), "size": None}
        return {"index": index, "error": None, **self.item(image)}

    def item(self, image: np.ndarray) -> dict:
        raise NotImplementedError


def collate(items: list[dict], join: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack) -> dict:
    """Join the readable images into one tensor (stacked by default); keep the unreadable ones' reasons."""
    ok = [item for item in items if item["image"] is not None]
    return {
        "images": join([item["image"] for item in ok]) if ok else None,
        "indices": [item["index"] for item in ok],
        "sizes": [item["size"] for item in ok],
        "errors": [(item["index"], item["error"]) for item in items if item["image"] is None],
    }
