"""``dataset.data_dir`` may name an archive (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .zip): it is checked member by
member, extracted once into a cache directory keyed by the archive (resolved path, size, mtime) and reused.

Extraction never writes outside its directory. A member with an absolute path or a ``..`` component, a symlink or
hard link whose target leaves the archive, or a device file / FIFO is refused with one line naming the archive and
the member, before anything is written; tar extraction also runs through Python's ``tarfile`` ``data`` filter
(PEP 706), so whatever the explicit checks might miss is refused by the standard library too. Zip members that are
symlinks (a Unix mode in ``external_attr``) are refused. The extracted tree is published with
``transferrable.core.atomic.publish_dir``: a crash never leaves a half-extracted directory looking complete.

Cache root: ``$TRANSFERRABLE_ARCHIVE_DIR``, else ``<paths.cache_dir>/archives`` as paths.cache_dir defaults it
(``$TRANSFERRABLE_CACHE`` or ``$PROJECT_ROOT/.cache``). The extracted path is the archive's root, or the single
directory chain it holds (``VOCtrainval_06-Nov-2007.tar`` -> ``.../VOCdevkit/VOC2007``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from transferrable.core.atomic import atomic_write_json, publish_dir
from transferrable.core.errors import DatasetError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
MANIFEST = ".extracted.json"  # written last inside the extracted tree: its presence marks a complete extraction
VERSION = 1


class UnsafeArchiveError(DatasetError):
    """An archive member that would write outside the extraction directory (or is not a plain file/dir/link)."""


def is_archive(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(ARCHIVE_SUFFIXES) and Path(path).is_file()


def default_cache_root() -> Path:
    if os.environ.get("TRANSFERRABLE_ARCHIVE_DIR"):
        return Path(os.environ["TRANSFERRABLE_ARCHIVE_DIR"])
    cache = os.environ.get("TRANSFERRABLE_CACHE") or str(Path(os.environ.get("PROJECT_ROOT", ".")) / ".cache")
    return Path(cache) / "archives"


def archive_key(archive: Path) -> str:
    st = archive.stat()
    ident = f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _stem(archive: Path) -> str:
    name = archive.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


# -- member checks -----------------------------------------------------------------------------------------
def _unsafe_path(name: str) -> str | None:
    """Why ``name`` cannot be extracted under a directory, or None when it stays inside."""
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "an absolute path"
    if ".." in PurePosixPath(norm).parts:
        return "a '..' component (path traversal)"
    return None


def _link_escapes(member_name: str, target: str, hard: bool) -> bool:
    """A link target outside the extraction root (hard links are relative to the root, symlinks to the member)."""
    target = target.replace("\\", "/")
    if target.startswith("/"):
        return True
    base = "" if hard else posixpath.dirname(member_name.replace("\\", "/"))
    resolved = posixpath.normpath(posixpath.join(base, target))
    return resolved == ".." or resolved.startswith("../")


def _refuse(archive: Path, member: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"dataset.data_dir={archive}: refusing to extract member {member!r}: {why}; "
                              "nothing was extracted")


def check_tar(archive: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    for m in members:
        why = _unsafe_path(m.name)
        if why is None and (m.ischr() or m.isblk() or m.isfifo() or m.isdev()):
            why = "a device file or FIFO"
        if why is None and (m.issym() or m.islnk()) and _link_escapes(m.name, m.linkname, hard=m.islnk()):
            why = f"a {'hard link' if m.islnk() else 'symlink'} to {m.linkname!r} outside the archive"
        if why:
            raise _refuse(archive, m.name, why)
    return members


def check_zip(archive: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:
        why = _unsafe_path(info.filename)
        mode = info.external_attr >> 16  # Unix st_mode when the zip was written on Unix; file type 0: unknown
        if why is None and stat.S_ISLNK(mode):
            why = "a symlink (zip symlinks are not extracted)"
        if why is None and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            why = "a device file or FIFO"
        if why:
            raise _refuse(archive, info.filename, why)
    return infos


# -- extraction -------------------------------------------------------------------------------------------------
def _extract_into(archive: Path, dest: Path) -> int:
    dest.mkdir(parents=True)
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            infos = check_zip(archive, zf)
            for info in infos:
                zf.extract(info, dest)
            n = len(infos)
    else:
        try:
            tf = tarfile.open(archive)
        except (tarfile.TarError, OSError) as err:
            raise DatasetError(f"dataset.data_dir={archive}: not a readable tar or zip archive ({err})") from None
        with tf:
            members = check_tar(archive, tf)
            try:
                tf.extractall(dest, members=members, filter="data")
            except tarfile.FilterError as err:  # the standard library's own refusal (PEP 706)
                member = getattr(err, "tarinfo", None)
                raise _refuse(archive, member.name if member else "?", str(err)) from None
            n = len(members)
    atomic_write_json(dest / MANIFEST, {"archive": str(archive.resolve()), "size": archive.stat().st_size,
                                        "mtime_ns": archive.stat().st_mtime_ns, "members": n, "version": VERSION})
    return n


def dataset_root(extracted: Path) -> Path:
    """Descend through a chain of single directories (``VOCdevkit/VOC2007``): the folder the layout starts at."""
    root = extracted
    while True:
        entries = [p for p in root.iterdir() if p.name != MANIFEST and p.name != "__MACOSX"]
        if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
            root = entries[0]
        else:
            return root


def extract_archive(archive: str | Path, cache_root: str | Path | None = None) -> Path:
    """Extract ``archive`` once (checked, atomically) and return the dataset root inside the extracted tree."""
    archive = Path(os.path.expanduser(str(archive)))
    if not archive.is_file():
        raise DatasetError(f"dataset.data_dir={archive}: no such archive")
    out = Path(cache_root or default_cache_root()) / f"{_stem(archive)}-{archive_key(archive)}"
    if not (out / MANIFEST).is_file():
        log.info("extracting %s into %s", archive, out)
        publish_dir(out, lambda tmp: _extract_into(archive, tmp), lambda: (out / MANIFEST).is_file())
    else:
        log.info("using %s, extracted from %s earlier", out, archive)
    return dataset_root(out)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """What a DataModule's ``data_dir`` points at: a directory as given, or the extracted tree of an archive."""
    if data_dir is None:
        return None
    path = Path(os.path.expanduser(str(data_dir)))
    return extract_archive(path) if is_archive(path) else path


def extract_configured_archive(cfg) -> None:
    """Extract ``dataset.data_dir`` when it names an archive, before any pretraining (train.py calls this first):
    an unsafe or broken archive fails in seconds, and the DataModule then finds the extracted tree cached."""
    data_dir = (cfg.get("dataset") or {}).get("data_dir")
    if data_dir and is_archive(Path(os.path.expanduser(str(data_dir)))):
        extract_archive(data_dir)


def manifest(extracted_root: Path) -> dict:
    for d in (extracted_root, *extracted_root.parents):
        if (d / MANIFEST).is_file():
            return json.loads((d / MANIFEST).read_text())
    raise FileNotFoundError(f"no {MANIFEST} above {extracted_root}")
