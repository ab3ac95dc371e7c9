"""Waiting for a block device to appear, through the kernel's uevents (pyudev), not sleeps.

No udevd runs on many of the machines fscr serves (containers, minimal hosts), so the monitor
listens to the kernel's own netlink source: it sees a device the moment the kernel announces
it. The monitor is started before the command that makes the device, so its event cannot be
missed, and the devices that exist already are looked at first, so an event that came before
the monitor started is not waited for in vain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

import pyudev

from ..errors import SnapshotFailed

DEVICE_TIMEOUT = 30.0  # seconds: lvm2 activates a snapshot in well under a second


class DeviceWatch:
    def __enter__(self) -> DeviceWatch:
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source="kernel")
        self.monitor.filter_by("block")
        self.monitor.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        # pyudev has no close: dropping the last reference closes the netlink socket
        del self.monitor

    def wait(self, match: Callable[[pyudev.Device], bool], what: str,
             timeout: float = DEVICE_TIMEOUT) -> str:
        """The device node of the first block device `match` accepts, waiting up to `timeout`
        seconds for the kernel to announce it."""
        for dev in self.context.list_devices(subsystem="block"):
            if dev.device_node and match(dev):
                return dev.device_node
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            dev = self.monitor.poll(timeout=left)
            if dev is not None and dev.action in ("add", "change") and dev.device_node \
                    and match(dev):
                return dev.device_node
        raise SnapshotFailed(f"{what} did not appear within {timeout:g} s (no uevent from the "
                             "kernel): check `dmesg` and `lvs`")


def attribute(dev: pyudev.Device, name: str) -> str | None:
    """A sysfs attribute of `dev` as text, None if it has none."""
    try:
        return dev.attributes.asstring(name).strip()
    except (KeyError, UnicodeDecodeError):
        return None


def dm_device(dm_name: str) -> Callable[[pyudev.Device], bool]:
    """Matches the device-mapper device `dm_name` once it is live (resumed with its table):
    its "add" event comes before the table is loaded, the "change" event after."""
    def match(dev: pyudev.Device) -> bool:
        return (dev.sys_name.startswith("dm-") and attribute(dev, "dm/name") == dm_name
                and attribute(dev, "dm/suspended") == "0" and attribute(dev, "size") != "0")
    return match
