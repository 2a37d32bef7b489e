"""The store's one label convention, and the checks that hold a source's own labels to it.

A prepared store numbers the classes by sorted WNID (0 = n01440764). The package ships ILSVRC-2012's 1000 WNIDs in
that order with their WordNet words (ilsvrc2012_classes.tsv, from the devkit's meta.mat), so that a source that
ships no class list of its own (Hugging Face's tar.gz shards, timm's WebDataset shards) still gets all 1000 classes
and their names, and a source that numbers its classes (Hugging Face's parquet ClassLabel) can be checked: a
source whose integers follow another order is an error, never a store.
"""

from __future__ import annotations

import functools
from pathlib import Path

from repro.errors import PrepareError
from repro.sources.common import log

CLASSES_FILE = Path(__file__).with_name("ilsvrc2012_classes.tsv")
# How many of ILSVRC-2012's 1000 class names a source may spell differently and still be taken for its list, in
# order: Hugging Face's ClassLabel names must be unique, and the devkit calls two classes "crane" (n02012849, the
# bird, and n03126707, the machine), so at least one name there differs from the devkit's.
RENAMED_AT_MOST = 5


@functools.cache
def ilsvrc2012() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ILSVRC-2012's WNIDs in sorted order and each one's words ("tench, Tinca tinca")."""
    rows = [line.split("\t") for line in CLASSES_FILE.read_text().splitlines() if not line.startswith("#")]
    return tuple(wnid for wnid, _ in rows), tuple(words for _, words in rows)


def classes_of(wnids) -> tuple[list[str], list[str] | None]:
    """The classes (and names) of a source whose labels are WNIDs: ILSVRC-2012's 1000 when every WNID it names is
    one of them (so a class without images keeps its index), else the sorted WNIDs it names, without names (a set
    of other classes, e.g. the demo set's made-up ones)."""
    wnids = set(wnids)
    known, words = ilsvrc2012()
    if wnids <= set(known):
        return list(known), list(words)
    return sorted(wnids), None


def label_of(wnid: str, index: dict[str, int], where: str, listed_in: str) -> int:
    if wnid not in index:
        raise PrepareError(f"{where}: {wnid!r} is not one of the {len(index)} classes of {listed_in}")
    return index[wnid]


def names_are_ilsvrc2012(names: list[str], where: str) -> bool:
    """Whether `names` (label i's name at position i) is ILSVRC-2012's class list in sorted-WNID order. False for
    another data set's names; a PrepareError when they are ILSVRC-2012's names in another order, or too many of
    them differ. The few spelled differently (at most RENAMED_AT_MOST) are logged."""
    _, words = ilsvrc2012()
    if len(names) != len(words):
        return False
    unique = {word: i for i, word in enumerate(words) if words.count(word) == 1}
    moved = [(i, unique[name]) for i, name in enumerate(names) if name != words[i] and name in unique]
    if moved:
        i, j = moved[0]
        raise PrepareError(f"{where}: its labels follow another order than the sorted WNIDs: label {i} is named "
                           f"{names[i]!r}, which is class {j} ({words[j]!r}) in sorted-WNID order ({len(moved)} "
                           "such labels); this is not ILSVRC/imagenet-1k's numbering, so its labels cannot be used")
    renamed = [i for i, name in enumerate(names) if name != words[i]]
    if len(renamed) > len(words) // 2:
        return False
    if len(renamed) > RENAMED_AT_MOST:
        raise PrepareError(f"{where}: {len(renamed)} of its 1000 class names differ from ILSVRC-2012's (label "
                           f"{renamed[0]} is {names[renamed[0]]!r}, expected {words[renamed[0]]!r}); it is not "
                           "ILSVRC/imagenet-1k's class list")
    for i in renamed:
        log.info(f"{where}: label {i} is named {names[i]!r} where the devkit says {words[i]!r}")
    return True
