"""The command line of scheduled backups: fscr backup, prune and schedule (docs/backups.md).
Thin like the rest of the CLI: parse, call fscr.backup, render."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from .cli import emit, err, json_opt, notice_unfinished, progress_printer, quiet_opt, store_opt
from .errors import BadInput
from .fsutil import write_atomic


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--move-to", "move_to", default=None, metavar="HOST",
              help="Move the workload to the job's ssh destination HOST and restore it there.")
@json_opt
@quiet_opt
def backup(job_file: str, move_to: str | None, as_json: bool, quiet: bool) -> None:
    """One backup run of a job: checkpoint (leave running), copy it to the job's
    destinations, then prune by its policy."""
    from . import backup as backup_mod
    from .pipeline import require_root
    require_root()
    job = backup_mod.load(job_file)
    notice_unfinished(job.store)
    if move_to is not None:
        from . import migrate
        m = migrate.move(job, move_to)
        err.print(f"fscr backup {m.job}: move to {m.host}: {m.status} id={m.id or '-'} "
                  f"duration={m.seconds:.3f}s" + (f" stopped={m.stopped:.3f}s" if m.stopped
                                                  else "")
                  + (f" error={m.error}" if m.error else ""), markup=False, highlight=False,
                  soft_wrap=True)
        emit(dataclasses.asdict(m), as_json, lambda: click.echo(m.id or m.status))
        sys.exit(m.exit_code)
    with progress_printer(as_json, quiet) as progress:
        r = backup_mod.run(job, progress=progress)
    # One log line per run, for cron mail and journald alike.
    window = f" freeze={r.freeze_window:.3f}s" if r.freeze_window is not None else ""
    err.print(f"fscr backup {r.job}: {r.status} id={r.id or '-'} duration={r.seconds:.3f}s"
              f"{window} kept={len(r.kept)} removed={len(r.removed)}"
              + (f" error={r.error}" if r.error else ""), markup=False, highlight=False,
              soft_wrap=True)
    for d in r.destinations:
        how = (f"{d.mode}" + (f" on {d.parent}" if d.parent else "")
               + f", {d.bytes} bytes" + (f", removed there: {len(d.removed)}"
                                         if d.removed else "")
               if d.status == "sent" else f"failed: {d.error}")
        err.print(f"fscr backup {r.job}: destination {d.destination}: {how}, "
                  f"{d.seconds:.3f}s", markup=False, highlight=False, soft_wrap=True)
    emit(dataclasses.asdict(r), as_json, lambda: click.echo(r.id or r.status))
    sys.exit(r.exit_code)


def _policy_opts(f):  # noqa: ANN001, ANN202 - a click decorator
    for rule in ("keep-last", "hourly", "daily", "weekly", "monthly", "yearly"):
        f = click.option(f"--{rule}", rule.replace("-", "_"), type=click.IntRange(0, 100000),
                         default=0, help=f"With --job: the {rule} count.")(f)
    return f


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False), required=False)
@click.option("--dry-run", is_flag=True, help="Show what the policy keeps and why; remove nothing.")
@click.option("--job", "job_name", default=None,
              help="Without JOB_FILE: prune this job's checkpoints by the policy given in "
                   "the options below (what a backup runs on an ssh destination).")
@_policy_opts
@store_opt
@json_opt
def prune(job_file: str | None, dry_run: bool, job_name: str | None, store: str | None,
          as_json: bool, **rules: int) -> None:
    """Remove the job's checkpoints that its retention policy no longer keeps."""
    from . import backup as backup_mod
    from .errors import BadInput
    from .names import check_id
    from .pipeline import require_root
    from .retention import Policy
    require_root()
    if (job_file is None) == (job_name is None):
        raise BadInput("give a JOB_FILE, or --job NAME with the policy as options")
    if job_file is not None:
        if any(rules.values()):
            raise BadInput("the policy options go with --job; a JOB_FILE has its own")
        d = backup_mod.prune(backup_mod.load(job_file), dry_run=dry_run)
    else:
        d = backup_mod.prune_checkpoints(check_id(job_name), store, Policy(**rules), dry_run)

    def text() -> None:
        for cid in d.keep:
            click.echo(f"keep   {cid}  ({', '.join(d.reasons[cid])})")
        for cid in d.remove:
            click.echo(f"{'would remove' if dry_run else 'removed'} {cid}")

    emit({"dry_run": dry_run, "keep": d.keep, "remove": d.remove, "reasons": d.reasons},
         as_json, text)


@click.group()
def schedule() -> None:
    """Install or remove the timer (systemd) or cron entry that runs a backup job."""


@schedule.command("install")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--every", required=True, help="How often: 15m, 1h, 1d, ...")
@click.option("--systemd/--cron", "systemd", default=None,
              help="Default: a systemd timer where systemd runs, else a cron.d file.")
@click.option("--dest", default=None, help="Write the files here instead of /etc/...")
def schedule_install(job_file: str, every: str, systemd: bool | None, dest: str | None) -> None:
    """Write the timer and service (or cron entry) for a job; print what was written."""
    from . import backup as backup_mod
    from .pipeline import require_root
    require_root()
    job = backup_mod.load(job_file)
    systemd = backup_mod.default_systemd() if systemd is None else systemd
    where = Path(dest) if dest else backup_mod.default_dest(systemd)
    files = backup_mod.schedule_files(job, job_file, every, systemd)
    if not where.is_dir():
        raise BadInput(f"{where} is not a directory: create it first (or give --dest)")
    for name, content in files.items():
        try:
            write_atomic(where / name, content.encode(), mode=0o644)
        except OSError as e:
            raise BadInput(f"cannot write {where / name}: {e.strerror}") from None
        click.echo(f"wrote {where / name}:")
        click.echo(content)
    if systemd:
        click.echo(f"enable it with: systemctl daemon-reload && systemctl enable --now "
                   f"fscr-backup-{job.name}.timer")


@schedule.command("remove")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--dest", default=None, help="Where install wrote the files.")
def schedule_remove(job_file: str, dest: str | None) -> None:
    """Remove what install wrote for a job; print what was removed."""
    from . import backup as backup_mod
    from .pipeline import require_root
    require_root()
    job = backup_mod.load(job_file)
    for systemd in (True, False):
        where = Path(dest) if dest else backup_mod.default_dest(systemd)
        for name in backup_mod.schedule_files(job, job_file, "1h", systemd):
            if (where / name).exists():
                (where / name).unlink()
                click.echo(f"removed {where / name}")


@click.group("restore-from")
def restore_from() -> None:
    """Bring a checkpoint back from where a backup job's destination put it."""


@restore_from.command("restic")
@click.argument("ckpt_id")
@click.option("--repository", "-r", required=True, help="The restic repository.")
@click.option("--password-file", default=None,
              help="Else restic's own environment (RESTIC_PASSWORD, ...).")
@click.option("--option", "-o", "options", multiple=True, help="restic -o, e.g. sftp.command=...")
@store_opt
@json_opt
def restore_from_restic(ckpt_id: str, repository: str, password_file: str | None,
                        options: tuple[str, ...], store: str | None, as_json: bool) -> None:
    """restic dump of the checkpoint's stream, received into this store (then: fscr restore)."""
    from . import replicate
    from .pipeline import require_root
    require_root()
    notice_unfinished(store)
    got = replicate.restore_from_restic(ckpt_id, repository, password_file, list(options),
                                        store)
    emit({"id": got.id, "volumes": got.volumes}, as_json, lambda: click.echo(got.id))


def register(cli: click.Group) -> None:
    for command in (backup, prune, schedule, restore_from):
        cli.add_command(command)
