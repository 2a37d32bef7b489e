"""The raw input of a preparation, read side: where ILSVRC-2012's images and labels are, in whichever layout the
user has, and their bytes. `repro.prepare` converts what `plan` lists into a store.

The layouts (`LAYOUTS`; `repro-prepare source=NAME` names one, otherwise the raw folder's files say which):

- `archives`, `folders`: image-net.org's archives and their extracted folders (repro/sources/imagenet.py);
- `kaggle`: Kaggle's ImageNet Object Localization Challenge download (repro/sources/kaggle.py);
- `hf_tar`, `hf_parquet`: the Hugging Face dataset ILSVRC/imagenet-1k's tar.gz or parquet shards
  (repro/sources/huggingface.py);
- `wds`: timm's imagenet-1k-wds WebDataset shards (repro/sources/webdataset.py).

Whatever the layout, a store's labels are sorted-WNID indices (0 = n01440764), converted from the source's own
labels and checked against the class list it ships (repro/sources/classes.py), and its rows are sorted by each
image's canonical name (train/<wnid>/<file>, val/<file>), so the same images give the same store.
"""

from __future__ import annotations

from pathlib import Path

from repro.errors import PrepareError
from repro.sources import huggingface, imagenet, kaggle, webdataset
from repro.sources.common import Source
from repro.sources.imagenet import read_devkit
from repro.sources.reading import Reader, chunks

__all__ = ["LAYOUTS", "Reader", "Source", "chunks", "plan", "read_devkit"]

# name: (what it is, the files that show it, how to read it given (raw, skip_bad, pool_map))
LAYOUTS = {
    "archives": ("image-net.org's archives", imagenet.archives_signature,
                 lambda raw, skip_bad, pool_map: imagenet.read(raw, {"archives"}, skip_bad)),
    "folders": ("extracted train/<wnid>/ and val/ folders", imagenet.folders_signature,
                lambda raw, skip_bad, pool_map: imagenet.read(raw, {"folders"}, skip_bad)),
    "kaggle": ("Kaggle's ImageNet Object Localization Challenge", kaggle.signature,
               lambda raw, skip_bad, pool_map: kaggle.read(raw)),
    "hf_tar": ("Hugging Face ILSVRC/imagenet-1k's tar.gz shards", huggingface.tar_signature,
               lambda raw, skip_bad, pool_map: huggingface.read_tar(raw, pool_map)),
    "hf_parquet": ("Hugging Face ILSVRC/imagenet-1k's parquet shards", huggingface.parquet_signature,
                   lambda raw, skip_bad, pool_map: huggingface.read_parquet(raw)),
    "wds": ("timm's imagenet-1k-wds WebDataset shards", webdataset.signature,
            lambda raw, skip_bad, pool_map: webdataset.read(raw, pool_map)),
}
IMAGE_NET_ORG = ("archives", "folders")  # one download, often half extracted: these two mix


def detect(raw: Path) -> list[str]:
    """The layouts whose files are in `raw`: one, image-net.org's two mixed, or a PrepareError."""
    present = {name: files for name, (_, signature, _) in LAYOUTS.items() if (files := signature(raw))}
    families = {name if name not in IMAGE_NET_ORG else IMAGE_NET_ORG for name in present}
    if len(families) > 1:
        listing = "; ".join(f"{name} ({LAYOUTS[name][0]}: {', '.join(files[:3])})" for name, files in present.items())
        raise PrepareError(f"{raw} holds more than one layout: {listing}. Keep one of them there, or name the one to "
                           f"read with source={'|'.join(present)}")
    if not present:
        hint = (f" ({kaggle.ZIP} must be extracted first: unzip it in {raw})" if (raw / kaggle.ZIP).is_file() else "")
        raise PrepareError(f"{raw} holds no ILSVRC-2012 images{hint}: expected one of " + "; ".join(
            f"{name}: {what}" for name, (what, _, _) in LAYOUTS.items()) + " (docs/data.md lists their files)")
    return list(present)


def plan(raw: Path, source: str | None = None, skip_bad: bool = False, pool_map=map) -> dict:
    """Find the input (in the layout `source`, or the one `raw` holds), check it, and list every image of every
    split with its label. `pool_map(function, items)` runs the indexing of many shards (in worker processes when
    the caller gives a pool; in this one by default), yielding results in any order."""
    if not raw.is_dir():
        raise PrepareError(f"{raw} is not a folder")
    if source is not None and source not in LAYOUTS:
        raise PrepareError(f"source={source}: not a layout; one of {', '.join(LAYOUTS)}")
    if source is not None and not LAYOUTS[source][1](raw):
        raise PrepareError(f"source={source}: {raw} holds none of the files of {LAYOUTS[source][0]} (docs/data.md "
                           "lists them)")
    layouts = [source] if source else detect(raw)
    if len(layouts) > 1:  # image-net.org's archives and folders, mixed
        found = imagenet.read(raw, set(layouts), skip_bad)
    else:
        found = LAYOUTS[layouts[0]][2](raw, skip_bad, pool_map)
    return {"raw": str(raw.resolve()), "devkit": found.devkit, "classes": found.classes,
            "class_names": found.class_names, "splits": found.splits,
            "source": {"layout": found.layout, "files": found.files, "labels": found.labels}}
