"""send and receive: a checkpoint as one self-describing stream, over any pipe.

The stream (version 1):

    b"FSCR-STREAM 1\\n"
    record*        a JSON line ({"type": ...}) followed by its payload in chunks
    end record     {"type": "end", "sha256": <hex>}: the sha256 of every byte before it

Records, in order: "manifest" (manifest.json), one "image" per CRIU image file, one "volume"
per snapshot (a btrfs send stream, incremental when the record names a "parent" checkpoint).
A payload is a sequence of chunks, each an 8-byte big-endian length and that many bytes, and
ends with a zero length, so streams of unknown size (btrfs send) need no buffering.

This module frames the stream (records, chunks, checksums) and journals what receive makes; the
snapshot provider fills and empties the volume records (Btrfs.send, Btrfs.receive run btrfs
send and receive), and says whether its snapshots travel at all (`sends`: LVM's do not).

receive writes as it reads (the snapshots through the provider, the images into the store)
but lists nothing until the end record's checksum, the manifest's validation and every image's
checksum passed; on any failure it removes what it received. A journal covers it, so `fscr gc`
removes what a killed receive left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, BinaryIO

from . import records, snapshot
from .errors import BadManifest, BadStream, FscrError, MissingParent, NoSpace, Refused
from .journal import Journal
from .manifest import ImageName, Manifest, Sha256
from .names import check_id
from .pipeline.common import Progress, quiet
from .progress import Meter, meter
from .records import Id, Meta, Record
from .store import Store

MAGIC = b"FSCR-STREAM 1\n"
CHUNK = 1 << 20


class _Out:
    """The stream being written, hashing everything that passes."""

    def __init__(self, f: BinaryIO, shown: Meter) -> None:
        self.f, self.h, self.bytes, self.shown = f, hashlib.sha256(), 0, shown

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.h.update(data)
        self.bytes += len(data)
        self.shown.advance(len(data))

    def record(self, header: dict, fill: Callable[[Callable[[bytes], None]], None]) -> None:
        """A header line, then the payload `fill` passes to its argument, chunk by chunk."""
        self.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        fill(self.chunk)
        self.write((0).to_bytes(8, "big"))

    def chunk(self, data: bytes) -> None:
        if data:
            self.write(len(data).to_bytes(8, "big") + data)


def _copy(f: BinaryIO) -> Callable[[Callable[[bytes], None]], None]:
    def fill(write: Callable[[bytes], None]) -> None:
        while data := f.read(CHUNK):
            write(data)
    return fill


@dataclass(frozen=True)
class Sent:
    id: str
    parent: str | None
    bytes: int


def send(ckpt_id: str, out: BinaryIO, parent: str | None = None,
         store_dir: str | None = None, progress: Progress = quiet) -> Sent:
    """Write checkpoint `ckpt_id` as a stream to `out` (incremental against `parent`)."""
    store = Store.open(store_dir, write=False)
    m = store.load(check_id(ckpt_id))
    provider = snapshot.get(m.snapshot)
    if not provider.sends:  # LVM, the one provider whose snapshots do not travel
        raise Refused(f"checkpoint {m.id} holds LVM snapshots: send carries btrfs snapshots "
                      "only (docs/lvm.md says how to move a logical volume)")
    with meter(progress, "checksum", m.image_bytes) as shown:
        store.verify_images(m, shown.advance)
    base = store.load(check_id(parent)) if parent else None
    if base is not None and [v.path for v in base.volumes] != [v.path for v in m.volumes]:
        raise FscrError(f"parent {parent} does not have the same volumes as {ckpt_id}")
    # The total is known only without volumes: btrfs send tells no size beforehand.
    sent = meter(progress, "sent", None if any(v.snapshot for v in m.volumes) else
                 m.image_bytes)
    s = _Out(out, sent)
    s.write(MAGIC)
    raw = (store.dir(m.id) / "manifest.json").read_bytes()
    s.record({"type": "manifest"}, lambda write: write(raw))
    for img in m.images:
        with open(store.images(m.id) / img.name, "rb") as f:
            s.record({"type": "image", "name": img.name}, _copy(f))
    for v in m.volumes:
        if v.snapshot is None:
            continue
        progress(f"volume {v.path}")
        against = base.volumes[v.n].snapshot if base is not None else None
        s.record({"type": "volume", "n": v.n, "parent": parent},
                 lambda write, v=v, against=against: provider.send(v.snapshot, against, write))
    digest = s.h.hexdigest()
    s.write(json.dumps({"type": "end", "sha256": digest}).encode() + b"\n")
    out.flush()
    sent.finish()
    return Sent(m.id, parent, s.bytes)


class _Header(Record, tag_field="type"):
    """A record's header line; its "type" picks the class (msgspec's tagged union)."""


class ManifestHeader(_Header, tag="manifest"):
    pass


class ImageHeader(_Header, tag="image"):
    name: ImageName


class VolumeHeader(_Header, tag="volume"):
    n: Annotated[int, Meta(ge=0)]
    parent: Id | None


class EndHeader(_Header, tag="end"):
    sha256: Sha256


# A record header, validated like a manifest: a wrong type, a missing or extra key, or JSON
# nested too deep is one BadStream, never a Python error.
Header = ManifestHeader | ImageHeader | VolumeHeader | EndHeader
_TYPES = {c.__struct_config__.tag for c in (ManifestHeader, ImageHeader, VolumeHeader, EndHeader)}


class _Type(records.Struct):
    """Only a header's "type" (any other key ignored): to say where an invalid one failed."""
    type: str


def _where(line: bytes, where: str) -> str:
    """Where in header `line` it failed, after its type as the reader knows it
    ("image.name"): msgspec's path starts inside the record its "type" picked."""
    try:
        kind = records.decode(line, _Type).type
    except (records.Invalid, RecursionError):
        return where
    if kind not in _TYPES or where == "type":
        return where
    return kind if where == "(top)" else f"{kind}.{where}"


class _In:
    """The stream being read; every read that comes short is a truncated stream."""

    def __init__(self, f: BinaryIO, shown: Meter) -> None:
        self.f, self.h, self.shown = f, hashlib.sha256(), shown

    def exact(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise BadStream("the stream is truncated")
        self.h.update(data)
        self.shown.advance(n)
        return data

    def line(self, limit: int = 4096, hashed: bool = True) -> bytes:
        data = self.f.readline(limit)
        if not data.endswith(b"\n"):
            raise BadStream("the stream is truncated or corrupt (a record header is broken)")
        if hashed:
            self.h.update(data)
        self.shown.advance(len(data))
        return data

    def header(self) -> Header:
        line = self.line()
        try:
            return records.decode(line, Header)
        except records.Invalid as e:
            where, what = records.why(e)
            where = _where(line, where)
        except RecursionError:  # msgspec skips a value ahead of "type" (keys come sorted)
            where, what = "(top)", "JSON nested too deep"
        raise BadStream(f"the stream is corrupt (a record header is invalid at {where}: "
                        f"{what})")

    def payload(self, sink: Callable[[bytes], None], limit: int | None = None) -> int:
        total = 0
        while n := int.from_bytes(self.exact(8), "big"):
            if n > 64 * CHUNK or (limit is not None and total + n > limit):
                raise BadStream("the stream is corrupt (a chunk length is impossible)")
            sink(self.exact(n))
            total += n
        return total


@dataclass(frozen=True)
class Received:
    id: str
    volumes: list[str]
    bytes: int


def receive(inp: BinaryIO, store_dir: str | None = None,
            progress: Progress = quiet) -> Received:
    """Read a stream into this machine: snapshots beside the volumes' original paths, images
    and manifest into the store. On failure, whatever arrived is removed."""
    store = Store.open(store_dir)
    received = meter(progress, "received", _size_of(inp))
    s = _In(inp, received)
    if s.line(64) != MAGIC:
        raise BadStream("not an fscr stream, or one of a version this fscr does not read")
    if not isinstance(s.header(), ManifestHeader):
        raise BadStream("the stream is corrupt (it does not start with a manifest)")
    raw = bytearray()
    s.payload(raw.extend, limit=16 << 20)
    try:
        m = Manifest.from_bytes(bytes(raw), "received manifest")
    except BadManifest as e:
        raise BadStream(f"the stream is corrupt: {e}") from None
    store.check_free(m.id)
    provider = snapshot.get(m.snapshot)
    if not provider.sends:  # fscr send never writes one: the stream was made by hand
        raise BadStream("the stream's checkpoint names LVM snapshots, which streams never carry")
    journal = Journal.begin(store.root, m.id, "receive", volumes=[v.path for v in m.volumes],
                            snapshot=m.snapshot)
    made: list[str] = []
    try:
        store.reserve(m.id)
        _receive_rest(s, store, m, provider, journal, made, progress)
        received.finish()
        try:
            with meter(progress, "checksum", sum(i.size for i in m.images)) as shown:
                store.verify_images(m, shown.advance)
        except BadManifest as e:
            raise BadStream(f"the stream is corrupt: {e}") from None
        store.mark_received(m.id)
        store.commit(m)
    except BaseException:
        for p in made:
            provider.delete(p)
        store.remove(m.id)
        journal.close()
        raise
    journal.close()
    return Received(m.id, [v.path for v in m.volumes], len(raw))


def _receive_rest(s: _In, store: Store, m: Manifest, provider: snapshot.Provider,
                  journal: Journal, made: list[str], progress: Progress) -> None:
    listed = {i.name: i.size for i in m.images}
    while True:
        before = s.h.hexdigest()  # the end record checks everything before its own line
        h = s.header()
        if isinstance(h, ImageHeader):
            _receive_image(s, store, m, h.name, listed, progress)
        elif isinstance(h, VolumeHeader):
            _receive_volume(s, store, m, provider, h, journal, made, progress)
        elif isinstance(h, EndHeader):
            if h.sha256 != before:
                raise BadStream("the stream is corrupt: its sha256 does not match")
            if s.f.read(1):
                raise BadStream("the stream is corrupt: data follows its end record")
            return
        else:
            raise BadStream("the stream is corrupt (a second manifest record)")


def _receive_image(s: _In, store: Store, m: Manifest, name: str, listed: dict[str, int],
                   progress: Progress) -> None:
    if name not in listed or (store.images(m.id) / name).exists():
        raise BadStream(f"the stream carries an unexpected image {name!r}")
    path = store.images(m.id) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        s.payload(lambda data: _write_all(fd, data), limit=listed[name])
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left for the images in {store.root}") from None
        raise FscrError(f"cannot write image {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _receive_volume(s: _In, store: Store, m: Manifest, provider: snapshot.Provider,
                    h: VolumeHeader, journal: Journal, made: list[str],
                    progress: Progress) -> None:
    n = h.n
    if not n < len(m.volumes):
        raise BadStream("the stream is corrupt (a volume record names no volume)")
    v = m.volumes[n]
    volume = Path(v.path)
    parent = h.parent
    if parent is not None:
        base = provider.find(volume, parent, n)
        if not store.committed(parent) or base is None or not provider.exists(base):
            raise MissingParent(f"the stream is incremental against checkpoint {parent}, "
                                "which this machine has not received: receive it first")

    def journaled(name: str) -> None:  # before the provider writes a byte there
        progress(f"volume {v.path}")
        journal.note("subvolume", path=name)
        made.append(name)

    provider.receive(volume, m.id, n, s.payload, journaled)


def _size_of(f: BinaryIO) -> int | None:
    """The stream's size when it is a file (`fscr receive < FILE`): a meter with an ETA."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None
