"""The command line: parse, call the library, render as text or --json. No work of its own."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from . import preflight
from .completion import checkpoint_ids, workload_names
from .errors import FscrError, MissingDependency, Refused
from .records import plain

if TYPE_CHECKING:
    from .manifest import Manifest
    from .process.target import Target
    from .progress import Reporter

# Start-up is most of a short command's time (a restore's CRIU run is ~0.1 s): each command
# imports the library it calls inside its body, and rich loads only when it draws something.


class _Stderr:
    """rich's Console on stderr, loaded on first use; plain lines when stderr is no
    terminal and the text holds no markup, which is every line a script or log sees."""

    _console = None

    def print(self, text: str, markup: bool = True, **kwargs: Any) -> None:
        if not markup and not sys.stderr.isatty():
            sys.stderr.write(f"{text}\n")
            sys.stderr.flush()
            return
        if self._console is None:
            from rich.console import Console
            _Stderr._console = Console(stderr=True)
        self._console.print(text, markup=markup, **kwargs)


err = _Stderr()


def emit(data: Any, as_json: bool, text: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        text()


def progress_printer(as_json: bool, quiet: bool = False) -> Reporter:
    """Progress on stderr (fscr/progress.py): rich on a terminal, timestamped lines
    otherwise; none with --quiet or --json. Use it in a `with`, so the live line is gone
    before the result is printed."""
    from .progress import reporter
    return reporter(quiet=quiet or as_json)


def notice_unfinished(store: str | None) -> None:
    """One line when runs died unfinished: their residue waits for `fscr gc`."""
    if os.geteuid() != 0:
        return
    from .journal import unfinished
    from .store import Store
    dead = unfinished(Store.open(store, write=False).root)
    if dead:
        ids = ", ".join(f"{r.op} {r.id}" for r in dead)
        err.print(f"fscr: warning: {len(dead)} unfinished run(s) whose fscr is gone ({ids}); "
                  "run `fscr gc` to clean up", markup=False, highlight=False, soft_wrap=True)


def target_of(pid: int | None, cgroup: str | None, name: str | None) -> Target:
    given = [x for x in (pid, cgroup, name) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --pid, --cgroup, --name")
    from .process.target import Target
    return Target(pid=pid, cgroup=cgroup, name=name)


def summary(m: Manifest) -> dict[str, Any]:
    """What a user or script wants to know of a checkpoint (text and --json alike)."""
    return {
        "id": m.id, "created": m.created, "hostname": m.hostname, "job": m.job,
        "backend": m.backend,
        "snapshot": m.snapshot, "mode": m.mode, "root_pid": m.root.pid,
        "volumes": plain(m.volumes), "relinks": plain(m.relinks),
        "tcp": m.tcp, "netns": plain(m.netns), "pidns": m.pidns,
        "network_lock": m.netlock,
        "sockets": plain(m.sockets),
        "allowed": m.allowed, "leaks": plain(m.leaks),
        "image_bytes": m.image_bytes, "durations": m.durations,
    }


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer killed by it

# A day: longer than any freeze a service survives, short enough for select()'s timeout.
MAX_FREEZE = 86400.0


def finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """FloatRange lets nan through (every comparison with it is false)."""
    if value != value:
        raise click.BadParameter("not a number", ctx, param)
    return value


def parse_allow(value: str | None) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in (value or "").split(",") if k.strip())
    unknown = kinds - set(preflight.KINDS)
    if unknown:
        raise click.BadParameter(f"unknown kind(s) {', '.join(sorted(unknown))}; known: "
                                 f"{', '.join(preflight.KINDS)}", param_hint="--allow")
    return kinds


allow_opt = click.option(
    "--allow", default=None, metavar="KIND,...",
    help="Accept resources outside the checkpoint of these kinds: "
         + ", ".join(k for k in preflight.KINDS if k != "shm") + ".")
tcp_opt = click.option(
    "--tcp", type=click.Choice(["refuse", "established", "close"]), default="refuse",
    show_default=True,
    help="TCP connections: refuse them, keep them (needs --kill; restored live, the peer "
         "never notices), or restore them closed (listeners always work).")

store_opt = click.option("--store", envvar="FSCR_STORE", default=None,
                         help="Checkpoint store (default /var/lib/fscr; env FSCR_STORE).")
json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
quiet_opt = click.option("-q", "--quiet", is_flag=True,
                         help="No progress on stderr (also FSCR_QUIET=1); errors still show.")


class _PipeClosed(Exception):
    """stdout's reader went away. Not an OSError: click turns EPIPE into a bare exit 1."""


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _PipeClosed() from None


@click.group(cls=_Group)
def cli() -> None:
    """Checkpoint a process tree together with the filesystem it uses."""


@cli.command()
@click.option("--for", "for_id", default=None, metavar="ID", shell_complete=checkpoint_ids,
              help="Also check that this machine can restore checkpoint ID.")
@store_opt
@json_opt
def doctor(for_id: str | None, store: str | None, as_json: bool) -> None:
    """Check what fscr needs on this machine."""
    from . import doctor as doctor_mod
    from .store import Store
    rows = doctor_mod.run_checks()
    if for_id is not None:
        rows += doctor_mod.for_checkpoint(Store.open(store, write=False), for_id)
    missing = [r.name for r in rows if r.essential and not r.ok]

    def text() -> None:
        for r in rows:
            mark = "ok" if r.ok else ("MISSING" if r.essential else
                                      "warning" if r.warning else "unavailable")
            click.echo(f"{r.name:<26} {mark:<12} {r.detail}")
        if missing:
            click.echo(f"essential items missing: {', '.join(missing)}")

    emit({"ok": not missing, "missing": missing, "checks": doctor_mod.as_dicts(rows)},
         as_json, text)
    if missing:
        sys.exit(MissingDependency.exit_code)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--name", default=None, help="Name the workload (target it with --name).")
@click.option("--log", default=None, help="Append stdout/stderr to this file.")
@click.option("--netns", default=None,
              help="Start it in this network namespace (e.g. /run/netns/NAME), by setns.")
@click.option("--pidns", is_flag=True,
              help="Start it as init (PID 1) of a new PID namespace: its restores keep their "
                   "PIDs whatever is taken on the machine.")
@json_opt
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def run(name: str | None, log: str | None, netns: str | None, pidns: bool, as_json: bool,
        argv: tuple[str, ...]) -> None:
    """Start CMD detached in a cgroup of its own; print its PID."""
    from . import pipeline
    from .process import launch
    pipeline.require_root()
    s = launch.run(list(argv), name=name, log=log, netns=netns, pidns=pidns)
    emit({"pid": s.pid, "cgroup": s.cgroup}, as_json, lambda: click.echo(s.pid))


def target_opts(f: Callable) -> Callable:
    """The tree and its volumes, as checkpoint and check take them."""
    for opt in reversed((
        click.option("--pid", type=int, default=None, help="Root of the tree."),
        click.option("--cgroup", default=None, help="Every task of this cgroup."),
        click.option("--name", default=None, shell_complete=workload_names,
                     help="A workload started with fscr run --name."),
        click.option("--volume", "volumes", multiple=True, required=True,
                     help="A btrfs subvolume the tree uses (repeatable)."))):
        f = opt(f)
    return f


@cli.command()
@target_opts
@click.option("--snapshot", type=click.Choice(["btrfs", "lvm", "none"]), default="btrfs")
@click.option("--lvm-size", default=None, metavar="SIZE",
              help="Size of a classic LVM snapshot: 2G, 512M, or a share of the origin such "
                   "as 20%ORIGIN (the default). Thin snapshots take no size.")
@click.option("--backend", type=click.Choice(["criu", "freeze-only"]), default="criu")
@click.option("--leave-running/--kill", default=True,
              help="Keep the tree running after the dump (default) or kill it.")
@tcp_opt
@allow_opt
@click.option("--id", "ckpt_id", default=None, help="Checkpoint id (default: UTC time + random).")
@click.option("--max-freeze", type=click.FloatRange(min=0.1, max=MAX_FREEZE), default=30.0,
              show_default=True, callback=finite,
              help="Seconds the tree may stay frozen; past that the watchdog thaws it and the "
                   "checkpoint is aborted.")
@store_opt
@json_opt
@quiet_opt
def checkpoint(pid, cgroup, name, volumes, snapshot, lvm_size, backend, leave_running, tcp,
               allow, ckpt_id, max_freeze, store, as_json, quiet) -> None:  # noqa: ANN001
    """Checkpoint a process tree and its volumes at one frozen instant."""
    from .pipeline.checkpoint import CheckpointRequest, checkpoint
    notice_unfinished(store)
    req = CheckpointRequest(
        target=target_of(pid, cgroup, name), volumes=list(volumes), snapshot=snapshot,
        lvm_size=lvm_size, backend=backend, kill=not leave_running, tcp=tcp,
        allow=parse_allow(allow), id=ckpt_id, store=store, max_freeze=max_freeze)
    with progress_printer(as_json, quiet) as progress:
        m = checkpoint(req, progress)
    emit(summary(m), as_json, lambda: click.echo(m.id))


@cli.command()
@target_opts
@tcp_opt
@allow_opt
@store_opt
@json_opt
def check(pid, cgroup, name, volumes, tcp, allow, store, as_json) -> None:  # noqa: ANN001
    """Run only the preflight: what a checkpoint would face. Exit 15 if it would refuse."""
    from .pipeline.checkpoint import CheckpointRequest, check
    req = CheckpointRequest(target=target_of(pid, cgroup, name), volumes=list(volumes),
                            tcp=tcp, allow=parse_allow(allow), store=store)
    report, refusal = check(req)
    data = report.as_dict() | {"ok": refusal is None, "refusal": refusal}

    def text() -> None:
        if not report.leaks:
            click.echo("no resource outside the checkpoint's reach")
        for kind in preflight.KINDS:
            found = [x for x in report.leaks if x.kind == kind]
            if found:
                click.echo(f"{kind}:")
                for leak in found:
                    click.echo(f"  {leak.describe()}")
        for c in data["connections"]:
            click.echo(f"tcp connection (decided by --tcp): {c}")
        click.echo(f"{len(report.unchanged)} read-only file(s) outside the volumes, verified "
                   "at restore")
        click.echo("would checkpoint" if refusal is None else f"would refuse: {refusal}")

    emit(data, as_json, text)
    if refusal is not None:
        sys.exit(Refused.exit_code)


@cli.command()
@click.argument("ckpt_id", shell_complete=checkpoint_ids)
@click.option("--replace", is_flag=True, help="Kill a still-running tree of this checkpoint.")
@click.option("--force", is_flag=True,
              help="Swap the volumes even while other processes hold files on them.")
@click.option("--volumes-only", is_flag=True, help="Put the volumes back, no processes.")
@click.option("--rollback", is_flag=True,
              help="LVM: merge the snapshots back into their origin volumes (lvconvert "
                   "--merge) instead of mounting copies over them.")
@click.option("--beside", is_flag=True,
              help="Run a copy beside the still-running original, on clones of the snapshots "
                   "mounted at the volumes' paths for the copy alone (checkpoints of `fscr "
                   "run --pidns` trees on btrfs).")
@click.option("--lazy", is_flag=True,
              help="Start the tree before its memory is back: CRIU's lazy-pages daemon serves "
                   "its pages on demand (userfaultfd). The page images are verified while it "
                   "runs; a corrupt one kills it and puts the volumes back (exit 22).")
@store_opt
@json_opt
@quiet_opt
def restore(ckpt_id: str, replace: bool, force: bool, volumes_only: bool, rollback: bool,
            beside: bool, lazy: bool, store: str | None, as_json: bool, quiet: bool) -> None:
    """Put the volumes back and restore the processes; print the new root PID."""
    from . import pipeline
    notice_unfinished(store)
    if beside and (replace or force or volumes_only or rollback):
        raise click.UsageError("--beside leaves the original and its volumes alone: it takes "
                               "none of --replace, --force, --volumes-only, --rollback")
    if lazy and (beside or volumes_only):
        raise click.UsageError("--lazy restores the processes in place: it takes neither "
                               "--beside nor --volumes-only")
    with progress_printer(as_json, quiet) as progress:
        r = (pipeline.restore_beside(ckpt_id, store, progress=progress) if beside else
             pipeline.restore(ckpt_id, store, replace=replace, force=force,
                              volumes_only=volumes_only, rollback=rollback, progress=progress,
                              lazy=lazy))
    data = {"id": r.id, "pid": r.pid, "rescue_snapshots": r.rescues, "copy": r.copy,
            "durations": r.durations}
    emit(data, as_json, lambda: click.echo(r.pid if r.pid is not None else "volumes restored"))
    if r.copy and not as_json:
        err.print(f"fscr: copy {r.copy} runs beside the original; `fscr delete {r.copy}` "
                  "stops it and removes its volumes", markup=False, highlight=False)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@store_opt
@json_opt
def gc(dry_run: bool, store: str | None, as_json: bool) -> None:
    """Finish or undo runs whose fscr died: thaw, remove relinks, half-made snapshots."""
    from . import gc as gc_mod
    from .store import Store
    st = Store.open(store)
    report = gc_mod.collect(st, dry_run=dry_run)
    expired = gc_mod.expire_failures(st, dry_run=dry_run)

    def text() -> None:
        if not report and not expired:
            click.echo("nothing to do: no unfinished run, no expired failed attempt")
        for what in expired:
            click.echo(f"{'would ' if dry_run else ''}{what}")
        for r in report:
            click.echo(f"{r['op']} {r['id']} (fscr PID {r['pid']} is gone):")
            for a in r["actions"]:
                click.echo(f"  {'would ' if dry_run else ''}{a}")
            for e in r["errors"]:
                click.echo(f"  FAILED: {e}")

    emit({"dry_run": dry_run, "runs": report, "failed_removed": expired}, as_json, text)
    if any(r["errors"] for r in report):
        sys.exit(FscrError.exit_code)


@cli.command()
@click.argument("ckpt_id", shell_complete=checkpoint_ids)
@click.option("--parent", default=None, shell_complete=checkpoint_ids,
              help="Send only the changes since this checkpoint.")
@store_opt
@quiet_opt
def send(ckpt_id: str, parent: str | None, store: str | None, quiet: bool) -> None:
    """Write a checkpoint as one stream to stdout (pipe it to ssh, a file, ...)."""
    from . import transfer
    from .units import size
    out = click.get_binary_stream("stdout")
    if out.isatty():
        raise click.UsageError("refusing to write a binary stream to a terminal: redirect it")
    notice_unfinished(store)
    with progress_printer(False, quiet) as progress:  # on stderr: stdout is the stream
        sent = transfer.send(ckpt_id, out, parent=parent, store_dir=store, progress=progress)
    err.print(f"fscr: sent {sent.id}" + (f" (incremental on {sent.parent})" if sent.parent
              else "") + f", {sent.bytes} bytes ({size(sent.bytes)})", markup=False,
              highlight=False)


@cli.command()
@store_opt
@json_opt
@quiet_opt
def receive(store: str | None, as_json: bool, quiet: bool) -> None:
    """Read a stream from stdin into this machine's store and btrfs filesystems."""
    from . import transfer
    notice_unfinished(store)
    with progress_printer(as_json, quiet) as progress:
        got = transfer.receive(click.get_binary_stream("stdin"), store_dir=store,
                               progress=progress)
    emit({"id": got.id, "volumes": got.volumes}, as_json, lambda: click.echo(got.id))


from . import cli_jobs, cli_store  # noqa: E402 - register their commands on `cli`

cli_jobs.register(cli)
cli_store.register(cli)


def one_line(text: str) -> str:
    """A message as one line: a newline or control character in a name it quotes (a path,
    a manifest value) is shown escaped, as repr() would."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except FscrError as e:
        err.print(f"fscr: error: {one_line(str(e))}", highlight=False, markup=False,
                  soft_wrap=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        # One line like every other error (scripts grep stderr); --help shows the usage.
        err.print(f"fscr: error: {one_line(e.format_message())}", highlight=False,
                  markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (_PipeClosed, BrokenPipeError):
        # The reader stopped (`fscr send ID | head`, `fscr list | head -1`): quiet, as any
        # tool a shell pipes from, with the status a SIGPIPE gives; stdout goes to /dev/null
        # so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(BROKEN_PIPE_EXIT)
    except click.exceptions.Abort:
        err.print("fscr: aborted", markup=False)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
