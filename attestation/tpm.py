"""TPM 2.0 evidence, appraised without a TPM: structures, quotes, credentials, event logs.

What a TPM adds to a node's evidence (Keylime's model, RFC 9334 terms):
- an attestation key (AK) that never leaves the TPM: a restricted signing key, so anything it
  signs that starts with TPM_GENERATED was made by the TPM itself, never by software;
- the AK bound to the endorsement key (EK) by credential activation (TPM 2.0 Part 1, 24):
  the verifier encrypts a secret to the EK for the AK's name; only the TPM holding both keys
  can recover it, so the AK is proven resident in that TPM;
- a quote: the TPM's signature over the values of the measurement PCR and the verifier's
  nonce, so the measurements are fresh and were extended into that TPM;
- the event log: every digest meshd extended into the PCR since the TPM was reset. Replaying
  it must give the quoted PCR value; its last entry is the code that runs now.

The measurement PCR is 23, the application-support PCR of the TCG PC Client profile: no
firmware, boot loader or kernel extends it, so its log is meshd's alone.

Limits, said where they apply: meshd measures its own files before extending (as an IMA
policy would, had it measured them); a PCR can only be extended, never set, so a value that
a log cannot explain exposes any other writer.

Invariants:
- Pure: no I/O, no clock, no TPM. Randomness (the credential seed) is passed in.
- Every parser takes untrusted bytes and returns a value or raises TpmError with a reason;
  trailing bytes, short reads, unknown algorithms are reasons, never other exceptions.
- `appraise_quote` returns every reason it finds; an empty list means the quote verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from attestation.signed import AttestationError

try:  # TPM credentials use AES-CFB, which cryptography now files under "decrepit"
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # cryptography < 44
    CFB = modes.CFB

# TCG PC Client Platform Firmware Profile: PCR 23 is for application support; see header.
MEASUREMENT_PCR = 23
PCR_SIZE = 32  # the SHA-256 bank
PCR_INITIAL = bytes(PCR_SIZE)  # PCRs 0-15 and 23 start at zero after a TPM reset
MAX_STRUCTURE = 4096  # every TPM2B a TPM marshals for us fits (TPM2B_PUBLIC of RSA 4096 < 700)
CREDENTIAL_SIZE = 32  # bytes of secret in a credential challenge (a SHA-256 digest's size)

# Algorithm ids (TPM 2.0 Part 2, 6.3) and attributes (8.3).
ALG_RSA, ALG_ECC, ALG_SHA256, ALG_NULL = 0x0001, 0x0023, 0x000B, 0x0010
ALG_AES, ALG_CFB = 0x0006, 0x0043
ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA, ALG_ECDAA = 0x0014, 0x0016, 0x0018, 0x001A
ECC_NIST_P256, ECC_NIST_P384 = 0x0003, 0x0004
ATTR_FIXED_TPM, ATTR_FIXED_PARENT, ATTR_SENSITIVE_DATA_ORIGIN = 0x2, 0x10, 0x20
ATTR_RESTRICTED, ATTR_DECRYPT, ATTR_SIGN = 0x10000, 0x20000, 0x40000
AK_REQUIRED = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN | ATTR_RESTRICTED | ATTR_SIGN
EK_REQUIRED = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN | ATTR_RESTRICTED | ATTR_DECRYPT
TPM_GENERATED = 0xFF544347  # "\xffTCG": only a TPM writes this into what a restricted key signs
ST_ATTEST_QUOTE = 0x8018
QUOTE_CONTEXT = b"meshd tpm quote v1\0"  # domain separation of the nonce binding


class TpmError(AttestationError):
    pass


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TpmError(f"{self.what}: truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def sized(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        if self.pos != len(self.data):
            raise TpmError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _sized(data: bytes) -> bytes:
    """Marshal `data` as a TPM2B: a big-endian 16-bit size, then the bytes."""
    return struct.pack(">H", len(data)) + data


def _sized_whole(data: object, what: str) -> bytes:
    """The contents of one TPM2B that must span all of `data`."""
    if not isinstance(data, (bytes, bytearray)) or not 2 <= len(data) <= MAX_STRUCTURE:
        raise TpmError(f"{what}: must be 2 to {MAX_STRUCTURE} bytes")
    reader = _Reader(bytes(data), what)
    inner = reader.sized()
    reader.done()
    return inner


@dataclass(frozen=True)
class TpmPublic:
    """A TPMT_PUBLIC: an RSA or ECC key held by a TPM."""
    area: bytes  # the marshaled TPMT_PUBLIC, what the name is computed over
    key_type: int
    name_alg: int
    attributes: int
    symmetric: tuple[int, int, int]  # (algorithm, key bits, mode); (ALG_NULL, 0, 0) for none
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def name(self) -> bytes:
        """TPM 2.0 Part 1, 16: nameAlg followed by the digest of the public area."""
        return struct.pack(">H", self.name_alg) + hashlib.sha256(self.area).digest()


def parse_public(data: object, what: str = "TPM public key") -> TpmPublic:
    """A TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC) as a TPM marshals it."""
    area = _sized_whole(data, what)
    r = _Reader(area, what)
    key_type, name_alg, attributes = r.u16(), r.u16(), r.u32()
    if name_alg != ALG_SHA256:
        raise TpmError(f"{what}: name algorithm {name_alg:#06x} is not SHA-256")
    r.sized()  # authPolicy
    symmetric = (r.u16(), 0, 0)
    if symmetric[0] != ALG_NULL:
        symmetric = (symmetric[0], r.u16(), r.u16())
    scheme = r.u16()
    if scheme != ALG_NULL:
        r.u16()  # the scheme's hash
        if scheme == ALG_ECDAA:
            raise TpmError(f"{what}: ECDAA keys are not supported")
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if key_type == ALG_RSA:
        bits, exponent = r.u16(), r.u32()
        modulus = r.sized()
        if bits not in (2048, 3072, 4096) or len(modulus) * 8 != bits:
            raise TpmError(f"{what}: RSA modulus of {len(modulus) * 8} bits")
        key = rsa.RSAPublicNumbers(exponent or 65537, int.from_bytes(modulus, "big")).public_key()
    elif key_type == ALG_ECC:
        curve_id = r.u16()
        kdf = r.u16()
        if kdf != ALG_NULL:
            r.u16()
        x, y = r.sized(), r.sized()
        curves = {ECC_NIST_P256: ec.SECP256R1(), ECC_NIST_P384: ec.SECP384R1()}
        if curve_id not in curves:
            raise TpmError(f"{what}: curve {curve_id:#06x} is not NIST P-256 or P-384")
        try:
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                curves[curve_id]).public_key()
        except ValueError:
            raise TpmError(f"{what}: the point is not on the curve") from None
    else:
        raise TpmError(f"{what}: key type {key_type:#06x} is neither RSA nor ECC")
    r.done()
    return TpmPublic(area, key_type, name_alg, attributes, symmetric, key)


def check_attestation_key(ak: TpmPublic) -> list[str]:
    """What makes a key fit to sign quotes: restricted signing, created inside the TPM and
    unable to leave it. A key lacking any of these could sign forged quotes."""
    missing = AK_REQUIRED & ~ak.attributes
    reasons = [f"attestation key lacks required attributes {missing:#x} (fixedTPM, fixedParent, "
               "sensitiveDataOrigin, restricted, sign)"] if missing else []
    if ak.attributes & ATTR_DECRYPT:
        reasons.append("attestation key is also a decryption key")
    return reasons


def check_endorsement_key(ek: TpmPublic) -> list[str]:
    reasons = []
    if EK_REQUIRED & ~ek.attributes:
        reasons.append("endorsement key is not a restricted decryption key fixed to its TPM")
    if ek.key_type != ALG_RSA or ek.symmetric != (ALG_AES, 128, ALG_CFB):
        reasons.append("endorsement key must be the TCG default RSA 2048 EK (AES-128-CFB)")
    return reasons


@dataclass(frozen=True)
class Quote:
    attest: bytes  # the TPMS_ATTEST bytes the signature covers
    extra_data: bytes
    pcr_selection: tuple[tuple[int, tuple[int, ...]], ...]  # ((hash alg, (pcr, ...)), ...)
    pcr_digest: bytes


def parse_quote(data: object) -> Quote:
    """A TPM2B_ATTEST holding a TPMS_ATTEST of type quote."""
    attest = _sized_whole(data, "TPM quote")
    r = _Reader(attest, "TPM quote")
    if r.u32() != TPM_GENERATED:
        raise TpmError("TPM quote: not generated by a TPM (magic)")
    if r.u16() != ST_ATTEST_QUOTE:
        raise TpmError("TPM quote: the attestation is not a quote")
    r.sized()  # qualifiedSigner
    extra_data = r.sized()
    r.take(8 + 4 + 4 + 1)  # clockInfo: clock, resetCount, restartCount, safe
    r.u64()  # firmwareVersion
    selection = []
    count = r.u32()
    if count > 16:
        raise TpmError("TPM quote: too many PCR banks")
    for _ in range(count):
        alg, size = r.u16(), r.u8()
        if size > 8:
            raise TpmError("TPM quote: PCR select bitmap too long")
        bitmap = r.take(size)
        selection.append((alg, tuple(i for i in range(size * 8) if bitmap[i // 8] >> (i % 8) & 1)))
    pcr_digest = r.sized()
    r.done()
    return Quote(attest, extra_data, tuple(selection), pcr_digest)


def verify_quote_signature(ak: TpmPublic, quote: Quote, signature: object) -> bool:
    """A TPMT_SIGNATURE over the quote by the attestation key (ECDSA or RSASSA/PSS, SHA-256)."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) > MAX_STRUCTURE:
        return False
    try:
        r = _Reader(bytes(signature), "TPM signature")
        sig_alg, hash_alg = r.u16(), r.u16()
        if hash_alg != ALG_SHA256:
            return False
        if sig_alg == ALG_ECDSA and isinstance(ak.key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(int.from_bytes(r.sized(), "big"), int.from_bytes(r.sized(), "big"))
            r.done()
            ak.key.verify(der, quote.attest, ec.ECDSA(hashes.SHA256()))
        elif sig_alg in (ALG_RSASSA, ALG_RSAPSS) and isinstance(ak.key, rsa.RSAPublicKey):
            raw = r.sized()
            r.done()
            pad = padding.PKCS1v15() if sig_alg == ALG_RSASSA else padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            ak.key.verify(raw, quote.attest, pad, hashes.SHA256())
        else:
            return False
    except (TpmError, InvalidSignature, ValueError):
        return False
    return True


def quote_data(nonce_hex: str, node_id: str) -> bytes:
    """What a quote must carry as extraData: the verifier's nonce and the node it asked."""
    return hashlib.sha256(QUOTE_CONTEXT + bytes.fromhex(nonce_hex) + node_id.encode()).digest()


def replay(events: list[bytes]) -> bytes:
    """The PCR value after extending each event digest in order from the initial value:
    new = H(old || digest)."""
    value = PCR_INITIAL
    for digest in events:
        value = hashlib.sha256(value + digest).digest()
    return value


def pcr_selection_digest(pcr_values: list[bytes]) -> bytes:
    """What a quote's pcrDigest is: the hash of the selected PCR values concatenated."""
    return hashlib.sha256(b"".join(pcr_values)).digest()


def appraise_quote(ak: TpmPublic, quote_bytes: object, signature: object, events: list[str], nonce_hex: str,
                   node_id: str, package_digest: str) -> list[str]:
    """Reasons the quote does not vouch for this evidence; empty when it does."""
    try:
        quote = parse_quote(quote_bytes)
    except TpmError as e:
        return [str(e)]
    reasons = []
    if not verify_quote_signature(ak, quote, signature):
        return ["TPM quote signature does not verify with the node's attestation key"]
    if not hmac.compare_digest(quote.extra_data, quote_data(nonce_hex, node_id)):
        reasons.append("TPM quote is not bound to this challenge (replayed quote, or another nonce)")
    if quote.pcr_selection != ((ALG_SHA256, (MEASUREMENT_PCR,)),):
        reasons.append(f"TPM quote does not cover exactly sha256 PCR {MEASUREMENT_PCR}")
    if not events:
        reasons.append("TPM event log is empty: meshd's measurement was never extended")
    elif events[-1] != package_digest:
        reasons.append("TPM event log's last measurement is not the package digest the evidence claims")
    digests = [bytes.fromhex(e) for e in events]
    if quote.pcr_digest != pcr_selection_digest([replay(digests)]):
        reasons.append(f"TPM quote is over PCR {MEASUREMENT_PCR} values the event log does not explain "
                       "(something else extended the PCR, or the log was altered)")
    return reasons


# --- credential activation (TPM 2.0 Part 1, 24; Part 2, 11.4.10) -------------------------------

def _kdfa(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    return KBKDFHMAC(algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
                     location=CounterLocation.BeforeFixed, label=label, context=context, fixed=None).derive(key)


def make_credential(ek: TpmPublic, ak_name: bytes, credential: bytes, seed: bytes) -> tuple[bytes, bytes]:
    """(TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) that only the TPM holding `ek` and the key
    named `ak_name` can open with ActivateCredential. `seed`: 32 fresh random bytes."""
    unfit = check_endorsement_key(ek)
    if unfit:
        raise TpmError("; ".join(unfit))
    if len(seed) != 32 or not 1 <= len(credential) <= CREDENTIAL_SIZE:
        raise TpmError("credential: seed must be 32 bytes, the secret 1 to 32")
    assert isinstance(ek.key, rsa.RSAPublicKey)
    encrypted_seed = ek.key.encrypt(seed, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                                       label=b"IDENTITY\0"))
    sym_key = _kdfa(seed, b"STORAGE", ak_name, 128)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_sized(credential)) + encryptor.finalize()
    hmac_key = _kdfa(seed, b"INTEGRITY", b"", 256)
    outer = hmac.new(hmac_key, enc_identity + ak_name, hashlib.sha256).digest()
    return _sized(_sized(outer) + enc_identity), _sized(encrypted_seed)
