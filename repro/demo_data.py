"""A small synthetic ILSVRC-2012, laid out exactly as ImageNet distributes it, so that the real preparation code
and training run on it unchanged.

`make_demo_data(out)` writes, under `out`:

- `ILSVRC2012_img_train.tar`: one uncompressed `<wnid>.tar` per class, each holding `<wnid>_<n>.JPEG` files;
- `ILSVRC2012_img_val.tar`: flat `ILSVRC2012_val_%08d.JPEG` files (1-based), the classes interleaved;
- `ILSVRC2012_devkit_t12.tar.gz`: `data/meta.mat` and `data/ILSVRC2012_validation_ground_truth.txt`;
- `demo_info.json`: what was made, the odd files included (see `make_demo_data`).

The WNIDs are made up ('n9' + 7 digits, so they never collide with real ones). As in the real data, the class
index is the position in sorted-WNID order, while the devkit's ILSVRC2012_IDs follow another order, so code that
confuses the two gets wrong validation labels. The images carry the real data's awkward cases: varied sizes and
aspect ratios (some need upscaling), a few percent grayscale, a few CMYK, one PNG named .JPEG and one truncated
JPEG (both in train).

Each class is a geometric pattern or texture drawn at the image's own size. Sizes are fractions of the shorter
side, so they survive the resize to 256, and every class is symmetric under horizontal flips (or, for the
diagonal stripes, draws both directions), so flips and 224 crops never turn one class into another.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from repro.errors import RunError
from repro.io import write_json

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
INFO_JSON = "demo_info.json"
FORMAT_VERSION = 1  # part of the arguments recorded in demo_info.json: bump it when the output changes

# name: the band of its scale (stripe period, cell, dot spacing, shape size) as a fraction of the shorter side,
# for the first len(PATTERNS) classes and for their "small" variants, the classes after them.
PATTERNS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "stripes horizontal": ((0.11, 0.18), (0.045, 0.065)),
    "stripes vertical": ((0.11, 0.18), (0.045, 0.065)),
    "stripes diagonal": ((0.11, 0.18), (0.045, 0.065)),
    "checkerboard": ((0.18, 0.28), (0.07, 0.1)),
    "rings concentric": ((0.1, 0.16), (0.045, 0.065)),
    "dots grid": ((0.15, 0.22), (0.07, 0.1)),
    "disc": ((0.26, 0.36), (0.1, 0.15)),
    "cross": ((0.3, 0.4), (0.12, 0.17)),
    "triangle": ((0.3, 0.4), (0.12, 0.17)),
    "square outline": ((0.26, 0.34), (0.1, 0.15)),
}
PATTERN_NAMES = tuple(PATTERNS)
MAX_CLASSES = 2 * len(PATTERNS)

# Smallest and largest allowed value of each argument (None: no upper limit). At least 3 train and 2 validation
# images per class, so that a few ordinary images remain beside the odd ones even for 2 classes.
LIMITS = {"num_classes": (2, MAX_CLASSES), "train_per_class": (3, None), "val_per_class": (2, None), "seed": (0, None)}

SHORT_SIDE = (160, 520)  # pixels; below 256 the preparation must upscale
ASPECT = (0.6, 1.8)  # width / height
GRAYSCALE_FRACTION = 0.02
CMYK_FRACTION = 0.002
JPEG_QUALITY = 90
EDGE_PX = 1.2  # width of the antialiased edge of every shape
ARCHIVE_MTIME = 1338508800  # 2012-06-01 UTC: a fixed time stamp keeps the archives byte-identical across runs


def class_name(index: int) -> str:
    """The devkit's `words` of class `index` (in sorted-WNID order)."""
    pattern = PATTERN_NAMES[index % len(PATTERNS)]
    return f"demo small {pattern}" if index >= len(PATTERNS) else f"demo {pattern}"


# ----------------------------------------------------------------------------------------------------------------
# Images


def _square_wave(x: np.ndarray, period: float, duty: float, phase: float) -> np.ndarray:
    """Signed distance (positive inside) to the edges of stripes of width `duty * period` repeating along x."""
    return period * (duty / 2 - np.abs((x / period + phase) % 1.0 - 0.5))


def _signed_distance(pattern: str, scale: float, rng: np.random.Generator, u: np.ndarray, v: np.ndarray):
    """Signed distance to the foreground's edge (positive inside), in units of the shorter side.

    u (a row) and v (a column) are the pixel coordinates from the image centre in the same units.
    """
    if pattern.startswith("stripes"):
        if pattern == "stripes horizontal":
            x = v
        elif pattern == "stripes vertical":
            x = u
        else:  # either diagonal, so that a horizontal flip stays in the class
            x = (u + rng.choice([-1, 1]) * v) / np.sqrt(2)
        return _square_wave(x, scale, rng.uniform(0.4, 0.6), rng.random())
    if pattern == "checkerboard":
        du, dv = _square_wave(u, scale, 0.5, rng.random()), _square_wave(v, scale, 0.5, rng.random())
        return np.sign(du * dv) * np.minimum(np.abs(du), np.abs(dv))
    if pattern == "dots grid":
        du = scale * ((u / scale + rng.random()) % 1.0 - 0.5)
        dv = scale * ((v / scale + rng.random()) % 1.0 - 0.5)
        return scale * rng.uniform(0.22, 0.32) - np.hypot(du, dv)

    # The rest are centred, with a jitter small enough to stay inside the central crop.
    jitter = 0.06 if scale > 0.2 else 0.15
    u = u - rng.uniform(-jitter, jitter)
    v = v - rng.uniform(-jitter, jitter)
    if pattern == "rings concentric":
        return _square_wave(np.hypot(u, v), scale, rng.uniform(0.4, 0.6), rng.random())
    if pattern == "disc":
        return scale - np.hypot(u, v)
    if pattern == "cross":
        half_width = scale * rng.uniform(0.18, 0.26)
        bar_across = np.minimum(half_width - np.abs(v), scale - np.abs(u))
        bar_down = np.minimum(half_width - np.abs(u), scale - np.abs(v))
        return np.maximum(bar_across, bar_down)
    if pattern == "triangle":  # pointing up, with its centroid at the (jittered) centre
        height, half_base = 1.6 * scale, scale * rng.uniform(0.8, 1.0)
        apex, base = -2 * height / 3, height / 3
        slant = height / np.hypot(height, half_base)  # turns the horizontal gap into a distance to the side
        return np.minimum(base - v, ((v - apex) * half_base / height - np.abs(u)) * slant)
    if pattern == "square outline":
        return scale * rng.uniform(0.08, 0.11) - np.abs(np.maximum(np.abs(u), np.abs(v)) - scale)
    raise AssertionError(pattern)


def _class_tint(index: int) -> np.ndarray:
    """A zero-mean RGB offset of a hue of its own, so that colour helps a little (but is never needed)."""
    rgb = np.array(colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 1.0, 1.0))
    return rgb - rgb.mean()


def draw_image(class_index: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 RGB image of class `class_index`, of random size, pattern parameters, colours and noise."""
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    aspect = float(np.exp(rng.uniform(np.log(ASPECT[0]), np.log(ASPECT[1]))))
    height, width = (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)

    pattern = PATTERN_NAMES[class_index % len(PATTERNS)]
    scale = rng.uniform(*PATTERNS[pattern][class_index >= len(PATTERNS)])
    u = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2) / short)[None, :]
    v = ((np.arange(height, dtype=np.float32) + 0.5 - height / 2) / short)[:, None]
    distance = np.broadcast_to(_signed_distance(pattern, scale, rng, u, v), (height, width))  # stripes: 1-D
    mask = np.clip(0.5 + distance * (short / EDGE_PX), 0.0, 1.0).astype(np.float32)

    # One dark and one light colour, so that the pattern keeps its contrast in grayscale.
    lightness = [rng.uniform(0.05, 0.35), rng.uniform(0.65, 0.95)]
    rng.shuffle(lightness)
    tint = 0.12 * _class_tint(class_index)
    background, foreground = (np.clip(lum + tint + 0.08 * rng.standard_normal(3), 0, 1) for lum in lightness)

    image = background.astype(np.float32) + mask[..., None] * (foreground - background).astype(np.float32)
    # Uniform pixel noise: as good as Gaussian here, and several times faster to draw.
    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * np.float32(rng.uniform(0.03, 0.12))
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def encode_image(pixels: np.ndarray, kind: str) -> bytes:
    """The file's bytes: kind is "rgb", "grayscale" or "cmyk" (JPEGs), "png" or "truncated" (half a JPEG)."""
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if kind == "png":
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    mode = {"grayscale": "L", "cmyk": "CMYK"}.get(kind, "RGB")
    image.convert(mode).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    data = buffer.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


def _image_file(seed: int, stream: tuple[int, ...], class_index: int, kind: str) -> bytes:
    # Each image has its own random stream, so that it does not depend on the order of generation.
    return encode_image(draw_image(class_index, np.random.default_rng([seed, *stream])), kind)


# ----------------------------------------------------------------------------------------------------------------
# Archives


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)  # uid, gid 0 and empty uname, gname by default
    info.size, info.mtime = size, ARCHIVE_MTIME
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            _add_file(tar, name, data)
    return buffer.getvalue()


def meta_mat(wnids: list[str], devkit_ids: dict[str, int], internal_wnids: list[str], train_per_class: int) -> bytes:
    """The devkit's meta.mat: a 1-column struct array `synsets` ordered by ILSVRC2012_ID, the leaves (the classes)
    at 1..C and two internal synsets after them, as in the real devkit (1000 leaves, then 860 internal)."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    count = len(wnids)
    synsets = np.zeros((count + 2, 1), dtype=[(field, object) for field in fields])
    for index, wnid in enumerate(wnids):
        synset_id = devkit_ids[wnid]
        words = class_name(index)
        synsets[synset_id - 1, 0] = (synset_id, wnid, words, f"synthetic images: {words}", 0,
                                     np.zeros(0), 0, train_per_class)
    half = count // 2
    group_children = np.arange(1, half + 1)
    root_children = np.concatenate([[count + 1], np.arange(half + 1, count + 1)])
    for synset_id, wnid, words, children, height in [
        (count + 1, internal_wnids[0], "demo group", group_children, 1),
        (count + 2, internal_wnids[1], "demo root", root_children, 2),
    ]:
        synsets[synset_id - 1, 0] = (synset_id, wnid, words, "an internal synset of the demo data", len(children),
                                     children, height, 0)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    data = bytearray(buffer.getvalue())
    # The 116-byte text header holds the time of writing: a fixed text keeps the file byte-identical.
    data[:116] = b"MATLAB 5.0 MAT-file, written by repro.demo_data".ljust(116)
    return bytes(data)


def _write_devkit(path: Path, meta: bytes, ground_truth_ids: list[int]) -> None:
    root = "ILSVRC2012_devkit_t12"
    ground_truth = "".join(f"{synset_id}\n" for synset_id in ground_truth_ids).encode()
    with open(path, "wb") as raw:
        # A fixed gzip time stamp and no file name in the gzip header (it would be the temporary one).
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed:
            with tarfile.open(fileobj=compressed, mode="w", format=tarfile.GNU_FORMAT) as tar:
                tar.addfile(_tar_info(root, directory=True))
                tar.addfile(_tar_info(f"{root}/data", directory=True))
                _add_file(tar, f"{root}/data/meta.mat", meta)
                _add_file(tar, f"{root}/data/ILSVRC2012_validation_ground_truth.txt", ground_truth)


# ----------------------------------------------------------------------------------------------------------------
# The data set


def _limit_error(value, low: int, high: int | None) -> str | None:
    """Why `value` is not allowed between these limits (None if it is)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
        return f"must be an integer {allowed}, got {value!r}"
    return None


def _odd_kinds(count: int, rng: np.random.Generator, extra: tuple[str, ...]) -> list[str]:
    """The kind of each of `count` images: a few percent grayscale, a few CMYK, then one of each `extra` kind."""
    special = (["grayscale"] * max(1, round(GRAYSCALE_FRACTION * count))
               + ["cmyk"] * max(1, round(CMYK_FRACTION * count)) + list(extra))
    kinds = ["rgb"] * count
    for position, kind in zip(rng.permutation(count), special):
        kinds[position] = kind
    return kinds


def _read_info(out: Path) -> dict | None:
    try:
        return json.loads((out / INFO_JSON).read_text())
    except (OSError, ValueError):
        return None


def make_demo_data(out_dir: str | os.PathLike, num_classes: int = 10, train_per_class: int = 260,
                   val_per_class: int = 30, seed: int = 0) -> dict:
    """Write the synthetic ILSVRC-2012 archives into `out_dir` and return (and write as demo_info.json) a summary:

    - `args`: the arguments (and FORMAT_VERSION);
    - `wnids`: the WNIDs in sorted order, the class index being the position in it; `words`: the class names;
    - `devkit_ids`: {wnid: ILSVRC2012_ID}, deliberately not in sorted-WNID order;
    - `val_labels`: the class index of each validation image, in file order (ILSVRC2012_val_00000001 first);
    - `grayscale`, `cmyk`, `png_as_jpeg`, `truncated`: the file names (as in the tars) of the odd images.

    The same arguments give byte-identical files. When the files exist and demo_info.json records the same
    arguments, nothing is done. The archives are written under temporary names and renamed at the end, so an
    interrupted run never leaves complete-looking ones.
    """
    args = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed)
    for name, value in args.items():
        error = _limit_error(value, *LIMITS[name])
        if error:
            raise RunError(f"{name} {error}")
    args["format_version"] = FORMAT_VERSION

    out = Path(out_dir)
    outputs = [TRAIN_TAR, VAL_TAR, DEVKIT_TAR]
    info = _read_info(out)
    if info is not None and info.get("args") == args and all((out / name).is_file() for name in outputs):
        print(f"{out}: the demo data for these arguments is already there, nothing to do")
        return info

    rng = np.random.default_rng([seed, 0])
    numbers = rng.choice(10**7, size=num_classes + 2, replace=False)
    made_up = [f"n9{number:07d}" for number in numbers]
    wnids, internal_wnids = sorted(made_up[:num_classes]), made_up[num_classes:]
    order = rng.permutation(num_classes)
    if order[0] == 0:  # ID 1 must not be the first sorted WNID, so that the two orders clearly differ
        order = np.roll(order, 1)
    devkit_ids = {wnid: int(order[index]) + 1 for index, wnid in enumerate(wnids)}
    val_labels = rng.permutation(np.repeat(np.arange(num_classes), val_per_class)).tolist()
    train_kinds = _odd_kinds(num_classes * train_per_class, rng, ("png", "truncated"))
    val_kinds = _odd_kinds(len(val_labels), rng, ())

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"{out} cannot be the demo data's folder: {error.strerror}") from None
    (out / INFO_JSON).unlink(missing_ok=True)  # so that a run interrupted below is never taken for complete
    temporary = {name: out / f"{name}.partial" for name in outputs}
    odd: dict[str, list[str]] = {"grayscale": [], "cmyk": [], "png": [], "truncated": []}
    try:
        with tarfile.open(temporary[TRAIN_TAR], mode="w", format=tarfile.GNU_FORMAT) as train:
            for label, wnid in enumerate(wnids):
                files = []
                for number in range(1, train_per_class + 1):
                    name, kind = f"{wnid}_{number}.JPEG", train_kinds[label * train_per_class + number - 1]
                    files.append((name, _image_file(seed, (1, label, number), label, kind)))
                    if kind != "rgb":
                        odd[kind].append(name)
                _add_file(train, f"{wnid}.tar", _tar_bytes(files))
        with tarfile.open(temporary[VAL_TAR], mode="w", format=tarfile.GNU_FORMAT) as val:
            for number, (label, kind) in enumerate(zip(val_labels, val_kinds), start=1):
                name = f"ILSVRC2012_val_{number:08d}.JPEG"
                _add_file(val, name, _image_file(seed, (2, number), label, kind))
                if kind != "rgb":
                    odd[kind].append(name)
        meta = meta_mat(wnids, devkit_ids, internal_wnids, train_per_class)
        _write_devkit(temporary[DEVKIT_TAR], meta, [devkit_ids[wnids[label]] for label in val_labels])
        for name in outputs:
            os.replace(temporary[name], out / name)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)

    info = dict(args=args, wnids=wnids, words=[class_name(index) for index in range(num_classes)],
                devkit_ids=devkit_ids, val_labels=val_labels, grayscale=odd["grayscale"], cmyk=odd["cmyk"],
                png_as_jpeg=odd["png"], truncated=odd["truncated"])
    write_json(out / INFO_JSON, info)  # written last: its presence means the archives are complete
    return info
