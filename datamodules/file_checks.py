"""Cheap structural checks a dataset's scan runs on every file before training (issue 29): what a path is when it is
not what was expected, and whether an image file is whole.

``image_fault`` reads a few bytes at each end of the file, decoding nothing: the magic number, and where the format
has one, the end marker or the size the header declares (JPEG's EOI marker, PNG's IEND chunk, BMP's file size,
WebP's RIFF size). A file cut off halfway (a failed copy or download) is found here, at the scan, not when an epoch
reaches it. Formats without a declared end (TIFF, PNM) are checked by their header only.
"""

from __future__ import annotations

import os
from pathlib import Path

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_TAIL = 64  # bytes read from the end: JPEG writers may pad a few bytes after EOI


def kind_fault(path: str | Path, want: str = "file") -> str | None:
    """Why ``path`` is not a readable ``want`` (``"file"`` or ``"folder"``), or None when it is one:
    ``"does not exist"``, ``"is a folder, not a file"``, ``"is a file, not a folder"``, ``"is not readable"``."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        if p.is_symlink():
            return "does not exist (a broken link)"
        above = next((a for a in p.parents if a.exists()), None)  # a file in the way of a folder on the path
        return f"does not exist ({above} is a file, not a folder)" if above and not above.is_dir() else "does not exist"
    if want == "folder" and not p.is_dir():
        return "is a file, not a folder"
    if want == "file" and p.is_dir():
        return "is a folder, not a file"
    if want == "file" and not p.is_file():
        return "is not a regular file"
    if not os.access(p, os.R_OK | (os.X_OK if want == "folder" else 0)):
        return "is not readable (permissions)"
    return None


def image_fault(path: str | Path) -> str | None:
    """Why the image file at ``path`` cannot be read whole (``"empty file (0 bytes)"``, ``"truncated: ..."``,
    ``"not an image: ..."``), or None when its structure looks whole."""
    why = kind_fault(path, "file")
    if why:
        return why
    size = os.path.getsize(path)
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(32)
        f.seek(max(0, size - _TAIL))
        tail = f.read()
    if head.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(_PNG_MAGIC):
        return None if _PNG_END in tail else "truncated PNG (no IEND chunk)"
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return None if declared <= size or declared == 0 else f"truncated BMP ({size} of {declared} bytes)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if declared <= size else f"truncated WebP ({size} of {declared} bytes)"
    if head.startswith((b"II*\x00", b"MM\x00*")) or head[:1] == b"P" and head[1:2] in b"123456":
        return None  # TIFF, PNM: no declared end; OpenCV reads the header
    import cv2

    try:
        return None if cv2.haveImageReader(str(path)) else "not an image OpenCV reads (unknown header)"
    except cv2.error:
        return "not an image OpenCV reads (unknown header)"
