"""Uploads spooled to memory up to a threshold, then to a temporary file; removed on every path."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO


@dataclass(slots=True)
class Upload:
    """One uploaded file. `file` is a seekable binary file object (memory, then disk)."""

    filename: str
    content_type: str
    file: BinaryIO = field(repr=False)
    size: int = 0

    def rewind(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    async def chunks(self, size: int = 65_536) -> AsyncIterator[bytes]:
        """The file from the start, in chunks (for forwarding upstream without loading it whole)."""
        f = self.rewind()
        while chunk := f.read(size):
            yield chunk

    def close(self) -> None:
        self.file.close()


def spooled_file(memory_bytes: int, directory: str | None = None) -> BinaryIO:
    return tempfile.SpooledTemporaryFile(max_size=memory_bytes, dir=directory, prefix="gateway-upload-")  # type: ignore[return-value]
