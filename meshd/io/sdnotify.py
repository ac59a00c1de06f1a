"""systemd's notify protocol (sd_notify(3)): READY=1, STATUS=..., STOPPING=1 and watchdog pings.

meshd.service is `Type=notify` with `WatchdogSec=`: systemd passes the socket in
$NOTIFY_SOCKET and the watchdog timeout in $WATCHDOG_USEC (and the pid it expects pings from
in $WATCHDOG_PID), and kills and restarts a daemon whose pings stop.

Invariants:
- Without $NOTIFY_SOCKET nothing is sent: `meshd run` outside systemd behaves the same.
- A failed send is logged, never raised: the service manager is not a reason to stop.
- Watchdog pings are sent by a task of the trio loop, never by a thread, so a wedged loop
  stops them; the in-process loop watchdog (meshd.io.watchdog) normally ends a wedged daemon
  first, and systemd's timeout catches what that cannot see.
- `watchdog_ping_interval` is pure: the environment and our pid are passed in.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

import trio

log = logging.getLogger("meshd.daemon")

# sd_watchdog_enabled(3) recommends a ping every half of the timeout: one ping may come late
# (a busy board, a long pause) and the next one still meets the deadline.
PING_FRACTION = 0.5


def sd_notify(message: str) -> None:
    """Send one notification (e.g. "READY=1") to the service manager, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.send(message.encode())
    except OSError as e:
        log.warning("sd_notify failed", extra={"reason": str(e), "notify": message.split("=", 1)[0]})


def sd_status(text: str) -> None:
    """What the daemon is doing, one line (shown by `systemctl status meshd`)."""
    sd_notify("STATUS=" + " ".join(text.split()))


def watchdog_ping_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when this process must not ping.

    As sd_watchdog_enabled(3): no $WATCHDOG_USEC (or not a positive integer) means no
    watchdog; a $WATCHDOG_PID that is not `pid` means the pings are expected from another
    process (a wrapper, or our parent that passed its environment on)."""
    usec_text = env.get("WATCHDOG_USEC", "")
    if not (usec_text.isascii() and usec_text.isdigit()) or int(usec_text) == 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None and pid_text != str(pid):
        return None
    return int(usec_text) / 1e6 * PING_FRACTION


async def ping_watchdog(interval: float, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Send WATCHDOG=1 every `interval` seconds from this trio loop, the first one at once."""
    task_status.started()
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)
