"""AES-128 in CTR mode in pure Python (python3-pyaes; FunctionBench pyaes).

init() derives the key from a fixed string and generates the plaintext buffer from a seeded
generator; each invocation encrypts a prefix of it with a fresh counter, decrypts the result
and verifies the round trip. The ciphertext hash is checkable against any AES-CTR
implementation (e.g. `openssl enc -aes-128-ctr`, see tests/workloads).
"""

import hashlib
import random

import pyaes

KEY_SOURCE = b"snaptier pyaes key"

_key = b""
_plaintext = b""


def init(config):
    global _key, _plaintext
    _key = hashlib.sha256(KEY_SOURCE).digest()[:16]
    _plaintext = random.Random(config.get("seed", 7)).randbytes(config.get("buffer_bytes", 65536))


def ctr_cipher(nonce):
    # The counter starts at nonce (a 128-bit big-endian block), as in openssl's -iv.
    return pyaes.AESModeOfOperationCTR(_key, counter=pyaes.Counter(initial_value=nonce))


def handle(input):
    size = input.get("bytes", 4096)
    nonce = input.get("nonce", 1)
    if not (isinstance(size, int) and 0 < size <= len(_plaintext)):
        raise ValueError(f"bytes must be an integer in 1..{len(_plaintext)}")
    if not (isinstance(nonce, int) and 0 <= nonce < 2**128):
        raise ValueError("nonce must be an integer in 0..2**128-1")
    plaintext = _plaintext[:size]
    ciphertext = ctr_cipher(nonce).encrypt(plaintext)
    if ctr_cipher(nonce).decrypt(ciphertext) != plaintext:
        raise RuntimeError("decryption did not give back the plaintext")
    return {"bytes": size, "nonce": nonce, "roundtrip_ok": True,
            "plaintext_sha256": hashlib.sha256(plaintext).hexdigest(),
            "ciphertext_sha256": hashlib.sha256(ciphertext).hexdigest()}


def state():
    return [_key, _plaintext]


def check(input, output):
    problems = []
    if output.get("roundtrip_ok") is not True:
        problems.append("roundtrip_ok is not true")
    if output.get("bytes") != input.get("bytes", 4096):
        problems.append(f"bytes {output.get('bytes')} != requested")
    if output.get("plaintext_sha256") == output.get("ciphertext_sha256"):
        problems.append("ciphertext equals plaintext")
    return problems
