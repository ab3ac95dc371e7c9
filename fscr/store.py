"""Where checkpoints live (default /var/lib/fscr): one directory per checkpoint id.

<store>/checkpoints/<id>/manifest.json        the record (written last but one)
<store>/checkpoints/<id>/manifest.json.sha256 its digest; written last: the commit point
<store>/checkpoints/<id>/images/              CRIU's image files
<store>/checkpoints/<id>/criu-*.log           CRIU's logs
<store>/checkpoints/<id>/received             present if `fscr receive` brought it here
<store>/journal/                              one journal per unfinished run (journal.py)
<store>/rescues/<name>.json                   the paths of a rescue snapshot made by restore
<store>/lineages/, <store>/origins/            what this host recorded (origins.py)
A checkpoint is listed only once its digest file exists.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from . import origins, records
from .errors import BadInput, BadManifest, BadStore, FscrError, NoSuchCheckpoint, require_root
from .fsutil import private_dir, sha256_files, write_atomic
from .manifest import ImageFile, Manifest, Record, digest
from .names import RESCUE_PATTERN, check_id, is_rescue
from .records import Meta, PathText

DEFAULT = Path("/var/lib/fscr")


def _private_dir(path: Path) -> Path:
    return private_dir(path, BadStore)


class RescueRecord(Record, kw_only=True):
    """<store>/rescues/<name>.json: the snapshots a restore replaced (provider `kind`).
    `version` is the record's format (a record without one, written before it existed, is
    version 1; another version is damaged, as an unreadable record is)."""

    version: Literal[1] = 1
    name: Annotated[str, Meta(pattern=rf"^{RESCUE_PATTERN}\Z")]
    paths: list[PathText]
    kind: Literal["btrfs", "lvm", "none"] = "btrfs"


@dataclass(frozen=True)
class Store:
    root: Path

    @classmethod
    def open(cls, root: str | Path | None = None, write: bool = True) -> Store:
        """The store at `root` (or $FSCR_STORE, or the default), made if missing. `write`:
        the caller will write to it; a read-only one (a backup disk) is then refused in one
        line, while list, show and send read it."""
        require_root()
        given = str(root or os.environ.get("FSCR_STORE") or DEFAULT)
        if "\0" in given:
            raise BadStore(f"{given!r} holds a NUL byte")
        root = Path(os.path.abspath(given))
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            raise BadStore(f"{root} exists and is not a directory") from None
        except OSError as e:
            raise BadStore(f"cannot create {root}: {e.strerror}") from None
        _private_dir(root)
        _private_dir(root / "checkpoints")
        _private_dir(root / "journal")
        _private_dir(root / "rescues")
        _private_dir(root / "lineages")
        if write and not os.access(root / "journal", os.W_OK):  # EROFS, even for root
            raise BadStore(f"{root} is read-only here: this command writes to the store")
        return cls(root)

    def dir(self, ckpt_id: str) -> Path:
        return self.root / "checkpoints" / check_id(ckpt_id)

    def images(self, ckpt_id: str) -> Path:
        return self.dir(ckpt_id) / "images"

    def exists(self, ckpt_id: str) -> bool:
        return self.dir(ckpt_id).exists()

    def check_free(self, ckpt_id: str) -> None:
        """Ids are unique in a store: a taken one is refused (one error, one exit code)."""
        if self.exists(ckpt_id):
            raise self._taken(ckpt_id)

    def _taken(self, ckpt_id: str) -> BadInput:
        return BadInput(f"checkpoint id {ckpt_id} already exists in {self.root}")

    def reserve(self, ckpt_id: str) -> Path:
        """Create the checkpoint's directory; fails if the id is taken (ids are unique)."""
        d = self.dir(ckpt_id)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise self._taken(ckpt_id) from None
        (d / "images").mkdir(mode=0o700)
        return d

    def commit(self, m: Manifest) -> str:
        """Write the manifest, then its digest: from then on the checkpoint is listed."""
        d = self.dir(m.id)
        try:  # as the next load will read it: a record that cannot be read is never written
            raw = records.checked(m).to_bytes()
        except (records.Invalid, ValueError) as e:
            raise BadManifest(f"checkpoint {m.id} cannot be recorded: {records.why(e)[1]}") \
                from None
        write_atomic(d / "manifest.json", raw)
        dg = digest(raw)
        write_atomic(d / "manifest.json.sha256", f"{dg}  manifest.json\n".encode())
        return dg

    def image_records(self, ckpt_id: str,
                      advance: Callable[[int], None] | None = None) -> list[ImageFile]:
        """Name, size and sha256 of every image file, for the manifest (`advance` hears of
        the bytes hashed)."""
        paths = sorted(self.images(ckpt_id).iterdir())
        return [ImageFile(name=p.name, size=p.stat().st_size, sha256=sha)
                for p, sha in zip(paths, sha256_files(paths, advance), strict=True)]

    def mark_received(self, ckpt_id: str) -> None:
        """Before commit: this checkpoint came by `fscr receive` (fscr list says so)."""
        write_atomic(self.dir(ckpt_id) / "received", b"")

    def was_received(self, ckpt_id: str) -> bool:
        return (self.dir(ckpt_id) / "received").exists()

    def committed(self, ckpt_id: str) -> bool:
        return (self.dir(ckpt_id) / "manifest.json.sha256").exists()

    def load(self, ckpt_id: str) -> Manifest:
        """The validated manifest: digest matches, schema holds, paths confined."""
        d = self.dir(ckpt_id)
        if not self.committed(ckpt_id):
            raise NoSuchCheckpoint(f"no checkpoint {ckpt_id} in {self.root}")
        try:
            raw = (d / "manifest.json").read_bytes()
            want = (d / "manifest.json.sha256").read_text().split()[0]
        except (OSError, IndexError, UnicodeDecodeError):  # missing, a directory, garbage
            raise BadManifest(f"checkpoint {ckpt_id}: manifest or its digest is missing or "
                              "unreadable") from None
        if digest(raw) != want:
            raise BadManifest(f"checkpoint {ckpt_id}: manifest.json does not match its sha256")
        m = Manifest.from_bytes(raw, f"checkpoint {ckpt_id}")
        if m.id != ckpt_id:
            raise BadManifest(f"checkpoint {ckpt_id}: manifest names id {m.id}")
        return m

    def manifest_digest(self, ckpt_id: str) -> str:
        return (self.dir(ckpt_id) / "manifest.json.sha256").read_text().split()[0]

    def verify_images(self, m: Manifest, advance: Callable[[int], None] | None = None,
                      which: Callable[[str], bool] | None = None) -> None:
        """Every image file the manifest lists is present with its size, and no other file is
        there; the sha256 of those `which` selects by name (default: all). `advance` hears of
        the bytes hashed."""
        images = self.images(m.id)
        present = {p.name for p in images.iterdir()} if images.is_dir() else set()
        listed = {i.name for i in m.images}
        if present - listed:
            raise BadManifest(f"checkpoint {m.id}: unlisted image files {sorted(present - listed)}")
        for img in m.images:
            p = images / img.name
            if not p.is_file() or p.is_symlink():
                raise BadManifest(f"checkpoint {m.id}: image {img.name} is missing")
            if p.stat().st_size != img.size:
                raise BadManifest(f"checkpoint {m.id}: image {img.name} is corrupt (size)")
        chosen = [img for img in m.images if which is None or which(img.name)]
        try:
            digests = sha256_files([images / img.name for img in chosen], advance)
        except OSError as e:  # a failing disk: the image cannot be trusted either
            raise BadManifest(f"checkpoint {m.id}: an image cannot be read "
                              f"({e.strerror or e})") from None
        for img, got in zip(chosen, digests, strict=True):
            if got != img.sha256:
                raise BadManifest(f"checkpoint {m.id}: image {img.name} is corrupt (sha256)")

    def list(self) -> list[Manifest]:
        out = []
        for d in sorted((self.root / "checkpoints").iterdir()):
            if self.committed(d.name):
                try:
                    out.append(self.load(d.name))
                except BadManifest:
                    continue
        return sorted(out, key=lambda m: m.created)

    def remove(self, ckpt_id: str) -> None:
        """Remove the checkpoint's directory: the digest first, so a half-removed checkpoint is
        never listed."""
        d = self.dir(ckpt_id)
        (d / "manifest.json.sha256").unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
        origins.forget(self.root, ckpt_id)

    def add_rescue(self, name: str, paths: list[str], kind: str) -> None:
        """Record a rescue snapshot (the contents a restore replaced), so it is listed; `kind`
        is the snapshot provider that made it."""
        rec = RescueRecord(name=name, paths=paths, kind=kind)
        write_atomic(self._rescue_file(name), records.encode(rec))

    def rescues(self, damaged: Callable[[str], None] | None = None) -> list[dict]:
        """The rescue records, validated; a damaged one is left out, and `damaged` (if
        given) told why, in one line."""
        out = []
        for p in sorted((self.root / "rescues").glob("*.json")):
            try:
                rec = records.decode(p.read_bytes(), RescueRecord)
                if f"{rec.name}.json" != p.name:
                    raise ValueError(f"it names rescue {rec.name}")
            except (OSError, ValueError, records.Invalid) as e:
                if damaged is not None:
                    damaged(f"rescue record {p.name} is damaged ({records.why(e)[1]}): ignored")
                continue
            out.append({k: v for k, v in records.plain(rec).items()
                        if k != "version"})  # `list` shows what it names
        return out

    def remove_rescue(self, name: str) -> None:
        self._rescue_file(name).unlink(missing_ok=True)

    def _rescue_file(self, name: str) -> Path:
        if not is_rescue(name):
            raise FscrError(f"invalid rescue snapshot name {name!r}")
        return self.root / "rescues" / f"{name}.json"
