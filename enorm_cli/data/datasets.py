"""Datasets and loaders for fine-tuning and evaluation: imagefolder, filelist, fashion_mnist.

Images are prepared with timm's ``create_transform`` at the recipe's size and the
model's mean/std; grey images become RGB. ``filelist`` is the WebVision/ImageNet
style: text files of ``relative/path label`` lines under a root.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..config.recipe import DataConfig
from ..errors import EnormError
from .images import load_rgb, readable, to_rgb
from .label_noise import RelabeledDataset, noisy_targets
from .shift import ShiftedDataset, parse_shift

FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def default_data_root() -> Path:
    """Where unpacked data lives unless the recipe says: the user cache's data/ (``cache.py``)."""
    from ..cache import data_dir

    return data_dir()


class ToRGB:
    """PIL image -> 8-bit RGB (``images.to_rgb``: Fashion-MNIST is grey, files may be 16-bit
    or CMYK; models want 3 channels). Picklable for workers."""

    def __call__(self, image: Any) -> Any:
        return to_rgb(image)


def build_transform(
    cfg: DataConfig, mean: list[float], std: list[float], training: bool
) -> Callable:
    """timm's train or eval transform at the recipe's size, after an RGB conversion."""
    from timm.data import create_transform
    from torchvision import transforms

    kwargs: dict[str, Any] = dict(
        input_size=(3, cfg.image_size, cfg.image_size),
        is_training=training,
        mean=tuple(mean),
        std=tuple(std),
        interpolation="bilinear",
    )
    if training:
        kwargs.update(scale=tuple(cfg.scale), hflip=cfg.hflip, color_jitter=cfg.color_jitter or 0.0)
    elif cfg.crop_pct is not None:
        kwargs["crop_pct"] = cfg.crop_pct
    return transforms.Compose([ToRGB(), create_transform(**kwargs)])


def eval_data_config(cfg: DataConfig, mean: list[float], std: list[float]) -> dict[str, Any]:
    """The data config a checkpoint records, so eval and inspect prepare images the same way."""
    return {
        "input_size": [3, cfg.image_size, cfg.image_size],
        "interpolation": "bilinear",
        "mean": list(mean),
        "std": list(std),
        "crop_pct": cfg.crop_pct or 0.875,
        "crop_mode": "center",
    }


def prepare_fashion_mnist(root: Path) -> Path:
    """Fashion-MNIST's idx files in ``root/FashionMNIST/raw``: there already (``enorm fetch``),
    else unpacked once from .gz files in ``root`` or Debian's dataset-fashion-mnist."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return root
    sources = [root, FASHION_MNIST_SYSTEM]
    for src in sources:
        if all((src / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
            raw.mkdir(parents=True, exist_ok=True)
            for name in FASHION_MNIST_FILES:
                tmp = raw / f".{name}.part"
                with gzip.open(src / f"{name}.gz", "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
                os.replace(tmp, raw / name)
            return root
    raise EnormError(
        f"Fashion-MNIST not found under {str(raw)!r}: run `enorm fetch` (it downloads it, or "
        "unpacks Debian's dataset-fashion-mnist where that is installed)"
    )


class FileListDataset(Dataset):
    """Images listed as ``relative/path label`` lines (WebVision, ImageNet lists)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None = None) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), label


def read_filelist(list_file: Path, image_dir: Path) -> list[tuple[str, int]]:
    """Parse ``path label`` lines; paths are relative to ``image_dir``."""
    if not list_file.is_file():
        raise EnormError(
            f"filelist {str(list_file)!r} not found: check data.root and data.train/data.val"
        )
    samples = []
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                label = int(parts[1])
            except (IndexError, ValueError):
                raise EnormError(
                    f"{str(list_file)!r} line {number} is not 'relative/path label': "
                    f"{line.strip()[:80]!r}"
                ) from None
            samples.append((str(image_dir / parts[0]), label))
    return samples


@dataclass
class Split:
    """One prepared split and what the checks found."""

    dataset: Dataset
    targets: list[int]
    classes: list[str] | None
    skipped: list[str] = field(default_factory=list)
    """Files left out because they do not open as images (``images.readable``)."""

    def skipped_line(self, label: str) -> str | None:
        """One line for the log when files were skipped, else None."""
        if not self.skipped:
            return None
        return (
            f"{label}: skipped {len(self.skipped)} file(s) that are not readable images "
            f"(first: {self.skipped[0]!r})"
        )


def _subset(dataset: Dataset, targets: list[int], keep: list[int]) -> tuple[Dataset, list[int]]:
    return Subset(dataset, keep), [targets[i] for i in keep]


def _limit(n: int, limit: int | None, seed: int = 0) -> list[int] | None:
    """A fixed random subset (not the first N: image folders are sorted by class)."""
    if limit is None or limit >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def _check_class_folders(folder: Path, label: str) -> None:
    """An empty class folder would shift every later class's label: name it."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in child.rglob("*") if f.is_file()):
            raise EnormError(
                f"{label}: class folder {str(child)!r} holds no images "
                f"({', '.join(IMG_EXTENSIONS[:4])}, ...): add some or remove the folder"
            )


def _drop_unreadable(dataset: Any, keep_missing: bool = False) -> list[str]:
    """Remove the samples whose file does not open as an image; returns their paths.

    ``keep_missing``: files that do not exist stay (the filelist check reports them).
    """
    paths = [path for path, _ in dataset.samples]
    if keep_missing:
        paths = [p for p in paths if os.path.isfile(p)]
    good, bad = readable(paths)
    if bad:
        kept = [(p, t) for p, t in dataset.samples if p in good or (keep_missing and p not in bad)]
        dataset.samples = kept
        dataset.targets = [t for _, t in kept]
        if hasattr(dataset, "imgs"):
            dataset.imgs = kept
    return bad


def load_split(
    cfg: DataConfig,
    split: str,
    transform: Callable | None,
    limit: int | None,
    num_classes: int | None = None,
    check_files: bool = True,
) -> Split:
    """A split by name ("train" or "val") with every check that saves a wasted run."""
    label = f"data.{split}"
    classes: list[str] | None = None
    skipped: list[str] = []
    shift = parse_shift(cfg.shift) if split == "val" and cfg.shift else None
    final_transform, transform = transform, (None if shift is not None else transform)
    if cfg.kind == "fashion_mnist":
        from torchvision.datasets import FashionMNIST

        root = prepare_fashion_mnist(Path(cfg.root) if cfg.root else default_data_root())
        train = (cfg.train if split == "train" else cfg.val) == "train"
        dataset: Dataset = FashionMNIST(str(root), train=train, transform=transform, download=False)
        targets = dataset.targets.tolist()
        classes = list(FASHION_MNIST_CLASSES)
    else:
        if cfg.root is None:
            raise EnormError(
                f"data.root is not set: point it at the {cfg.kind} dataset (data.root=/path)"
            )
        root = Path(cfg.root)
        if not root.is_dir():
            raise EnormError(f"data.root {str(root)!r} is not a directory: check the path")
        if cfg.kind == "imagefolder":
            from torchvision.datasets import ImageFolder

            folder = root / (
                cfg.train if split == "train" and isinstance(cfg.train, str) else cfg.val
            )
            if not folder.is_dir():
                raise EnormError(
                    f"{label} folder {str(folder)!r} not found: expected "
                    "root/<split>/<class>/<image>"
                )
            _check_class_folders(folder, label)
            try:
                dataset = ImageFolder(str(folder), transform=transform, loader=load_rgb)
            except (FileNotFoundError, RuntimeError) as exc:
                raise EnormError(
                    f"{label} folder {str(folder)!r} holds no images in class folders ({exc})"
                ) from None
            if cfg.check_images:
                skipped += _drop_unreadable(dataset)
            targets = list(dataset.targets)
            classes = list(dataset.classes)
        else:
            lists = cfg.train if split == "train" else cfg.val
            prefix = cfg.train_prefix if split == "train" else cfg.val_prefix
            samples = []
            for name in [lists] if isinstance(lists, str) else lists:
                samples.extend(read_filelist(root / name, root / prefix))
            dataset = FileListDataset(samples, transform)
            if cfg.check_images and check_files:
                skipped += _drop_unreadable(dataset, keep_missing=True)
            targets = list(dataset.targets)
    if cfg.first_classes is not None:
        dataset, targets = _subset(
            dataset, targets, [i for i, t in enumerate(targets) if t < cfg.first_classes]
        )
        classes = classes[: cfg.first_classes] if classes else None
    keep = _limit(len(targets), limit)
    if keep is not None:
        dataset, targets = _subset(dataset, targets, keep)
    if not targets:
        raise EnormError(f"{label} is empty: check data.root, data.{split} and data.first_classes")
    if num_classes is not None:
        bad = [t for t in targets if not 0 <= t < num_classes]
        if bad:
            raise EnormError(
                f"{label} has {len(bad)} labels outside 0..{num_classes - 1} (first: {bad[0]}): "
                "set model.num_classes to the number of classes, or data.first_classes"
            )
    if check_files and cfg.kind == "filelist":
        base = dataset
        indices = list(range(len(targets)))
        while isinstance(base, Subset):
            indices = [base.indices[i] for i in indices]
            base = base.dataset
        missing = [base.samples[i][0] for i in indices if not os.path.isfile(base.samples[i][0])]
        if missing:
            raise EnormError(
                f"{label}: {len(missing)} of {len(indices)} listed images are missing (first: "
                f"{missing[0]!r}): "
                "check data.root and data.train_prefix/val_prefix"
            )
    if split == "train" and cfg.label_noise > 0:
        classes_n = num_classes or (len(classes) if classes else max(targets) + 1)
        targets = noisy_targets(targets, cfg.label_noise, classes_n, cfg.label_noise_seed)
        dataset = RelabeledDataset(dataset, targets)
    if shift is not None:
        dataset = ShiftedDataset(dataset, shift, final_transform)
    return Split(dataset, targets, classes, skipped)


def checkpoint_split(
    cfg: DataConfig, data_config: dict[str, Any], num_classes: int | None, limit: int | None
) -> Split:
    """The val split of ``cfg`` prepared as a checkpoint's model expects (its size, crop,
    mean/std)."""
    size = int(data_config["input_size"][-1])
    cfg = cfg.model_copy(update={"image_size": size, "crop_pct": data_config.get("crop_pct")})
    transform = build_transform(cfg, data_config["mean"], data_config["std"], training=False)
    return load_split(cfg, "val", transform, limit, num_classes)


def with_transform(dataset: Any, transform: Any) -> Any:
    """Set the transform of a (possibly Subset-wrapped) dataset."""
    base = dataset
    while hasattr(base, "dataset"):
        base = base.dataset
    base.transform = transform
    return dataset


def make_loader(
    split: Split, batch_size: int, workers: int, train: bool, seed: int | None = 0
) -> torch.utils.data.DataLoader:
    """A split's loader: shuffled, dropping a last partial batch, when training.

    With a ``seed`` the loader draws its order and worker seeds from its own generator, not
    the global RNG, so starting an epoch (or an eval) does not move the model's dropout
    stream; ``None``: the global RNG, as a plain DataLoader. Training workers are re-created
    each epoch so that ``set_epoch`` on a ``PerSampleSeeds`` dataset reaches them.
    """
    return torch.utils.data.DataLoader(
        split.dataset,
        batch_size=batch_size,
        shuffle=train,
        num_workers=workers,
        drop_last=train and len(split.targets) >= batch_size,
        persistent_workers=workers > 0 and not train,
        pin_memory=torch.cuda.is_available(),
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )


def infer_num_classes(split: Split) -> int:
    """Classes of a dataset: its class list, else the largest label + 1."""
    return len(split.classes) if split.classes else max(split.targets) + 1


def parse_data_spec(spec: str) -> DataConfig:
    """``--data`` for eval and inspect: the split to read is always the config's ``val``.

    - ``DIR``: an image folder, ``DIR/<class>/<image>`` (torchvision's ImageFolder);
    - ``fashion_mnist`` (its test split) or ``fashion_mnist:train``;
    - ``filelist:LIST`` (paths relative to LIST's folder) or ``filelist:LIST@IMAGE_DIR``.
    """
    if spec.startswith("fashion_mnist"):
        split = spec.partition(":")[2] or "val"
        if split not in ("train", "val", "test"):
            raise EnormError(
                f"--data {spec!r}: use fashion_mnist, fashion_mnist:train or fashion_mnist:val"
            )
        return DataConfig(kind="fashion_mnist", val="train" if split == "train" else "val")
    if spec.startswith("filelist:"):
        listed, _, image_dir = spec[len("filelist:") :].partition("@")
        list_path = Path(listed)
        root = list_path.parent
        prefix = os.path.relpath(image_dir, root) if image_dir else ""
        return DataConfig(kind="filelist", root=str(root), val=list_path.name, val_prefix=prefix)
    folder = Path(spec)
    if not folder.is_dir():
        raise EnormError(
            f"--data {spec!r} is not a directory: give an image folder (DIR/<class>/<image>), "
            "fashion_mnist, or filelist:LIST"
        )
    return DataConfig(kind="imagefolder", root=str(folder.parent), val=folder.name)
