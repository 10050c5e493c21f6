"""Write a copy of a small-image dataset with every image re-encoded as JPEG, and print the loss in PSNR.

How much does JPEG compression move a table row? The CIFAR-10 copy kept as image files is JPEG at quality 75
(PIL's encoder: its quantisation tables are PIL's at 75, chroma subsampled 4:2:0), and the original arrays are not
always at hand. Compressing once more by a measured amount, and training on both, gives the cost of one more loss
of that size (README: "Where the gap comes from"); compressing a set of near-lossless images at 75 gives the cost
of the copy's own encoding on those images.

    python benchmarks/reencode_jpeg.py folder:../shared/data/cifar10_jpeg cifar10_q32.npz --quality 32
    python tna.py --dataset cifar10_q32.npz ...

The .npz has data.py's layout (x_train, y_train, x_test, y_test, classes), every image through PIL's JPEG encoder
at --quality with its defaults (4:2:0 chroma), rows in the dataset's order. An existing file is never overwritten.
"""
import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import DATASETS, build_data  # noqa: E402


def reencode(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 images [N, H, W, 3], each encoded as JPEG at `quality` and decoded again."""
    out = np.empty_like(images)
    for index, image in enumerate(images):
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, "JPEG", quality=quality)
        out[index] = np.asarray(Image.open(encoded).convert("RGB"))
    return out


def psnr(images: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 arrays, over all their pixels."""
    return float(10 * np.log10(255 ** 2 / np.mean((images.astype(np.float64) - other) ** 2)))


def jpeg_quality(text):
    if not text.isdigit() or not 1 <= int(text) <= 95:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 1 to 95")
    return int(text)


def fail(message):
    sys.exit(f"reencode_jpeg.py: error: {message}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.error = lambda message: fail(f"{message} (see --help)")
    parser.add_argument("dataset", help=f"a dataset that fits in memory: {', '.join(DATASETS)}")
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument("--quality", type=jpeg_quality, default=75, help="JPEG quality, 1 to 95 (PIL's scale)")
    parser.add_argument("--data-dir", default="./data", help="where a named dataset lives")
    args = parser.parse_args(argv)
    if args.out.suffix != ".npz":
        fail(f"{args.out} must end in .npz")
    if args.out.exists():
        fail(f"{args.out} exists; give another name")
    try:
        data = build_data(args.dataset, data_dir=args.data_dir, augment="none")
    except (ValueError, OSError, RuntimeError) as error:
        fail(str(error).splitlines()[0])
    if not hasattr(data.train, "images"):
        fail(f"{args.dataset} is read from its files batch by batch (large images): small-image datasets only")
    arrays = {"classes": np.array([str(name) for name in data.class_names])}
    for split, loader in (("train", data.train), ("test", data.test)):
        images = loader.images.permute(0, 2, 3, 1).cpu().numpy()
        arrays[f"x_{split}"], arrays[f"y_{split}"] = reencode(images, args.quality), loader.labels.cpu().numpy()
        print(f"{split}: {len(images)} images at quality {args.quality}, "
              f"PSNR {psnr(images, arrays[f'x_{split}']):.2f} dB to the source")
    np.savez(args.out, **arrays)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
