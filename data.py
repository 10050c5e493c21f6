"""Datasets and loaders shared by every method script: ``build_data(name, ...) -> Data``.

Two paths, one loader contract.

* Device-resident (cifar10, cifar100, mnist, tinyimagenet, fake, ``PATH.npz``): the whole
  dataset fits in memory, so it is held ONCE as a uint8 tensor [N, 3, H, W] on the training
  device (as airbench / hlb-CIFAR10 do). A train batch is gathered by index, then randomly
  cropped from its zero-padded images, flipped and normalised by a few batched tensor ops on
  that device (``random_crop_flip``, ``normalize``): no per-image Python work, no worker
  processes, no host-to-device copies after the first.
* DataLoader (imagenet, imagenet100, ``folder:PATH``): too big for memory, so a
  ``torch.utils.data.DataLoader`` decodes JPEGs in ``num_workers`` processes with the ImageNet
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
* test: in file order, not augmented, last batch kept; rank r takes the r-th contiguous block
  (``test_shard_indices``), so the blocks cover the test set exactly once and the caller can
  all-reduce correct counts. Iterating it neither reads nor advances any RNG.

Choices (SPEC section 1 fixes the CIFAR and ImageNet ones):
* mean/std: SPEC's constants for CIFAR-10/100, ImageNet's for the folder datasets; anything else
  (mnist, tinyimagenet, .npz, fake) uses the per-channel mean/std of its own training images,
  always right for the data at hand (the .npz CIFAR-10 subset is JPEG-compressed, so its std is
  not CIFAR-10's).
* augmentation "standard": random crop with zero padding of image_size // 8 (32 -> 4 px as in
  SPEC, 64 -> 8 px for TinyImageNet) + horizontal flip. MNIST is padded to 32x32 and repeated
  to 3 channels at load time (so every CIFAR model runs on it), then translated by up to 2 px
  (crop 32, padding 2) and never flipped (a mirrored digit is another symbol, or none).
* ``subset=N``: the first N train and N test images when the rows are in no class order
  (CIFAR, MNIST, .npz, fake); evenly spaced rows when the files are grouped by class
  (tinyimagenet, ImageFolder trees), so that every class still appears.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagenet", "imagenet100", "mnist", "fake",
            "folder:PATH", "PATH.npz")
AUGMENTS = ("standard", "none", "autoaugment")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET100_CLASSES = 100  # the first 100 WordNet ids in sorted order
FOLDER_IMAGE_SIZE, FOLDER_RESIZE = 224, 256
FAKE_TRAIN, FAKE_TEST, FAKE_CLASSES, FAKE_SIZE = 1024, 256, 10, 32
TINYIMAGENET_CACHE = "tinyimagenet_uint8.npz"

# Distinct streams of the (seed, epoch) generators, so that the permutation and the crops
# are not drawn from the same numbers.
_PERMUTATION_STREAM, _CROP_FLIP_STREAM, _AUTOAUGMENT_STREAM, _FOLDER_AUGMENT_STREAM = range(4)


@dataclass
class Data:
    train: "DeviceLoader | FolderLoader"
    test: "DeviceLoader | FolderLoader"
    num_classes: int
    image_size: int
    class_names: list
    mean: tuple
    std: tuple


@dataclass(frozen=True)
class CropFlip:
    """Train augmentation of the device path: crop back to size from a zero-padded image, maybe mirror."""
    padding: int
    flip: bool = True


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


# ----------------------------------------------------------------------------- batched tensor ops
def random_crop_flip(images: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor,
                     flip_mask: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-image crop and mirror of a batch, in one gather on the batch's device.

    images [B, C, H, W] (any dtype) are zero-padded by ``padding`` on every side; image b is
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
    rows = offsets_y.to(device)[:, None] + torch.arange(height, device=device)            # [B, H]
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip_mask.to(device)[:, None], width - 1 - columns, columns)
    columns = columns + offsets_x.to(device)[:, None]                                       # [B, W]
    flat_index = rows[:, :, None] * padded.shape[-1] + columns[:, None, :]                  # [B, H, W]
    flat_index = flat_index.view(batch, 1, height * width).expand(batch, channels, height * width)
    return padded.flatten(2).gather(2, flat_index).view(batch, channels, height, width)


def normalize(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std in float32, as one multiply-subtract; mean/std shaped [1, C, 1, 1]."""
    return images_uint8.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)


def channel_stats(images_uint8: torch.Tensor, chunk: int = 1024) -> tuple[tuple, tuple]:
    """Per-channel mean and std (population, over all pixels) of uint8 images [N, C, H, W] in
    [0, 1] units, summed in float64 chunk by chunk so big sets need little extra memory. The
    std is floored at 1/255 so that a constant channel (synthetic data) is not divided by 0."""
    total = torch.zeros(images_uint8.shape[1], dtype=torch.float64)
    total_squares = torch.zeros_like(total)
    for block in images_uint8.split(chunk):
        block = block.float().div_(255.0)
        total += block.sum(dim=(0, 2, 3), dtype=torch.float64).cpu()
        total_squares += block.square_().sum(dim=(0, 2, 3), dtype=torch.float64).cpu()
    count = images_uint8.numel() / images_uint8.shape[1]
    mean = total / count
    std = (total_squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)
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

    crop_flip=None disables the random crop and flip (test, or augment="none"); autoaugment, a
    per-image transform on uint8 tensors, runs after the crop and flip (the order of the
    torchvision CIFAR recipes) inside a global RNG seeded per (seed, epoch, rank, batch).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], train: bool,
                 crop_flip: Optional[CropFlip] = None, autoaugment: Optional[Callable] = None,
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

    def _crop_flip_draws(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's crop offsets and flips for every position, drawn at once, moved once."""
        generator = epoch_generator(self.seed, self.epoch, _CROP_FLIP_STREAM, self.rank)
        span = 2 * self.crop_flip.padding + 1
        offsets_y = torch.randint(span, (count,), generator=generator)
        offsets_x = torch.randint(span, (count,), generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5
        if not self.crop_flip.flip:
            flips.zero_()
        device = self.images.device
        return offsets_y.to(device), offsets_x.to(device), flips.to(device)

    def _autoaugment_batch(self, images: torch.Tensor, batch_number: int) -> torch.Tensor:
        with seeded_global_rng(epoch_seed(self.seed, self.epoch, _AUTOAUGMENT_STREAM, self.rank, batch_number)):
            return torch.stack([self.autoaugment(image) for image in images])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices()[: self.num_samples].to(self.images.device)
        augment = self.train and self.crop_flip is not None
        if augment:
            offsets_y, offsets_x, flips = self._crop_flip_draws(len(indices))
        for batch_number, start in enumerate(range(0, len(indices), self.batch_size)):
            positions = slice(start, start + self.batch_size)
            batch_indices = indices[positions]
            images = self.images[batch_indices]
            if augment:
                images = random_crop_flip(images, offsets_y[positions], offsets_x[positions],
                                          flips[positions], self.crop_flip.padding)
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


def _nhwc_to_nchw(images) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()


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


def _arrays_from_npz_layout(arrays, grouped_by_class: bool = False) -> ImageArrays:
    """x_train, y_train, x_test, y_test (uint8 NHWC, int labels) and optional classes, from
    an opened .npz or a dict with those keys."""
    num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    class_names = (arrays["classes"].tolist() if "classes" in arrays
                   else [str(label) for label in range(num_classes)])
    return _arrays_with_own_stats(_nhwc_to_nchw(arrays["x_train"]), arrays["y_train"],
                                  _nhwc_to_nchw(arrays["x_test"]), arrays["y_test"],
                                  class_names, grouped_by_class)


def _load_npz(path: Path, grouped_by_class: bool = False) -> ImageArrays:
    with np.load(path) as arrays:
        return _arrays_from_npz_layout(arrays, grouped_by_class)


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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"{name} not found in {data_dir} and the download failed ({reason}): "
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
    return _arrays_with_own_stats(_nhwc_to_nchw(train_set.data), train_set.targets,
                                  _nhwc_to_nchw(test_set.data), test_set.targets,
                                  train_set.classes, mean=mean, std=std)


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # some Tiny ImageNet images are grey


def _load_tinyimagenet(data_dir: str) -> ImageArrays:
    """The official tiny-imagenet-200 layout (in data_dir or data_dir/tiny-imagenet-200),
    decoded once with PIL and cached next to it as an .npz (delete it if the folder changes).
    Labels follow the sorted WordNet ids, as ImageFolder would number them; the val set, which
    has labels, is the test set."""
    root = Path(data_dir) / "tiny-imagenet-200"
    root = root if root.is_dir() else Path(data_dir)
    cache = root / TINYIMAGENET_CACHE
    if cache.exists():
        return _load_npz(cache, grouped_by_class=True)
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
    split = {}
    for key, files in (("train", train_files), ("test", test_files)):
        split[f"x_{key}"] = np.stack([_read_rgb(path) for path, _ in files])
        split[f"y_{key}"] = np.array([label for _, label in files], dtype=np.int64)
    split["classes"] = np.array([names.get(wnid, wnid) for wnid in wnids])
    try:  # written under a temporary name and renamed, so concurrent ranks never read half a file
        temporary = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            np.savez(file, **split)
        os.replace(temporary, cache)
    except OSError:
        pass  # a read-only data folder: decode again next time
    return _arrays_from_npz_layout(split, grouped_by_class=True)


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
    if name.endswith(".npz"):
        return _load_npz(_resolve_npz(name, data_dir))
    raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")


def _build_device_data(arrays: ImageArrays, *, batch_size, eval_batch_size, device, subset,
                       augment, seed, rank, world_size) -> Data:
    train_rows = subset_rows(len(arrays.train_images), subset, arrays.grouped_by_class)
    test_rows = subset_rows(len(arrays.test_images), subset, arrays.grouped_by_class)
    common = dict(mean=arrays.mean, std=arrays.std, rank=rank, world_size=world_size)
    autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10) if augment == "autoaugment" else None
    train = DeviceLoader(arrays.train_images[train_rows].to(device), arrays.train_labels[train_rows].to(device),
                         batch_size=batch_size, train=True, seed=seed, autoaugment=autoaugment,
                         crop_flip=None if augment == "none" else arrays.crop_flip, **common)
    test = DeviceLoader(arrays.test_images[test_rows].to(device), arrays.test_labels[test_rows].to(device),
                        batch_size=eval_batch_size, train=False, **common)
    return Data(train, test, len(arrays.class_names), arrays.train_images.shape[-1],
                arrays.class_names, arrays.mean, arrays.std)


# ----------------------------------------------------------------------------- DataLoader path
class FirstClassesImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder restricted to the first max_classes class folders in sorted order
    (imagenet100); max_classes=None keeps all. Module level, so workers can unpickle it."""

    def __init__(self, root, max_classes: Optional[int] = None):
        self.max_classes = max_classes  # read by find_classes, which the parent's __init__ calls
        super().__init__(root)

    def find_classes(self, directory):
        classes = super().find_classes(directory)[0][: self.max_classes]
        return classes, {name: label for label, name in enumerate(classes)}


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
    """ImageNet's: RandomResizedCrop 224 + flip (+ AutoAugment) for training; resize 256 and
    centre crop 224 for test and for augment="none". Output uint8 CHW, normalised on the device."""
    test = v2.Compose([v2.Resize(FOLDER_RESIZE), v2.CenterCrop(FOLDER_IMAGE_SIZE), v2.PILToTensor()])
    if augment == "none":
        return test, test
    train = [v2.RandomResizedCrop(FOLDER_IMAGE_SIZE), v2.RandomHorizontalFlip()]
    if augment == "autoaugment":
        train.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    return v2.Compose(train + [v2.PILToTensor()]), test


def _build_folder_data(root: Path, max_classes: Optional[int], *, batch_size, eval_batch_size,
                       device, subset, augment, seed, num_workers, rank, world_size) -> Data:
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise FileNotFoundError(f"{root} needs train/<class>/*.JPEG and val/<class>/*.JPEG "
                                f"(ImageFolder layout; ImageNet's val images sorted into class folders)")
    train_folder = FirstClassesImageFolder(root / "train", max_classes)
    test_folder = FirstClassesImageFolder(root / "val", max_classes)
    if train_folder.classes != test_folder.classes:
        raise ValueError(f"{root}: train/ and val/ have different class folders")
    train_transform, test_transform = _folder_transforms(augment)
    common = dict(device=device, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed,
                  num_workers=num_workers, rank=rank, world_size=world_size)
    loaders = []
    for folder, transform, train, size in ((train_folder, train_transform, True, batch_size),
                                           (test_folder, test_transform, False, eval_batch_size)):
        rows = subset_rows(len(folder), subset, grouped_by_class=True).tolist()
        samples = torch.utils.data.Subset(folder, rows)
        dataset = SeededTransformDataset(samples, transform, seed if train else None)
        loaders.append(FolderLoader(dataset, batch_size=size, train=train, **common))
    return Data(loaders[0], loaders[1], len(train_folder.classes), FOLDER_IMAGE_SIZE,
                list(train_folder.classes), IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------- entry point
def build_data(name: str, data_dir: str = "./data", batch_size: int = 128, device="cpu",
               subset: Optional[int] = None, augment: str = "standard", seed: int = 0,
               eval_batch_size: Optional[int] = None, num_workers: int = 8, rank: int = 0,
               world_size: int = 1) -> Data:
    """Train and test loaders for dataset ``name`` (one of DATASETS; see the module docstring).

    eval_batch_size defaults to batch_size; num_workers only matters for the DataLoader path.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; accepted: {', '.join(AUGMENTS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    options = dict(batch_size=batch_size, eval_batch_size=eval_batch_size or batch_size,
                   device=device, subset=subset, augment=augment, seed=seed, rank=rank,
                   world_size=world_size)
    if name in ("imagenet", "imagenet100") or name.startswith("folder:"):
        root = Path(name[len("folder:"):]) if name.startswith("folder:") else Path(data_dir)
        max_classes = IMAGENET100_CLASSES if name == "imagenet100" else None
        return _build_folder_data(root, max_classes, num_workers=num_workers, **options)
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
