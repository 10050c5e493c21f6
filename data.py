"""Datasets and loaders shared by every method script: ``build_data(name, ...) -> Data``.

Two paths, one loader contract.

* Device-resident (cifar10, cifar100, mnist, tinyimagenet, sample, fake, ``PATH.npz``, and
  ``folder:PATH`` when its images are at most 64 px): the whole dataset fits in memory, so it is
  held ONCE as a uint8 tensor [N, 3, H, W] on the training device (as airbench / hlb-CIFAR10 do).
  A train batch is gathered by index, then cropped, flipped and normalised by a few batched
  tensor ops on that device, one random crop per image (``random_crop_flip`` or
  ``resized_crop_flip``, then ``normalize``): no per-image Python work, no worker processes, no
  host-to-device copies after the first. Image files (tinyimagenet, small folders) are decoded
  once, in threads, and the decoded copy is cached as an .npz keyed by every file's path, label,
  size and modification time (rebuilt when any changes): beside the data when that folder is
  writable, else in ``user_cache_dir()`` ($XDG_CACHE_HOME/online-kd, default ~/.cache).
* DataLoader (imagenet, imagenet100, ``folder:PATH`` with larger images): too big for memory, so
  a ``torch.utils.data.DataLoader`` decodes JPEGs in ``num_workers`` processes with the ImageNet
  transforms (RandomResizedCrop 224 + flip; test resize 256, centre crop 224). Workers return
  uint8 tensors (4x less to copy than float32); they are copied to the device with
  ``non_blocking`` (from pinned memory on CUDA) and normalised there by the same ``normalize``.

Loader contract (both paths): iterating yields ``(images, labels)`` already on ``device``,
images float32 NCHW normalised by the dataset's mean/std, labels int64. ``len(loader)`` is the
number of batches per epoch on this rank, ``loader.num_samples`` the number of images per epoch
on this rank, ``loader.set_epoch(epoch)`` selects the epoch. ``batch_size`` is per rank.
* train: a fresh permutation and fresh augmentation each epoch, drawn from generators seeded by
  (seed, epoch) only, never from the global RNG: the same seed and epoch give identical batches,
  so a resumed run reproduces an uninterrupted one. The last incomplete batch is dropped.
  With ``world_size > 1`` every rank draws the same permutation and takes its own disjoint
  slice (``train_shard_indices``); every rank gets the same number of batches.
* test (and holdout): in file order, not augmented, last batch kept; rank r takes the r-th
  contiguous block (``test_shard_indices``), so the blocks cover the set exactly once and the
  caller can all-reduce correct counts. Iterating it neither reads nor advances any RNG.

Inputs are checked before training: a malformed .npz (missing keys, float or NCHW images, labels
out of range, empty or one-class splits, not an .npz at all) or image folder (one class, splits
with different classes, mixed sizes, an unreadable file) is a one-line ValueError or
FileNotFoundError naming the file and what is accepted.

Choices:
* mean/std: the published per-channel statistics of the official CIFAR-10/100 training sets,
  ImageNet's for the ImageNet-sized folders; anything else (mnist, tinyimagenet, sample, .npz,
  small folders, fake) uses the exact per-channel mean/std of its own training images (before
  subset and holdout), always right for the data at hand (a JPEG copy of CIFAR-10 has a smaller
  std than CIFAR-10).
* augmentation "standard": random crop with zero padding of image_size // 8 (32 -> 4 px, the
  CIFAR recipe of He et al. 2016; 64 -> 8 px for Tiny ImageNet) + horizontal flip. MNIST is padded
  to 32x32 and repeated to 3 channels at load time (so every CIFAR model runs on it), then
  translated by up to 2 px (crop 32, padding 2) and never flipped (a mirrored digit is another
  symbol, or none). "meanpad": standard with the padding in the dataset's mean colour instead of
  black: what normalising before RandomCrop gives (its padding is 0 after normalisation), the
  order of the TNA authors' CIFAR code. "rrc": RandomResizedCrop back to the image size, scale (0.1, 1), ratio
  (0.8, 1.25), + flip: the TNA authors' Tiny ImageNet recipe (their kd_lth code). "autoaugment":
  standard + AutoAugment's CIFAR-10 policy (ImageNet policy on the DataLoader path).
* ``subset=N``: the first N train and N test images when the rows are in no class order
  (CIFAR, MNIST, .npz, fake); evenly spaced rows when the files are grouped by class
  (tinyimagenet, ImageFolder trees), so that every class still appears.
* ``holdout=N``: a class-stratified hold-out of N training images (``stratified_holdout``),
  seeded by ``seed`` alone, taken from the training set left by ``subset`` (so ``subset`` says
  which images a run may see at all, and the hold-out is carved from them); ``Data.holdout_indices``
  numbers its rows in the source's order (rows of x_train, or files of train/ in sorted order).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagenet", "imagenet100", "mnist", "sample", "fake",
            "folder:PATH", "PATH.npz")
# --augment: standard = crop from zero padding + flip (ImageNet folders: RandomResizedCrop 224 + flip);
# meanpad = standard, padded with the mean colour; rrc = RandomResizedCrop to the image size with RRC_SCALE,
# RRC_RATIO + flip; autoaugment = standard + AutoAugment
AUGMENTATIONS = ("standard", "meanpad", "none", "autoaugment", "rrc")
# The TNA authors' Tiny ImageNet recipe: RandomResizedCrop(64, scale=(0.1, 1), ratio=(0.8, 1.25)) + flip.
RRC_SCALE, RRC_RATIO = (0.1, 1.0), (0.8, 1.25)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET100_CLASSES = 100  # the first 100 WordNet ids in sorted order
FOLDER_IMAGE_SIZE, FOLDER_RESIZE = 224, 256
FAKE_TRAIN, FAKE_TEST, FAKE_CLASSES, FAKE_SIZE = 1024, 256, 10, 32
# Image folders decoded into memory: tinyimagenet, and folder:PATH when its images are at most this many px.
SMALL_IMAGE_MAX = 64
DECODED_CACHE, DECODED_CACHE_VERSION = "decoded_uint8.npz", 1  # the decoded copy's file name; its format
# The CIFAR-10 sample shipped with the repository (1,000 train / 200 test images; samples/README.md).
SAMPLE_NPZ = Path(__file__).resolve().parent / "samples" / "cifar10_sample.npz"

# Distinct streams of the (seed, epoch) generators, so that the permutation and the crops
# are not drawn from the same numbers.
_PERMUTATION_STREAM, _CROP_FLIP_STREAM, _AUTOAUGMENT_STREAM, _FOLDER_AUGMENT_STREAM, _HOLDOUT_STREAM = range(5)


@dataclass
class Data:
    train: "DeviceLoader | FolderLoader"
    test: "DeviceLoader | FolderLoader"
    num_classes: int
    image_size: int
    class_names: list
    mean: tuple
    std: tuple
    holdout: "DeviceLoader | FolderLoader | None" = None  # build_data(holdout=N): an evaluation loader
    holdout_indices: list = field(default_factory=list)   # its rows of the source's training set, sorted


def _flip_draws(generator: torch.Generator, count: int, flip: bool) -> torch.Tensor:
    flips = torch.rand(count, generator=generator) < 0.5
    return flips if flip else flips.zero_()


@dataclass(frozen=True)
class CropFlip:
    """Train augmentation of the device path: crop back to size from a padded image, maybe mirror. The
    padding is black, or `fill` (a uint8 value per channel)."""
    padding: int
    flip: bool = True
    fill: tuple = ()

    def draw(self, generator: torch.Generator, count: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Per-image (row offset, column offset, flip) for `count` images."""
        span = 2 * self.padding + 1
        offsets_y = torch.randint(span, (count,), generator=generator)
        offsets_x = torch.randint(span, (count,), generator=generator)
        return offsets_y, offsets_x, _flip_draws(generator, count, self.flip)

    def __call__(self, images: torch.Tensor, offsets_y, offsets_x, flips) -> torch.Tensor:
        return random_crop_flip(images, offsets_y, offsets_x, flips, self.padding, self.fill or None)


@dataclass(frozen=True)
class ResizedCropFlip:
    """torchvision's RandomResizedCrop(image size, scale, ratio) + RandomHorizontalFlip, one crop per
    image, batched on the device (see resized_crop_boxes and resized_crop_flip)."""
    scale: tuple = RRC_SCALE
    ratio: tuple = RRC_RATIO
    flip: bool = True

    def draw(self, generator: torch.Generator, count: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Per-image (top, left, box height, box width, flip) for `count` images."""
        boxes = resized_crop_boxes(generator, count, height, width, self.scale, self.ratio)
        return (*boxes, _flip_draws(generator, count, self.flip))

    def __call__(self, images: torch.Tensor, top, left, box_height, box_width, flips) -> torch.Tensor:
        return resized_crop_flip(images, top, left, box_height, box_width, flips)


# ----------------------------------------------------------------------------- seeding, sharding
def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, stream...); SeedSequence mixes the
    numbers so that nearby (seed, epoch) pairs do not give related or equal seeds."""
    words = np.random.SeedSequence([seed, epoch, *stream]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def epoch_generator(seed: int, epoch: int, *stream: int) -> torch.Generator:
    """A CPU generator (so CPU and CUDA runs draw the same numbers) that never touches the global RNG."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, *stream))


def train_shard_indices(num_images: int, seed: int, epoch: int, rank: int = 0,
                        world_size: int = 1) -> torch.Tensor:
    """This rank's image indices for one training epoch: every rank draws the same permutation
    and takes every world_size-th entry from its rank on; the tail that would give ranks unequal
    counts is dropped (it changes every epoch)."""
    permutation = torch.randperm(num_images, generator=epoch_generator(seed, epoch, _PERMUTATION_STREAM))
    per_rank = num_images // world_size
    return permutation[rank: per_rank * world_size: world_size]


def test_shard_indices(num_images: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The rank-th of world_size contiguous blocks of range(num_images): disjoint, covering it once."""
    return torch.arange(num_images).tensor_split(world_size)[rank]


def subset_rows(num_rows: int, subset: Optional[int], grouped_by_class: bool) -> torch.Tensor:
    """Rows kept by ``subset``: the first ones, or evenly spaced ones when rows are sorted by class."""
    if subset is None or subset >= num_rows:
        return torch.arange(num_rows)
    if grouped_by_class:
        return torch.linspace(0, num_rows - 1, subset).round().long()
    return torch.arange(subset)


def stratified_holdout(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Sorted positions of `count` of `labels`, each class contributing in proportion to its frequency
    (largest remainders, ties to the lower class), drawn within each class by a generator seeded by
    `seed` only: the same positions on every rank and on every run with that seed."""
    if not 0 < count < len(labels):
        raise ValueError(f"holdout {count} must be in 1..{len(labels) - 1}: the training set has {len(labels)} images")
    classes, class_counts = labels.cpu().unique(return_counts=True)
    exact = class_counts.double() * count / len(labels)
    quota = exact.floor().long()
    quota[torch.argsort(quota - exact, stable=True)[: count - int(quota.sum())]] += 1
    generator = epoch_generator(seed, 0, _HOLDOUT_STREAM)
    chosen = []
    for label, share in zip(classes, quota.tolist()):
        members = (labels.cpu() == label).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:share]])
    return torch.cat(chosen).sort().values


def split_holdout(rows: torch.Tensor, labels: torch.Tensor, holdout: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(training rows, hold-out rows): `rows` of a training set whose labels are `labels`, minus a
    stratified_holdout of `holdout` of them (none when 0); both in the order of `rows`."""
    if holdout == 0:
        return rows, rows[:0]
    positions = stratified_holdout(labels[rows], holdout, seed)
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[positions] = False
    return rows[keep], rows[positions]


# ----------------------------------------------------------------------------- batched tensor ops
def random_crop_flip(images: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor,
                     flip_mask: torch.Tensor, padding: int, fill: Optional[Sequence] = None) -> torch.Tensor:
    """Per-image crop and mirror of a batch, in one gather on the batch's device.

    images [B, C, H, W] (any dtype) are padded by ``padding`` on every side, with zeros or with
    ``fill`` (one value per channel, torchvision's ``pad(image, padding, fill)``); image b is
    cropped back to H x W at row offsets_y[b], column offsets_x[b] of its padded version
    (0 <= offset <= 2 * padding) and then mirrored left-right where flip_mask[b]. This equals
    torchvision's ``hflip(crop(pad(image, padding), y, x, H, W))``, i.e. RandomCrop(H, padding)
    + RandomHorizontalFlip with those draws. The flip is folded into the column indices, so it
    costs nothing extra; one gather over each flattened H*W plane is about 4x faster on CPU
    than indexing with four broadcast index tensors.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    if padding and fill is not None:
        border = torch.ones_like(padded[:1, :1], dtype=torch.bool)
        border[..., padding:-padding, padding:-padding] = False
        padded = torch.where(border, torch.tensor(fill, dtype=images.dtype, device=device).view(1, -1, 1, 1), padded)
    rows = offsets_y.to(device)[:, None] + torch.arange(height, device=device)            # [B, H]
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip_mask.to(device)[:, None], width - 1 - columns, columns)
    columns = columns + offsets_x.to(device)[:, None]                                       # [B, W]
    flat_index = rows[:, :, None] * padded.shape[-1] + columns[:, None, :]                  # [B, H, W]
    flat_index = flat_index.view(batch, 1, height * width).expand(batch, channels, height * width)
    return padded.flatten(2).gather(2, flat_index).view(batch, channels, height, width)


def resized_crop_boxes(generator: torch.Generator, count: int, height: int, width: int, scale: Sequence[float],
                       ratio: Sequence[float], attempts: int = 10) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop's boxes (top, left, box height, box width; int64 [count] each) for `count` images
    at once, drawn as torchvision's get_params draws them: up to 10 attempts of an area fraction uniform
    in `scale` and a log-uniform aspect ratio in `ratio`, the first box that fits the image wins, a
    uniform position inside it; when no attempt fits, the centred largest box within `ratio`."""
    area = torch.empty(count, attempts).uniform_(scale[0], scale[1], generator=generator) * (height * width)
    aspect = torch.empty(count, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    box_width, box_height = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (box_width > 0) & (box_width <= width) & (box_height > 0) & (box_height <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    box_width, box_height = box_width.gather(1, first).squeeze(1).long(), box_height.gather(1, first).squeeze(1).long()
    fallback_width = min(width, round(height * ratio[1]))  # torchvision's central crop, clipped to the ratios
    fallback_height = min(height, round(fallback_width / ratio[0]))
    any_fits = fits.any(1)
    box_width = torch.where(any_fits, box_width, fallback_width)
    box_height = torch.where(any_fits, box_height, fallback_height)
    uniform = torch.rand(2, count, generator=generator)  # a position uniform over the (H - h + 1) x (W - w + 1) ones
    top = torch.where(any_fits, (uniform[0] * (height - box_height + 1)).long(), (height - box_height) // 2)
    left = torch.where(any_fits, (uniform[1] * (width - box_width + 1)).long(), (width - box_width) // 2)
    return top, left, box_height, box_width


def resized_crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, box_height: torch.Tensor,
                      box_width: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per-image crop of box (top, left, box_height, box_width), resized bilinearly back to the image's
    size and mirrored where flips, for a whole batch in one grid_sample on its device.

    images [B, C, H, W] (any dtype) -> float32 [B, C, H, W] in the input's units (0-255 for uint8,
    unrounded). Output pixel k samples the crop at k + 0.5 crop pixels per output pixel - 0.5, clamped
    to the crop (align_corners=False resizing, as F.interpolate and torchvision's resize compute it;
    the boxes never exceed the image, so this only upsamples and antialiasing changes nothing): it
    equals hflip(resized_crop(image, top, left, box_height, box_width, [H, W])) up to torchvision's
    rounding to uint8.
    """
    batch, _, height, width = images.shape
    device = images.device

    def sample_points(start, length, size):  # [B, size] source coordinates, in pixels of the whole image
        start, length = start.to(device, torch.float32)[:, None], length.to(device, torch.float32)[:, None]
        points = start + (torch.arange(size, device=device) + 0.5) * (length / size) - 0.5
        return torch.minimum(torch.maximum(points, start), start + length - 1)

    rows, columns = sample_points(top, box_height, height), sample_points(left, box_width, width)
    columns = torch.where(flips.to(device)[:, None], columns.flip(1), columns)
    grid = torch.stack([(2 * columns / max(width - 1, 1) - 1)[:, None, :].expand(batch, height, width),
                        (2 * rows / max(height - 1, 1) - 1)[:, :, None].expand(batch, height, width)], dim=-1)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)


def normalize(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std in float32, as one multiply-subtract; mean/std shaped [1, C, 1, 1]."""
    return images_uint8.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)


def channel_stats(images_uint8: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std (population, over all pixels) of uint8 images [N, C, H, W] in [0, 1]
    units, exact: computed in float64 from each channel's histogram of its 256 values (fast, and no
    float copy of the images). The std is floored at 1/255 so that a constant channel (synthetic
    data) is not divided by 0."""
    counts = torch.stack([channel.flatten().bincount(minlength=256) for channel in images_uint8.unbind(1)])
    probabilities = counts.cpu().double() / counts[0].sum().item()                       # [C, 256]
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = probabilities @ values
    std = (probabilities @ values.square() - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


def _stats_tensors(mean: Sequence[float], std: Sequence[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return as_tensor(mean), as_tensor(std)


@contextlib.contextmanager
def seeded_global_rng(seed_value: int):
    """The global CPU RNG, which torchvision's random transforms draw from, seeded with
    seed_value inside the block and restored after it, so the caller's RNG sees no change."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed_value)
        yield


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------- device-resident path
class DeviceLoader:
    """Batches from uint8 images held on the device; see the module docstring for the contract.

    crop_flip (a CropFlip or ResizedCropFlip, None for test or augment="none") draws the epoch's
    per-image crops once and applies them batch by batch; autoaugment, a
    per-image transform on uint8 tensors, runs after the crop and flip (the order of the
    torchvision CIFAR recipes) inside a global RNG seeded per (seed, epoch, rank, batch).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], train: bool,
                 crop_flip: "CropFlip | ResizedCropFlip | None" = None, autoaugment: Optional[Callable] = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.images, self.labels = images, labels
        self.batch_size, self.train = batch_size, train
        self.crop_flip, self.autoaugment = crop_flip, autoaugment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.mean, self.std = _stats_tensors(mean, std, images.device)
        self.epoch = 0
        shard_size = (len(images) // world_size if train
                      else len(test_shard_indices(len(images), rank, world_size)))
        self.num_batches = shard_size // batch_size if train else -(-shard_size // batch_size)
        self.num_samples = self.num_batches * batch_size if train else shard_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def epoch_indices(self) -> torch.Tensor:
        """The image indices this rank visits this epoch, in order (CPU)."""
        if self.train:
            return train_shard_indices(len(self.images), self.seed, self.epoch, self.rank, self.world_size)
        return test_shard_indices(len(self.images), self.rank, self.world_size)

    def _crop_flip_draws(self, count: int) -> list[torch.Tensor]:
        """The epoch's crops and flips for every position, drawn at once, moved once."""
        generator = epoch_generator(self.seed, self.epoch, _CROP_FLIP_STREAM, self.rank)
        draws = self.crop_flip.draw(generator, count, *self.images.shape[-2:])
        return [draw.to(self.images.device) for draw in draws]

    def _autoaugment_batch(self, images: torch.Tensor, batch_number: int) -> torch.Tensor:
        with seeded_global_rng(epoch_seed(self.seed, self.epoch, _AUTOAUGMENT_STREAM, self.rank, batch_number)):
            return torch.stack([self.autoaugment(image) for image in images])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices()[: self.num_samples].to(self.images.device)
        augment = self.train and self.crop_flip is not None
        if augment:
            draws = self._crop_flip_draws(len(indices))
        for batch_number, start in enumerate(range(0, len(indices), self.batch_size)):
            positions = slice(start, start + self.batch_size)
            batch_indices = indices[positions]
            images = self.images[batch_indices]
            if augment:
                images = self.crop_flip(images, *(draw[positions] for draw in draws))
            if self.train and self.autoaugment is not None:
                images = self._autoaugment_batch(images, batch_number)
            yield normalize(images, self.mean, self.std), self.labels[batch_indices]


@dataclass
class ImageArrays:
    """A whole dataset in memory: uint8 images [N, C, H, W] and int64 labels, plus its metadata."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list
    mean: tuple
    std: tuple
    crop_flip: CropFlip
    grouped_by_class: bool = False


def _arrays_with_own_stats(train_images, train_labels, test_images, test_labels, class_names,
                           grouped_by_class=False, crop_flip=None, mean=None, std=None) -> ImageArrays:
    """ImageArrays from uint8 NCHW tensors; mean/std default to the training images' own, the
    crop padding to image_size // 8 with flip."""
    if mean is None:
        mean, std = channel_stats(train_images)
    return ImageArrays(train_images, torch.as_tensor(train_labels, dtype=torch.int64),
                       test_images, torch.as_tensor(test_labels, dtype=torch.int64),
                       [str(name) for name in class_names], tuple(mean), tuple(std),
                       crop_flip or CropFlip(padding=train_images.shape[-1] // 8),
                       grouped_by_class)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _reason(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _checked_images(images: np.ndarray, where: str) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (or grey [N, H, W] / [N, H, W, 1]) as a uint8 tensor [N, 3, H, W],
    or a ValueError naming what is wrong and what is accepted."""
    accepted = "expected uint8 images [N, H, W, 3] (NHWC, RGB, 0-255) or [N, H, W] (grey)"
    if images.size == 0:
        raise ValueError(f"{where} is empty (shape {images.shape}): {accepted}")
    if images.dtype != np.uint8:
        hint = " (e.g. store (x * 255).round().astype(np.uint8))" if images.dtype.kind == "f" else ""
        raise ValueError(f"{where} is {images.dtype}: {accepted}{hint}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        raise ValueError(f"{where} has shape {images.shape}, which is NCHW: {accepted} "
                         f"(store x.transpose(0, 2, 3, 1))")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{where} has shape {images.shape}: {accepted}")
    # choice: grey images are repeated to 3 channels (as MNIST is), so every model runs on them unchanged
    return torch.as_tensor(images).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()


def _checked_labels(labels: np.ndarray, num_images: int, where: str) -> torch.Tensor:
    """Integer class indices [N], one per image, none negative, as an int64 tensor (or a ValueError)."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{where} is {labels.dtype} of shape {labels.shape}: expected integer class "
                         f"indices [N] (one per image, not one-hot)")
    if len(labels) != num_images:
        raise ValueError(f"{where} holds {len(labels)} labels for {num_images} images: expected one per image")
    if labels.min() < 0:
        raise ValueError(f"{where} holds negative labels (min {labels.min()}): expected 0..C-1")
    return torch.as_tensor(labels.astype(np.int64))


def _arrays_from_npz_layout(arrays, source, grouped_by_class: bool = False) -> ImageArrays:
    """x_train, y_train, x_test, y_test (uint8 NHWC, integer labels) and optional classes, from an
    opened .npz or a dict with those keys, checked: every problem is a one-line ValueError naming
    ``source`` and the array."""
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{source}: no {', '.join(missing)}; an .npz dataset holds {', '.join(NPZ_KEYS)} "
                         f"(uint8 images [N, H, W, 3], integer labels [N]) and optionally classes")
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split] = _checked_images(arrays[f"x_{split}"], f"{source}: x_{split}")
        labels[split] = _checked_labels(arrays[f"y_{split}"], len(images[split]), f"{source}: y_{split}")
    if images["train"].shape[1:] != images["test"].shape[1:]:
        raise ValueError(f"{source}: x_train images are {tuple(images['train'].shape[2:])} px but x_test images "
                         f"{tuple(images['test'].shape[2:])} px: both splits need one image size")
    present = labels["train"].unique()
    if len(present) < 2:
        raise ValueError(f"{source}: y_train holds one class ({present.tolist()[0]}): training needs at least 2")
    largest = max(int(labels["train"].max()), int(labels["test"].max()))
    class_names = arrays["classes"].tolist() if "classes" in arrays else list(range(largest + 1))
    if largest >= len(class_names):
        split = "train" if int(labels["train"].max()) == largest else "test"
        raise ValueError(f"{source}: y_{split} holds label {largest} but classes names {len(class_names)} "
                         f"classes: expected labels 0..{len(class_names) - 1}")
    return _arrays_with_own_stats(images["train"], labels["train"], images["test"], labels["test"],
                                  class_names, grouped_by_class)


def _read_npz(path: Path) -> dict:
    """Every array of an .npz file, or a one-line ValueError saying why they cannot be read."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (the zip of .npy arrays that np.savez writes)")
    try:
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # object arrays, damaged members
        raise ValueError(f"{path}: cannot read its arrays ({_reason(error)})") from None


def _load_npz(path: Path, grouped_by_class: bool = False) -> ImageArrays:
    return _arrays_from_npz_layout(_read_npz(path), path, grouped_by_class)


# name: (torchvision class, what to place in data_dir and where to get it, mean, std; None: the
# training images' own)
_TORCHVISION_SOURCES = {
    "cifar10": ("CIFAR10", "cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/"
                "cifar-10-python.tar.gz) or its extracted folder cifar-10-batches-py/",
                CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("CIFAR100", "cifar-100-python.tar.gz (from https://www.cs.toronto.edu/~kriz/"
                 "cifar-100-python.tar.gz) or its extracted folder cifar-100-python/",
                 CIFAR100_MEAN, CIFAR100_STD),
    "mnist": ("MNIST", "MNIST/raw/ holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (from "
              "https://ossci-datasets.s3.amazonaws.com/mnist/)", None, None),
}


def _open_torchvision(name: str, data_dir: str, train: bool):
    """The torchvision dataset from local files if they are there, else downloaded; offline
    and absent, a FileNotFoundError that says what to place where (no traceback chain)."""
    class_name, files_hint, _, _ = _TORCHVISION_SOURCES[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        return dataset_class(root=data_dir, train=train, download=False)
    except RuntimeError:  # not there (or not extracted yet): the download also extracts archives
        pass
    try:
        return dataset_class(root=data_dir, train=train, download=True)
    except (OSError, RuntimeError) as error:
        raise FileNotFoundError(f"{name} not found in {data_dir} and the download failed ({_reason(error)}): "
                                f"place {files_hint} in {data_dir}") from None


def _load_torchvision(name: str, data_dir: str) -> ImageArrays:
    _, _, mean, std = _TORCHVISION_SOURCES[name]
    train_set, test_set = (_open_torchvision(name, data_dir, train) for train in (True, False))
    if name == "mnist":
        # choice: 28x28 grey -> 32x32 (2 px of zeros, the background) x 3 channels, so every
        # CIFAR model runs unchanged; train translation of up to 2 px, no flip.
        as_cifar = lambda digits: F.pad(digits[:, None], (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
        return _arrays_with_own_stats(as_cifar(train_set.data), train_set.targets,
                                      as_cifar(test_set.data), test_set.targets,
                                      train_set.classes, crop_flip=CropFlip(padding=2, flip=False))
    return _arrays_with_own_stats(_checked_images(train_set.data, name), train_set.targets,
                                  _checked_images(test_set.data, name), test_set.targets,
                                  train_set.classes, mean=mean, std=std)


# ----------------------------------------------------------------------------- image files, decoded once
@contextlib.contextmanager
def _open_image(path):
    """PIL's image, lazily decoded; any failure to read it (in the block too) is a one-line ValueError naming it."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: cannot read the image ({_reason(error)})") from None


def _read_rgb(path) -> np.ndarray:
    """uint8 [H, W, 3]: grey, palette and RGBA images become RGB."""
    with _open_image(path) as image:
        return np.asarray(image.convert("RGB"))


def _decode_images(paths: Sequence) -> np.ndarray:
    """uint8 [N, H, W, 3] from image files, decoded in threads (one contiguous chunk per CPU; Pillow
    releases the GIL while it decodes); every image must have the first one's size."""
    chunks = np.array_split(np.arange(len(paths)), _usable_cpus())
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        images = [image for chunk in pool.map(lambda rows: [_read_rgb(paths[row]) for row in rows], chunks)
                  for image in chunk]
    for path, image in zip(paths, images):
        if image.shape != images[0].shape:
            size = lambda array: f"{array.shape[1]}x{array.shape[0]} px"  # width x height, as PIL
            raise ValueError(f"{path} is {size(image)} but {paths[0]} is {size(images[0])}: a folder read into "
                             f"memory (images <= {SMALL_IMAGE_MAX} px) needs one image size")
    return np.stack(images)


def user_cache_dir() -> Path:
    """Where decoded copies of read-only data folders go: $XDG_CACHE_HOME/online-kd (default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "online-kd"


def _cache_paths(root: Path) -> list[Path]:
    """Where a data folder's decoded copy may be: beside the data when the folder grants write permission
    (checked on its mode too, so that root leaves a read-only shared folder alone), and in user_cache_dir()
    under a name unique to the folder."""
    folder_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    beside = [root / DECODED_CACHE] if os.access(root, os.W_OK) and root.stat().st_mode & 0o222 else []
    return beside + [user_cache_dir() / f"{root.name}-{folder_id}.npz"]


def _cache_key(root: Path, files: Sequence, class_names: Sequence) -> str:
    """A digest of what the decoded copy depends on: every file's path (relative to root), label, size and
    modification time, the class names and the cache's format version."""
    digest = hashlib.sha256(f"{DECODED_CACHE_VERSION}\t{list(class_names)}\n".encode())
    prefix = len(os.fspath(root))  # every path starts with root: hash the rest, so a moved folder keeps its copy
    for path, label in files:
        stat = os.stat(path)
        digest.update(f"{os.fspath(path)[prefix:]}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _write_npz_atomically(path: Path, arrays: dict) -> bool:
    """np.savez under a temporary name, then renamed, so concurrent ranks never read half a file; False
    (and nothing left behind) when it cannot be written there."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        return False


def _decoded_layout(root: Path, train_files: Sequence, test_files: Sequence, class_names: Sequence) -> dict:
    """The .npz layout (x_train, y_train, x_test, y_test, classes) of (path, label) image files: read from
    the first cache whose key matches the files, else decoded and cached where it can be written (see
    _cache_paths). A changed, added or removed file changes the key, so the copy is rebuilt."""
    key = _cache_key(root, [*train_files, *test_files], class_names)
    for cache in _cache_paths(root):
        with contextlib.suppress(ValueError, KeyError, OSError):  # absent, damaged or stale: decode again
            layout = _read_npz(cache)
            if str(layout.pop("cache_key")) == key:
                return layout
    images = _decode_images([path for path, _ in [*train_files, *test_files]])
    labels = lambda files: np.array([label for _, label in files], dtype=np.int64)
    layout = dict(x_train=images[: len(train_files)], y_train=labels(train_files),
                  x_test=images[len(train_files):], y_test=labels(test_files), classes=np.array(class_names))
    for cache in _cache_paths(root):
        if _write_npz_atomically(cache, {**layout, "cache_key": np.array(key)}):
            break
    return layout


def _load_tinyimagenet(data_dir: str) -> ImageArrays:
    """The official tiny-imagenet-200 layout (in data_dir or data_dir/tiny-imagenet-200), decoded
    once and cached (_decoded_layout). Labels follow the sorted WordNet ids, as ImageFolder would
    number them; the val set, which has labels, is the test set."""
    root = Path(data_dir) / "tiny-imagenet-200"
    root = root if root.is_dir() else Path(data_dir)
    if not (root / "wnids.txt").exists():
        raise FileNotFoundError(f"tinyimagenet: no wnids.txt in {root}: place the extracted "
                                f"tiny-imagenet-200/ (from http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
                                f"in {data_dir}")
    wnids = sorted((root / "wnids.txt").read_text().split())
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    names = {}
    if (root / "words.txt").exists():  # "n01443537\tgoldfish, Carassius auratus": keep the first name
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, words = line.partition("\t")
            names[wnid] = words.split(",")[0].strip()
    train_files = [(path, label_of[wnid]) for wnid in wnids
                   for path in sorted((root / "train" / wnid / "images").glob("*.JPEG"))]
    test_files = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        file_name, wnid = line.split("\t")[:2]
        test_files.append((root / "val" / "images" / file_name, label_of[wnid]))
    layout = _decoded_layout(root, train_files, test_files, [names.get(wnid, wnid) for wnid in wnids])
    return _arrays_from_npz_layout(layout, root, grouped_by_class=True)


def _make_fake() -> ImageArrays:
    """Random uint8 images and labels from a fixed generator: the same set on every call."""
    generator = torch.Generator().manual_seed(0)
    total = FAKE_TRAIN + FAKE_TEST
    images = torch.randint(256, (total, 3, FAKE_SIZE, FAKE_SIZE), generator=generator, dtype=torch.uint8)
    labels = torch.randint(FAKE_CLASSES, (total,), generator=generator)
    return _arrays_with_own_stats(images[:FAKE_TRAIN], labels[:FAKE_TRAIN], images[FAKE_TRAIN:],
                                  labels[FAKE_TRAIN:], [f"class{i}" for i in range(FAKE_CLASSES)])


def _resolve_npz(name: str, data_dir: str) -> Path:
    for path in (Path(name), Path(data_dir) / name):
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} not found (also looked in {data_dir})")


def _load_arrays(name: str, data_dir: str) -> ImageArrays:
    if name in _TORCHVISION_SOURCES:
        return _load_torchvision(name, data_dir)
    if name == "tinyimagenet":
        return _load_tinyimagenet(data_dir)
    if name == "fake":
        return _make_fake()
    if name == "sample":
        return _load_npz(SAMPLE_NPZ)
    if name.endswith(".npz"):
        return _load_npz(_resolve_npz(name, data_dir))
    raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")


def _device_crop_flip(augment: str, standard: CropFlip, mean: tuple) -> "CropFlip | ResizedCropFlip | None":
    """The device path's crop for `augment`, from the dataset's standard one (whose flip setting rrc keeps);
    meanpad's fill is the mean colour `mean` (0..1 per channel) in uint8."""
    mean_colour = replace(standard, fill=tuple(round(255 * value) for value in mean))
    return {"none": None, "rrc": ResizedCropFlip(flip=standard.flip), "meanpad": mean_colour}.get(augment, standard)


def _build_device_data(arrays: ImageArrays, *, batch_size, eval_batch_size, device, subset,
                       augment, seed, rank, world_size, holdout) -> Data:
    train_rows, holdout_rows = split_holdout(subset_rows(len(arrays.train_images), subset, arrays.grouped_by_class),
                                             arrays.train_labels, holdout, seed)
    test_rows = subset_rows(len(arrays.test_images), subset, arrays.grouped_by_class)
    common = dict(mean=arrays.mean, std=arrays.std, rank=rank, world_size=world_size)
    evaluation = lambda images, labels, rows: DeviceLoader(
        images[rows].to(device), labels[rows].to(device), batch_size=eval_batch_size, train=False, **common)
    autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10) if augment == "autoaugment" else None
    train = DeviceLoader(arrays.train_images[train_rows].to(device), arrays.train_labels[train_rows].to(device),
                         batch_size=batch_size, train=True, seed=seed, autoaugment=autoaugment,
                         crop_flip=_device_crop_flip(augment, arrays.crop_flip, arrays.mean), **common)
    return Data(train, evaluation(arrays.test_images, arrays.test_labels, test_rows), len(arrays.class_names),
                arrays.train_images.shape[-1], arrays.class_names, arrays.mean, arrays.std,
                evaluation(arrays.train_images, arrays.train_labels, holdout_rows) if holdout else None,
                holdout_rows.tolist())


# ----------------------------------------------------------------------------- image folders
class FirstClassesImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder restricted to the first max_classes class folders in sorted order
    (imagenet100); max_classes=None keeps all. Module level, so workers can unpickle it."""

    def __init__(self, root, max_classes: Optional[int] = None):
        self.max_classes = max_classes  # read by find_classes, which the parent's __init__ calls
        super().__init__(root)

    def find_classes(self, directory):
        classes = super().find_classes(directory)[0][: self.max_classes]
        return classes, {name: label for label, name in enumerate(classes)}


def _scan_folders(root: Path, max_classes: Optional[int] = None):
    """The ImageFolders of root/train and of its evaluation split, checked: at least 2 classes, the same
    class folders in both. Any problem is a one-line error naming the folder."""
    # choice: val/ before test/ when a folder has both: the per-epoch evaluation (and the best epoch picked
    # from it) is model selection, so a separate test/ stays untouched; ImageNet's labelled split is val/.
    evaluation = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or evaluation is None:
        raise FileNotFoundError(f"{root} needs train/<class>/<images> and val/<class>/<images> or "
                                f"test/<class>/<images> (the ImageFolder layout)")
    folders = []
    for split in (root / "train", evaluation):
        try:
            folders.append(FirstClassesImageFolder(split, max_classes))
        except FileNotFoundError as error:  # no class folder, or a class folder without image files
            raise ValueError(f"{split}: {_reason(error)}") from None
    train, test = folders
    if len(train.classes) < 2:
        raise ValueError(f"{root / 'train'} holds one class folder ({train.classes[0]}): training needs at least 2")
    if train.classes != test.classes:
        only = lambda a, b: ", ".join(sorted(set(a.classes) - set(b.classes))) or "none"
        raise ValueError(f"{root}: train/ and {evaluation.name}/ have different class folders (only in train/: "
                         f"{only(train, test)}; only in {evaluation.name}/: {only(test, train)})")
    return train, test


def _is_small(folder: torchvision.datasets.ImageFolder) -> bool:
    """Whether the folder's first image is at most SMALL_IMAGE_MAX px on each side (read from its header)."""
    with _open_image(folder.samples[0][0]) as image:
        return max(image.size) <= SMALL_IMAGE_MAX


def _load_small_folder(root: Path, train: torchvision.datasets.ImageFolder, test) -> ImageArrays:
    """A folder of small images as device-resident arrays, decoded once and cached; its own mean/std."""
    return _arrays_from_npz_layout(_decoded_layout(root, train.samples, test.samples, train.classes), root,
                                   grouped_by_class=True)


# ----------------------------------------------------------------------------- DataLoader path
class SeededTransformDataset(torch.utils.data.Dataset):
    """Applies a transform to (PIL image, label) samples. With a seed, image i of epoch e is
    transformed inside a global RNG seeded by (seed, e, i) and restored afterwards, so the
    augmentation depends on neither the number of workers nor the caller's RNG."""

    def __init__(self, samples, transform, seed: Optional[int] = None):
        self.samples, self.transform, self.seed = samples, transform, seed
        self.epoch = 0  # copied into the workers, which are started afresh every epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, label = self.samples[index]
        if self.seed is None:  # test transforms are deterministic
            return self.transform(image), label
        with seeded_global_rng(epoch_seed(self.seed, self.epoch, _FOLDER_AUGMENT_STREAM, index)):
            return self.transform(image), label


class EpochShardSampler(torch.utils.data.Sampler):
    """Sampler form of train_shard_indices: the same permutation and sharding as the device path."""

    def __init__(self, num_images: int, seed: int, rank: int, world_size: int):
        self.num_images, self.seed, self.rank, self.world_size = num_images, seed, rank, world_size
        self.epoch = 0

    def __iter__(self):
        return iter(train_shard_indices(self.num_images, self.seed, self.epoch, self.rank,
                                        self.world_size).tolist())

    def __len__(self) -> int:
        return self.num_images // self.world_size


class FolderLoader:
    """DataLoader over an image folder; yields normalised float32 batches on the device."""

    def __init__(self, dataset: SeededTransformDataset, *, batch_size: int, device, train: bool,
                 mean, std, seed: int, num_workers: int, rank: int, world_size: int):
        self.dataset, self.device = dataset, torch.device(device)
        if train:
            self.sampler = EpochShardSampler(len(dataset), seed, rank, world_size)
        else:
            self.sampler = test_shard_indices(len(dataset), rank, world_size).tolist()
        self.mean, self.std = _stats_tensors(mean, std, self.device)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=train,
            num_workers=min(num_workers, _usable_cpus()),
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator())  # its seed draw for the workers would advance the global RNG
        self.num_samples = len(self.loader) * batch_size if train else len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch
        if isinstance(self.sampler, EpochShardSampler):
            self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield normalize(images, self.mean, self.std), labels.to(self.device, non_blocking=True)


def _folder_transforms(augment: str) -> tuple[Callable, Callable]:
    """ImageNet's: RandomResizedCrop 224 + flip (+ AutoAugment) for training (meanpad: the same, it pads
    nothing); resize 256 and centre crop 224 for test and for augment="none". Output uint8 CHW, normalised on
    the device."""
    test = v2.Compose([v2.Resize(FOLDER_RESIZE), v2.CenterCrop(FOLDER_IMAGE_SIZE), v2.PILToTensor()])
    if augment == "none":
        return test, test
    recipe = dict(scale=RRC_SCALE, ratio=RRC_RATIO) if augment == "rrc" else {}  # else torchvision's (ImageNet's)
    crop = v2.RandomResizedCrop(FOLDER_IMAGE_SIZE, **recipe)
    train = [crop, v2.RandomHorizontalFlip()]
    if augment == "autoaugment":
        train.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    return v2.Compose(train + [v2.PILToTensor()]), test


def _build_folder_data(train_folder, test_folder, *, batch_size, eval_batch_size, device, subset, augment, seed,
                       num_workers, rank, world_size, holdout) -> Data:
    train_transform, test_transform = _folder_transforms(augment)
    common = dict(device=device, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed,
                  num_workers=num_workers, rank=rank, world_size=world_size)

    def loader(folder, rows, train):
        dataset = SeededTransformDataset(torch.utils.data.Subset(folder, rows.tolist()),
                                         train_transform if train else test_transform, seed if train else None)
        return FolderLoader(dataset, batch_size=batch_size if train else eval_batch_size, train=train, **common)

    train_rows, holdout_rows = split_holdout(subset_rows(len(train_folder), subset, grouped_by_class=True),
                                             torch.tensor(train_folder.targets), holdout, seed)
    test_rows = subset_rows(len(test_folder), subset, grouped_by_class=True)
    return Data(loader(train_folder, train_rows, True), loader(test_folder, test_rows, False),
                len(train_folder.classes), FOLDER_IMAGE_SIZE, list(train_folder.classes), IMAGENET_MEAN,
                IMAGENET_STD, loader(train_folder, holdout_rows, False) if holdout else None, holdout_rows.tolist())


# ----------------------------------------------------------------------------- entry point
def build_data(name: str, data_dir: str = "./data", batch_size: int = 128, device="cpu",
               subset: Optional[int] = None, augment: str = "standard", seed: int = 0,
               eval_batch_size: Optional[int] = None, num_workers: int = 8, rank: int = 0,
               world_size: int = 1, holdout: int = 0) -> Data:
    """Train and test loaders for dataset ``name`` (one of DATASETS; see the module docstring).

    eval_batch_size defaults to batch_size; num_workers only matters for the DataLoader path.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; accepted: {', '.join(AUGMENTATIONS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    options = dict(batch_size=batch_size, eval_batch_size=eval_batch_size or batch_size,
                   device=device, subset=subset, augment=augment, seed=seed, rank=rank,
                   world_size=world_size, holdout=holdout)
    if name in ("imagenet", "imagenet100") or name.startswith("folder:"):
        root = Path(name[len("folder:"):]) if name.startswith("folder:") else Path(data_dir)
        train_folder, test_folder = _scan_folders(root, IMAGENET100_CLASSES if name == "imagenet100" else None)
        if name.startswith("folder:") and _is_small(train_folder):
            return _build_device_data(_load_small_folder(root, train_folder, test_folder), **options)
        return _build_folder_data(train_folder, test_folder, num_workers=num_workers, **options)
    return _build_device_data(_load_arrays(name, data_dir), **options)


# ----------------------------------------------------------------------------- readers for analysis.py
# The analyses of trained runs read images in an order they choose (file order, a seeded shuffle, a
# hold-out's rows) and the corruption benchmarks; they use these readers, never a loader's attributes.
CORRUPTION_SEVERITIES = 5  # CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C (Hendrycks & Dietterich 2019)
CORRUPTIONS = ("brightness", "contrast", "defocus_blur", "elastic_transform", "fog", "frost", "gaussian_noise",
               "glass_blur", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "shot_noise", "snow",
               "zoom_blur")  # the 15 benchmark corruptions whose mean the papers report (TNA Table 6)


def rows_in_order(loader, batch_size: int,
                  rows: Optional[Sequence[int]] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A loader's images, unaugmented and none dropped, as normalised (images, labels) batches on its
    device: all of them in file order, or `rows` (positions in the loader's images) in the order given.
    Unlike iterating a training loader, this neither shuffles, augments nor drops the last batch, as
    the analyses need (training NLL, probe features, a seeded shuffle of the test set). A folder
    dataset is read through its own transform, which is the deterministic test one when it was built
    with augment="none"."""
    if isinstance(loader, DeviceLoader):
        rows = torch.arange(len(loader.images)) if rows is None else torch.as_tensor(rows)
        for batch_rows in rows.to(loader.images.device).split(batch_size):
            yield normalize(loader.images[batch_rows], loader.mean, loader.std), loader.labels[batch_rows]
        return
    dataset = loader.dataset
    if rows is not None:
        dataset = torch.utils.data.Subset(dataset, torch.as_tensor(rows).tolist())
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size, num_workers=loader.loader.num_workers):
        yield normalize(images.to(loader.device), loader.mean, loader.std), labels.to(loader.device)


def loader_size(loader) -> int:
    """How many images a loader reads from (before any shuffling or dropping)."""
    return len(loader.images) if isinstance(loader, DeviceLoader) else len(loader.dataset)


def corruption_sets(folder, subset: Optional[int] = None, num_classes: Optional[int] = None):
    """The sets of a corruption benchmark, checked before any is read; returns an iterator of
    (corruption, severity, uint8 images [n, 3, H, W] on the CPU, int64 labels).

    CIFAR-10-C / CIFAR-100-C: <corruption>.npy (5 severities x N images, NHWC uint8, stacked) and
    labels.npy (N labels, or 5N as distributed). Tiny-ImageNet-C: <corruption>/<1..5>/<wnid>/*.JPEG,
    labels by sorted wnid as data.py numbers Tiny ImageNet. `subset` keeps the first N images of each
    set (CIFAR) or evenly spaced ones (class folders); `num_classes` (the run's) is checked against
    the labels. A fault (no such layout, a partial download, labels that do not fit) raises
    FileNotFoundError or ValueError naming the file and what was expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a CIFAR-10-C / CIFAR-100-C or "
                                f"Tiny-ImageNet-C folder)")
    arrays = sorted(path for path in folder.glob("*.npy") if path.name != "labels.npy")
    if arrays or (folder / "labels.npy").exists():
        return _cifar_c_sets(folder, arrays, subset, num_classes)
    corruptions = sorted(path for path in folder.iterdir() if path.is_dir())
    if not corruptions:
        raise FileNotFoundError(f"{folder} holds neither <corruption>.npy with labels.npy (CIFAR-10-C / CIFAR-100-C) "
                                f"nor <corruption>/<severity>/<wnid>/*.JPEG folders (Tiny-ImageNet-C)")
    return _tinyimagenet_c_sets(corruptions, subset, num_classes)


def _checked_label_range(labels: np.ndarray, num_classes: Optional[int], where) -> None:
    if num_classes is not None and len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1} "
                         f"(the run's {num_classes} classes)")


def _cifar_c_sets(folder: Path, arrays: list, subset, num_classes):
    labels_path = folder / "labels.npy"
    if not labels_path.exists():
        raise FileNotFoundError(f"no labels.npy in {folder} (CIFAR-10-C / CIFAR-100-C folders hold <corruption>.npy "
                                f"and labels.npy)")
    if not arrays:
        raise FileNotFoundError(f"{folder} holds labels.npy but no <corruption>.npy (e.g. fog.npy: "
                                f"{CORRUPTION_SEVERITIES} severities x N images)")

    def read(path, **options):
        try:
            return np.load(path, **options)
        except (ValueError, OSError, EOFError) as error:  # not a .npy file, or a truncated one
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{path} is not a readable .npy array ({reason}): a partial download?") from None

    labels = read(labels_path)
    images = {path: read(path, mmap_mode="r") for path in arrays}
    per_severity = {}
    for path, stack in images.items():
        if stack.dtype != np.uint8 or stack.ndim != 4 or stack.shape[-1] != 3 or len(stack) % CORRUPTION_SEVERITIES:
            raise ValueError(f"{path}: expected uint8 images {CORRUPTION_SEVERITIES} severities x N x H x W x 3, got "
                             f"{stack.dtype} of shape {stack.shape}")
        per_severity[path] = len(stack) // CORRUPTION_SEVERITIES
    sizes = set(per_severity.values())
    if len(sizes) > 1:
        counts = ", ".join(f"{path.name} {n}" for path, n in per_severity.items())
        raise ValueError(f"{folder}: the corruptions hold different numbers of images per severity ({counts}): "
                         f"a partial download?")
    count = sizes.pop()
    if labels.ndim != 1 or len(labels) not in (count, CORRUPTION_SEVERITIES * count):
        raise ValueError(f"{labels_path} holds {labels.shape} labels; the images need {count} (one per image) or "
                         f"{CORRUPTION_SEVERITIES * count} (one per image and severity, as distributed)")
    _checked_label_range(labels, num_classes, labels_path)
    rows = subset_rows(count, subset, grouped_by_class=False).numpy()

    def sets():
        for path, stack in images.items():
            for severity in range(CORRUPTION_SEVERITIES):
                block = slice(severity * count, (severity + 1) * count)
                severity_labels = labels[block] if len(labels) > count else labels
                nchw = torch.from_numpy(np.ascontiguousarray(stack[block][rows])).permute(0, 3, 1, 2)
                yield path.stem, severity + 1, nchw, torch.as_tensor(severity_labels[rows], dtype=torch.int64)

    return sets()


def _tinyimagenet_c_sets(corruptions: list, subset, num_classes):
    severities = [str(severity) for severity in range(1, CORRUPTION_SEVERITIES + 1)]
    layout, reference = {}, None
    for corruption in corruptions:
        missing = [severity for severity in severities if not (corruption / severity).is_dir()]
        if missing:
            raise FileNotFoundError(f"{corruption} lacks severity folder(s) {', '.join(missing)}: Tiny-ImageNet-C "
                                    f"holds <corruption>/1..{CORRUPTION_SEVERITIES}/<wnid>/*.JPEG (partial?)")
        for severity in severities:
            where = corruption / severity
            wnids = sorted(path.name for path in where.iterdir() if path.is_dir())
            images = [sorted((where / wnid).glob("*.JPEG")) for wnid in wnids]
            empty = [wnid for wnid, paths in zip(wnids, images) if not paths]
            if not wnids or empty:
                fault = f"empty class folders ({', '.join(empty[:3])})" if wnids else "no class folders"
                raise FileNotFoundError(f"{where} has {fault}: expected <wnid>/*.JPEG for every class "
                                        f"(a partial download?)")
            files = [(path, label) for label, paths in enumerate(images) for path in paths]
            if reference is None:
                reference = (where, wnids)
            elif wnids != reference[1]:
                raise ValueError(f"{where} has {len(wnids)} class folders, {reference[0]} has {len(reference[1])}: "
                                 f"every severity of every corruption needs the same classes (a partial download?)")
            layout[corruption.name, int(severity)] = files
    if num_classes is not None and len(reference[1]) != num_classes:
        raise ValueError(f"{reference[0]} has {len(reference[1])} class folders, the run has {num_classes} classes")

    def read(path):
        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)

    def sets():
        for (corruption, severity), files in layout.items():
            files = [files[row] for row in subset_rows(len(files), subset, grouped_by_class=True)]
            images = torch.stack([read(path) for path, _ in files])
            yield corruption, severity, images, torch.tensor([label for _, label in files])

    return sets()
