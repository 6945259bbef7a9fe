"""The manifest of a cache entry, ``.ddcnn-entry.json``: what it records of the entry's files when the entry is
written (:func:`write_manifest`), and what differs from that record when the entry is opened (:func:`entry_problem`,
through :func:`ddcnn.data.cache.verified_entry`).

It records every file's size and sha256 (and inode, mtime and ctime), and a link's target. A missing, added or
resized file is always noticed. Checksums are recomputed for every file of an entry of up to ``FULL_CHECK_BYTES``
(2 GiB: sha256 runs at about 2 GB/s with the SHA CPU extensions, 0.11 s for a 200 MB entry from the page cache). In a
larger entry (a streamed dataset, which hashing would read once more per run) only the files whose inode, mtime or
ctime changed since they were recorded are hashed: any write to a file moves its ctime, which no tool sets back, so
what this misses is damage below the file system (bit rot). An entry without a manifest (written before ddcnn
checked its cache) counts as damaged.

It also records what the entry's content was made with, ``meta`` (for decoded images: the decoding version, the
``--intensity`` rule and what it resolved to, and the dtype stored). An entry opened for other settings
(:func:`entry_problem` with ``expect``) counts as stale: a changed intensity transform rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FULL_CHECK_BYTES = 2 * 2**30  # entries up to this size are checksummed in full each time they are opened
MANIFEST = ".ddcnn-entry.json"
_OWN_PREFIX = ".ddcnn-"  # names at the top of an entry that are ddcnn's bookkeeping, not its content
_HASH_CHUNK_BYTES = 2**20


def write_manifest(entry: Path, meta: Mapping[str, Any] | None = None) -> None:
    """Record every file of ``entry`` in its manifest: size, sha256 and stat stamp; a link, its target; and
    ``meta``, what the content was made with (JSON values)."""
    listing = _listing(entry)
    files = [rel for rel, st in listing.items() if not stat.S_ISLNK(st.st_mode)]
    digests = dict(zip(files, _sha256_all(entry, files)))
    records = {
        rel: {"size": st.st_size, "sha256": digests[rel], "stamp": _stamp(st)}
        if rel in digests
        else {"link": os.readlink(entry / rel)}
        for rel, st in listing.items()
    }
    _write_json(entry / MANIFEST, {"version": 1, "files": records, **({"meta": dict(meta)} if meta else {})})


def _write_json(path: Path, value: Any) -> None:
    """Write ``path`` whole or not at all (readers of an entry may be reading its manifest)."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        part.write_text(json.dumps(value))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def entry_problem(entry: Path, expect: Mapping[str, Any] | None = None) -> str | None:
    """What is wrong with the cache entry ``entry``, or None if it matches its manifest and its recorded ``meta``
    holds the values ``expect`` gives (JSON values)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written by an older ddcnn, or removed)"
    except (OSError, ValueError) as e:
        return f"its {MANIFEST} cannot be read ({e})"
    try:
        if manifest["version"] != 1:
            return f"its {MANIFEST} is too new"
        recorded = manifest.get("meta", {})
        for key, value in (expect or {}).items():
            if recorded.get(key) != value:
                return f"it was made with {key} {recorded.get(key)!r}, not the {value!r} asked for (stale)"
        return _compare(entry, manifest["files"], manifest.get("meta"))
    except (KeyError, TypeError, AttributeError) as e:
        return f"its {MANIFEST} is malformed ({type(e).__name__}: {e})"


def _compare(entry: Path, recorded: dict[str, dict[str, Any]], meta: dict[str, Any] | None) -> str | None:
    """What differs between the files of ``entry`` and their manifest records, or None."""
    present = _listing(entry)
    if missing := sorted(set(recorded) - set(present)):
        return f"{missing[0]} is missing"
    if added := sorted(set(present) - set(recorded)):
        return f"{added[0]} was added after it was written"
    changed = []
    for rel, record in recorded.items():
        st = present[rel]
        if "link" in record:
            if not stat.S_ISLNK(st.st_mode) or os.readlink(entry / rel) != record["link"]:
                return f"the link {rel} was changed"
        elif stat.S_ISLNK(st.st_mode) or st.st_size != record["size"]:
            return f"{rel} has {st.st_size} bytes, not the {record['size']} written (truncated or overwritten)"
        elif _stamp(st) != record["stamp"]:
            changed.append(rel)
    files = [rel for rel, record in recorded.items() if "link" not in record]
    to_hash = files if sum(recorded[rel]["size"] for rel in files) <= FULL_CHECK_BYTES else changed
    try:
        digests = _sha256_all(entry, to_hash)
    except OSError as e:
        return f"{e.filename} cannot be read ({e.strerror})"
    for rel, digest in zip(to_hash, digests):
        if digest != recorded[rel]["sha256"]:
            return f"{rel} does not match the sha256 recorded when it was written (edited or corrupted)"
    if changed:  # intact, yet restamped (copied, say): record the new stamps, so a large entry is not hashed again
        renewed = {rel: {**recorded[rel], "stamp": _stamp(present[rel])} for rel in changed}
        with contextlib.suppress(OSError):  # a read-only cache keeps the old ones
            files = {**recorded, **renewed}
            _write_json(entry / MANIFEST, {"version": 1, "files": files, **({"meta": meta} if meta else {})})
    return None


def _listing(entry: Path) -> dict[str, os.stat_result]:
    """Every file and link below ``entry`` (relative POSIX path -> lstat), except ddcnn's own files at its top."""
    found = {}
    for folder, dirs, names in os.walk(entry):
        base = Path(folder).relative_to(entry)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            if base.parts or not name.startswith(_OWN_PREFIX):
                found[(base / name).as_posix()] = os.lstat(os.path.join(folder, name))
    return found


def _stamp(st: os.stat_result) -> list[int]:
    """What any write to a file, or replacing it, changes."""
    return [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _sha256_all(entry: Path, files: list[str]) -> list[str]:
    """The sha256 of each file below ``entry``, hashed on a few threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda rel: _sha256(entry / rel), files))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
