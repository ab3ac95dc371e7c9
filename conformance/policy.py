"""What fscr is told about each ZDTM test, and why: one table per concern, each entry with
its reason (docs/conformance.md renders them).

- EQUIVALENT / NO_EQUIVALENT: a .desc's CRIU options in fscr's terms, or the left-out group
  (GROUPS) when fscr exposes no equivalent;
- POLICY and EXTERNAL_PEER: what fscr refuses by policy unless told, for the tests that exist
  to hold such a thing;
- OWN_IPC: tests zdtm.py runs only in its ns flavor that need just an IPC namespace;
- IDENTITY: tests that assert identity across restore, which a subvolume swap cannot keep.
"""

from __future__ import annotations

from dataclasses import dataclass

# The tests fscr cannot pass by design: a restored volume is another btrfs subvolume (a
# writable snapshot swapped in), so its st_dev, and the subvolume id in its file handles,
# differ from what the test saw before. Inode numbers survive a snapshot. Reported apart,
# never counted as fscr bugs.
IDENTITY: dict[str, str] = {
    "unlink_fstat03": "compares st_dev of its unlinked file's fd before and after restore",
    "fanotify00": "compares its fanotify mark's file handle (fdinfo) before and after restore; "
                  "a btrfs file handle holds the subvolume id",
}

# fscr refuses these by policy unless told; each test exists to hold one, so the runner tells
# it what the test implies: name -> (checkpoint args, restore args, why). docs/conformance.md,
# "Policy allowances", lists them.
POLICY: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "console": (("--allow", "devices"), (), "holds /dev/console's device node (made on its "
                                            "volume), a device fscr refuses by default"),
    "vt": (("--allow", "devices"), (), "holds a virtual console's device node (made on its "
                                       "volume)"),
    "deleted_dev": (("--allow", "devices"), (), "holds a device node it made and unlinked"),
}
# A test whose source calls test_ext_init() forks a peer before test_init(): a process
# outside the tree by design, whose cwd and NAME.out.external are on the volume. fscr swaps a
# volume that outside processes hold only with --force.
EXTERNAL_PEER = ((), ("--force",), "an external peer (forked before test_init, outside the "
                                   "tree by design) holds the volume: restore --force")

# zdtm.py runs these only in its ns flavor, of whose namespaces they need one: an IPC
# namespace of their own (fscr, like CRIU, cannot take SysV objects of the host's). The runner
# starts them, in every mode alike, through `unshare --ipc`: the test's tree then owns the
# namespace, which CRIU dumps and recreates with it.
OWN_IPC: dict[str, str] = {
    "shm": "SysV shared memory",
    "shm-unaligned": "SysV shared memory of an unaligned size",
    "shm-mp": "SysV shared memory mapped twice",
    "sem": "SysV semaphores",
    "msgque": "a SysV message queue",
}
UNSHARE_IPC = ("unshare", "--ipc", "--")

CGROUP_SKIP = ("uses CRIU's cgroup management (--manage-cgroups, --cgroup-root, --cgroup-yard), "
               "which fscr does not expose; its baseline needs zdtm.py's system-wide named "
               "cgroup hierarchies (zdtm_mount_cgroups), which this runner does not create")

# CRIU options of a .desc that fscr covers, and how: option -> (fscr checkpoint args, why).
EQUIVALENT: dict[str, tuple[tuple[str, ...], str]] = {
    "--tcp-established": (("--tcp", "established"), "--tcp established"),
    "--tcp-close": (("--tcp", "close"), "--tcp close (CRIU's --tcp-close at restore)"),
    "--file-locks": ((), "fscr finds the locks and passes --file-locks itself"),
    "--shell-job": ((), "fscr passes --shell-job itself for a tree with a terminal"),
    "--ext-unix-sk": (("--allow", "unix-sockets"), "--allow unix-sockets"),
    "--skip-in-flight": ((), "fscr passes --skip-in-flight on every dump"),
    "--link-remap": ((), "fscr relinks unlinked-but-open files into lost+found/checkpoint"),
    "--ghost-limit": ((), "fscr relinks unlinked files on its volumes instead of ghost copies"),
    "--ghost-fiemap": ((), "fscr relinks unlinked files on its volumes instead of ghost copies"),
    "--no-ghost-fiemap": ((), "fscr relinks unlinked files on its volumes instead of ghost "
                              "copies"),
    "--network-lock=nftables": ((), "fscr's network lock is nftables"),
}

# CRIU options with no fscr equivalent: option -> left-out group (GROUPS explains each).
NO_EQUIVALENT: dict[str, str] = {
    "--network-lock=iptables": "iptables-lock",
    "--external": "external", "--ext-mount-map": "external",
    "--enable-external-masters": "external", "--join-ns": "external", "--enable-fs": "external",
    "--force-irmap": "irmap", "--irmap-scan-path": "irmap",
    "--allow-uprobes": "uprobes",
    "--mntns-compat-mode": "mntns", "--no-mntns-compat-mode": "mntns",
    "--lsm-mount-context": "mntns",
    "--manage-cgroups": "cgroups", "--cgroup-root": "cgroups", "--cgroup-yard": "cgroups",
}

GROUPS: dict[str, str] = {
    "iptables-lock": "CRIU's iptables network lock: fscr locks connections with nftables only",
    "external": "CRIU's --external/--ext-mount-map/--join-ns/--enable-fs: fscr exposes no "
                "mapping of external mounts, devices or namespaces",
    "irmap": "--force-irmap/--irmap-scan-path: fscr exposes no inotify path-map options",
    "uprobes": "--allow-uprobes: fscr exposes no such option",
    "mntns": "mount-namespace restore modes: fscr exposes no such option",
    "cgroups": CGROUP_SKIP,
    "tcp-split": "dumps connections with --tcp-established but restores them with --tcp-close: "
                 "fscr decides TCP once, at checkpoint",
}

VALUED = {"--ghost-limit", "--network-lock", "--external", "--cgroup-root", "--cgroup-yard",
          "--irmap-scan-path", "--join-ns", "--ext-mount-map", "--enable-fs"}

CGROUP_OPTIONS = {"--manage-cgroups", "--cgroup-root", "--cgroup-yard"}


@dataclass(frozen=True)
class FscrTerms:
    args: tuple[str, ...]  # extra `fscr checkpoint` arguments
    restore_args: tuple[str, ...]  # extra `fscr restore` arguments
    mapped: tuple[str, ...]  # one line per mapped option or policy
    left_out: str | None  # why the fscr modes cannot run it, or None


def fscr_terms(name: str, dump: list[str], restore: list[str], source: str) -> FscrTerms:
    """Everything fscr is told about test `name`: its .desc's CRIU options for dump and
    restore mapped (or the left-out reason), its policy entries, and whether its C `source`
    forks an external peer."""
    args, mapped, left_out = fscr_mapping(dump, restore)
    restore_args: tuple[str, ...] = ()
    if name in OWN_IPC:
        mapped += (f"flavor: host, in an IPC namespace of its own ({OWN_IPC[name]}; "
                   f"started through {' '.join(UNSHARE_IPC[:2])})",)
    peer = EXTERNAL_PEER if "test_ext_init(" in source else ((), (), "")
    for extra, more, why in (POLICY.get(name, ((), (), "")), peer):
        if why:
            args += extra
            restore_args += more
            mapped += (f"policy: {' '.join(extra + more)} ({why})",)
    return FscrTerms(_merge_allows(args), restore_args, mapped, left_out)


def uses_cgroups(tokens: list[str]) -> bool:
    return bool(CGROUP_OPTIONS & set(options(tokens)))


def fscr_mapping(dump: list[str], restore: list[str]) -> tuple[tuple[str, ...], tuple[str, ...],
                                                                str | None]:
    """The .desc's CRIU options in fscr's terms: (checkpoint args, one line per mapped option,
    the left-out reason or None)."""
    args: list[str] = []
    notes: list[str] = []
    left: list[str] = []
    for opt in dict.fromkeys(options(dump) + options(restore)):
        if opt in EQUIVALENT:
            extra, why = EQUIVALENT[opt]
            if not (extra[:1] == ("--tcp",) and "--tcp" in args):  # a split: left out below
                args += extra
            notes.append(f"{opt}: {why}")
        else:
            group = NO_EQUIVALENT.get(opt)
            left.append(GROUPS[group] if group else f"{opt}: fscr exposes no such CRIU option")
    if "--tcp-established" in options(dump) and "--tcp-close" in options(restore):
        left.append(GROUPS["tcp-split"])
    return tuple(args), tuple(notes), ("; ".join(dict.fromkeys(left)) or None)


def options(tokens: list[str]) -> list[str]:
    """Option names of a CRIU command line, values dropped (but --network-lock's kept)."""
    out = []
    it = iter(tokens)
    for tok in it:
        name, eq, value = tok.partition("=")
        if not name.startswith("--"):
            continue
        if name in VALUED and not eq:
            value = next(it, "")
        out.append(f"{name}={value}" if name == "--network-lock" else name)
    return out


def _merge_allows(args: tuple[str, ...]) -> tuple[str, ...]:
    """One --allow with every kind (fscr takes a comma list), other arguments kept in order."""
    out: list[str] = []
    kinds: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--allow":
            kinds += [k for k in next(it).split(",") if k not in kinds]
        else:
            out.append(a)
    return (*out, *(("--allow", ",".join(kinds)) if kinds else ()))
