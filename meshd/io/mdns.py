"""mDNS announce and browse of `_meshd._tcp.local.` (zeroconf, on its own thread).

Discovery only finds candidates to talk to. It never decides liveness: a killed node's record
lingers for minutes, so membership and liveness come from Raft heartbeats alone.

Invariants:
- The TXT record stays small (well under 1 KB): node id, site, peer port, key fingerprint,
  version.
- zeroconf callbacks run on zeroconf's thread; they only touch a lock-protected dict and
  never call into trio.
- Only the interface of the advertised address is used, so a loopback mesh never sends
  multicast onto a real network.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger("meshd.mdns")

SERVICE_TYPE = "_meshd._tcp.local."


@dataclass(frozen=True)
class Candidate:
    node_id: str
    site: str
    address: str  # "ip:port" of the peer endpoint
    fingerprint: str


class Discovery:
    def __init__(self, *, advertise_ip: str, node_id: str, site: str, peer_port: int, fingerprint: str,
                 version: str):
        self._lock = threading.Lock()
        self._candidates: dict[str, Candidate] = {}
        self._node_id = node_id
        interfaces = [advertise_ip] if advertise_ip not in ("0.0.0.0", "") else None
        self._zc = Zeroconf(interfaces=interfaces or "all", ip_version=IPVersion.V4Only)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{node_id[:16]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(advertise_ip)],
            port=peer_port,
            properties={"id": node_id, "site": site, "fp": fingerprint[:32], "v": version},
            server=f"meshd-{node_id[:16]}.local.",
        )
        self._announced = False
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    def announce(self) -> None:
        # cooperating_responders: several meshd nodes answer for the same service type; it
        # cuts register-to-seen from about a second to milliseconds.
        self._zc.register_service(self._info, cooperating_responders=True)
        self._announced = True

    def update_site(self, site: str) -> None:
        props = dict(self._info.decoded_properties)
        props["site"] = site
        self._info = ServiceInfo(SERVICE_TYPE, self._info.name, addresses=self._info.addresses,
                                 port=self._info.port, properties=props, server=self._info.server)
        if self._announced:
            self._zc.update_service(self._info)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                for key, cand in list(self._candidates.items()):
                    if name.startswith(key[:16]):
                        del self._candidates[key]
            return
        # Resolve on a separate thread: get_service_info blocks and this is zeroconf's loop.
        threading.Thread(target=self._resolve, args=(name,), daemon=True).start()

    def _resolve(self, name: str) -> None:
        try:
            # The browse answer usually carries SRV/TXT/A already: take them from the cache
            # and only ask the network when something is missing.
            info = ServiceInfo(SERVICE_TYPE, name)
            if not info.load_from_cache(self._zc) and not info.request(self._zc, 3000):
                return
        except Exception:
            log.debug("mDNS resolve of %s failed", name, exc_info=True)
            return
        if not info.addresses:
            return
        props = {k: v for k, v in info.decoded_properties.items() if isinstance(v, str)}
        node_id, site = props.get("id"), props.get("site")
        if not node_id or not site or node_id == self._node_id:
            return
        address = f"{socket.inet_ntoa(info.addresses[0])}:{info.port}"
        with self._lock:
            self._candidates[node_id] = Candidate(node_id, site, address, props.get("fp", ""))

    def candidates(self, site: str | None = None) -> list[Candidate]:
        with self._lock:
            return [c for c in self._candidates.values() if site is None or c.site == site]

    def close(self) -> None:
        try:
            if self._announced:
                self._zc.unregister_service(self._info)
        except Exception:
            log.debug("mDNS unregister failed", exc_info=True)
        self._zc.close()
