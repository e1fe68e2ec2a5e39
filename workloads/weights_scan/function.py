"""A read-everything function: 64 MiB of "weights" built at init, every invocation reads all of
them (a stand-in for inference over a model held in memory). Where lookup_table touches a few
pages per request, this one touches every page of its state once, read-only: the case where a
restore that maps the weights in place pays one page-table population per page (or per huge
page) on the first request, and a copying restore moves all of them first.

Entry i is splitmix64(i) (as in lookup_table), so no page is zero and every page differs. The
answer is the xor and the wrapping sum of all entries at a seeded stride offset, exact integer
arithmetic a reference can check in pure Python for the sampled entries.
"""

import numpy

GOLDEN = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
MASK_64 = (1 << 64) - 1
CHUNK = 1 << 20        # build in 8 MiB slices

_weights = None


def splitmix64(values):
    z = values * numpy.uint64(GOLDEN)
    for shift, multiplier in ((30, MIX_1), (27, MIX_2)):
        z ^= z >> numpy.uint64(shift)
        z *= numpy.uint64(multiplier)
    return z ^ (z >> numpy.uint64(31))


def entry_value(key):
    z = (key * GOLDEN) & MASK_64
    z = ((z ^ (z >> 30)) * MIX_1) & MASK_64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK_64
    return z ^ (z >> 31)


def init(config):
    global _weights
    entries = config.get("weights_mib", 64) * (1 << 20) // 8
    _weights = numpy.empty(entries, dtype=numpy.uint64)
    for start in range(0, entries, CHUNK):
        end = min(start + CHUNK, entries)
        _weights[start:end] = splitmix64(numpy.arange(start, end, dtype=numpy.uint64))
    _weights.flags.writeable = False   # read-only from here: the state a restore can share


def handle(input):
    passes = input.get("passes", 1)
    if not (isinstance(passes, int) and 1 <= passes <= 16):
        raise ValueError("passes must be an integer in 1..16")
    with numpy.errstate(over="ignore"):
        total = numpy.uint64(0)
        xor = numpy.uint64(0)
        for _ in range(passes):
            total = _weights.sum(dtype=numpy.uint64)
            xor = numpy.bitwise_xor.reduce(_weights)
    sample = [0, len(_weights) // 3, len(_weights) - 1]
    return {"entries": len(_weights), "sum": f"{int(total):016x}", "xor": f"{int(xor):016x}",
            "sample": [[i, f"{int(_weights[i]):016x}"] for i in sample]}


def state():
    return _weights


def check(input, output):
    return [f"entry {i}: {value} != {entry_value(i):016x}"
            for i, value in output.get("sample", []) if value != f"{entry_value(i):016x}"]
