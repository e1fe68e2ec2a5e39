"""A large-heap function: a 128 MiB lookup table built at init, point lookups per invocation.

Stands in for functions whose state dwarfs their per-request work (model weights, indexes,
caches). Entry i is splitmix64(i): every page differs from every other and none is zero, so a
snapshot's page classification sees 128 MiB of real data. A request for N random keys touches
about N distinct pages, the access pattern that lazy restore (userfaultfd) and tiering study.
"""

import random

import numpy

GOLDEN = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
MASK_64 = (1 << 64) - 1
BUILD_CHUNK_ENTRIES = 1 << 20   # build in 8 MiB slices: temporaries stay small
SAMPLE_SIZE = 8
MAX_KEYS_PER_REQUEST = 1_000_000

_table = None


def entry_value(key):
    """The table's value for key, in pure Python (the reference the checks use)."""
    z = (key * GOLDEN) & MASK_64
    z = ((z ^ (z >> 30)) * MIX_1) & MASK_64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK_64
    return z ^ (z >> 31)


def hex64(value):
    return f"{value:016x}"


def build_table(entries):
    table = numpy.empty(entries, dtype=numpy.uint64)
    shifted = numpy.empty(BUILD_CHUNK_ENTRIES, dtype=numpy.uint64)
    for start in range(0, entries, BUILD_CHUNK_ENTRIES):
        z = table[start:start + BUILD_CHUNK_ENTRIES]
        scratch = shifted[:len(z)]
        z[:] = numpy.arange(start, start + len(z), dtype=numpy.uint64)
        z *= numpy.uint64(GOLDEN)
        for shift, multiplier in ((30, MIX_1), (27, MIX_2)):
            numpy.right_shift(z, numpy.uint64(shift), out=scratch)
            z ^= scratch
            z *= numpy.uint64(multiplier)
        numpy.right_shift(z, numpy.uint64(31), out=scratch)
        z ^= scratch
    return table


def init(config):
    global _table
    _table = build_table(config.get("table_mib", 128) * (1 << 20) // 8)


def handle(input):
    if "keys" in input:
        keys = input["keys"]
        if not (isinstance(keys, list) and all(isinstance(key, int) and 0 <= key < len(_table) for key in keys)):
            raise ValueError(f"keys must be a list of integers in 0..{len(_table) - 1}")
    else:
        count = input.get("random", 1000)
        if not (isinstance(count, int) and 0 <= count <= MAX_KEYS_PER_REQUEST):
            raise ValueError(f"random must be an integer in 0..{MAX_KEYS_PER_REQUEST}")
        generator = random.Random(input.get("seed", 1))
        keys = [generator.randrange(len(_table)) for _ in range(count)]
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise ValueError(f"at most {MAX_KEYS_PER_REQUEST} keys per request")
    values = _table[numpy.array(keys, dtype=numpy.int64)]
    xor = int(numpy.bitwise_xor.reduce(values)) if len(keys) else 0
    # 64-bit values as hex strings: JSON numbers above 2**53 (and TOML's above 2**63) are not portable.
    return {"count": len(keys), "table_entries": len(_table), "xor": hex64(xor),
            "sample": [[key, hex64(int(value))] for key, value in zip(keys[:SAMPLE_SIZE], values[:SAMPLE_SIZE])]}


def state():
    return _table


def check(input, output):
    problems = [f"entry {key}: {value} != {hex64(entry_value(key))}"
                for key, value in output.get("sample", []) if value != hex64(entry_value(key))]
    if "keys" in input:
        expected_xor = 0
        for key in input["keys"]:
            expected_xor ^= entry_value(key)
        if output.get("xor") != hex64(expected_xor):
            problems.append(f"xor {output.get('xor')} != {hex64(expected_xor)}")
    return problems
