"""The exit statuses of `meshd run`: one per kind of failure an operator or a service manager
must tell apart (systemd's `RestartPreventExitStatus=` names the ones a restart cannot fix).

Values follow sysexits(3) where one fits, so that tools that know them read them right; the
two meshd-specific ones sit above sysexits' range.

Invariants:
- Each status means one kind of failure, always announced by one `error: ...` line.
- A restart cannot help EXIT_REVOKED or EXIT_REFUSED: the unit stops restarting on them.
"""

EXIT_OK = 0
EXIT_ERROR = 1  # any other failure of start-up that the operator can cause
EXIT_USAGE = 2  # argparse's own: an unknown option or a missing argument
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: no member of the site admitted this node in time (retry later)
EXIT_SOFTWARE = 70  # EX_SOFTWARE: the daemon's event loop wedged (meshd.io.watchdog); a restart helps
EXIT_PORT_IN_USE = 73  # EX_CANTCREAT: a port meshd must listen on is taken by another program
EXIT_NOPERM = 77  # EX_NOPERM: not allowed to do what the config asks (a port below 1024, a data dir not ours)
EXIT_CONFIG = 78  # EX_CONFIG: a bad option or config file, one that contradicts the data dir, or bootstrap = join with nothing to join
EXIT_LOCKED = 75  # EX_TEMPFAIL: another meshd runs on this data dir; it may stop, so a retry may work
EXIT_REVOKED = 80  # this node was revoked: it may never run on this data dir again
EXIT_REFUSED = 81  # the site refused this node's join (a bad or used token, failed attestation)
