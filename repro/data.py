"""The loader and the paper's augmentation, done on the towers' devices as batched tensor ops.

The loader ships uint8 256x256 images of a prepared store (`repro.store`: raw records, or JPEG records decoded in
the worker processes, or on the first tower's GPU with nvJPEG), pinned, from worker processes; `Augment` turns them
into the network's input on each tower's device: a random 224x224 crop and horizontal flip (§4.1), PCA colour noise
(§4.1), minus the mean image (§2). Every random draw comes from a CPU generator seeded by (seed, epoch, step), so a
batch is the same on any device and after any resume.
"""

from __future__ import annotations

import signal
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repro.errors import RunError, StoreError
from repro.store import SIZE, Split

CROP = 224  # §4.1: "extracting random 224 x 224 patches (and their horizontal reflections)"
BORDER = SIZE - CROP  # offsets 0..32 in each axis (the 2012 code's 33 positions)
# The choices of `Augment` (the config's enums are made from these).
LIGHTING_STYLES = ("paper", "cuda_convnet")
MEAN_CROPS = ("center", "aligned")
CROP_CHUNKS = (1, 32)  # 32: the 2012 code shared one crop offset and flip among each 32 consecutive images
DECODERS = ("loader", "gpu")  # where a JPEG store's records are decoded (`data.decode`): the loader's workers, nvJPEG


def epoch_order(num: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Positions 0..num-1 in the order epoch `epoch` visits them: a permutation fixed by (seed, epoch)."""
    if not shuffle:
        return np.arange(num)
    return np.random.default_rng([seed, epoch]).permutation(num)


def decode_device(decode: str, store, device: str) -> str | None:
    """Where the loader's batches of `store` (a `PreparedStore`) are decoded beyond its workers (`data.decode`):
    None, or with `gpu` the first tower's GPU `device` (nvJPEG)."""
    if decode != "gpu":
        return None
    if store.record_format != "jpeg":
        raise RunError(f"data.decode=gpu decodes JPEG records, but the store {store.root} holds "
                       f"{store.record_format} records: leave data.decode=loader")
    if not device.startswith("cuda"):
        raise RunError(f"data.decode=gpu decodes with nvJPEG on the first tower's GPU, but it is on {device}: "
                       "leave data.decode=loader")
    return device


class EpochBatches(Dataset):
    """Batch k of one epoch's sample order, read from the store's records (item k = one whole batch, or with
    `shard=(index, parts)` slice `index` of `parts` of it: one rank's share of a global batch): uint8 images, or
    with `encoded` the JPEG records themselves (`JpegRecords.encoded`), to be decoded on a GPU. A damaged record
    is returned as its StoreError, which `Batches` raises: torch would re-raise it wrapped in the worker's
    traceback."""

    def __init__(self, split: Split, batch_size: int, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                 shard: tuple[int, int] = (0, 1), encoded: bool = False):
        self.records, self.labels, self.batch_size = split.records, split.labels, batch_size
        self.shard, self.encoded = shard, encoded
        self.order = split.rows[epoch_order(len(split), seed, epoch, shuffle)]
        full, rest = divmod(len(self.order), batch_size)
        self.num_batches = full if drop_last or rest == 0 else full + 1

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, k: int):
        index, parts = self.shard
        rows = np.array_split(self.order[k * self.batch_size:(k + 1) * self.batch_size], parts)[index]
        try:
            images = self.records.encoded(rows) if self.encoded else torch.from_numpy(self.records.read(rows))
        except StoreError as error:
            return error
        return images, torch.from_numpy(self.labels[rows])


class Batches:
    """What `batches` returns: the loader's batches, its damaged records raised as StoreErrors (one line naming
    the store, split and row), and with `decode_on` (a CUDA device) its JPEG records decoded there as a batch."""

    def __init__(self, loader: DataLoader, split: Split, decode_on: torch.device | None):
        self.loader, self.records, self.decode_on = loader, split.records, decode_on

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for item in self.loader:
            if isinstance(item, StoreError):
                raise item
            images, labels = item
            yield (self.records.decode(*images, device=self.decode_on) if self.decode_on else images), labels


# The signals a terminal (Ctrl-C, a closed window) or SLURM (SIGTERM, --signal) sends to every process of a job.
# A data worker ignores them: it ends with its parent (through the loader, or torch's watchdog once the parent is
# gone), because a worker killed by one makes the parent fail ("DataLoader worker is killed by signal") even when
# the parent stops cleanly on it (repro/loop.py, StopSignals). torch's workers die on a SIGTERM that does not come
# from their parent (torch/utils/data/_utils/signal_handling.py, its NOTE).
WORKER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def ignore_signals(worker_id: int) -> None:
    """A data worker's set-up (`worker_init_fn`, run after torch's own signal handlers are set)."""
    for signum in WORKER_IGNORES:
        signal.signal(signum, signal.SIG_IGN)


def batches(split: Split, batch_size: int, seed: int = 0, epoch: int = 0, start_step: int = 0,
            shuffle: bool = True, drop_last: bool = True, workers: int = 2, pin_memory: bool = False,
            prefetch: int = 4, shard: tuple[int, int] = (0, 1), decode_on: str | torch.device | None = None) -> Batches:
    """uint8 batches [B, 256, 256, 3] and int64 labels of epoch `epoch`, starting at batch `start_step` (a resumed
    run gets exactly the batches an uninterrupted one would have got from that step on). Worker processes read
    (and decode) ahead `prefetch` batches each, so loading overlaps with compute. With `shard=(rank, ranks)` each
    batch is that rank's slice of the global batch of `batch_size`: every rank draws the same epoch order, so the
    ranks' slices of step s together are exactly the one-process batch of step s. `decode_on`: a device on which
    to decode a JPEG store's records (nvJPEG on a GPU; `data.decode`), the workers only reading them; None
    decodes them in the workers."""
    decode_on = torch.device(decode_on) if decode_on is not None else None
    if decode_on is not None and split.records.spec["format"] != "jpeg":
        raise ValueError("decode_on needs a store of JPEG records")
    dataset = EpochBatches(split, batch_size, seed, epoch, shuffle, drop_last, shard, encoded=decode_on is not None)
    loader = DataLoader(dataset, batch_size=None, sampler=range(start_step, len(dataset)), num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=prefetch if workers else None,
                        worker_init_fn=ignore_signals)
    return Batches(loader, split, decode_on)


def step_rng(seed: int, epoch: int, step: int, stream: int = 1) -> np.random.Generator:
    """A random stream of one training step (1: augmentation, 2: dropout), independent of device, worker count
    and resume point."""
    return np.random.default_rng([seed, epoch, step, stream])


class Augment:
    """The paper's input pipeline on the training devices, from uint8 [B, 256, 256, 3] to float [B, 3, 224, 224].

    `devices`: the towers' devices (the model's `devices`). Each tower's input is built on its own device from the
    uint8 batch and the step's draws, so only those (a quarter of the float batch's bytes) travel to the second
    device; a device shared by two towers builds their input once. The results are one tensor per tower.

    pca_lighting: §4.1 colour noise. Each image gets eigvecs @ (alpha * scale) added to every pixel, with
        alpha ~ N(0, pca_std) drawn per image per presentation. `eigvals` and `eigvecs` are those of the RGB
        covariance on the 0-255 scale the network sees. The per-image noise (B x 3 values) is computed on the CPU,
        so every device adds the same numbers.
    lighting_style: `paper` (§4.1) scales alpha by the eigenvalues. Their scale matters and the paper does not
        give it: with 0-255 pixel values the formula taken literally adds noise with a std of about 1,800 grey
        levels, so the eigenvalues are those of pixel values on the [0, 1] scale (lambda_255 / 255^2), and the
        noise is converted back to 0-255 (x 255). `cuda_convnet` scales alpha by the square roots of the 0-255
        eigenvalues (the 2012 code's `color_stdevs`, which needs no choice of scale) and divides the training
        batch by 1 + pca_std afterwards, as that code did.
    mean_crop: `center` subtracts the mean image's central 224 crop from every crop (the 2012 code); `aligned`
        the mean under the same crop and flip (Caffe).
    crop_chunk: 1 draws a crop offset and flip per image; 32 shares them within each 32 consecutive images (the
        2012 code).
    """

    def __init__(self, mean_image: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray,
                 devices: Sequence[str | torch.device] = ("cpu",), pca_lighting: bool = True, pca_std: float = 0.1,
                 lighting_style: str = "paper", mean_crop: str = "center", crop_chunk: int = 1):
        for name, value, allowed in (("lighting_style", lighting_style, LIGHTING_STYLES),
                                     ("mean_crop", mean_crop, MEAN_CROPS), ("crop_chunk", crop_chunk, CROP_CHUNKS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        self.devices = [torch.device(d) for d in devices]
        self.device = self.devices[0]  # where the logits, labels and metrics are
        self.mean = torch.as_tensor(mean_image, dtype=torch.float32).permute(2, 0, 1)  # [3, 256, 256], CPU
        self.means = {device: self.mean.to(device) for device in self.devices}
        scale = eigvals / 255.0 if lighting_style == "paper" else np.sqrt(eigvals)  # see the docstring
        # column i of eigvecs is the i-th eigenvector: noise = eigvecs @ (alpha * scale)
        self.lighting = torch.as_tensor(eigvecs * scale[None, :], dtype=torch.float32)
        self.pca_lighting, self.pca_std, self.lighting_style = pca_lighting, pca_std, lighting_style
        self.mean_crop, self.crop_chunk = mean_crop, crop_chunk

    def draw(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The random parameters of one training batch: crop offsets, flips and lighting alphas."""
        groups = -(-batch_size // self.crop_chunk)
        offsets = np.repeat(rng.integers(0, BORDER + 1, size=(groups, 2)), self.crop_chunk, axis=0)[:batch_size]
        flips = np.repeat(rng.random(groups) < 0.5, self.crop_chunk)[:batch_size]
        alphas = rng.normal(0.0, self.pca_std, size=(batch_size, 3))
        return {"offsets": torch.from_numpy(offsets), "flips": torch.from_numpy(flips),
                "alphas": torch.from_numpy(alphas).float()}

    def train(self, images: torch.Tensor | Mapping[torch.device, torch.Tensor], rng: np.random.Generator,
              shard: tuple[int, int] = (0, 1)) -> list[torch.Tensor]:
        """A training batch per tower: random crop and flip, colour noise, minus the mean image. `images` is the
        uint8 batch (on the CPU, pinned for GPUs) or its copies per device (`repro.speed.prefetch`). With
        `shard=(rank, ranks)` it is that rank's slice of the global batch and gets the draws of its own images in
        that batch, so the ranks together augment exactly as one process would."""
        index, parts = shard
        size = len(next(iter(images.values())) if isinstance(images, Mapping) else images)
        draws = {k: v[index * size:(index + 1) * size] for k, v in self.draw(size * parts, rng).items()}
        noise = draws["alphas"] @ self.lighting.T  # [B, 3]

        def build(source: torch.Tensor, device: torch.device) -> torch.Tensor:
            x = self.crop(source, send(draws["offsets"], device), send(draws["flips"], device), device)
            if self.pca_lighting:
                x += send(noise, device)[:, :, None, None]
                if self.lighting_style == "cuda_convnet":
                    x /= 1.0 + self.pca_std
            return x

        return self.per_tower(images, build)

    def test_views(self, images: torch.Tensor, ten_crop: bool) -> list[torch.Tensor]:
        """§4.1 test patches per tower, [B * V, 3, 224, 224] ordered image by image: the centre crop (V=1), or the
        four corner crops and the centre crop and their horizontal reflections (V=10), whose softmaxes are
        averaged."""
        corners = [(0, 0), (0, BORDER), (BORDER, 0), (BORDER, BORDER)]
        positions = corners + [(BORDER // 2, BORDER // 2)] if ten_crop else [(BORDER // 2, BORDER // 2)]
        views = [(p, flip) for flip in ((False, True) if ten_crop else (False,)) for p in positions]
        offsets = torch.tensor([p for p, _ in views]).repeat(len(images), 1)
        flips = torch.tensor([f for _, f in views]).repeat(len(images))

        def build(source: torch.Tensor, device: torch.device) -> torch.Tensor:
            return self.crop(source.repeat_interleave(len(views), dim=0), send(offsets, device),
                             send(flips, device), device)

        return self.per_tower(images, build)

    def per_tower(self, images: torch.Tensor | Mapping[torch.device, torch.Tensor], build) -> list[torch.Tensor]:
        """`build(images on d, d)` once for each distinct device d, returned tower by tower."""
        built = {}
        for device in self.devices:
            if device not in built:
                source = images[device] if isinstance(images, Mapping) else send(images, device)
                built[device] = build(source, device)
        return [built[device] for device in self.devices]

    def crop(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
             device: torch.device) -> torch.Tensor:
        """Float [B, 3, 224, 224] crops at `offsets` (row, column), mirrored where `flips`, minus the mean, in
        the contiguous (NCHW) layout: the gather works on NHWC pixels, and its permuted view would hand every
        convolution channels-last input (`speed.channels_last` asks for that layout where it helps)."""
        span = torch.arange(CROP, device=device)
        rows = offsets[:, :1] + span  # [B, 224]
        cols = offsets[:, 1:] + torch.where(flips[:, None], CROP - 1 - span, span)
        batch = torch.arange(len(images), device=device)[:, None, None]
        x = images[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        mean = self.means[device]
        if self.mean_crop == "aligned":
            return x - mean[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        centre = BORDER // 2
        return x - mean[:, centre:centre + CROP, centre:centre + CROP]


def send(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; to a GPU through pinned memory without making the host wait."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
