"""The joiner's side: which member to ask next, what each answer means, when to give up,
and what it is waiting for (shown by `meshctl status` while joining); and, before any of
that, how a starting node becomes a member at all (`start_path`) and what config it must
refuse to start with (`start_conflict`).

Invariants:
- A node whose data dir holds a membership resumes it, whatever `bootstrap` says; a node
  without one founds a mesh only when `bootstrap` allows it ("found", or "auto" without a
  token), so a device whose config says "join" never founds a mesh by accident.
- Pure: `now` is monotonic seconds; the runtime finds candidates (mDNS, --peer) and talks.
- Only a `denied` refusal ends the join early; every other failure (unreachable, a member
  that cannot decide, a site that could not commit) tries the next candidate, the leader a
  member named first, until the join timeout.
- Every failed attempt is reported once per distinct outcome (address, reason), so the log
  says what the joiner tried without repeating itself every poll.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.node.admitting import DENIED, JoinRefusal

# How long a joining node keeps trying before it gives up (a device that boots before its
# site's network is up still joins; a mistyped token does not hang forever).
JOIN_TIMEOUT = 60.0
# A candidate that failed is asked again after this long (it may have caught up).
RETRY_CANDIDATE_AFTER = 0.5


# How a starting node becomes a member (`start_path`).
RESUME = "resume"  # the data dir holds a membership
JOIN = "join"  # ask the site the token names
FOUND = "found"  # a new mesh and its site, this node its first voter


@dataclass(frozen=True)
class StartPath:
    """How a starting node becomes a member, or why it must not start."""
    way: str | None  # RESUME, JOIN or FOUND; None: the node must not start
    refusal: str | None = None  # why not, one line that says what to set


@dataclass(frozen=True)
class Unreachable:
    """No answer from the candidate: connection refused, timed out, closed, TLS failed."""
    reason: str


@dataclass(frozen=True)
class Attempt:
    address: str
    outcome: str  # "unreachable" | a refusal code
    reason: str
    at: float


@dataclass(frozen=True)
class GiveUp:
    reason: str
    refused: bool  # a member said no (a restart will not help); else nobody admitted it in time


@dataclass
class Joining:
    site: str
    started: float
    timeout: float = JOIN_TIMEOUT
    attempts: dict[str, Attempt] = field(default_factory=dict)  # the last attempt per address
    hinted: list[str] = field(default_factory=list)  # leaders named by members, newest first

    def candidates(self, found: list[str], static: list[str], now: float) -> list[str]:
        """Whom to ask now, in order: named leaders, then new candidates, then those that
        failed long enough ago."""
        pool = list(dict.fromkeys([*self.hinted, *static, *found]))
        due = [a for a in pool if a not in self.attempts or now - self.attempts[a].at >= RETRY_CANDIDATE_AFTER]
        return sorted(due, key=lambda a: (a not in self.hinted, a in self.attempts))

    def failed(self, address: str, outcome: Unreachable | JoinRefusal, now: float) -> tuple[bool, GiveUp | None]:
        """Record a failed attempt. Returns (worth logging: a new outcome for that address,
        GiveUp when the join must end now)."""
        if isinstance(outcome, JoinRefusal):
            attempt = Attempt(address, outcome.code, outcome.reason, now)
            if outcome.leader and outcome.leader != address and outcome.leader not in self.hinted:
                self.hinted.insert(0, outcome.leader)
        else:
            attempt = Attempt(address, "unreachable", outcome.reason, now)
        previous = self.attempts.get(address)
        self.attempts[address] = attempt
        new = previous is None or (previous.outcome, previous.reason) != (attempt.outcome, attempt.reason)
        if attempt.outcome == DENIED:
            return new, GiveUp(f"join refused by {address}: {attempt.reason}", refused=True)
        return new, None

    def expired(self, now: float) -> GiveUp | None:
        if now - self.started < self.timeout:
            return None
        return GiveUp(f"could not join site {self.site} within {self.timeout:g}s: {self.waiting_for()}", refused=False)

    def waiting_for(self) -> str:
        if not self.attempts:
            return f"a member of site {self.site} (none found yet by mDNS or --peer)"
        tried = "; ".join(f"{a.address}: {a.reason}" for a in sorted(self.attempts.values(), key=lambda a: a.address))
        return f"a member of site {self.site} that can admit this node (tried {len(self.attempts)}: {tried})"

    def status(self, now: float) -> dict:
        return {"waiting_for": self.waiting_for(), "joining_for_s": round(now - self.started, 1),
                "attempts": [{"address": a.address, "outcome": a.outcome, "reason": a.reason,
                              "s_ago": round(now - a.at, 1)}
                             for a in sorted(self.attempts.values(), key=lambda a: a.address)]}


def start_conflict(*, stored_site: str | None, config_site: str, site_given: bool,
                   token_site: str | None) -> str | None:
    """Why the daemon must not start with this config on this data dir (None: it may).

    `stored_site` is the site of the membership the data dir holds (None: no membership),
    `site_given` whether --site (or the config file's `site`) was set, `token_site` the site
    the --join token names (None: no token). A data dir's membership is never silently kept
    against a config that names something else, nor a token used for a site it does not
    admit to. A token for the site the data dir already belongs to is fine: a config file
    keeps the token it joined with, and restarts resume the membership."""
    if stored_site is not None:
        if site_given and config_site != stored_site:
            return (f"the data dir belongs to site {stored_site}, but the config says site {config_site}: "
                    f"drop --site, or wipe the data dir to start this device over in {config_site}")
        if token_site is not None and token_site != stored_site:
            return (f"the data dir belongs to site {stored_site}, but the join token is for site {token_site}: "
                    f"drop --join, or wipe the data dir to join {token_site}")
        return None
    if token_site is not None and site_given and token_site != config_site:
        return f"the join token is for site {token_site}, but the config says site {config_site}"
    return None


def start_path(*, member: bool, bootstrap: str, token: bool, data_dir: str, config_file: str | None) -> StartPath:
    """How this node becomes a member: `member` whether the data dir holds a membership,
    `bootstrap` the config's mode (auto | found | join; found with a token is refused by the
    config itself), `token` whether a join token is given. A refusal names the keys of
    `config_file` to set (the command line's options without one)."""
    if member:
        return StartPath(RESUME)
    if token:
        return StartPath(JOIN)
    if bootstrap != "join":  # "auto" or "found"
        return StartPath(FOUND)
    if config_file is not None:
        what = (f'set join = "TOKEN" (from `meshctl token create` on a member) in {config_file} to join a mesh, '
                f'or bootstrap = "found" there on the first device of a new mesh')
    else:
        what = ("give --join TOKEN (from `meshctl token create` on a member) to join a mesh, "
                "or --bootstrap found on the first device of a new mesh")
    return StartPath(None, f"bootstrap is join, but no join token is given and the data dir {data_dir} holds "
                           f"no membership: {what}")
