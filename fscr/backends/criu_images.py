"""What fscr reads back from CRIU's images, decoded by pycriu (never by hand): the run id of
a dump (its network lock is named after it), and the unlinked files CRIU copied into the
image as ghost files."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any


def _load(path: Path) -> list[dict[str, Any]]:
    from pycriu import images  # ~50 ms: only where an image is read

    try:
        with open(path, "rb") as f:
            return images.load(f)["entries"]
    except FileNotFoundError:
        return []


def run_id(images: Path) -> str | None:
    """The run id CRIU recorded in inventory.img when it dumped (dump_criu_run_id)."""
    entries = _load(images / "inventory.img")
    return entries[0].get("dump_criu_run_id") if entries else None


def ghosts(images: Path, under: list[Path]) -> list[str]:
    """Paths under `under` of regular files CRIU copied into the image because they were
    unlinked (its ghost files), one per file."""
    # CRIU writes remap-fpath.img only when it remapped a file (a ghost, a link remap): its
    # absence answers without importing pycriu's image modules (~20 ms inside the stall).
    if not (images / "remap-fpath.img").exists():
        return []
    remaps = _load(images / "remap-fpath.img")
    ghosted = {r["orig_id"] for r in remaps if r.get("remap_type") == "GHOST"}
    if not ghosted:
        return []
    roots = [str(u).rstrip("/") + "/" for u in under]
    out = []
    for f in _load(images / "files.img"):
        reg = f.get("reg")
        if f.get("type") != "REG" or reg is None or reg.get("id") not in ghosted:
            continue
        name = "/" + reg.get("name", "").lstrip("/")
        mode = reg.get("mode")
        if mode is not None and not stat.S_ISREG(mode):
            continue
        if any(name.startswith(r) for r in roots):
            out.append(name)
    return sorted(set(out))
