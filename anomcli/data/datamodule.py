"""Datasets in the MVTec AD folder layout, and the loaders that feed a model.

    <root>/train/good/*.png                       defect-free training images
    <root>/test/good/*.png, <root>/test/<type>/*  test images
    <root>/ground_truth/<type>/<name>_mask.png    optional masks of defective test images

Images of any size are resized (not cropped) to the model's square input, so
an anomaly map covers the whole image and maps back onto it exactly. With
tiling (`data.tiling.tile`), large images are scored in overlapping tiles and
trained on random tiles instead (see tiling.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from .image_io import list_images
from .readable import ReadableImageDataset, collate
from .tiling import RandomTileDataset, TiledImageDataset, collate_tiles

log = logging.getLogger(__name__)

GOOD = "good"


class DatasetLayoutError(ValueError):
    """A data root that does not follow the MVTec AD layout."""


class TilingError(ValueError):
    """Tiling settings that cannot work."""


@dataclass(frozen=True)
class Tiling:
    """tile: side of a square tile in image pixels (0: off); overlap: share of a tile neighbours share."""

    tile: int = 0
    overlap: float = 0.25

    def __post_init__(self):
        if self.tile < 0 or self.tile == 1:
            raise TilingError(f"data.tiling.tile must be 0 (off) or a tile side of at least 2 pixels, "
                              f"got {self.tile}")
        if not 0 <= self.overlap < 1:
            raise TilingError(f"data.tiling.overlap must be in [0, 1), got {self.overlap}")

    @property
    def enabled(self) -> bool:
        return self.tile > 0


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 defective, -1 unknown (inference)
    defect_type: str  # "good", a defect folder name, or "" when unknown
    mask_path: Path | None = None


def image_tensor(image, input_size: int) -> torch.Tensor:
    """float [H, W, 3] in [0, 1] -> [3, input_size, input_size], resized with antialiasing."""
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.squeeze(0).clamp_(0, 1)


class ImageDataset(ReadableImageDataset):
    """Each image resized to the model's input; an unreadable file yields its reason instead."""

    def item(self, image) -> dict:
        return {"image": image_tensor(image, self.input_size), "size": image.shape[:2]}


class FolderDataModule:
    """An MVTec-AD layout folder: train split of good images, test split with defect types and masks."""

    def __init__(self, root: str, name: str = "folder", batch_size: int = 16, num_workers: int = 2,
                 extra_good: str | None = None, tiling: dict | None = None):
        self.root = Path(root).expanduser()
        # confirmed-good images from elsewhere (e.g. reviewed false alarms) that train alongside train/good
        self.extra_good = Path(extra_good).expanduser() if extra_good else None
        self.name = name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tiling = Tiling(**(tiling or {}))

    def prepare(self) -> None:
        """Check the layout before any work starts."""
        if not self.root.is_dir():
            raise DatasetLayoutError(f"data root {self.root} does not exist (set data.root=...)")
        train = self.root / "train" / GOOD
        if not train.is_dir() or not list_images(train):
            raise DatasetLayoutError(
                f"{self.root} has no images in train/good/: a dataset needs the MVTec AD layout "
                "train/good/, test/good/, test/<defect>/, ground_truth/<defect>/<name>_mask.png")
        if self.extra_good is not None and (not self.extra_good.is_dir() or not list_images(self.extra_good)):
            raise DatasetLayoutError(f"data.extra_good={self.extra_good} is not a folder with images")

    def train_samples(self) -> list[Sample]:
        extra = list_images(self.extra_good) if self.extra_good is not None else []
        return [Sample(p, 0, GOOD) for p in [*list_images(self.root / "train" / GOOD), *extra]]

    def test_samples(self) -> list[Sample]:
        test = self.root / "test"
        if not test.is_dir():
            raise DatasetLayoutError(f"{self.root} has no test/ folder to evaluate on")
        samples = []
        for folder in sorted(p for p in test.iterdir() if p.is_dir()):
            defect = folder.name
            for path in list_images(folder):
                mask = self.root / "ground_truth" / defect / f"{path.stem}_mask.png"
                samples.append(Sample(path, int(defect != GOOD), defect,
                                      mask if defect != GOOD and mask.is_file() else None))
        if not samples:
            raise DatasetLayoutError(f"{test} holds no images")
        return samples

    def loader(self, samples: Sequence[Sample], input_size: int, *, shuffle: bool = False,
               batch_size: int | None = None, seed: int = 0, start_batch: int = 0, rank: int = 0,
               world_size: int = 1) -> DataLoader:
        """Batches in order; with shuffle, the endless training stream of ShuffledBatches
        (under torchrun, this process's share of it: rank of world_size)."""
        batch_size = batch_size or self.batch_size
        dataset, collate_fn = ImageDataset(samples, input_size), collate
        if self.tiling.enabled and shuffle:
            dataset = RandomTileDataset(samples, input_size, self.tiling.tile, seed=seed)
        elif self.tiling.enabled:
            # one image's tiles already fill a forward pass: batch_size counts tiles, an image is a batch
            dataset = TiledImageDataset(samples, input_size, self.tiling.tile, self.tiling.overlap,
                                        tiles_per_forward=batch_size)
            collate_fn, batch_size = collate_tiles, 1
        # worker seeds come from this generator, not the global one, so starting a loader leaves the
        # dropout random stream as it was (a resumed run must draw the noise an uninterrupted one drew)
        options = dict(num_workers=self.num_workers, collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                       generator=torch.Generator().manual_seed(seed))
        if shuffle:
            batches = ShuffledBatches(len(samples), batch_size, seed, start_batch, rank=rank, world_size=world_size)
            return DataLoader(dataset, batch_sampler=batches, **options)
        return DataLoader(dataset, batch_size=batch_size, **options)


class ShuffledBatches(Sampler[list[int]]):
    """Endless training batches, a new shuffle each epoch, that can start at any batch.

    Epoch e's order depends only on (seed, e), so a run resumed at batch k draws
    the batches an uninterrupted run would have drawn from k on, with no
    generator state to save. As with drop_last, an epoch's incomplete last
    batch is dropped unless it is the epoch's only one. Under torchrun every
    process shuffles alike and takes every world_size-th image of the order from
    its rank on, so the processes share each epoch without overlap.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, start_batch: int = 0, *, rank: int = 0,
                 world_size: int = 1):
        self.size, self.batch_size, self.seed, self.start_batch = size, batch_size, seed, start_batch
        self.rank, self.world_size = rank, world_size
        share = len(range(rank, size, world_size))  # this process's images per epoch
        self.batches_per_epoch = max(1, share // batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for batch in range(skip, self.batches_per_epoch):
                yield order[batch * self.batch_size:(batch + 1) * self.batch_size]
            epoch, skip = epoch + 1, 0


def readable_batches(loader: DataLoader) -> Iterator[dict]:
    """One pass over a training loader: unreadable files are logged and skipped, empty batches dropped."""
    for batch in loader:
        for index, reason in batch["errors"]:
            log.warning("skipping unreadable training image %s: %s", loader.dataset.samples[index].path, reason)
        if batch["images"] is not None:
            yield batch


def endless_batches(loader: DataLoader) -> Iterator[dict]:
    """The readable batches of a shuffled (endless) loader; batches with no readable image are skipped."""
    while True:
        yield from readable_batches(loader)


class CoilsDataModule(FolderDataModule):
    """The embedded synthetic coil dataset: generated into `root` on first use, then read as a folder."""

    def __init__(self, root: str = ".cache/coils", name: str = "coils", batch_size: int = 16,
                 num_workers: int = 2, seed: int = 0, n_train: int = 200, n_test_good: int = 40,
                 n_test_per_defect: int = 10, height: int = 256, width: int = 256, extra_good: str | None = None,
                 tiling: dict | None = None):
        super().__init__(root, name, batch_size, num_workers, extra_good, tiling)
        self.generator_args = dict(seed=seed, n_train=n_train, n_test_good=n_test_good,
                                   n_test_per_defect=n_test_per_defect, height=height, width=width)

    def prepare(self) -> None:
        from .coils import generate_coils

        generate_coils(self.root, **self.generator_args)
        super().prepare()
