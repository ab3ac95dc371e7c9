"""The command line of scheduled backups: fscr backup, prune and schedule (docs/backups.md).
Thin like the rest of the CLI: parse, call fscr.backup, render."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from .cli import emit, err, json_opt, notice_unfinished, progress_printer, quiet_opt


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@json_opt
@quiet_opt
def backup(job_file: str, as_json: bool, quiet: bool) -> None:
    """One backup run of a job: checkpoint (leave running), then prune by its policy."""
    from . import backup as backup_mod
    from .pipeline import require_root
    require_root()
    job = backup_mod.load(job_file)
    notice_unfinished(job.store)
    with progress_printer(as_json, quiet) as progress:
        r = backup_mod.run(job, progress=progress)
    # One log line per run, for cron mail and journald alike.
    window = f" freeze={r.freeze_window:.3f}s" if r.freeze_window is not None else ""
    err.print(f"fscr backup {r.job}: {r.status} id={r.id or '-'} duration={r.seconds:.3f}s"
              f"{window} kept={len(r.kept)} removed={len(r.removed)}"
              + (f" error={r.error}" if r.error else ""), markup=False, highlight=False,
              soft_wrap=True)
    emit(dataclasses.asdict(r), as_json, lambda: click.echo(r.id or r.status))
    sys.exit(r.exit_code)


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Show what the policy keeps and why; remove nothing.")
@json_opt
def prune(job_file: str, dry_run: bool, as_json: bool) -> None:
    """Remove the job's checkpoints that its retention policy no longer keeps."""
    from . import backup as backup_mod
    from .pipeline import require_root
    require_root()
    job = backup_mod.load(job_file)
    d = backup_mod.prune(job, dry_run=dry_run)

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
    for name, content in backup_mod.schedule_files(job, job_file, every, systemd).items():
        (where / name).write_text(content)
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



def register(cli: click.Group) -> None:
    for command in (backup, prune, schedule):
        cli.add_command(command)
