"""`fscr delete`: a checkpoint (its snapshots, then its directory), a rescue snapshot, or a
copy restored beside its original."""

from __future__ import annotations

from pathlib import Path

from .. import locks, netlock, snapshot
from ..errors import BadManifest, NoSuchCheckpoint
from ..names import check_id, is_copy, is_rescue
from ..store import Store
from . import trust


def delete(name: str, store_dir: str | None = None) -> list[str]:
    """Delete checkpoint `name` (its snapshots, then its directory) or rescue snapshot `name`.
    Returns what was removed."""
    store = Store.open(store_dir)
    if is_copy(name):
        from .. import copies  # loaded on use: a restore never needs it
        return copies.delete(store.root, name)
    if is_rescue(name):
        for r in store.rescues():
            if r.get("name") == name:
                kind = r.get("kind", "btrfs")
                provider = snapshot.get(kind)
                for p in r["paths"]:
                    if not provider.owns_rescue(name, p):  # a record edited to name others
                        raise BadManifest(f"rescue record {name} names {p}, not its own")
                    provider.delete(p)
                store.remove_rescue(name)
                return list(r["paths"])
        raise NoSuchCheckpoint(f"no rescue snapshot {name} in {store.root}")
    if not store.committed(check_id(name)):
        raise NoSuchCheckpoint(f"no checkpoint {name} in {store.root}")
    m = store.load(name)
    provider = snapshot.get(m.snapshot)
    with locks.hold([locks.volume_lock(Path(v.path)) for v in m.volumes]):
        removed = netlock.release(m.netlock, lambda: trust.netns_path(store.root, m))
        for v in m.volumes:
            if v.snapshot is not None:
                provider.delete(v.snapshot)
                removed.append(v.snapshot)
        store.remove(name)
    return removed + [str(store.dir(name))]
