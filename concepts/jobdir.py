"""A training job's directory on a local path or any fsspec URL (``s3://bucket/jobs/<job id>``).

The service writes a job's inputs (images, ``spec.json``, ``launch.json``) there and reads back what
the trainer leaves (``progress.jsonl``, ``result.json``, the checkpoint marker); `JobDir` is the one
place that knows whether that is a local directory or an object store. A trainer given a remote
spec works in a local scratch copy (`JobMirror`): it copies the job directory down, runs as on a
local one, and uploads its outputs back while it runs. An object store has no append, so the mirror
uploads the whole ``progress.jsonl`` each time it grew; the file only ever grows, so a reader that
keeps an offset sees each line once, in order (and only complete lines: it stops at the last newline).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
#: Where trainers keep their local copies of remote job directories (else under the temp dir).
SCRATCH_ENV = "CUSTOMDIFF_SCRATCH_DIR"


def is_remote(url: str) -> bool:
    """Whether `url` names an object store (or any non-local fsspec filesystem) rather than a local path."""
    return "://" in url and not url.startswith("file://")


class JobDir:
    """One job directory. Paths inside it are relative names such as ``"progress.jsonl"``.

    Local directories keep their exact layout and semantics (atomic writes by rename); remote ones go
    through fsspec, where one PUT is atomic already.
    """

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        #: The directory as a local path (as given, relative or not), or None when it is remote.
        self.local: Path | None = None
        if isinstance(self.fs, LocalFileSystem):
            self.local = Path(self.root) if "://" in self.url else Path(self.url)

    def child(self, name: str) -> JobDir:
        return JobDir(self.url_of(name))

    def url_of(self, name: str) -> str:
        """`name` inside the directory, as the trainer and the registry see it."""
        return str(self.local / name) if self.local is not None else posixpath.join(self.url, name)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).exists()
        self.fs.invalidate_cache(self._path(name))
        return self.fs.exists(self._path(name))

    def read_bytes(self, name: str, offset: int = 0) -> bytes:
        """The file's bytes from `offset` on. Raises FileNotFoundError."""
        if self.local is not None:
            with open(self.local / name, "rb") as f:
                f.seek(offset)
                return f.read()
        path = self._path(name)
        self.fs.invalidate_cache(path)  # sizes listed earlier may be stale: the trainer rewrites files
        with self.fs.open(path, "rb") as f:
            f.seek(offset)
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode(errors="replace")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the whole file at once: a reader sees the old or the new bytes, never a mix."""
        if self.local is not None:
            path = self.local / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        self.fs.pipe_file(self._path(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def append_text(self, name: str, text: str) -> None:
        """Append (read, then rewrite, on an object store: only for the rare line nobody else writes then)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            with open(self.local / name, "a", encoding="utf-8") as f:
                f.write(text)
            return
        try:
            old = self.read_bytes(name)
        except FileNotFoundError:
            old = b""
        self.write_bytes(name, old + text.encode())

    def delete(self, name: str) -> None:
        """Remove a file or a subdirectory; a missing one is not an error."""
        try:
            self.fs.rm(self._path(name), recursive=True)
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        """Remove the whole directory; a missing one is not an error."""
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
            return
        try:
            self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass

    def files(self) -> list[str]:
        """Every file below the directory, as relative names."""
        self.fs.invalidate_cache(self.root)
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(self.root))

    def upload(self, local_dir: Path) -> None:
        """Copy every file of `local_dir` into the directory (nothing to do when it is that directory)."""
        if self.local is not None and self.local.resolve() == local_dir.resolve():
            return
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(path.relative_to(local_dir).as_posix(), path.read_bytes())


def relocate(spec: dict[str, Any], src: str, dst: str) -> dict[str, Any]:
    """A copy of a job spec dict whose paths under `src` (work_dir, images, class images) are under `dst`."""

    def move(value: str) -> str:
        return dst + value[len(src):] if value == src or value.startswith(src.rstrip("/") + "/") else value

    out = dict(spec, work_dir=move(spec["work_dir"]))
    out["concepts"] = [dict(c, images=[move(p) for p in c.get("images", [])],
                            class_images=[dict(ci, path=move(ci["path"]))
                                          for ci in c.get("class_images", [])])
                       for c in spec["concepts"]]
    return out


class JobMirror:
    """A trainer's local copy of a remote job directory, kept in sync with it while the job runs.

    `open` copies every file down (a resumed job finds its checkpoint, result and progress so far);
    `sync` uploads the outputs that changed (`OUTPUTS`, then the `markers`: small files derived from
    the local directory, e.g. the checkpoint's step, that the service reads instead of the large file)
    and deletes remote outputs removed locally; a background thread syncs every `interval_s` and
    `close` syncs a last time. Only the rank that owns the outputs (rank 0) uploads.

    Thread model: `sync` runs on the background thread and on the thread that calls `close`; a lock
    serializes them.
    """

    OUTPUTS = ("checkpoint/state.pt", "result.json", "progress.jsonl")

    def __init__(self, remote: JobDir, local: Path,
                 markers: dict[str, Callable[[Path], bytes | None]] | None = None, uploads: bool = True,
                 interval_s: float = 0.5) -> None:
        self.remote = remote
        self.local = local
        self.markers = markers or {}
        self.uploads = uploads
        self._seen: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True, name="job-mirror")

    @classmethod
    def open(cls, remote: JobDir, rank: int = 0, **kwargs: Any) -> JobMirror:
        """Copy `remote` to a fresh scratch directory and start syncing back."""
        root = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "customdiff-scratch")
        local = root / f"{posixpath.basename(remote.url.rstrip('/'))}.rank{rank}"
        shutil.rmtree(local, ignore_errors=True)  # the remote directory is the truth
        local.mkdir(parents=True)
        for name in remote.files():
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(remote.read_bytes(name))
        mirror = cls(remote, local, uploads=rank == 0, **kwargs)
        mirror._seen = {name: mirror._stamp(name) for name in cls.OUTPUTS}
        mirror._seen.update({name: fn(local) for name, fn in mirror.markers.items()})
        mirror._thread.start()
        return mirror

    def _stamp(self, name: str) -> tuple[int, int] | None:
        try:
            st = (self.local / name).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def sync(self) -> None:
        """Upload what changed since the last sync; remove remote outputs that are gone locally."""
        if not self.uploads:
            return
        with self._lock:
            changed = False
            for name in self.OUTPUTS:
                stamp = self._stamp(name)
                if stamp == self._seen.get(name):
                    continue
                changed = True
                if stamp is None:
                    self.remote.delete(name)
                else:
                    try:
                        self.remote.write_bytes(name, (self.local / name).read_bytes())
                    except FileNotFoundError:  # removed meanwhile: the next sync deletes it
                        continue
                self._seen[name] = stamp
            for name, fn in self.markers.items() if changed else ():
                content = fn(self.local)
                if content != self._seen.get(name):
                    if content is None:
                        self.remote.delete(name)
                    else:
                        self.remote.write_bytes(name, content)
                    self._seen[name] = content

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - a store hiccup must not end the job; the next sync retries
                log.exception("uploading the job's outputs to %s failed; retrying", self.remote.url)

    def close(self, remove_local: bool = True) -> None:
        """Stop the thread, sync a last time (errors propagate), and remove the scratch copy."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.sync()
        finally:
            if remove_local:
                shutil.rmtree(self.local, ignore_errors=True)

