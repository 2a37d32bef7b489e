"""Reading sources' bytes for the conversion, in an order each kind of file can be read in.

Byte ranges (files, uncompressed tars) can be read in any order and are read by the workers. A .tar.gz shard can
only be read from its start, so the main process reads each shard through once, in member order, and sends the
bytes along with the chunk. A parquet file is read a row group at a time, so a chunk is one row group, read by one
worker. `chunks` turns a split's rows into such chunks, in reading order (by file, then by place in the file).
"""

from __future__ import annotations

import gzip
import itertools
import zlib

from repro.errors import PrepareError
from repro.sources.common import Source

STREAMED = (".tar.gz", ".tgz")
SKIP_BLOCK = 1 << 22  # bytes a forward skip through a .tar.gz stream reads at a time


def streamed(source: Source) -> bool:
    return source.path.endswith(STREAMED)


class Reader:
    """Reads sources' bytes, keeping the last file open for the next source in it (one reader per process; one
    open file at a time, so a million class-folder files never exhaust the process's file handles)."""

    def __init__(self):
        self.path, self.file, self.position = None, None, 0
        self.group, self.images = None, None

    def open(self, path: str, opener=open) -> None:
        if self.file is not None:
            self.file.close()
        self.path, self.file, self.position = path, opener(path, "rb"), 0

    def read(self, source: Source) -> bytes:
        if source.path.endswith(".parquet"):
            data = self.parquet_row(source)
        elif streamed(source):
            data = self.stream(source)
        else:
            if source.path != self.path:
                self.open(source.path)
            self.file.seek(source.offset)
            data = self.file.read(source.size)
        if not data:
            raise OSError("empty file")
        return data

    def stream(self, source: Source) -> bytes:
        """A member of a .tar.gz by its offset in the decompressed stream: forward from where the last read ended,
        or from the start again."""
        if source.path != self.path or source.offset < self.position:
            self.open(source.path, gzip.open)
        try:
            while self.position < source.offset:
                skipped = len(self.file.read(min(SKIP_BLOCK, source.offset - self.position)))
                if not skipped:
                    self._end(source)
                self.position += skipped
            data = self.file.read(source.size)
        except (OSError, EOFError, zlib.error) as error:
            raise PrepareError(f"{source.path} is truncated or damaged ({type(error).__name__}: {error}); download "
                               "it again (what is converted is kept)") from None
        if len(data) < source.size:
            self._end(source)
        self.position += len(data)
        return data

    def _end(self, source: Source):
        raise PrepareError(f"{source.path} ends before {source.name}: it changed since it was indexed or is "
                           "truncated; download it again (what is converted is kept)")

    def parquet_row(self, source: Source) -> bytes:
        """Row `size` of row group `offset`: the row group's image bytes are read once and kept for its other rows."""
        if (source.path, source.offset) != self.group:
            import pyarrow.parquet as parquet

            table = parquet.ParquetFile(source.path).read_row_group(source.offset, columns=["image"])
            self.group, self.images = (source.path, source.offset), table.column("image").combine_chunks().field("bytes")
        return self.images[source.size].as_py()


def chunks(rows: list[tuple[int, Source]], size: int):
    """`rows` ((row, source) pairs) in reading order, as lists of (row, source, bytes or None) of at most `size`
    rows (a parquet row group is one chunk whatever its size). The bytes of .tar.gz members are read here, the
    others' (None) by the worker that converts the chunk."""
    reader = Reader()
    ordered = sorted(rows, key=lambda r: (r[1].path, r[1].offset, r[1].size))

    def unit(row):  # a parquet row group is read whole, so it is one chunk; other rows chunk freely
        source = row[1]
        return (source.path, source.offset) if source.path.endswith(".parquet") else None

    for group, same in itertools.groupby(ordered, key=unit):
        same = list(same)
        step = len(same) if group else size
        for start in range(0, len(same), step):
            yield [(row, source, reader.read(source) if streamed(source) else None)
                   for row, source in same[start:start + step]]
