"""Dense matrix multiplication with numpy (FunctionBench matmul).

init() fills two size x size float64 matrices with small integers (0..96) from a seeded
splitmix64 stream computed in numpy (not numpy.random, whose streams may change between numpy
versions). Products of small integers are exact in float64 whatever the BLAS summation order,
so the checksum and hash of A @ B are the same on every machine.
"""

import hashlib

import numpy

GOLDEN = numpy.uint64(0x9E3779B97F4A7C15)
MIX_1 = numpy.uint64(0xBF58476D1CE4E5B9)
MIX_2 = numpy.uint64(0x94D049BB133111EB)
ENTRY_MODULUS = 97

_matrix_a = None
_matrix_b = None


def splitmix64(values):
    """splitmix64 of each element, in place on a uint64 array (wrapping arithmetic)."""
    values *= GOLDEN
    values ^= values >> numpy.uint64(30)
    values *= MIX_1
    values ^= values >> numpy.uint64(27)
    values *= MIX_2
    values ^= values >> numpy.uint64(31)
    return values


def seeded_matrix(size, stream):
    counters = numpy.arange(size * size, dtype=numpy.uint64) + numpy.uint64(stream << 32)
    return (splitmix64(counters) % numpy.uint64(ENTRY_MODULUS)).astype(numpy.float64).reshape(size, size)


def init(config):
    global _matrix_a, _matrix_b
    size, seed = config.get("size", 256), config.get("seed", 1)
    _matrix_a = seeded_matrix(size, 2 * seed)
    _matrix_b = seeded_matrix(size, 2 * seed + 1)


def handle(input):
    size = input.get("size", _matrix_a.shape[0])
    if not (isinstance(size, int) and 1 <= size <= _matrix_a.shape[0]):
        raise ValueError(f"size must be an integer in 1..{_matrix_a.shape[0]}")
    product = _matrix_a[:size, :size] @ _matrix_b[:size, :size]
    exact = product.astype("<i8")
    return {"size": size, "checksum": int(exact.sum()), "trace": int(numpy.trace(exact)),
            "sha256": hashlib.sha256(exact.tobytes()).hexdigest()}


def state():
    return [_matrix_a, _matrix_b]


def check(input, output):
    # Independent of BLAS: the trace recomputed with Python integers.
    size = input.get("size", _matrix_a.shape[0])
    a = _matrix_a[:size, :size].astype(int).tolist()
    b = _matrix_b[:size, :size].astype(int).tolist()
    trace = sum(sum(a[i][k] * b[k][i] for k in range(size)) for i in range(size))
    return [] if output.get("trace") == trace else [f"trace {output.get('trace')} != {trace}"]
