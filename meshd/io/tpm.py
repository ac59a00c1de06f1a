"""The node's TPM 2.0, through tpm2-pytss: keys, credential activation, measurement, quotes.

Keys: the endorsement key (EK) is the TCG default RSA 2048 EK, created from its template (or
the template the manufacturer stored in NV), with its certificate read from NV when there is
one; the attestation key (AK) is a restricted ECDSA P-256 signing key, a primary key of the
endorsement hierarchy. Primary keys derive from the TPM's seeds, so both are the same keys at
every start without anything persisted or written to NV.

Measurement: the package digest is extended into the measurement PCR (attestation.tpm) and
appended to the event log kept in the data dir, at start and whenever the measured code
changes. The log is trusted by nobody: the verifier replays it against the quoted PCR.

Invariants:
- Every call into the TPM holds `_lock` (an ESAPI context is not thread-safe; callers run us
  in worker threads).
- The event log file is rewritten atomically after each extend, before the quote that may
  include it; a log that no longer explains the PCR (the TPM was reset) starts over only
  when the PCR is back at its initial value.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from attestation.tpm import MEASUREMENT_PCR, PCR_INITIAL, replay
from meshd.io.identity import write_atomic

log = logging.getLogger("meshd.tpm")

EVENT_LOG_NAME = "tpm-events.json"
EK_TYPE = "EK-RSA2048"  # the one EK every TPM 2.0 carries a certificate for (TCG EK profile)


class TpmUnavailable(Exception):
    """The configured TPM cannot be used; the message says why (shown at start)."""


def _pytss():
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # libtss2 prints probing errors otherwise
    try:
        import tpm2_pytss
    except ImportError as e:
        raise TpmUnavailable(f"tpm2-pytss is not installed (pip install 'meshd[tpm]'): {e}") from None
    return tpm2_pytss


class TpmDevice:
    def __init__(self, tcti: str, data_dir: Path) -> None:
        self.tcti = tcti
        self.log_path = data_dir / EVENT_LOG_NAME
        self._lock = threading.Lock()
        self._ctx = None
        self._ek = self._ak = None  # ESYS handles of the loaded keys
        self.ek_public = b""
        self.ak_public = b""
        self.ek_certificate: bytes | None = None
        self.events: list[str] = []

    # --- opening -------------------------------------------------------------------------

    def open(self) -> None:
        t = _pytss()
        from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC
        from tpm2_pytss.utils import create_ek_template
        name, _, conf = self.tcti.partition(":")
        with self._lock:
            try:
                self._ctx = ctx = t.ESAPI(t.TCTILdr(name, conf or None))
                self._flush_stale_objects()
                self.ek_certificate, ek_template = create_ek_template(EK_TYPE, self._nv_reader())
                self._ek, ek_public, *_ = ctx.create_primary(None, ek_template, ESYS_TR.ENDORSEMENT)
                attributes = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
                              | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT)
                ak_template = TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attributes))
                self._ak, ak_public, *_ = ctx.create_primary(None, ak_template, ESYS_TR.ENDORSEMENT)
                self.ek_public, self.ak_public = ek_public.marshal(), ak_public.marshal()
                self.events = self._load_events(self._read_pcr())
            except t.TSS2_Exception as e:
                self._close_locked()
                raise TpmUnavailable(f"TPM {self.tcti}: {e}") from None
        log.info("TPM ready", extra={"tcti": self.tcti, "ek_certificate": self.ek_certificate is not None,
                                     "events": len(self.events)})

    def _flush_stale_objects(self) -> None:
        """Flush transient objects left by an earlier run that died before closing. A
        resource manager (/dev/tpmrm0) shows each connection only its own, so this only
        matters where meshd has the TPM to itself (swtpm, /dev/tpm0): a TPM holds only
        three transient objects, and leaked ones would make every start fail."""
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HT
        more, stale = True, []
        first = TPM2_HT.TRANSIENT << 24
        while more:
            more, caps = self._ctx.get_capability(TPM2_CAP.HANDLES, first, 64)
            handles = list(caps.data.handles)
            stale.extend(handles)
            if not handles:
                break
            first = handles[-1] + 1
        for handle in stale:
            self._ctx.flush_context(self._ctx.tr_from_tpmpublic(handle))

    def _nv_reader(self):
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.utils import NoSuchIndex
        ctx = self._ctx

        def read(index):
            try:
                handle = ctx.tr_from_tpmpublic(index)
            except TSS2_Exception:
                raise NoSuchIndex(index) from None
            public, _ = ctx.nv_read_public(handle)
            size, data, offset = public.nvPublic.dataSize, b"", 0
            while offset < size:  # TPMs cap one NV read (often 1024 bytes); certificates are longer
                chunk = bytes(ctx.nv_read(handle, min(size - offset, 512), offset))
                data, offset = data + chunk, offset + len(chunk)
            return data
        return read

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._ctx is not None:
            try:
                for handle in (self._ak, self._ek):
                    if handle is not None:
                        self._ctx.flush_context(handle)
                self._ctx.close()
            except Exception as e:  # closing must not turn a clean stop into a crash
                log.warning("TPM close failed", extra={"reason": str(e)})
            finally:
                self._ctx = self._ek = self._ak = None

    # --- measurement ---------------------------------------------------------------------

    def _read_pcr(self) -> bytes:
        _, _, values = self._ctx.pcr_read(f"sha256:{MEASUREMENT_PCR}")
        return bytes(values[0])

    def _load_events(self, pcr: bytes) -> list[str]:
        try:
            events = json.loads(self.log_path.read_text())["events"]
            if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
                raise ValueError("events must be a list of hex digests")
        except FileNotFoundError:
            events = []
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("TPM event log unreadable; starting a new one", extra={"reason": str(e)})
            events = []
        if replay([bytes.fromhex(e) for e in events]) == pcr:
            return events
        if pcr == PCR_INITIAL:  # the TPM was reset (a reboot): the old log belongs to another boot
            self._save_events([])
            return []
        log.warning("TPM measurement PCR holds values the event log does not explain; "
                    "the verifier will refuse this node's quotes", extra={"pcr": MEASUREMENT_PCR})
        return events

    def _save_events(self, events: list[str]) -> None:
        write_atomic(self.log_path, json.dumps({"pcr": MEASUREMENT_PCR, "events": events}).encode())

    def measure(self, package_digest: str) -> list[str]:
        """Extend the package digest unless it is already the last measurement; the log."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA
        with self._lock:
            if self.events and self.events[-1] == package_digest:
                return list(self.events)
            digest = bytes.fromhex(package_digest)
            self._ctx.pcr_extend(getattr(ESYS_TR, f"PCR{MEASUREMENT_PCR}"), TPML_DIGEST_VALUES(
                [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]))
            self.events = self.events + [package_digest]
            self._save_events(self.events)
            return list(self.events)

    # --- attestation ---------------------------------------------------------------------

    def quote(self, extra_data: bytes) -> tuple[bytes, bytes]:
        """(TPM2B_ATTEST, TPMT_SIGNATURE) over the measurement PCR with `extra_data`."""
        with self._lock:
            attest, signature = self._ctx.quote(self._ak, f"sha256:{MEASUREMENT_PCR}", extra_data)
            return attest.marshal(), signature.marshal()

    def activate_credential(self, id_object: bytes, encrypted_secret: bytes) -> bytes:
        """The secret a verifier encrypted for our EK and AK (TPM2_ActivateCredential)."""
        t = _pytss()
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
        from tpm2_pytss.types import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPMT_SYM_DEF
        blob, _ = TPM2B_ID_OBJECT.unmarshal(id_object)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        with self._lock:
            ctx = self._ctx
            # The EK's policy: PolicySecret with the endorsement hierarchy (TCG EK profile).
            session = ctx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                             TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
            try:
                ctx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                return bytes(ctx.activate_credential(self._ak, self._ek, blob, secret,
                                                     session1=ESYS_TR.PASSWORD, session2=session))
            except t.TSS2_Exception as e:
                raise TpmUnavailable(f"credential activation failed: {e}") from None
            finally:
                ctx.flush_context(session)

    def keys(self) -> dict:
        """What a joiner names in its hello: the EK and AK public areas (and EK certificate)."""
        keys = {"ek": self.ek_public.hex(), "ak": self.ak_public.hex()}
        if self.ek_certificate:
            keys["ek_certificate"] = self.ek_certificate.hex()
        return keys
