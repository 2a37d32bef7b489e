"""Top-1/top-5 error on the centre crop or the paper's 10 patches (§4.1), and a trained checkpoint's network, store
and test-time input (`load_trained`, for `repro-eval` and the figures)."""

from __future__ import annotations

from pathlib import Path

import torch

from repro import speed
from repro.checkpoint import check_classes, load_checkpoint
from repro.config import SpeedConfig, build_augment, build_model, validate
from repro.data import Augment, batches, decode_device
from repro.distributed import World
from repro.errors import RunError
from repro.io import write_json
from repro.model import AlexNet
from repro.progress import progress
from repro.runtime import resolve_devices, use_devices, worker_count
from repro.store import PreparedStore, Split

# The four numbers every run reports (§6: top-1 and top-5 error, the centre patch and the 10 patches), and labels.
METRIC_LABELS = {"top1_err_1crop": "top-1 centre", "top5_err_1crop": "top-5 centre",
                 "top1_err_10crop": "top-1 10 patches", "top5_err_10crop": "top-5 10 patches"}
PAPER_METRICS = tuple(METRIC_LABELS)


@torch.no_grad()
def evaluate(model, augment: Augment, split: Split, images_per_batch: int, ten_crop: bool, workers: int = 0,
             desc: str | None = None, world: World = World(), decode_on: str | None = None) -> dict:
    """Error rates in percent over every usable image of `split`, `images_per_batch` images at a time (x10 views
    with `ten_crop`). With `ten_crop`, the softmax outputs of the four corner patches, the centre patch and their
    reflections are averaged (§4.1); else the centre patch alone. The model is left in eval mode (dropout's outputs
    x0.5, §4.2). The counts stay on the device until the end (no host sync per batch). Under torchrun each rank
    evaluates its share of the images and the counts are summed, so every rank gets the same numbers (and the same
    schedule). `decode_on`: as for `batches` (training's `data.decode`)."""
    model.eval()
    views = 10 if ten_crop else 1
    wrong, count = torch.zeros(2, dtype=torch.int64, device=augment.device), 0  # wrong at top-1 and top-5
    loader = batches(split.part(world.rank, world.size), images_per_batch, shuffle=False, drop_last=False,
                     workers=workers, pin_memory=augment.device.type == "cuda", decode_on=decode_on)
    for images, labels in progress(loader, desc, len(loader), "batch"):
        logits = model(augment.test_views(images, ten_crop))
        probs = logits.float().softmax(dim=-1).view(len(images), views, -1).mean(dim=1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        hits = top == labels.to(augment.device, non_blocking=True)[:, None]
        wrong += torch.stack([(~hits[:, 0]).sum(), (~hits.any(dim=1)).sum()])
        count += len(labels)
    wrong1, wrong5, count = world.sum(torch.cat([wrong, wrong.new_tensor([count])])).tolist()
    return {"top1_err": 100.0 * wrong1 / count, "top5_err": 100.0 * wrong5 / count, "images": count}


def evaluate_views(model, augment: Augment, split: Split, images_per_batch: int, workers: int = 0,
                   desc: str | None = None, world: World = World(), decode_on: str | None = None) -> dict:
    """`top1_err_1crop`, `top5_err_1crop`, `top1_err_10crop`, `top5_err_10crop` and `val_images`: the metrics the
    paper reports (§6), over the whole split."""
    metrics = {}
    for ten_crop, suffix in ((False, "1crop"), (True, "10crop")):
        result = evaluate(model, augment, split, images_per_batch, ten_crop, workers,
                          desc=f"{desc} {suffix}" if desc else None, world=world, decode_on=decode_on)
        metrics.update({f"top1_err_{suffix}": result["top1_err"], f"top5_err_{suffix}": result["top5_err"],
                        "val_images": result["images"]})
    return metrics


def load_trained(checkpoint_path, store=None, devices=None,
                 speed_options=None) -> tuple[dict, AlexNet, PreparedStore, Augment]:
    """A checkpoint, its network on `devices` (default: what exists) with the speed options (default: the
    defaults), the store it was trained on (or `store`), and the test-time input pipeline with the run's own
    mean-image settings."""
    devices = resolve_devices(devices, require_two_gpus=False)
    use_devices(devices)  # before anything touches a GPU
    checkpoint = load_checkpoint(Path(checkpoint_path))
    trained = checkpoint["config"]
    store = PreparedStore(store or trained["data"]["store"])
    check_classes(checkpoint, checkpoint_path, store.classes, store.root)
    stats = store.stats()
    speed_options = speed_options or SpeedConfig()
    speed.set_precision(speed_options.tf32)
    model = build_model(trained["model"], devices)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise RunError(f"{checkpoint_path} does not fit the network its own config describes: {error}") from None
    speed.apply(model, speed_options)
    return checkpoint, model, store, build_augment(trained["data"], stats, model.devices)


def evaluate_checkpoint(cfg) -> dict:
    """`repro-eval checkpoint=PATH`: the checkpoint's network on a store's validation split, centre crop and
    10 patches, written to a JSON file and returned."""
    validate(cfg)
    checkpoint, model, store, augment = load_trained(cfg.checkpoint, cfg.store, cfg.devices, cfg.speed)
    trained, split = checkpoint["config"], store.split("val")
    metrics = {"checkpoint": str(cfg.checkpoint), "store": str(store.root), "epoch": checkpoint["epoch"],
               "step": checkpoint["global_step"], "preset": trained["model"]["preset"],
               "options": model.options, "precision": speed.precision(cfg.speed)}
    decode = cfg.decode.name if cfg.decode is not None else trained["data"].get("decode", "loader")
    if cfg.decode is None and decode == "gpu" and model.devices[0].type != "cuda":
        decode = "loader"  # the run's nvJPEG needs a GPU: the same pixels but for a rounding here and there
    metrics["decode"] = decode
    metrics.update(evaluate_views(model, augment, split, cfg.batch_size, worker_count(cfg.workers), desc="eval",
                                  decode_on=decode_device(decode, store, str(model.devices[0]))))
    write_json(Path(cfg.out) if cfg.out else Path(cfg.checkpoint).resolve().parents[1] / "eval_metrics.json", metrics)
    return metrics
