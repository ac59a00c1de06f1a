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
import select
import socket
import threading
import time
from dataclasses import dataclass

from zeroconf import (DNSAddress, DNSIncoming, DNSOutgoing, DNSQuestion, DNSService, DNSText, IPVersion,
                      ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf)
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_PTR

log = logging.getLogger("meshd.mdns")

SERVICE_TYPE = "_meshd._tcp.local."
MDNS_GROUP = ("224.0.0.251", 5353)
# Responders answer a legacy unicast query at once (measured: 1-2 ms on loopback); a LAN
# adds little. Long enough for a busy board, short enough to ask again soon.
PROBE_WINDOW = 0.15
MAX_MDNS_PACKET = 9000  # RFC 6762 section 17: the largest mDNS message over Ethernet jumbo frames


def _txt_properties(text: bytes) -> dict[str, str]:
    """RFC 6763 TXT: length-prefixed "key=value" strings. Malformed entries are skipped."""
    props: dict[str, str] = {}
    i = 0
    while i < len(text):
        n = text[i]
        if i + 1 + n > len(text):
            break  # a length that runs past the record: the rest is not trustworthy
        entry = text[i + 1:i + 1 + n]
        i += 1 + n
        key, sep, value = entry.partition(b"=")
        if sep:
            try:
                props[key.decode()] = value.decode()
            except UnicodeDecodeError:
                continue
    return props


def candidates_from_records(records) -> list[Candidate]:
    """Candidates from one answer's records: SRV (port, host) + TXT (id, site) + A (address)."""
    addresses: dict[str, str] = {}
    services: dict[str, DNSService] = {}
    texts: dict[str, dict[str, str]] = {}
    for record in records:
        if isinstance(record, DNSAddress) and len(record.address) == 4:
            addresses[record.name.lower()] = socket.inet_ntoa(record.address)
        elif isinstance(record, DNSService) and record.name.endswith(SERVICE_TYPE):
            services[record.name.lower()] = record
        elif isinstance(record, DNSText) and record.name.endswith(SERVICE_TYPE):
            texts[record.name.lower()] = _txt_properties(record.text)
    found = []
    for name, srv in services.items():
        props, ip = texts.get(name, {}), addresses.get(srv.server.lower())
        if ip and props.get("id") and props.get("site"):
            found.append(Candidate(props["id"], props["site"], f"{ip}:{srv.port}", props.get("fp", "")))
    return found


def probe_link(interface_ip: str, window: float) -> list[Candidate]:
    """One legacy unicast query for every meshd service; the candidates answered within `window`."""
    out = DNSOutgoing(_FLAGS_QR_QUERY, multicast=False)
    out.add_question(DNSQuestion(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN))
    found: dict[str, Candidate] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        bind_ip = interface_ip if interface_ip not in ("", "0.0.0.0") else "0.0.0.0"
        if bind_ip != "0.0.0.0":
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(bind_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.bind((bind_ip, 0))
        try:
            for packet in out.packets():
                sock.sendto(packet, MDNS_GROUP)
        except OSError as e:
            log.debug("mDNS probe not sent: %s", e)
            return []
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                break
            data, _ = sock.recvfrom(MAX_MDNS_PACKET)
            try:
                incoming = DNSIncoming(data)
            except Exception:  # junk on the link is not our problem; keep listening
                continue
            if incoming.valid and not incoming.is_query():
                for cand in candidates_from_records(incoming.answers()):
                    found[cand.node_id] = cand
    return list(found.values())


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
        self._advertise_ip = advertise_ip
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

    def probe(self, window: float = PROBE_WINDOW) -> list[Candidate]:
        """Ask every meshd node on the link at once and wait `window` seconds for answers.

        For a node that is joining and has found nobody yet. The browser's own schedule
        waits a second after its first query, then doubles; and members that multicast
        their records within the last second must not multicast them again (RFC 6762
        section 6), so a browse right after another node's join often goes unanswered for
        a second. A query from a port other than 5353 is a "legacy unicast" query (section
        6.7): every responder answers it at once, by unicast to that port, with the SRV,
        TXT and address records in the same packet. Answers also land in `candidates()`."""
        found = probe_link(self._advertise_ip, window)
        found = [c for c in found if c.node_id != self._node_id]
        with self._lock:
            for cand in found:
                self._candidates[cand.node_id] = cand
        return found

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
