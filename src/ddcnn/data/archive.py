"""Archives and downloads, both untrusted input.

:func:`safe_extract` checks every member of a .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz or .zip archive before it
writes anything, and refuses the whole archive if one member would land outside the target folder.
:func:`extract_cached` extracts an archive once into the cache. :func:`download` writes to a temporary file and
renames it into place only after its sha256 matched, so a failed or tampered download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..errors import ChecksumError, DatasetError, UnsafeArchiveError
from .cache import atomic_dir, cache_root, file_stamp, fingerprint, verified_entry

log = logging.getLogger(__name__)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
ARCHIVE_SUFFIXES = (*_TAR_SUFFIXES, ".zip")
_CHUNK_BYTES = 2**20


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: Path) -> str:
    """The archive's name without its archive suffix: ``tf_flowers-224.tar.gz`` -> ``tf_flowers-224``."""
    name = path.name
    suffix = next((s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def safe_extract(archive_path: str | Path, dest: str | Path) -> None:
    """Extract an archive into ``dest``, refusing it (:class:`UnsafeArchiveError`, nothing written) if any member
    has an absolute path or a ``..`` component, is a link whose target leaves ``dest`` or lies below a link, is a
    symbolic link to a folder containing it (``train/up -> ..``: a loop), or is a device file or FIFO; and
    (:class:`DatasetError`) if a hard link does not point to a regular file stored before it. Tar archives are also
    extracted through tarfile's ``data`` filter."""
    archive_path, dest = Path(archive_path), Path(dest)
    name = archive_path.name.lower()
    if name.endswith(".zip"):
        _extract_zip(archive_path, dest)
    elif name.endswith(_TAR_SUFFIXES):
        _extract_tar(archive_path, dest)
    else:
        raise DatasetError(f"{archive_path} is not an archive ddcnn reads; use one of {', '.join(ARCHIVE_SUFFIXES)}")


def extract_cached(archive_path: Path, cache_dir: str | None) -> Path:
    """The folder ``archive_path`` was extracted to in the cache, extracting it (safely, once) if needed."""
    key = fingerprint(str(archive_path.resolve()), file_stamp(archive_path))
    final = cache_root(cache_dir) / "extracted" / f"{archive_stem(archive_path)}-{key}"
    if not verified_entry(final):
        log.info("extracting %s to %s", archive_path, final)
        with atomic_dir(final) as tmp:
            safe_extract(archive_path, tmp)
    return final


def download(url: str, dest: str | Path, sha256: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``; :class:`ChecksumError` (and no file) if its sha256 is not
    ``sha256``, :class:`DatasetError` if it cannot be fetched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}", disable=None) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256.lower():
            raise ChecksumError(
                f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; the download is corrupt or the file "
                "changed upstream, so it was discarded"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DatasetError(
            f"could not download {url} ({e}); check the address and the network, or fetch it by hand to {dest}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _member_path(archive: Path, name: str) -> PurePosixPath:
    """The member's path, refused if absolute or containing ``..``."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the target folder; refusing to extract this archive"
        )
    return path


def _stays_inside(path: PurePosixPath) -> bool:
    """Whether a relative path, ``..`` resolved lexically, stays inside the folder it is relative to."""
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return False
    return True


def open_tar(archive: Path) -> tarfile.TarFile:
    """The tar archive (any compression) opened for reading; :class:`DatasetError` if it is not one."""
    try:
        return tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{archive} is not a readable tar archive ({e}); replace it") from None


def _extract_tar(archive: Path, dest: Path) -> None:
    with open_tar(archive) as tar:
        members = tar.getmembers()
        links = {_member_path(archive, m.name) for m in members if m.issym() or m.islnk()}
        files: set[PurePosixPath] = set()  # the regular files stored so far: what a hard link may point to
        for member in members:
            path = _member_path(archive, member.name)
            if any(parent in links for parent in path.parents):
                raise UnsafeArchiveError(
                    f"{archive}: member {member.name!r} lies below a link, which could lead "
                    "outside the target folder; refusing to extract this archive"
                )
            if member.issym() or member.islnk():
                _check_link(archive, member, path, files)
            elif not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(
                    f"{archive}: member {member.name!r} is a device file or FIFO; refusing to extract this archive"
                )
            if member.isfile() or member.islnk():
                files.add(_normalized(path))
        dest.mkdir(parents=True, exist_ok=True)
        try:
            tar.extractall(dest, members=members, filter="data")
        except tarfile.FilterError as e:
            raise UnsafeArchiveError(f"{archive}: {e}; refusing to extract this archive") from None
        except (tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise DatasetError(f"{archive} cannot be extracted ({e}); the archive is damaged, replace it") from None


def _normalized(path: PurePosixPath) -> PurePosixPath:
    """``path`` with ``.`` and ``..`` resolved lexically (``PurePosixPath(".")`` for the archive root)."""
    return PurePosixPath(posixpath.normpath(path))


def _check_link(archive: Path, member: tarfile.TarInfo, path: PurePosixPath, files: set[PurePosixPath]) -> None:
    """Refuse a link member that leaves the target folder, a symbolic link to a folder that contains it (which
    makes the extracted tree infinitely deep), and a hard link to anything but a regular file stored before it."""
    target = PurePosixPath(member.linkname)
    # a symlink's target is relative to its own folder, a hardlink's to the archive root
    relative_to = path.parent if member.issym() else PurePosixPath()
    if target.is_absolute() or not _stays_inside(relative_to / target):
        raise UnsafeArchiveError(
            f"{archive}: link {member.name!r} points to {member.linkname!r}, "
            "outside the target folder; refusing to extract this archive"
        )
    resolved = _normalized(relative_to / target)
    if member.issym() and (resolved == _normalized(path) or resolved in _normalized(path).parents):
        raise UnsafeArchiveError(
            f"{archive}: symbolic link {member.name!r} points to {member.linkname!r}, itself or a folder that "
            "contains it, which makes the tree loop; refusing to extract this archive"
        )
    if member.islnk() and resolved not in files:
        raise DatasetError(
            f"{archive}: hard link {member.name!r} points to {member.linkname!r}, which is not a regular file "
            "stored before it; the archive is damaged, replace it"
        )


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"{archive} is not a readable zip archive ({e}); replace it") from None
    with zf:
        for info in zf.infolist():
            _member_path(archive, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} is a symbolic link; refusing to extract this archive"
                )
        dest.mkdir(parents=True, exist_ok=True)
        try:
            zf.extractall(dest)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DatasetError(f"{archive} cannot be extracted ({e}); the archive is damaged, replace it") from None
