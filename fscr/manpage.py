"""fscr(1), generated from the click commands themselves, so the page lists exactly the
commands and options that exist, and the exit codes of fscr/errors.py.

`python -m fscr.manpage > fscr.1` (scripts/setup installs it where `man fscr` finds it).
"""

from __future__ import annotations

import sys
from datetime import date

import click

from . import errors

# Not FscrErrors: click's usage errors, backup's own outcomes (fscr/backup.py), Ctrl-C.
OTHER_CODES = {
    2: "Bad usage: an unknown option, a missing argument (click prints the usage).",
    20: "fscr backup: skipped, another run of the same job holds its lock.",
    21: "fscr backup: partial, the checkpoint was made but pruning failed.",
    130: "Interrupted (Ctrl-C).",
}

ENVIRONMENT = {
    "FSCR_STORE": "The checkpoint store (default /var/lib/fscr); --store overrides it.",
    "FSCR_QUIET": "1: no progress on stderr, as --quiet.",
    "FSCR_CRIU": "The CRIU binary to use (else fscr's own build, then PATH; >= 4.2.1).",
    "FSCR_LOCK_WAIT": "Seconds to wait for a busy workload or volume lock (default 5).",
}


def esc(text: str) -> str:
    """Text safe in roff: backslashes, hyphens of options, a leading dot or quote."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in out.splitlines())


def commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    """Every leaf command, with its full name ("schedule install"), in listing order."""
    ctx = click.Context(group, info_name="fscr")
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            out += commands(cmd, prefix=f"{full} ")
        else:
            out.append((full, cmd))
    return out


def section(name: str, cmd: click.Command) -> list[str]:
    ctx = click.Context(cmd, info_name=f"fscr {name}")
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = [f".SS fscr {esc(name)}", f".B fscr {esc(name)}", esc(usage), ".PP",
             esc(cmd.help or "").replace("\n\n", "\n.PP\n")]
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if (record is None or not isinstance(param, click.Option)
                or "--help" in param.opts):  # arguments: the usage line names them
            continue
        opts, help_text = record
        lines += [".TP", f".B {esc(opts)}", esc(help_text) or "\\&"]
    return lines


def exit_codes() -> list[tuple[int, str]]:
    found = {0: "Success."} | OTHER_CODES
    pending = [errors.FscrError]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        doc = " ".join((cls.__doc__ or cls.__name__).split())
        if cls is errors.FscrError:
            doc = "Any other expected failure (the one line on stderr says which)."
        found.setdefault(cls.exit_code, doc)
    return sorted(found.items())


def render(group: click.Group) -> str:
    cmds = commands(group)
    lines = [f'.TH FSCR 1 "{date.today():%Y-%m-%d}" "fscr" "fscr manual"',
             ".SH NAME", "fscr \\- " + esc(group.help or ""),
             ".SH SYNOPSIS", ".B fscr", ".I COMMAND", "[OPTIONS] [ARGS]...",
             ".SH DESCRIPTION",
             esc("fscr freezes a process tree, snapshots the btrfs (or LVM) volumes it uses "
                 "and dumps it with CRIU at that one instant; restore puts the volumes back "
                 "and the processes with them. It runs as root. Every command takes --help; "
                 "with --json the output is JSON on stdout. Progress goes to stderr (drawn "
                 "on a terminal, timestamped lines otherwise) unless --quiet or --json."),
             ".SH COMMANDS"]
    for name, cmd in cmds:
        lines += section(name, cmd)
    lines += [".SH EXIT STATUS", esc("One line on stderr says what failed; the code says "
                                     "which kind of failure:")]
    for code, text in exit_codes():
        lines += [".TP", f".B {code}", esc(text)]
    lines.append(".SH ENVIRONMENT")
    for var, text in ENVIRONMENT.items():
        lines += [".TP", f".B {var}", esc(text)]
    lines += [".SH FILES", ".TP", ".B /var/lib/fscr",
              esc("The store: checkpoints (manifest, CRIU images, logs), journals of "
                  "unfinished runs, rescue snapshot records, failed attempts."),
              ".TP", ".B <parent of VOLUME>/.fscr-snapshots/",
              esc("The snapshots of a volume, beside it on the same filesystem."),
              ".SH SEE ALSO", "criu(8), btrfs(8), " + esc(
                  "and the docs/ directory of fscr's source: usage.md, tutorial.md, "
                  "transfer.md, backups.md.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    from .cli import cli
    sys.stdout.write(render(cli))


if __name__ == "__main__":
    main()
