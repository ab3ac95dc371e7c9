"""The floor of a restore driven from Python over CRIU's RPC, for bench.stall: the
interpreter (fscr's venv, with its site), pycriu's RPC messages loaded as fscr loads them,
`criu swrk`, one RESTORE request for images that `criu dump` wrote, and its answer. Nothing
of fscr: no click, no manifest, no checksum, no snapshot, no journal.

    python bench/rpc_floor.py CRIU IMAGES_DIR
"""

import importlib.util
import os
import socket
import subprocess
import sys


def rpc():  # noqa: ANN201 - as fscr.backends.criu.rpc: rpc_pb2 alone, not all of pycriu
    spec = importlib.util.find_spec("pycriu")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "rpc_pb2.py")
    mod_spec = importlib.util.spec_from_file_location("pycriu.rpc_pb2", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def main() -> int:
    criu, images = sys.argv[1], sys.argv[2]
    pb = rpc()
    fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([criu, "swrk", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    theirs.close()
    opts = pb.criu_opts(images_dir_fd=fd, log_file="restore.log", log_level=2)
    ours.send(pb.criu_req(type=pb.RESTORE, opts=opts).SerializeToString())
    resp = pb.criu_resp()
    resp.ParseFromString(ours.recv(1 << 20))
    ours.close()
    proc.wait()
    if not resp.success:
        print(f"criu restore over RPC failed: {resp.cr_errmsg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
