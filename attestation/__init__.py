"""Remote attestation for meshd: evidence, reference values, verification and certificates.

Pure: no I/O. The verifier takes `now` as an argument.
"""
