"""data.py: batched crop/flip against torchvision, normalisation, loader contract (lengths,
determinism, distributed shards), every dataset path on tiny synthetic files, error messages."""
import struct
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import data


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def concatenated(loader, epoch=0):
    images, labels = zip(*batches(loader, epoch))
    return torch.cat(images), torch.cat(labels)


def write_image(path, colour, size=(64, 64), file_format="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, file_format)


# ----------------------------------------------------------------------------- batched augmentation
@pytest.mark.parametrize("size, padding, fill", [(32, 4, None), (64, 8, None), (32, 2, None), (32, 4, (125, 123, 114))])
def test_random_crop_flip_equals_torchvision_pad_crop_hflip(size, padding, fill):
    generator = torch.Generator().manual_seed(size + padding)
    images = torch.randint(256, (6, 3, size, size), generator=generator, dtype=torch.uint8)
    top = 2 * padding
    cases = [(0, 0, False), (top, top, False), (0, top, True), (top, 0, True),
             (padding - 1, padding + 1, True), (padding, padding, False)]  # hand-picked (y, x, flip)
    offsets_y, offsets_x, flips = (torch.tensor(column) for column in zip(*cases))
    result = data.random_crop_flip(images, offsets_y, offsets_x, flips, padding, fill)
    for image, (y, x, flip), got in zip(images, cases, result):
        expected = TF.crop(TF.pad(image, [padding], fill=list(fill or [0])), y, x, size, size)
        expected = TF.horizontal_flip(expected) if flip else expected
        assert torch.equal(got, expected), (y, x, flip)


def test_random_crop_flip_equals_torchvision_random_transforms_with_same_draws():
    """RandomCrop(32, padding=4) + RandomHorizontalFlip(1.0) at a known crop position."""
    image = torch.randint(256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    padded = TF.pad(image, [4])
    expected = TF.horizontal_flip(TF.crop(padded, 7, 2, 32, 32))
    got = data.random_crop_flip(image[None], torch.tensor([7]), torch.tensor([2]), torch.tensor([True]), 4)
    assert torch.equal(got[0], expected)


def test_meanpad_is_the_crop_of_images_normalised_first():
    """augment="meanpad" pads with the dataset's mean colour: the same crops as the TNA authors' order,
    Normalize and then RandomCrop(32, padding=4), whose zero padding is the mean (up to the uint8 rounding)."""
    loaded = data.build_data("sample", batch_size=16, augment="meanpad", seed=3)
    crop = loaded.train.crop_flip
    assert crop == data.CropFlip(padding=4, fill=tuple(round(255 * value) for value in loaded.mean))
    images = loaded.train.images[:16]
    draws = crop.draw(torch.Generator().manual_seed(0), len(images), 32, 32)
    mean, std = (torch.tensor(stat).view(1, 3, 1, 1) for stat in (loaded.mean, loaded.std))
    authors = data.random_crop_flip(data.normalize(images, mean, std), *draws, 4)
    ours = data.normalize(crop(images, *draws), mean, std)
    torch.testing.assert_close(ours, authors, rtol=0, atol=0.5 / 255 / std.min().item() + 1e-6)
    assert not torch.equal(ours, data.normalize(data.random_crop_flip(images, *draws, 4), mean, std))  # not black


# ----------------------------------------------------------------------------- RandomResizedCrop on the device
RESIZED_CROP_CASES = [(0, 0, 32, 32, False), (0, 0, 32, 32, True), (5, 3, 10, 12, False), (20, 17, 12, 15, True),
                      (31, 31, 1, 1, False), (0, 9, 29, 23, True)]  # hand-picked (top, left, height, width, flip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_resized_crop_flip_equals_torchvision_resized_crop_and_hflip(dtype):
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(256, (len(RESIZED_CROP_CASES), 3, 32, 32), generator=generator, dtype=torch.uint8)
    images = images.to(dtype)
    top, left, height, width, flips = (torch.tensor(column) for column in zip(*RESIZED_CROP_CASES))
    result = data.resized_crop_flip(images, top, left, height, width, flips)
    assert result.shape == images.shape and result.dtype == torch.float32
    for image, (y, x, h, w, flip), got in zip(images, RESIZED_CROP_CASES, result):
        expected = TF.resized_crop(image, y, x, h, w, [32, 32], antialias=True)
        expected = (TF.horizontal_flip(expected) if flip else expected).float()
        # float input: the same arithmetic; uint8: torchvision rounds its output to integers
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 if dtype == torch.float32 else 1.0)
    assert torch.equal(result[0], images[0].float()) and torch.equal(result[1], images[1].flip(-1).float())


def test_resized_crop_boxes_stay_in_range_and_match_torchvision_statistics():
    count, size = 20000, 64
    top, left, height, width = data.resized_crop_boxes(torch.Generator().manual_seed(0), count, size, size,
                                                       data.RRC_SCALE, data.RRC_RATIO)
    assert ((top >= 0) & (left >= 0) & (top + height <= size) & (left + width <= size)).all()
    area, ratio = height * width / size**2, width / height
    assert area.min() >= 0.1 * 0.9 and area.max() <= 1 and ratio.min() >= 0.8 * 0.95 and ratio.max() <= 1.25 / 0.95
    with data.seeded_global_rng(0):  # torchvision's own sampler, for the distribution of the same quantities
        reference = torch.tensor([v2.RandomResizedCrop.get_params(torch.zeros(1, size, size), [0.1, 1.0],
                                                                  [0.8, 1.25]) for _ in range(4000)]).float()
    ours = torch.stack([top, left, height, width], 1).float()
    torch.testing.assert_close(ours.mean(0), reference.mean(0), rtol=0, atol=1.0)  # sampling error ~ 0.3 px
    torch.testing.assert_close(ours.std(0), reference.std(0), rtol=0, atol=1.0)
    # no attempt fits (every box is wider than the image): torchvision's fallback, the centred box within the ratios
    fallback = data.resized_crop_boxes(torch.Generator().manual_seed(0), 5, size, size, (1.0, 1.0), (2.0, 3.0))
    assert [box.tolist() for box in fallback] == [[16] * 5, [0] * 5, [32] * 5, [64] * 5]


def test_rrc_augment_is_one_crop_per_image_on_the_device_loader():
    loaded = data.build_data("fake", batch_size=64, augment="rrc", seed=2)
    assert loaded.train.crop_flip == data.ResizedCropFlip() and "rrc" in data.AUGMENTATIONS
    rng_state = torch.get_rng_state()
    images, _ = batches(loaded.train, 1)[0]
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    top, left, height, width, flips = (draw[:64] for draw in loaded.train._crop_flip_draws(len(loaded.train.images)))
    assert len(set(zip(top.tolist(), left.tolist(), height.tolist(), width.tolist()))) > 60  # per image, not per batch
    assert 10 < flips.sum() < 54
    source = loaded.train.images[loaded.train.epoch_indices()[:64]]
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (loaded.mean, loaded.std))
    expected = (data.resized_crop_flip(source, top, left, height, width, flips) / 255 - mean) / std
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(batches(data.build_data("fake", batch_size=64, augment="rrc", seed=2).train, 1)[0][0], images)


# ----------------------------------------------------------------------------- normalisation, contract
def test_unaugmented_batch_is_normalised_gather():
    loaded = data.build_data("fake", batch_size=64, augment="none")
    images, labels = batches(loaded.train)[0]
    indices = loaded.train.epoch_indices()[:64]
    source = loaded.train.images[indices].float()
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (loaded.mean, loaded.std))
    torch.testing.assert_close(images, (source / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, loaded.train.labels[indices])


def test_npz_dataset():
    loaded = data.build_data(str(data.SAMPLE_NPZ), batch_size=128, eval_batch_size=64)  # the PATH.npz route
    assert (loaded.num_classes, loaded.image_size) == (10, 32)
    assert loaded.class_names[:3] == ["airplane", "automobile", "bird"]
    assert len(loaded.train) == 1000 // 128 and loaded.train.num_samples == 1000 // 128 * 128
    assert len(loaded.test) == 4 and loaded.test.num_samples == 200
    images, labels = next(iter(loaded.train))
    assert images.shape == (128, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and images.device.type == "cpu"
    test_images, test_labels = concatenated(loaded.test)
    assert len(test_images) == 200 and torch.equal(test_labels.bincount(), torch.full((10,), 20))
    # mean/std come from the training images, so the test set is close to standardised
    per_channel = test_images.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.05
    assert (per_channel.std(1) - 1).abs().max() < 0.05


def test_subset_takes_first_rows():
    full = data.build_data("sample", batch_size=50, augment="none")
    loaded = data.build_data("sample", batch_size=50, subset=150, augment="none")
    assert len(loaded.train) == 3 and loaded.test.num_samples == 150
    assert torch.equal(concatenated(loaded.test)[0], concatenated(full.test)[0][:150])
    assert torch.equal(loaded.train.images, full.train.images[:150])


def test_same_seed_and_epoch_give_identical_batches_without_touching_global_rng():
    first = data.build_data("fake", batch_size=100, seed=5)
    second = data.build_data("fake", batch_size=100, seed=5)
    rng_state = torch.get_rng_state()
    for epoch in range(3):  # the first loader walks epochs 0..2, as an uninterrupted run would
        epoch_two = batches(first.train, epoch)
    resumed = batches(second.train, 2)  # the second jumps straight to epoch 2, as a resumed run
    assert all(torch.equal(a, b) for pair in zip(epoch_two, resumed) for a, b in zip(*pair))
    batches(first.test)
    assert torch.equal(torch.get_rng_state(), rng_state)
    second.train.set_epoch(3)  # another epoch: another order
    assert not torch.equal(first.train.epoch_indices(), second.train.epoch_indices())
    other_seed = data.build_data("fake", batch_size=100, seed=6)
    other_seed.train.set_epoch(2)
    assert not torch.equal(other_seed.train.epoch_indices(), second.train.epoch_indices())


def test_distributed_shards():
    ranks = [data.build_data("fake", batch_size=100, rank=rank, world_size=2) for rank in (0, 1)]
    for loaded in ranks:
        loaded.train.set_epoch(4)
    shards = [loaded.train.epoch_indices() for loaded in ranks]
    assert len(shards[0]) == len(shards[1]) == data.FAKE_TRAIN // 2
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert len(ranks[0].train) == len(ranks[1].train) == data.FAKE_TRAIN // 2 // 100
    test_labels = torch.cat([concatenated(loaded.test)[1] for loaded in ranks])
    assert torch.equal(test_labels, data.build_data("fake").test.labels)
    covered = torch.cat([data.test_shard_indices(1001, rank, 3) for rank in range(3)])
    assert torch.equal(covered, torch.arange(1001))


def test_autoaugment_is_deterministic_and_keeps_global_rng():
    build = lambda: data.build_data("fake", batch_size=16, subset=32, augment="autoaugment")
    rng_state = torch.get_rng_state()
    first, second = batches(build().train, 1), batches(build().train, 1)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert len(first) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


# ----------------------------------------------------------------------------- errors
def test_unknown_dataset_and_augment_list_accepted_values():
    with pytest.raises(ValueError, match="cifar100.*tinyimagenet.*folder:PATH.*PATH.npz"):
        data.build_data("cifar1000")
    with pytest.raises(ValueError, match="standard, meanpad, none, autoaugment, rrc"):
        data.build_data("fake", augment="randaugment")


def test_cifar100_offline_names_the_file_to_place(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz.*cifar-100-python/") as error:
        data.build_data("cifar100", data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value) and error.value.__cause__ is None


# ----------------------------------------------------------------------------- dataset paths
def test_fake_dataset():
    loaded = data.build_data("fake", batch_size=256)
    assert (loaded.num_classes, loaded.image_size, len(loaded.train), len(loaded.test)) == (10, 32, 4, 1)
    assert next(iter(loaded.train))[0].shape == (256, 3, 32, 32)


def write_idx(path, array):
    """MNIST's idx format: magic (0, 0, type 0x08 = uint8, number of dims), big-endian sizes, bytes."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_is_padded_to_32_and_three_channels(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 8), ("t10k", 4)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(1, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    loaded = data.build_data("mnist", data_dir=str(tmp_path), batch_size=4, augment="none")
    assert (loaded.num_classes, loaded.image_size, len(loaded.train)) == (10, 32, 2)
    images, labels = next(iter(loaded.test))
    assert images.shape == (4, 3, 32, 32) and torch.equal(labels, torch.arange(4))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    zero = -loaded.mean[0] / loaded.std[0]
    assert torch.allclose(images[:, :, :2], torch.tensor(zero)) and (images[:, :, 2:30, 2:30] > zero).all()
    standard = data.build_data("mnist", data_dir=str(tmp_path), batch_size=4)
    assert standard.train.crop_flip == data.CropFlip(padding=2, flip=False)


CLASS_COLOURS = {"n01443537": (250, 10, 10), "n01629819": (10, 10, 250)}


def test_tinyimagenet_folder_layout_and_cache(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = list(CLASS_COLOURS)
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # official file is unsorted
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tsalamander\n")
    annotations = []
    for wnid, colour in CLASS_COLOURS.items():
        for number in range(2):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{number}.JPEG", colour)
            val_name = f"val_{len(annotations)}.JPEG"
            write_image(root / "val" / "images" / val_name, colour)
            annotations.append(f"{val_name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    loaded = data.build_data("tinyimagenet", data_dir=str(tmp_path), batch_size=2, augment="none")
    assert (loaded.class_names, loaded.image_size, len(loaded.train)) == (["goldfish", "salamander"], 64, 2)
    assert loaded.train.crop_flip is None and data.build_data(
        "tinyimagenet", data_dir=str(tmp_path)).train.crop_flip == data.CropFlip(padding=8)
    images, labels = concatenated(loaded.test)
    assert images.shape == (4, 3, 64, 64) and torch.equal(labels, torch.tensor([0, 0, 1, 1]))
    red_minus_blue = images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))
    assert ((red_minus_blue > 0) == (labels == 0)).all()  # label 0 is the red class
    assert (root / data.DECODED_CACHE).exists()
    cached = data.build_data("tinyimagenet", data_dir=str(tmp_path), batch_size=2, augment="none")
    assert torch.equal(concatenated(cached.test)[0], images)


def write_image_folder(root, class_names, per_class=2):
    for split in ("train", "val"):
        for label, name in enumerate(class_names):
            for number in range(per_class):
                write_image(root / split / name / f"{number}.png", (label * 2 % 256, 80, 160),
                            size=(80 + number, 70), file_format="PNG")


def test_folder_dataset_uses_imagenet_transforms_deterministically(tmp_path):
    write_image_folder(tmp_path / "birds", ["albatross", "crow"])
    build = lambda workers=0: data.build_data(f"folder:{tmp_path / 'birds'}", batch_size=2, num_workers=workers)
    loaded = build()
    assert (loaded.num_classes, loaded.image_size, loaded.class_names) == (2, 224, ["albatross", "crow"])
    assert (len(loaded.train), len(loaded.test), loaded.mean) == (2, 2, data.IMAGENET_MEAN)
    rng_state = torch.get_rng_state()
    # the same crops from a fresh loader, and from 2 worker processes: seeded per image and epoch
    first, again = batches(loaded.train, 1), batches(build(workers=2).train, 1)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert first[0][0].shape == (2, 3, 224, 224) and first[0][0].dtype == torch.float32
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert torch.equal(concatenated(loaded.test)[1], torch.tensor([0, 0, 1, 1]))


def test_imagenet100_keeps_first_100_sorted_classes(tmp_path):
    names = [f"n{number:08d}" for number in range(101, 0, -1)]
    write_image_folder(tmp_path, names, per_class=1)
    loaded = data.build_data("imagenet100", data_dir=str(tmp_path), batch_size=50, num_workers=0)
    assert loaded.num_classes == 100 and loaded.class_names == sorted(names)[:100]
    assert loaded.test.num_samples == 100


def test_sample_dataset_ships_with_the_repository_and_loads_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = data.build_data("sample", batch_size=100, augment="none")
    assert (loaded.num_classes, loaded.image_size, loaded.class_names[0]) == (10, 32, "airplane")
    assert (len(loaded.train), loaded.test.num_samples) == (10, 200)
    assert torch.equal(loaded.train.labels.bincount(), torch.full((10,), 100))
    assert torch.equal(loaded.test.labels.bincount(), torch.full((10,), 20))
    assert data.SAMPLE_NPZ.stat().st_size < 5_000_000 and "sample" in data.DATASETS


# ----------------------------------------------------------------------------- .npz schema
def valid_layout(num_train=20, num_test=10, num_classes=4):
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (num_train, 8, 8, 3), dtype=np.uint8),
            "y_train": np.arange(num_train) % num_classes,
            "x_test": rng.integers(0, 256, (num_test, 8, 8, 3), dtype=np.uint8),
            "y_test": np.arange(num_test) % num_classes,
            "classes": np.array([f"c{i}" for i in range(num_classes)])}


def one_line_error(build, match, error=ValueError):
    """The error `build()` raises: of type `error`, one line, matching `match`."""
    with pytest.raises(error, match=match) as caught:
        build()
    assert len(str(caught.value).splitlines()) == 1 and caught.value.__cause__ is None, str(caught.value)
    return str(caught.value)


NPZ_FAULTS = {  # name: (change to the valid layout, what the message must say)
    "missing keys": (lambda d: [d.pop(key) for key in ("x_test", "y_test")], r"no x_test, y_test; .*x_train, y_train"),
    "negative label": (lambda d: d["y_train"].__setitem__(3, -1), r"y_train holds negative labels \(min -1\)"),
    "label beyond classes": (lambda d: d["y_test"].__setitem__(0, 4), r"y_test holds label 4 but .* 4 classes"),
    "float images": (lambda d: d.update(x_train=d["x_train"] / 255.0), r"x_train is float64: expected uint8"),
    "NCHW": (lambda d: d.update(x_test=d["x_test"].transpose(0, 3, 1, 2)), r"x_test .*\(10, 3, 8, 8\).*NCHW"),
    "empty split": (lambda d: d.update(x_test=d["x_test"][:0], y_test=d["y_test"][:0]), r"x_test is empty"),
    "lengths differ": (lambda d: d.update(y_train=d["y_train"][:-1]), r"y_train holds 19 labels for 20 images"),
    "float labels": (lambda d: d.update(y_train=d["y_train"] * 1.0), r"y_train is float64 .*integer class"),
    "one-hot labels": (lambda d: d.update(y_test=np.eye(4, dtype=np.int64)[d["y_test"]]), r"y_test .*one-hot"),
    "one class": (lambda d: d.update(y_train=np.full(20, 2)), r"y_train holds one class \(2\).*at least 2"),
    "sizes differ": (lambda d: d.update(x_test=d["x_test"][:, :4, :4]), r"x_train images are \(8, 8\) px but"),
    "bad shape": (lambda d: d.update(x_train=d["x_train"][..., :2]), r"x_train has shape \(20, 8, 8, 2\)"),
    "object array": (lambda d: d.update(classes=np.array([None] * 4, dtype=object)), r"cannot read its arrays"),
}


@pytest.mark.parametrize("fault", NPZ_FAULTS)
def test_npz_schema_faults_are_one_line_errors_naming_the_file(tmp_path, fault):
    change, match = NPZ_FAULTS[fault]
    layout = valid_layout()
    change(layout)
    path = tmp_path / "broken.npz"
    np.savez(path, **layout)
    message = one_line_error(lambda: data.build_data(str(path), batch_size=4), match)
    assert str(path) in message


def test_npz_that_is_not_an_npz(tmp_path):
    for name, payload in (("pickle.npz", b"\x80\x04K\x01."), ("empty.npz", b""), ("text.npz", b"x_train,y\n")):
        (tmp_path / name).write_bytes(payload)
        one_line_error(lambda path=tmp_path / name: data.build_data(str(path)), r"is not an \.npz archive")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    one_line_error(lambda: data.build_data(str(tmp_path / "array.npz")), r"is not an \.npz archive")
    np.savez(tmp_path / "truncated.npz", **valid_layout(num_train=2000))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "truncated.npz").read_bytes()[:-3000])
    one_line_error(lambda: data.build_data(str(tmp_path / "truncated.npz")), r"not an \.npz|cannot read")


def test_npz_grey_images_are_accepted_as_three_equal_channels(tmp_path):
    layout = valid_layout()
    grey = {"x_train": layout["x_train"][..., 0], "x_test": layout["x_test"][..., :1]}  # [N, H, W] and [N, H, W, 1]
    np.savez(tmp_path / "grey.npz", **{**layout, **grey})
    loaded = data.build_data(str(tmp_path / "grey.npz"), batch_size=4, augment="none")
    assert loaded.train.images.shape == (20, 3, 8, 8) and loaded.test.images.shape == (10, 3, 8, 8)
    assert torch.equal(loaded.train.images[:, 0], torch.as_tensor(grey["x_train"]))
    assert torch.equal(loaded.train.images[:, 0], loaded.train.images[:, 2])


# ----------------------------------------------------------------------------- folders of small images
def write_small_folder(root, classes=("cat", "dog", "emu"), splits=("train", "test"), per_class=3, size=8, seed=0):
    """PNG files (lossless) of random pixels, train/<class>/<n>.png ...; returns {split: [N, H, W, 3]} in file order."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in splits:
        pixels[split] = rng.integers(0, 256, (len(classes) * per_class, size, size, 3), dtype=np.uint8)
        for row, array in enumerate(pixels[split]):
            path = root / split / classes[row // per_class] / f"{row % per_class}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    return pixels


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache_home"))
    return tmp_path / "cache_home" / "online-kd"


def test_small_image_folder_is_decoded_once_into_device_memory_with_its_own_stats(tmp_path, cache_home):
    pixels = write_small_folder(tmp_path / "pets")
    loaded = data.build_data(f"folder:{tmp_path / 'pets'}", batch_size=3, augment="none")
    assert isinstance(loaded.train, data.DeviceLoader) and isinstance(loaded.test, data.DeviceLoader)
    assert (loaded.class_names, loaded.num_classes, loaded.image_size) == (["cat", "dog", "emu"], 3, 8)
    assert torch.equal(loaded.train.images, torch.as_tensor(pixels["train"]).permute(0, 3, 1, 2))
    assert torch.equal(loaded.test.images, torch.as_tensor(pixels["test"]).permute(0, 3, 1, 2))
    assert torch.equal(loaded.train.labels, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    expected_mean = pixels["train"].reshape(-1, 3).mean(0) / 255
    expected_std = pixels["train"].reshape(-1, 3).std(0) / 255
    np.testing.assert_allclose(loaded.mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(loaded.std, expected_std, rtol=1e-6)
    assert (tmp_path / "pets" / data.DECODED_CACHE).exists() and not cache_home.exists()


def test_small_folder_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, cache_home, monkeypatch):
    root = tmp_path / "pets"
    write_small_folder(root)
    build = lambda: data.build_data(f"folder:{root}", batch_size=3, augment="none")
    first = build()
    decode = data._decode_images
    monkeypatch.setattr(data, "_decode_images", lambda paths: pytest.fail("decoded again, cache not reused"))
    assert torch.equal(build().train.images, first.train.images)
    new_pixels = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(new_pixels).save(root / "train" / "dog" / "1.png")  # same name, new content and mtime
    decoded = []
    monkeypatch.setattr(data, "_decode_images", lambda paths: decoded.append(len(paths)) or decode(paths))
    rebuilt = build()
    assert decoded == [18] and torch.equal(rebuilt.train.images[4], torch.full((3, 8, 8), 7, dtype=torch.uint8))
    Image.fromarray(new_pixels).save(root / "test" / "emu" / "3.png")  # an added file
    added = build()
    assert added.test.num_samples == 10 and decoded == [18, 19]
    (root / data.DECODED_CACHE).write_bytes(b"damaged")
    assert torch.equal(build().test.images, added.test.images) and decoded == [18, 19, 19]


def test_read_only_folder_is_cached_in_the_user_cache_dir(tmp_path, cache_home, monkeypatch):
    root = tmp_path / "pets"
    write_small_folder(root, splits=("train", "val"))
    root.chmod(0o555)  # as root, writing is still possible: the folder's mode must be respected anyway
    try:
        loaded = data.build_data(f"folder:{root}", batch_size=3, augment="none")
        assert not (root / data.DECODED_CACHE).exists() and len(list(cache_home.glob("pets-*.npz"))) == 1
        monkeypatch.setattr(data, "_decode_images", lambda paths: pytest.fail("decoded again, cache not reused"))
        assert torch.equal(data.build_data(f"folder:{root}", batch_size=3).test.images, loaded.test.images)
    finally:
        root.chmod(0o755)


def test_folder_evaluates_on_val_when_there_is_one_else_test(tmp_path, cache_home):
    pixels = write_small_folder(tmp_path, splits=("train", "test"))
    only_test = data.build_data(f"folder:{tmp_path}", batch_size=3)
    assert torch.equal(only_test.test.images, torch.as_tensor(pixels["test"]).permute(0, 3, 1, 2))
    val = write_small_folder(tmp_path, splits=("val",), per_class=2, seed=1)["val"]
    both = data.build_data(f"folder:{tmp_path}", batch_size=3)
    assert torch.equal(both.test.images, torch.as_tensor(val).permute(0, 3, 1, 2))


def test_small_jpeg_folder_and_large_folder_take_their_paths(tmp_path, cache_home):
    for split in ("train", "val"):
        for name, colour in (("red", (250, 10, 10)), ("blue", (10, 10, 250))):
            write_image(tmp_path / "small" / split / name / "0.jpg", colour, size=(64, 64))
            write_image(tmp_path / "large" / split / name / "0.jpg", colour, size=(65, 64))
    small = data.build_data(f"folder:{tmp_path / 'small'}", batch_size=1, augment="none")
    assert isinstance(small.train, data.DeviceLoader) and small.image_size == 64
    red_minus_blue = small.test.images[:, 0].float().mean((1, 2)) - small.test.images[:, 2].float().mean((1, 2))
    assert small.class_names == ["blue", "red"] and torch.equal(small.test.labels, torch.tensor([0, 1]))
    assert (red_minus_blue * torch.tensor([-1, 1]) > 200).all()  # decoded JPEG colours, in label order
    large = data.build_data(f"folder:{tmp_path / 'large'}", batch_size=1, num_workers=0)
    assert isinstance(large.train, data.FolderLoader) and large.image_size == data.FOLDER_IMAGE_SIZE
    crop = data._folder_transforms("rrc")[0].transforms[0]  # the same recipe on the DataLoader path
    assert (crop.size, crop.scale, crop.ratio) == ((224, 224), data.RRC_SCALE, data.RRC_RATIO)


def folder_fault(root, fault):
    write_small_folder(root)
    if fault == "different classes":
        (root / "test" / "emu").rename(root / "test" / "gnu")
    elif fault == "mixed sizes":
        Image.new("RGB", (8, 9)).save(root / "test" / "dog" / "1.png")
    elif fault == "unreadable":
        (root / "train" / "emu" / "2.png").write_bytes(b"not an image")
    elif fault == "no class folders":
        for path in sorted((root / "train").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    elif fault == "one class":
        for name in ("dog", "emu"):
            for split in ("train", "test"):
                for path in (root / split / name).iterdir():
                    path.unlink()
                (root / split / name).rmdir()
    elif fault == "empty class folder":
        for path in (root / "train" / "dog").iterdir():
            path.unlink()
    elif fault == "no evaluation split":
        (root / "test").rename(root / "testing")


FOLDER_FAULTS = {
    "different classes": (ValueError, r"train/ and test/ have different class folders \(only in train/: emu; "
                                      r"only in test/: gnu\)"),
    "mixed sizes": (ValueError, r"test/dog/1\.png is 8x9 px but .*train/cat/0\.png is 8x8 px.*one image size"),
    "unreadable": (ValueError, r"train/emu/2\.png: cannot read the image"),
    "no class folders": (ValueError, r"train: Couldn't find any class folder"),
    "one class": (ValueError, r"train holds one class folder \(cat\): training needs at least 2"),
    "empty class folder": (ValueError, r"train: Found no valid file for the classes dog"),
    "no evaluation split": (FileNotFoundError, r"needs train/<class>/<images> and val/.* or test/"),
}


@pytest.mark.parametrize("fault", FOLDER_FAULTS)
def test_folder_faults_are_one_line_errors(tmp_path, cache_home, fault):
    folder_fault(tmp_path / "pets", fault)
    error, match = FOLDER_FAULTS[fault]
    one_line_error(lambda: data.build_data(f"folder:{tmp_path / 'pets'}", batch_size=2), match, error)


# ----------------------------------------------------------------------------- hold-out (MSDNet's budgeted evaluation)
def sample_arrays():
    with np.load(data.SAMPLE_NPZ) as arrays:
        return torch.as_tensor(arrays["x_train"]).permute(0, 3, 1, 2), torch.as_tensor(arrays["y_train"])


def test_holdout_is_stratified_disjoint_from_training_and_unaugmented():
    images, labels = sample_arrays()
    loaded = data.build_data("sample", batch_size=100, holdout=100, seed=3)
    indices = loaded.holdout_indices
    assert indices == sorted(set(indices)) and len(indices) == 100 and all(isinstance(i, int) for i in indices)
    assert torch.equal(labels[indices].bincount(), torch.full((10,), 10))  # 100 per class in the sample
    kept = sorted(set(range(1000)) - set(indices))
    assert torch.equal(loaded.holdout.images, images[indices]) and torch.equal(loaded.train.images, images[kept])
    assert torch.equal(loaded.train.labels, labels[kept]) and len(loaded.train) == 9
    assert not loaded.holdout.train and loaded.holdout.num_samples == 100
    held_images, held_labels = concatenated(loaded.holdout)  # in index order, normalised, not augmented
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (loaded.mean, loaded.std))
    torch.testing.assert_close(held_images, (images[indices].float() / 255 - mean) / std)
    assert torch.equal(held_labels, labels[indices])
    uneven = data.build_data("sample", batch_size=100, holdout=55, seed=3)
    assert labels[uneven.holdout_indices].bincount().tolist() == [6] * 5 + [5] * 5  # ties go to the lower classes
    assert data.build_data("sample", batch_size=100).holdout is None


def test_holdout_is_deterministic_per_seed_and_the_same_on_every_rank():
    indices = lambda **options: data.build_data("sample", batch_size=50, holdout=200, **options).holdout_indices
    assert indices(seed=1) == indices(seed=1) != indices(seed=2)
    ranks = [data.build_data("sample", batch_size=50, holdout=200, seed=1, rank=rank, world_size=2) for rank in (0, 1)]
    assert ranks[0].holdout_indices == ranks[1].holdout_indices == indices(seed=1)
    shards = torch.cat([concatenated(loaded.holdout)[0] for loaded in ranks])
    unsharded = concatenated(data.build_data("sample", batch_size=50, holdout=200, seed=1).holdout)[0]
    assert torch.equal(shards, unsharded)  # the ranks' blocks of the hold-out cover it once
    for loaded in ranks:  # and every training shard comes from the rest
        assert len(loaded.train.images) == 800 and len(loaded.train) == 8


def test_holdout_is_taken_after_subset_and_refused_when_too_large():
    loaded = data.build_data("sample", batch_size=50, subset=500, holdout=50)
    assert max(loaded.holdout_indices) < 500 and len(loaded.train.images) == 450
    for holdout in (500, 501, -1):
        one_line_error(lambda holdout=holdout: data.build_data("sample", batch_size=50, subset=500, holdout=holdout),
                       r"holdout -?\d+ must be in 1\.\.499: the training set has 500 images")


def test_holdout_of_a_large_image_folder(tmp_path):
    write_image_folder(tmp_path, ["albatross", "crow", "dodo"], per_class=4)
    loaded = data.build_data(f"folder:{tmp_path}", batch_size=2, holdout=3, num_workers=0)
    targets = [label for _, label in loaded.holdout.dataset.samples]
    assert sorted(targets) == [0, 1, 2] and loaded.holdout.num_samples == 3 and loaded.train.num_samples == 8
    assert [index // 4 for index in loaded.holdout_indices] == targets  # class c holds rows 4c..4c+3
    images, labels = next(iter(loaded.holdout))
    assert images.shape == (2, 3, 224, 224) and labels.tolist() == targets[:2]
