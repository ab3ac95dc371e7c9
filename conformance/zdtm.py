"""Which ZDTM static tests run, how each starts, and what fscr must be told about it.

Mirrors CRIU 4.2.1's test/zdtm.py for its host ("h") flavor: a test is every executable of
test/zdtm/static not excluded by test/zdtm.desc; its NAME.desc (a Python dict literal) gives
flavors, flags, required kernel features and CRIU options; the start command is the
Makefile's NAME.pid rule; an executable NAME.checkskip that fails skips it; an executable
NAME.hook runs around dump and restore. What zdtm.py does as root that this runner does not:
it sets ZDTM_UID/GID/GROUPS so the test drops to another user (root here lacks
CAP_SYS_RESOURCE, and CRIU cannot dump a task of another user without it), and it mounts
system-wide named cgroup hierarchies for the cgroup tests (skipped here, see
policy.CGROUP_SKIP). What fscr is told about each test is in conformance/policy.py.
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import policy

CRIU_VERSION = "4.2.1"
ARCH = os.uname().machine  # zdtm.py: arch = os.uname()[4]
DEFAULT_TIMEOUT = 60.0  # seconds per test and mode, unless its .desc asks for more
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Build:
    """The ZDTM tree scripts/setup extracted and built (build_zdtm)."""

    root: Path

    @classmethod
    def default(cls) -> Build:
        """$FSCR_ZDTM_DIR, else $FSCR_CACHE/zdtm-4.2.1 (FSCR_CACHE: /var/cache/fscr)."""
        if d := os.environ.get("FSCR_ZDTM_DIR"):
            return cls(Path(d))
        return cls(Path(os.environ.get("FSCR_CACHE", "/var/cache/fscr")) / f"zdtm-{CRIU_VERSION}")

    @property
    def test_dir(self) -> Path:
        """CRIU's test/ directory: zdtm.py's working directory, where hooks run."""
        return self.root / f"criu-{CRIU_VERSION}" / "test"

    @property
    def static(self) -> Path:
        return self.test_dir / "zdtm" / "static"

    @property
    def lib(self) -> Path:
        """CRIU's lib/ (pycriu), which hooks import as ../lib from their working directory."""
        return self.root / f"criu-{CRIU_VERSION}" / "lib"

    def missing(self) -> str | None:
        """Why the tests cannot run from here, or None when the build is complete."""
        if not (self.root / ".built").is_file():
            return f"the ZDTM tests are not built in {self.root} (scripts/setup builds them)"
        return None


@dataclass(frozen=True)
class Test:
    """One static test as planned: how it starts, and what each runner mode does with it."""

    name: str
    desc: dict[str, Any]
    argv: tuple[str, ...] = ()  # absolute binary and arguments; cwd is its volume
    skip: str | None = None  # not run in any mode, why
    left_out: str | None = None  # fscr modes not run, why (CRIU alone still runs)
    fscr_args: tuple[str, ...] = ()  # extra `fscr checkpoint` arguments
    fscr_restore_args: tuple[str, ...] = ()  # extra `fscr restore` arguments (policy)
    mapped: tuple[str, ...] = ()  # how the .desc's CRIU options map to fscr
    identity: str | None = None  # asserts identity across restore (policy.IDENTITY)
    hook: str | None = None  # NAME.hook, when executable
    timeout: float = DEFAULT_TIMEOUT  # seconds for one mode, start to clean

    def flag(self, name: str) -> bool:
        return name in self.desc.get("flags", "").split()

    @property
    def dump_opts(self) -> list[str]:
        return self.desc.get("opts", "").split() + self.desc.get("dopts", "").split()

    @property
    def restore_opts(self) -> list[str]:
        return self.desc.get("opts", "").split() + self.desc.get("ropts", "").split()

    def criu_opts(self, kind: str, pidfile: Path) -> list[str]:
        """zdtm.py's getdopts() (kind "dopts") or getropts() ("ropts") for the host flavor
        without a freezer: the .desc's opts, --pidfile, then its dopts or ropts."""
        return [*self.desc.get("opts", "").split(), "--pidfile", str(pidfile),
                *self.desc.get(kind, "").split()]

    def env(self) -> dict[str, str]:
        """What zdtm.py adds to the environment of a host-flavor test run as root with the
        default (non-kernel) freezer; ZDTM_UID/GID/GROUPS deliberately not (module doc)."""
        env = {"TMPDIR": os.environ.get("TMPDIR", "/tmp"), "ZDTM_THREAD_BOMB": "5"}
        if self.flag("pre-dump-notify"):
            env |= {"ZDTM_NOTIFY_FDIN": "100", "ZDTM_NOTIFY_FDOUT": "101"}
        return env


def literal(path: Path) -> dict[str, Any]:
    """A .desc file: a Python dict literal; no file or an empty one is {} (zdtm.py's default).
    Raises ValueError for one that is code (zdtm.py evals it; this runner does not)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return {}
    if not text:
        return {}
    value = ast.literal_eval(text)
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} is not a dict")
    return value


def all_names(build: Build) -> list[str]:
    """Every static test, as `zdtm.py run -a` finds them, sorted."""
    exclude = {Path(x).name for x in literal(build.test_dir / "zdtm.desc").get("exclude", [])
               if x.startswith("static/")}
    out = []
    for p in build.static.iterdir():
        if (p.suffix in (".checkskip", ".hook") or p.name in exclude or p.is_symlink()
                or not p.is_file() or not os.access(p, os.X_OK)):
            continue
        out.append(p.name)
    return sorted(out)


class Features:
    """`criu check --feature X`, asked once per feature."""

    def __init__(self, criu: str) -> None:
        self.criu, self.known = criu, {}

    def supported(self, feature: str) -> bool:
        if feature not in self.known:
            rc = subprocess.run([self.criu, "check", "--no-default-config", "-v0", "--feature",
                                 feature], capture_output=True).returncode
            self.known[feature] = rc == 0
        return self.known[feature]


def skip_reason(build: Build, name: str, desc: dict[str, Any], features: Features,
                explicit: bool) -> str | None:
    """Why zdtm.py (or this runner, for the reasons in the module doc) would not run `name`
    in the host flavor here; None when it runs. Checks in zdtm.py's order."""
    flags = desc.get("flags", "").split()
    if desc.get("arch", ARCH) != ARCH:
        return f"arch: {desc['arch']} only"
    if "noauto" in flags and not explicit:
        return "noauto: zdtm.py runs it only when named"
    if "h" not in desc.get("flavor", "h ns uns").split() and name not in policy.OWN_IPC:
        return f"no host flavor (flavor '{desc['flavor']}'): needs zdtm.py's test root or userns"
    if "crfail" in flags:
        return "crfail: the dump is meant to fail; nothing to compare"
    if policy.uses_cgroups(desc.get("opts", "").split() + desc.get("dopts", "").split()
                           + desc.get("ropts", "").split()):
        return policy.CGROUP_SKIP
    for feature in desc.get("feature", "").split():
        if not features.supported(feature):
            return f"criu check --feature {feature}: not supported here"
    checkskip = build.static / f"{name}.checkskip"
    if os.access(checkskip, os.X_OK) and _fails(checkskip):
        return f"{name}.checkskip says the machine lacks what it needs"
    for dep in desc.get("deps", []):
        if not any(Path(alt).exists() for alt in dep.split("|")):
            return f"needs {dep}, absent here"
    return None


def _fails(checkskip: Path) -> bool:
    """Run a .checkskip in a scratch directory (some mktemp there) with the system PATH."""
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    proc = subprocess.run([str(checkskip)], cwd=scratch, capture_output=True, timeout=60,
                          env=os.environ | {"PATH": SYSTEM_PATH})
    return proc.returncode != 0


def start_commands(build: Build, names: list[str]) -> dict[str, tuple[str, ...]]:
    """Each test's start command from the Makefile's NAME.pid rules (one `make -n` for all),
    with the binary made absolute; a test without such a rule is absent from the result."""
    if not names:
        return {}
    out = subprocess.run(["make", "--no-print-directory", "-s", "-k", "-n",
                          *[f"{n}.pid" for n in names]], cwd=build.static,
                         capture_output=True, text=True).stdout
    by_pidfile = {}
    for line in out.splitlines():
        argv = shlex.split(line)
        if not argv or not argv[0].startswith("./"):
            continue
        for arg in argv[1:]:
            if arg.startswith("--pidfile=") and arg.endswith(".pid"):
                by_pidfile[arg[len("--pidfile="):-len(".pid")]] = (
                    str(build.static / argv[0][2:]), *argv[1:])
    return {n: by_pidfile[n] for n in names if n in by_pidfile}


def plan(build: Build, criu: str, names: list[str] | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> list[Test]:
    """The tests `names` (default: all) as they will run, each with its skip or left-out
    reason, fscr arguments, start command and timeout (`timeout`, or more if its .desc
    asks)."""
    explicit = names is not None
    features = Features(criu)
    tests = []
    for name in names if names is not None else all_names(build):
        t = _one(build, name, features, explicit)
        tests.append(replace(t, timeout=max(timeout, float(t.desc.get("timeout") or 0))))
    commands = start_commands(build, [t.name for t in tests if t.skip is None])
    out = []
    for t in tests:
        if t.skip is None and t.name not in commands:
            t = replace(t, skip=f"no {t.name}.pid rule in the static Makefile")
        elif t.skip is None:
            t = replace(t, argv=(*(policy.UNSHARE_IPC if t.name in policy.OWN_IPC else ()),
                                 *commands[t.name]))
        out.append(t)
    return out


def _one(build: Build, name: str, features: Features, explicit: bool) -> Test:
    if not (build.static / name).is_file():
        return Test(name, {}, skip=f"no such static test: {name}")
    try:
        desc = literal(build.static / f"{name}.desc")
    except (ValueError, SyntaxError):
        return Test(name, {}, skip=f"{name}.desc is code, not a literal (zdtm.py evaluates it; "
                                   "for this test it means noauto unless set up by hand)")
    skip = skip_reason(build, name, desc, features, explicit)
    hook = build.static / f"{name}.hook"
    t = Test(name, desc, skip=skip, hook=str(hook) if os.access(hook, os.X_OK) else None)
    try:
        source = (build.static / f"{name}.c").read_text(errors="replace")
    except FileNotFoundError:
        source = ""
    terms = policy.fscr_terms(name, t.dump_opts, t.restore_opts, source)
    return replace(t, fscr_args=terms.args, fscr_restore_args=terms.restore_args,
                   mapped=terms.mapped, left_out=terms.left_out,
                   identity=policy.IDENTITY.get(name))
