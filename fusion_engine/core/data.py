"""Labelled image inputs: load arrays, .npz files, image folders and torch datasets as one type.

Every dataset is an :class:`ImageDataset` whose items are ``(uint8 tensor (C, H, W), int label)``
with C = 1 (grey) or 3 (RGB). Bad input raises :class:`~fusion_engine.errors.DataError` saying
what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fusion_engine.errors import DataError, suggest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageDataset(torch.utils.data.Dataset):
    """Labelled images. Items are ``(uint8 tensor (C, H, W), int label)``.

    ``classes`` names the labels, ``targets`` holds every label (int64) without loading
    images, ``name`` is a short description for reports.
    """

    classes: list[str]
    targets: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def subset(self, indices) -> ImageDataset:
        """The images at ``indices`` (ints or a boolean mask), with the same classes."""
        raise NotImplementedError

    def digest(self) -> str:
        """sha256 hex digest of the images and labels (a feature-cache key)."""
        raise NotImplementedError

    def _pick(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        return np.arange(len(self))[idx if idx.size else idx.astype(np.int64)].reshape(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {len(self.classes)} classes)"


class ArrayImageDataset(ImageDataset):
    """Images held in memory: one uint8 tensor (N, C, H, W), or a list of (C, H, W) tensors of mixed sizes."""

    def __init__(self, images, targets: np.ndarray, classes: list[str], name: str = "arrays"):
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.name = name

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def subset(self, indices) -> ArrayImageDataset:
        idx = self._pick(indices)
        if isinstance(self.images, torch.Tensor):
            images = self.images[torch.from_numpy(idx)]
        else:
            images = [self.images[i] for i in idx]
        return ArrayImageDataset(images, self.targets[idx], self.classes, f"{self.name}[{len(idx)} of {len(self)}]")

    def digest(self) -> str:
        h = hashlib.sha256(b"array-images\0")
        for image in [self.images] if isinstance(self.images, torch.Tensor) else self.images:
            h.update(f"{tuple(image.shape)}\0".encode())
            h.update(image.contiguous().numpy())
        h.update(self.targets.astype("<i8").tobytes())
        return h.hexdigest()


class FolderImageDataset(ImageDataset):
    """Images read lazily from files under ``root``; only relative paths are kept in memory."""

    def __init__(self, root, paths: list[str], targets: np.ndarray, classes: list[str], name: str | None = None):
        self.root = Path(root)
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.name = name or f"folder {self.root.name}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as img:
                image = pil_to_tensor(img)
        except _PIL_ERRORS as e:
            raise DataError(f"cannot read image file {path}: {e}. Replace or delete the file.") from e
        return image, int(self.targets[index])

    def subset(self, indices) -> FolderImageDataset:
        idx = self._pick(indices)
        return FolderImageDataset(
            self.root,
            [self.paths[i] for i in idx],
            self.targets[idx],
            self.classes,
            f"{self.name}[{len(idx)} of {len(self)}]",
        )

    def digest(self) -> str:
        """Hash of relative paths, file sizes, modification times and labels (no image data is read)."""
        h = hashlib.sha256(b"folder-images\0")
        for rel, label in zip(self.paths, self.targets):
            try:
                st = os.stat(self.root / rel)
            except OSError as e:
                raise DataError(f"image file {self.root / rel} is gone: {e}. Reload the dataset.") from e
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
        return h.hexdigest()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as uint8 (C, H, W): grey ('1', 'L', 'LA', 16-bit) stays 1 channel, all else RGB.

    EXIF rotation is applied; transparent pixels (RGBA, LA, palette transparency) are
    composited onto white.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        arr = (np.array(img, dtype=np.uint16) >> 8).astype(np.uint8)
    else:
        grey = img.mode in ("1", "L", "LA")
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        arr = np.array(img.convert("L" if grey else "RGB"))
    t = torch.from_numpy(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


# Real photos shipped with the package (core/samples/README.md says where they come from).
SAMPLES = {"cifar10-sample": Path(__file__).resolve().parent / "samples" / "cifar10_sample.npz"}


def own_test_source(source) -> str | Path | None:
    """The held-out part that ``source`` carries itself, as something ``load_dataset`` reads: a shipped
    sample's ``NAME:test``, or an ``.npz`` with ``x_test``/``y_test`` (read with ``split="test"``); else None."""
    if isinstance(source, str) and source in SAMPLES:
        return f"{source}:test"
    if isinstance(source, (str, Path)) and str(source).lower().endswith(".npz") and Path(source).is_file():
        try:
            with np.load(source, allow_pickle=False) as d:
                keys = set(d.files) if isinstance(d, np.lib.npyio.NpzFile) else set()
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            return None  # load_dataset reports what is wrong with the file
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            return source
    return None


def load_dataset(source, *, classes: list[str] | None = None, split: str = "train") -> ImageDataset:
    """Load labelled images from ``source``.

    ``source`` is one of: ``"digits"`` (scikit-learn's 8x8 digits); ``"cifar10-sample"`` (3000 real
    photos shipped with the package, see ``core/samples/README.md``: ``split="train"`` 2000 images,
    ``split="test"`` or the name ``"cifar10-sample:test"`` 1000 others); a folder with one
    sub-folder of images per class (class names = sorted sub-folder names); an ``.npz``
    with ``x`` and ``y`` (optional ``classes``), or with ``x_train, y_train, x_test, y_test``
    (``split`` picks one); a tuple ``(x, y)`` of arrays; a torch Dataset of ``(image, label)``
    (read into memory); or an :class:`ImageDataset` (returned as is).

    ``classes`` names the labels 0..K-1; for a folder it picks and orders the sub-folders.
    A string is a path unless it is ``"digits"``; write ``"./digits"`` for a folder of that name.
    """
    if isinstance(source, str) and source.partition(":")[0] in SAMPLES:
        name, _, named_split = source.partition(":")
        source, split = SAMPLES[name], named_split or split  # "cifar10-sample:test": the held-out part
    is_npz = isinstance(source, (str, Path)) and str(source).lower().endswith(".npz")
    if split != "train" and not is_npz:
        raise DataError(
            f"split={split!r} only applies to an .npz file with x_{split}/y_{split}; leave it out for this source"
        )
    if isinstance(source, ImageDataset):
        if classes is not None and list(classes) != source.classes:
            raise DataError(
                f"classes {list(classes)} differ from the dataset's own {source.classes}; leave classes out"
            )
        return source
    if isinstance(source, str) and source == "digits":
        dataset = _load_digits(classes)
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            if isinstance(source, str) and not (os.sep in source or "/" in source or path.suffix):
                raise DataError(
                    f'unknown dataset source {source!r}{suggest(source, ["digits", *SAMPLES])}: give "digits", '
                    f"{', '.join(repr(s) for s in SAMPLES)}, a folder with one sub-folder of images per class, "
                    "or an .npz file with x and y"
                )
            raise DataError(f"dataset path {path.resolve()} does not exist; check the path")
        if path.is_dir():
            dataset = _load_folder(path, classes)
        elif is_npz:
            dataset = _load_npz(path, split, classes)
        else:
            raise DataError(
                f"{path} is neither a folder nor an .npz file; give a folder of class sub-folders or an .npz with x and y"
            )
    elif isinstance(source, tuple) and len(source) == 2:
        dataset = _from_arrays(source[0], source[1], classes, "arrays")
    elif isinstance(source, torch.utils.data.Dataset):
        dataset = _from_torch_dataset(source, classes)
    else:
        raise DataError(
            f'cannot load a dataset from a {type(source).__name__}; give "digits", a folder path, an .npz path, '
            "a tuple (x, y) of arrays, or a torch Dataset of (image, label)"
        )
    _check_classes(dataset)
    return dataset


def stratified_split(dataset: ImageDataset, test_size: float | int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Seeded stratified split into ``(train, held_out)``; ``test_size`` is a fraction or a count."""
    from sklearn.model_selection import train_test_split

    labels, counts = np.unique(dataset.targets, return_counts=True)
    if (counts < 2).any():
        lone = dataset.classes[labels[counts < 2][0]]
        raise DataError(
            f"class {lone!r} of {dataset.name} has only one image; a stratified split needs at least two per class"
        )
    try:
        train, held = train_test_split(
            np.arange(len(dataset)), test_size=test_size, stratify=dataset.targets, random_state=seed
        )
    except ValueError as e:
        raise DataError(
            f"cannot split {dataset.name} ({len(dataset)} images, {len(labels)} classes) with test_size={test_size}: {e}"
        ) from e
    return dataset.subset(np.sort(train)), dataset.subset(np.sort(held))


def collate_images(batch, size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader collate: ``(float32 images (B, C, H, W) in [0, 1], int64 labels)``.

    Grey images are repeated to 3 channels when the batch mixes grey and RGB. Images are
    resized (bilinear, antialiased) to ``size`` when given; a batch of mixed sizes needs it:
    ``DataLoader(..., collate_fn=functools.partial(collate_images, size=(224, 224)))``.
    """
    images = [torch.as_tensor(img) for img, _ in batch]
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
    for img in images:
        if img.ndim != 3 or img.shape[0] not in (1, 3):
            raise DataError(f"batch image has shape {tuple(img.shape)}; expected (C, H, W) with C = 1 or 3")
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    shapes = {tuple(img.shape[1:]) for img in images}
    if size is None and len(shapes) > 1:
        raise DataError(
            f"images in this batch differ in size ({', '.join(f'{h}x{w}' for h, w in sorted(shapes))}); pass size=(H, W) "
            "to collate_images, e.g. collate_fn=functools.partial(collate_images, size=(224, 224))"
        )
    channels = {img.shape[0] for img in images}
    if len(channels) == 1 and (size is None or shapes == {size}):
        return _to_float(torch.stack(images)), labels
    channels = max(channels)
    out = []
    for img in images:
        x = _to_float(img).expand(channels, -1, -1)
        if size is not None and tuple(x.shape[1:]) != size:
            x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
        out.append(x)
    return torch.stack(out), labels


def to_float_images(x) -> torch.Tensor:
    """Images (numpy or tensor; uint8 0..255 or float in [0, 1]) as float32 (N, C, H, W) in [0, 1].

    Accepts (N, H, W) grey, (N, H, W, C) or (N, C, H, W) with C = 1 or 3. When both 4-D
    layouts fit, numpy arrays are read as (N, H, W, C) and tensors as (N, C, H, W).
    """
    t = _as_nchw(x, "images")
    return _to_float(_check_values(t, "images"))


IMAGE_INPUTS = (
    "a PIL image, an image file path (str or Path), one image as a numpy array or torch tensor "
    "((H, W), (H, W, C) or (C, H, W); C = 1, 3, or 4 with alpha), a batch ((N, H, W), (N, H, W, C) or "
    "(N, C, H, W)), or a list of single images in any of these forms (sizes may differ)"
)


def image_batch(images, size: int | tuple[int, int] | None = None, *, batch: bool | None = None) -> torch.Tensor:
    """Any image input as float32 images (N, C, H, W) in [0, 1], C = 1 or 3; see :data:`IMAGE_INPUTS`.

    Pixels are uint8 (0..255) or float in [0, 1]; alpha is composited onto white (as files are read).
    With ``size`` every image is resized to it (bilinear, antialiased: as training batches are); without
    it, a list of images of different sizes is an error. Grey and RGB images in one list give RGB.

    ``batch=None`` reads an array's layout from its shape: 2-D is one grey image; 3-D is one image when
    an outer axis holds channels ((H, W, 1|3|4) for numpy; (1|3, H, W) for tensors, then the other way
    round), else N grey images (N, H, W); 4-D is a batch. So three grey images in one (3, H, W) array
    read as one RGB image: give them as (3, H, W, 1) or as a list. ``batch=True`` (scikit-learn's X)
    always reads the first axis as images. A list holds one image per item, never batches.
    """
    if isinstance(images, np.ndarray) and images.dtype.kind == "O" and images.ndim > 1 and images[0].size > 1:
        try:  # numbers stored as objects
            images = images.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"the images are an object array of shape {images.shape} that holds neither numbers nor one image "
                f"per item ({e}); give {IMAGE_INPUTS}"
            ) from None
    elif isinstance(images, np.ndarray) and images.dtype.kind in "OUS":  # paths or per-image objects
        images = images.item() if images.ndim == 0 else list(images.reshape(-1))
    elif not isinstance(images, (np.ndarray, torch.Tensor, list, tuple, str, Path, Image.Image)) and hasattr(
        images, "__array__"
    ):
        images = np.asarray(images)
    if isinstance(images, (list, tuple)) and images and _is_numeric_nest(images):
        try:
            images = np.asarray(images)
        except ValueError:
            pass  # ragged: one image per item
    if isinstance(images, (np.ndarray, torch.Tensor)):
        t = _pixels(images, "the images")
        single = t.ndim == 2 or (t.ndim == 3 and _channel_axis(t, isinstance(images, torch.Tensor)) is not None)
        if single and not batch:
            items = [_one_image(images, "the image")]
        elif t.ndim in (3, 4):
            x = _alpha_onto_white(_to_float(_checked_pixels(_batch_nchw(t, images), "the images")))
            return _resized(x, size)
        else:
            tabular = (
                " (2-D: one grey image, or rows of tabular features, not a batch of images)" if t.ndim == 2 else ""
            )
            raise DataError(
                f"the images have shape {tuple(t.shape)}{tabular}; "
                + (
                    "expected a batch of images (N, H, W), (N, H, W, C) or (N, C, H, W); reshape flattened images "
                    "with X.reshape(-1, H, W)"
                    if batch
                    else f"give {IMAGE_INPUTS}"
                )
            )
    elif isinstance(images, (str, Path, Image.Image)):
        items = [_one_image(images, "the image")]
    elif isinstance(images, (list, tuple)):
        items = [_one_image(item, f"item {i} of the list") for i, item in enumerate(images)]
    else:
        raise DataError(f"cannot read images from a {type(images).__name__}; give {IMAGE_INPUTS}")
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    if not items:
        return torch.zeros((0, 3, *(size or (1, 1))))
    shapes = {tuple(t.shape[1:]) for t in items}
    if size is None and len(shapes) > 1:
        raise DataError(
            f"the images differ in size ({', '.join(f'{h}x{w}' for h, w in sorted(shapes))}); resize them to one "
            "size, or pass size=(H, W)"
        )
    return collate_images([(t, 0) for t in items], size=size)[0]


# --- helpers ---------------------------------------------------------------------------------


def _is_numeric_nest(items) -> bool:
    """Whether a list looks like nested numbers (an array written as lists), not a list of images."""
    first = items[0]
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    return isinstance(first, (int, float, np.number)) and not isinstance(first, bool)


def _pixels(x, what: str) -> torch.Tensor:
    """A numpy array or tensor as a CPU tensor of uint8, int64 or float32 pixels (layout untouched)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bool or t.is_complex():
            raise DataError(f"{what}: a {t.dtype} tensor; expected uint8 (0..255) or float (0..1) pixels")
        if t.dtype != torch.uint8:
            t = t.float() if t.is_floating_point() else t.long()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(f"{what}: NaN or infinite values; pixels must be float in [0, 1] or uint8 0..255")
        return t
    if x.dtype.kind not in "uif":
        raise DataError(f"{what}: dtype {x.dtype}; expected uint8 (0..255) or float (0..1) pixels")
    if x.dtype != np.uint8:
        x = x.astype(np.float32 if x.dtype.kind == "f" else np.int64)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"{what}: NaN or infinite values; pixels must be float in [0, 1] or uint8 0..255")
    return t


def _channel_axis(t: torch.Tensor, channels_first: bool) -> int | None:
    """For one 3-D image: 0 (C, H, W) or 2 (H, W, C) when that axis can hold channels, else None."""
    first, last = t.shape[0] in (1, 3), t.shape[2] in (1, 3, 4)
    order = (0, 2) if channels_first else (2, 0)
    return next((axis for axis in order if (first if axis == 0 else last)), None)


def _batch_nchw(t: torch.Tensor, original) -> torch.Tensor:
    """A batch (N, H, W), (N, H, W, C) or (N, C, H, W) as (N, C, H, W); C = 1, 3 or 4."""
    if t.ndim == 3:
        return t[:, None]
    first, last = t.shape[1] in (1, 3, 4), t.shape[3] in (1, 3, 4)
    if last and not (first and isinstance(original, torch.Tensor)):
        return t.permute(0, 3, 1, 2)
    if first:
        return t
    raise DataError(
        f"the images have shape {tuple(t.shape)}: no channel axis; expected (N, H, W, C) or (N, C, H, W) with "
        "C = 1 (grey), 3 (RGB) or 4 (RGBA)"
    )


def _alpha_onto_white(x: torch.Tensor) -> torch.Tensor:
    """Float (N, 4, H, W) RGBA composited onto white as (N, 3, H, W); other images unchanged."""
    if x.shape[1] != 4:
        return x
    alpha = x[:, 3:]
    return x[:, :3] * alpha + (1 - alpha)


def _resized(x: torch.Tensor, size) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    if size is None or tuple(x.shape[2:]) == size or not len(x):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _one_image(image, what: str) -> torch.Tensor:
    """One image in any accepted form as float32 (C, H, W) in [0, 1], C = 1 or 3."""
    if isinstance(image, Image.Image):
        return _to_float(pil_to_tensor(image))
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser().resolve()
        where = "" if what == "the image" else f"{what}: "
        if not path.is_file():
            problem = "is a folder" if path.is_dir() else "does not exist"
            hint = " (list its images, e.g. sorted(Path(folder).glob('*.png')))" if path.is_dir() else ""
            raise DataError(f"{where}image file {path} {problem}; give the path of an image file{hint}")
        try:
            with Image.open(path) as img:
                return _to_float(pil_to_tensor(img))
        except _PIL_ERRORS as e:
            raise DataError(f"{where}cannot read image file {path}: {e}. Give a readable image file") from e
    if isinstance(image, (list, tuple)) and _is_numeric_nest(image):
        try:
            image = np.asarray(image)
        except ValueError:
            pass
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise DataError(
            f"{what} is a {type(image).__name__}; expected one image: a PIL image, an image file path, or a numpy "
            "array / torch tensor (H, W), (H, W, C) or (C, H, W)"
        )
    t = _pixels(image, what)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3 and (axis := _channel_axis(t, isinstance(image, torch.Tensor))) is not None:
        t = t.permute(2, 0, 1) if axis == 2 else t
    else:
        raise DataError(
            f"{what} has shape {tuple(t.shape)}, which is not one image; expected (H, W), (H, W, C) or (C, H, W) "
            "with C = 1, 3 or 4" + (" (a list holds one image per item)" if t.ndim > 2 else "")
        )
    return _alpha_onto_white(_to_float(_checked_pixels(t.contiguous(), what))[None])[0]


def _checked_pixels(t: torch.Tensor, what: str) -> torch.Tensor:
    try:
        return _check_values(t, "pixels")
    except DataError as e:
        raise DataError(f"{what}: {e}") from None


def _to_float(t: torch.Tensor) -> torch.Tensor:
    return t.float().div_(255) if t.dtype == torch.uint8 else t.float()


def _as_nchw(x, what: str) -> torch.Tensor:
    """Array or tensor of images as a tensor (N, C, H, W); uint8, int64 or float dtype."""
    channels_first = isinstance(x, torch.Tensor)
    if channels_first:
        t = x.detach().cpu()
        if t.dtype != torch.uint8 and not t.is_floating_point():
            t = t.long()
    else:
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise DataError(f"{what} cannot form one array ({e}); give images of equal size, or a folder") from e
        if arr.dtype.kind not in "uif":
            raise DataError(f"{what} have dtype {arr.dtype}; expected uint8 (0..255) or float (0..1) images")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32 if arr.dtype.kind == "f" else np.int64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    shape = tuple(t.shape)
    if t.ndim == 3 and shape[-1] == 3:
        raise DataError(f"{what} have shape {shape}, which looks like one RGB image; add a batch axis: x[None]")
    if t.ndim == 3:
        t = t[:, None]
    elif t.ndim == 4:
        first, last = t.shape[1] in (1, 3), t.shape[3] in (1, 3)
        if last and not (first and channels_first):
            t = t.permute(0, 3, 1, 2)
        elif not first:
            t = None
    else:
        t = None
    if t is None or min(t.shape[2:]) < 1:
        raise DataError(
            f"{what} have shape {shape}; expected (N, H, W) grey, or (N, H, W, C) / (N, C, H, W) with C = 1 (grey) or 3 (RGB)"
        )
    return t.contiguous()


def _check_values(t: torch.Tensor, what: str) -> torch.Tensor:
    """Check the value range of uint8 / int / float images; returns uint8 or float tensors unchanged."""
    if t.dtype == torch.uint8 or t.numel() == 0:
        return t
    lo, hi = (float(v) for v in torch.aminmax(t))
    if t.is_floating_point():
        if not (lo >= 0 and hi <= 1):
            raise DataError(
                f"float {what} must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; divide 0..255 images by 255 or pass uint8"
            )
        return t
    if lo < 0 or hi > 255:
        raise DataError(f"integer {what} must lie in 0..255, found values in [{lo:.0f}, {hi:.0f}]; pass uint8 images")
    return t.to(torch.uint8)


def _as_uint8(t: torch.Tensor, what: str) -> torch.Tensor:
    t = _check_values(t, what)
    return t if t.dtype == torch.uint8 else t.mul(255).round_().to(torch.uint8)


MAX_CLASSES = 100_000
"""The most classes a dataset may have (ImageNet-21k has 21,841). Labels are checked against it, and
against the number of images, before anything sized by them (the class list, the model's head) is built."""


def _labels(y, n: int, classes: list[str] | None, what: str) -> tuple[np.ndarray, list[str]]:
    """Validate labels against ``n`` images and the class list; infer "0".."K-1" names if none given.

    Every label lies in 0..K-1 with K at most :data:`MAX_CLASSES`; without class names K is the largest
    label + 1 and may not exceed the number of images either (a class list then costs no more memory
    than the images themselves; name the classes to have more classes than images).
    """
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1:
        raise DataError(f"{what}: labels y have shape {y.shape}; expected one integer label per image, shape ({n},)")
    if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
        y = _checked_range(y, what).astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{what}: labels y have dtype {y.dtype}; expected integer class indices 0..K-1")
    if len(y) != n:
        raise DataError(f"{what}: x has {n} images but y has {len(y)} labels; they must have the same length")
    y = _checked_range(y, what).astype(np.int64)
    _check_class_count(classes, what)
    if classes is None:
        count = int(y.max()) + 1 if len(y) else 0
        if count > n:
            raise DataError(
                f"{what}: label {count - 1} would make {count} classes for {n} images; without class names the "
                "labels must be 0..K-1 with K at most the number of images. Fix the label, or name the classes "
                "(a 'classes' array in the .npz, or classes=[...])"
            )
        classes = [str(i) for i in range(count)]
    bad = y[(y < 0) | (y >= len(classes))]
    if len(bad):
        raise DataError(
            f"{what}: label {bad[0]} is out of range; labels must be 0..{len(classes) - 1} for {len(classes)} classes"
        )
    return y, list(classes)


def _check_class_count(classes, what: str) -> None:
    if classes is not None and len(classes) > MAX_CLASSES:
        raise DataError(
            f"{what}: {len(classes)} class names; at most {MAX_CLASSES:,} classes are supported. Check the class list"
        )


def _checked_range(y: np.ndarray, what: str) -> np.ndarray:
    """``y`` when every label lies in 0..MAX_CLASSES-1 (checked in its own dtype, before any cast could wrap)."""
    if len(y):
        lo, hi = y.min(), y.max()
        bad = lo if lo < 0 else hi if hi >= MAX_CLASSES else None
        if bad is not None:
            shown = int(bad) if y.dtype.kind in "iu" else float(bad)
            raise DataError(
                f"{what}: label {shown} is out of range; labels are class indices 0..K-1 with K at most "
                f"{MAX_CLASSES:,}. Fix the labels"
            )
    return y


def _from_arrays(x, y, classes, name: str, what: str | None = None) -> ArrayImageDataset:
    """``what`` names the source in error messages (default: ``name``, e.g. a file's full path for .npz)."""
    what = what or name
    _check_class_count(classes, what)  # these two before the images are converted (copied)
    if isinstance(y, np.ndarray) and y.ndim == 1 and y.dtype.kind in "iuf":
        _checked_range(y, what)
    images = _as_uint8(_as_nchw(x, f"{what}: images x"), f"{what}: images x")
    targets, classes = _labels(y, len(images), classes, what)
    return ArrayImageDataset(images, targets, classes, name)


def _check_classes(dataset: ImageDataset) -> None:
    if len(set(dataset.classes)) != len(dataset.classes):
        raise DataError(f"{dataset.name}: class names repeat ({dataset.classes}); give each class a distinct name")
    if len(dataset) == 0:
        raise DataError(f"{dataset.name} contains no images")
    present = np.unique(dataset.targets)
    if len(present) < 2:
        names = ", ".join(repr(dataset.classes[i]) for i in present)
        raise DataError(
            f"{dataset.name} has images of {len(present)} class ({names}); a classifier needs at least two classes"
        )


def _load_digits(classes) -> ArrayImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)
    return _from_arrays(x, d.target, classes or [str(i) for i in range(10)], "digits")


def _load_npz(path: Path, split: str, classes) -> ArrayImageDataset:
    try:
        d = np.load(path, allow_pickle=False)
        if not isinstance(d, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single array, not an .npz archive; save x and y with numpy.savez")
        with d:
            keys = set(d.files)
            if {"x", "y"} <= keys:
                if split != "train":
                    raise DataError(
                        f"{path} holds one set (x, y) and no {split!r} split; hold data out with stratified_split"
                    )
                xk, yk, name = "x", "y", path.name
            elif {f"x_{split}", f"y_{split}"} <= keys:
                xk, yk, name = f"x_{split}", f"y_{split}", f"{path.name}:{split}"
            else:
                raise DataError(
                    f"{path} has arrays {sorted(keys)}; expected x and y, or x_{split} and y_{split} for split={split!r}"
                )
            x, y = d[xk], d[yk]
            if classes is None and "classes" in keys:
                names = d["classes"]
                if names.ndim != 1 or len(names) > MAX_CLASSES:
                    raise DataError(
                        f"{path}: 'classes' has shape {names.shape}; expected one name per class, at most "
                        f"{MAX_CLASSES:,}"
                    )
                classes = [str(c) for c in names]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"cannot read {path} as an .npz of arrays: {e}. Save it with numpy.savez (string class names, no objects)."
        ) from e
    return _from_arrays(x, y, classes, name, f"{path}" + ("" if xk == "x" else f" ({xk}, {yk})"))


def _load_folder(root: Path, classes) -> FolderImageDataset:
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None:
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(f"class folder(s) {missing} not found in {root}; it has sub-folders {found}")
        found = list(classes)
    if len(found) < 2:
        raise DataError(
            f"{root} has {len(found)} class sub-folder(s) {found}; put each class's images in its own sub-folder, "
            "at least two classes"
        )
    paths, targets = [], []
    for label, name in enumerate(found):
        files = sorted(
            p.relative_to(root).as_posix()
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.is_file()
        )
        if not files:
            raise DataError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        for rel in files:
            _verify_image(root / rel)
        paths += files
        targets += [label] * len(files)
    return FolderImageDataset(root, paths, np.array(targets, dtype=np.int64), found)


def _verify_image(path: Path) -> None:
    """Cheap integrity check: PNG chunk CRCs via ``verify``; JPEGs decoded at 1/8 scale to catch truncation."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (1, 1))
                img.load()
            else:
                img.verify()
    except _PIL_ERRORS as e:
        raise DataError(f"image file {path} is unreadable or corrupt ({e}); replace or delete it") from e


def _from_torch_dataset(ds, classes) -> ArrayImageDataset:
    """Read a torch Dataset of (image, label) into memory; images PIL, numpy HWC or tensor CHW."""
    name = type(ds).__name__
    try:
        n = len(ds)
    except TypeError as e:
        raise DataError(f"{name} has no length; give a map-style torch Dataset of (image, label)") from e
    images, labels = [], []
    for i in range(n):
        item = ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"item {i} of {name} is a {type(item).__name__}; expected a pair (image, label)")
        image, label = item
        what = f"item {i} of {name}"
        if isinstance(image, Image.Image):
            images.append(pil_to_tensor(image))
        elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3):
            images.append(_as_uint8(_as_nchw(image[None], what), what)[0])
        else:
            raise DataError(
                f"{what}: image is a {type(image).__name__}; expected a PIL image, numpy (H, W[, C]) or tensor (C, H, W)"
            )
        try:
            labels.append(int(label))
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise DataError(f"{what}: label {label!r} is not an integer class index") from e
        if not 0 <= labels[-1] < MAX_CLASSES:
            raise DataError(
                f"{what}: label {labels[-1]} is out of range; labels are class indices 0..K-1 with K at most "
                f"{MAX_CLASSES:,}. Fix the labels"
            )
    if classes is None and isinstance(getattr(ds, "classes", None), (list, tuple)):
        if len(ds.classes) > MAX_CLASSES:
            raise DataError(f"{name}: {len(ds.classes)} classes; at most {MAX_CLASSES:,} classes are supported")
        classes = [str(c) for c in ds.classes]
    targets, classes = _labels(np.array(labels, dtype=np.int64), n, classes, name)
    if len({tuple(t.shape) for t in images}) == 1:
        images = torch.stack(images)
    return ArrayImageDataset(images, targets, classes, name)


def align_classes(model, dataset):
    """Map the dataset's labels onto the model's class order (same names, any order)."""
    if model.class_names is None or list(dataset.classes) == list(model.class_names):
        return dataset
    if sorted(dataset.classes) != sorted(model.class_names):
        raise DataError(
            f"the data's classes {list(dataset.classes)} differ from the model's {model.class_names}; "
            "evaluate on data with the classes the model was trained on"
        )
    order = [model.class_names.index(c) for c in dataset.classes]
    remapped = dataset.subset(np.arange(len(dataset)))
    remapped.targets = np.asarray(order)[dataset.targets]
    remapped.classes = list(model.class_names)
    return remapped
