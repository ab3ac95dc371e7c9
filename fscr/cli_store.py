"""The command line of what the store holds: fscr list, show and delete. Thin like the rest
of the CLI: parse, call the library, render."""

from __future__ import annotations

from typing import Any

import click

from .cli import emit, err, json_opt, notice_unfinished, store_opt, summary


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
    rows = [summary(m) for m in st.list()]
    rescues = st.rescues(damaged=lambda why: err.print(f"fscr: warning: {why}", markup=False,
                                                       highlight=False, soft_wrap=True))
    from .snapshot import state_of
    for r in rescues:  # a classic LVM rescue fills up as the restored tree writes: say so
        r["states"] = [state_of(r.get("kind", "btrfs"), p) for p in r["paths"]]
    from . import copies
    beside = [c.model_dump() | {"pids": copies.running(c)} for c in copies.listed(st.root)]

    def text() -> None:
        for r in rows:
            vols = ",".join(v["path"] for v in r["volumes"])
            click.echo(f"{r['id']}  {r['created']}  {r['backend']:<11} "
                       f"pid {r['root_pid']:<7} {vols}")
        for r in rescues:
            shown = ", ".join(f"{p} ({state})" for p, state in zip(r["paths"], r["states"],
                                                                   strict=True))
            click.echo(f"{r['name']}  rescue snapshot  {shown}")
        for c in beside:
            state = f"running, PID {c['pids'][0]}" if c["pids"] else "stopped"
            click.echo(f"{c['name']}  copy of {c['id']} ({state})  "
                       + ", ".join(v["clone"] for v in c["volumes"]))

    emit({"checkpoints": rows, "rescues": rescues, "copies": beside}, as_json, text)


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
@click.argument("ckpt_id")
@store_opt
@json_opt
def show(ckpt_id: str, store: str | None, as_json: bool) -> None:
    """Show one checkpoint and its manifest digest."""
    from .store import Store
    notice_unfinished(store)
    st = Store.open(store, write=False)
    m = st.load(ckpt_id)
    data = summary(m) | {"manifest_sha256": st.manifest_digest(ckpt_id),
                                  "tasks": [t.model_dump() for t in m.tasks],
                                  "cgroup": m.cgroup.model_dump()}
    from .snapshot import state_of
    for v in data["volumes"]:
        v["state"] = state_of(m.snapshot, v["snapshot"]) if v["snapshot"] else None

    def text() -> None:
        for key in ("id", "created", "hostname", "backend", "snapshot", "mode", "root_pid",
                    "image_bytes", "manifest_sha256"):
            click.echo(f"{key:<20} {data[key]}")
        for v in data["volumes"]:
            state = f" ({v['state']})" if v["state"] else ""
            click.echo(f"volume               {v['path']}  snapshot {v['snapshot']}{state}")
        for r in data["relinks"]:
            click.echo(f"relinked             {r['original_path']} "
                       f"({r['method']}, {r['size']} bytes)")
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
            click.echo(f"{'time ' + k:<20} {v:.3f}s")

    emit(data, as_json, text)


@click.command()
@click.argument("ckpt_id")
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
