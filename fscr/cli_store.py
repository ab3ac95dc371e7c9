"""The command line of what the store holds: fscr list, show and delete. Thin like the rest
of the CLI: parse, call the library, render."""

from __future__ import annotations

from typing import Any

import click

from .cli import emit, err, json_opt, notice_unfinished, store_opt, summary
from .completion import checkpoint_ids, deletable
from .records import plain


@click.command("list")
@click.option("--failed", is_flag=True,
              help="List failed attempts instead: CRIU's log and fscr's record of each, kept "
                   "under <store>/failed for 7 days.")
@store_opt
@json_opt
def list_(failed: bool, store: str | None, as_json: bool) -> None:
    """List checkpoints and rescue snapshots (or, with --failed, failed attempts)."""
    from .store import Store
    notice_unfinished(store)
    st = Store.open(store, write=False)
    if failed:
        list_failed(st.root, as_json)
        return
    from . import copies, listing
    from .snapshot import state_of
    manifests = st.list()
    rows = [summary(m) | {"type": listing.type_of(st, m), "workload": listing.workload_name(m)}
            for m in manifests]
    rescues = st.rescues(damaged=lambda why: err.print(f"fscr: warning: {why}", markup=False,
                                                       highlight=False, soft_wrap=True))
    for r in rescues:  # a classic LVM rescue fills up as the restored tree writes: say so
        r["states"] = [state_of(r.get("kind", "btrfs"), p) for p in r["paths"]]
        r["type"], r["created"] = "rescue", listing.made_at(r["name"])
    beside = [plain(c) | {"pids": copies.running(c), "type": "copy",
                                "created": listing.made_at(c.name)}
              for c in copies.listed(st.root)]
    excl = listing.exclusive_bytes(
        [v["snapshot"] for r in rows if r["snapshot"] == "btrfs" for v in r["volumes"]
         if v["snapshot"]] + [p for r in rescues if r.get("kind", "btrfs") == "btrfs"
                              for p in r["paths"]])
    for r in rows:
        r["exclusive_bytes"] = _total([excl.get(v["snapshot"]) for v in r["volumes"]])
    for r in rescues:
        r["exclusive_bytes"] = _total([excl.get(p) for p in r["paths"]])

    def text() -> None:
        from .units import ago, size
        table = [("ID", "TYPE", "AGE", "IMAGES", "SNAPSHOT", "WORKLOAD", "VOLUMES")]
        for r in rows:
            table.append((r["id"], r["type"], ago(r["created"]), size(r["image_bytes"]),
                          size(r["exclusive_bytes"]), r["workload"] or "-",
                          ",".join(v["path"] for v in r["volumes"])))
        for r in rescues:
            shown = ", ".join(f"{p} ({state})" if state else p
                              for p, state in zip(r["paths"], r["states"], strict=True))
            table.append((r["name"], "rescue", ago(r["created"]) if r["created"] else "-", "-",
                          size(r["exclusive_bytes"]), "-", shown))
        for c in beside:
            state = f"running, PID {c['pids'][0]}" if c["pids"] else "stopped"
            table.append((c["name"], "copy", ago(c["created"]) if c["created"] else "-", "-",
                          "-", f"copy of {c['id']} ({state})",
                          ", ".join(v["clone"] for v in c["volumes"])))
        if len(table) == 1:
            click.echo("no checkpoint in this store")
            return
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
        for row in table:
            click.echo("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False))
                       + "  " + row[-1])
        if any(r["exclusive_bytes"] is None for r in rows + rescues):
            click.echo("SNAPSHOT: bytes only the snapshots hold; n/a where btrfs quotas are "
                       "off (btrfs quota enable MOUNT)")

    emit({"checkpoints": rows, "rescues": rescues, "copies": beside}, as_json, text)


def _total(values: list[int | None]) -> int | None:
    """The sum, or None if any part is unknown."""
    return None if any(v is None for v in values) else sum(v or 0 for v in values)


def list_failed(store_root: Any, as_json: bool) -> None:
    from . import failures
    rows = failures.listed(store_root)

    def text() -> None:
        if not rows:
            click.echo("no failed attempt kept")
        for f in rows:
            r = f["record"]
            if r is None:
                click.echo(f"{f['name']}  (unreadable record)  {f['path']}")
                continue
            click.echo(f"{f['name']}  {r['when']}  {r['op']} of {r['id']}: {r['cause']}")
            if r["hint"]:
                click.echo(f"    hint: {r['hint']}")
            for log in f["logs"]:
                click.echo(f"    log: {f['path']}/{log}")

    emit({"failed": rows}, as_json, text)


@click.command()
@click.argument("ckpt_id", shell_complete=checkpoint_ids)
@store_opt
@json_opt
def show(ckpt_id: str, store: str | None, as_json: bool) -> None:
    """Show one checkpoint and its manifest digest."""
    from .store import Store
    notice_unfinished(store)
    st = Store.open(store, write=False)
    m = st.load(ckpt_id)
    data = summary(m) | {"manifest_sha256": st.manifest_digest(ckpt_id),
                                  "tasks": plain(m.tasks), "cgroup": plain(m.cgroup)}
    from . import listing
    from .snapshot import state_of
    data |= {"type": listing.type_of(st, m), "workload": listing.workload_name(m)}
    excl = listing.exclusive_bytes([v["snapshot"] for v in data["volumes"]
                                    if v["snapshot"] and m.snapshot == "btrfs"])
    for v in data["volumes"]:
        v["state"] = state_of(m.snapshot, v["snapshot"]) if v["snapshot"] else None
        v["exclusive_bytes"] = excl.get(v["snapshot"])

    def text() -> None:
        from .units import ago, duration, size
        shown = data | {
            "created": f"{data['created']} ({ago(data['created'])})",
            "image_bytes": f"{data['image_bytes']} ({size(data['image_bytes'])})",
            "workload": data["workload"] or "-"}
        for key in ("id", "type", "workload", "created", "hostname", "backend", "snapshot",
                    "mode", "root_pid", "image_bytes", "manifest_sha256"):
            click.echo(f"{key:<20} {shown[key]}")
        for v in data["volumes"]:
            state = f" ({v['state']})" if v["state"] else ""
            own = (f", holds {v['exclusive_bytes']} bytes ({size(v['exclusive_bytes'])}) "
                   "of its own" if v["exclusive_bytes"] is not None else "")
            click.echo(f"volume               {v['path']}  snapshot {v['snapshot']}{state}{own}")
        for r in data["relinks"]:
            click.echo(f"relinked             {r['original_path']} "
                       f"({r['method']}, {r['size']} bytes, {size(r['size'])})")
        for x in data["leaks"]:
            click.echo(f"allowed leak         {x['kind']}: {x['what']} (PID {x['pid']})")
        ns = data["netns"]
        where = ns["path"] or (f"held by PID {ns['holder']['pid']}" if ns["holder"] else "")
        click.echo(f"{'network namespace':<20} {ns['treatment']} {where}".rstrip())
        click.echo(f"{'tcp':<20} {data['tcp']}"
                   + (f" (network lock {data['network_lock']})" if data["network_lock"] else ""))
        for s in data["sockets"]:
            if s["family"] == "unix":
                peer = f" peer {s['remote']}" if s["remote"] else ""
                click.echo(f"socket               unix {s['type']} {s['local'] or '(unnamed)'}"
                           f"{peer} (PID {s['pid']} fd {s['fd']})")
            else:
                click.echo(f"socket               {s['family']} {s['state']} {s['local']} -> "
                           f"{s['remote']} (PID {s['pid']} fd {s['fd']})")
        for k, v in data["durations"].items():
            click.echo(f"{'time ' + k:<20} {duration(v)}")

    emit(data, as_json, text)


@click.command()
@click.argument("ckpt_id", shell_complete=deletable)
@store_opt
@json_opt
def delete(ckpt_id: str, store: str | None, as_json: bool) -> None:
    """Delete a checkpoint (snapshots and images), a rescue snapshot, or a copy (stopped)."""
    from . import pipeline
    notice_unfinished(store)
    removed = pipeline.delete(ckpt_id, store)
    emit({"removed": removed}, as_json, lambda: [click.echo(f"removed {p}") for p in removed])


def register(cli: click.Group) -> None:
    for command in (list_, show, delete):
        cli.add_command(command)
