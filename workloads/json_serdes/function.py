"""JSON serialization and parsing of a generated document (FunctionBench json_serdes).

init() builds a list of customer-like records from a seeded generator; each invocation
serializes the document, parses it back, verifies the round trip and returns the size and a
hash of the text. Same seed, same document, same bytes on every Python version (random.Random
with integer seeds and json with sorted keys are stable).
"""

import hashlib
import json
import random

CITIES = ["Lisbon", "Oslo", "Kyoto", "Austin", "Nairobi", "Lima", "Perth", "Tallinn"]
TAGS = ["new", "vip", "churn-risk", "beta", "eu", "us", "apac", "wholesale", "retail"]

_document = []


def make_record(generator, record_id):
    first = "".join(generator.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
    return {
        "id": record_id,
        "name": first.capitalize(),
        "email": f"{first}{record_id}@example.org",
        "active": generator.random() < 0.7,
        "score": round(generator.random() * 100.0, 3),
        "tags": generator.sample(TAGS, generator.randint(1, 4)),
        "address": {"street": f"{generator.randint(1, 999)} Main St",
                    "city": generator.choice(CITIES),
                    "zip": f"{generator.randint(0, 99999):05d}"},
        "orders": [generator.randint(1, 10_000) for _ in range(generator.randint(0, 5))],
    }


def init(config):
    global _document
    generator = random.Random(config.get("seed", 42))
    _document = [make_record(generator, record_id) for record_id in range(config.get("records", 2000))]


def serialize(records):
    return json.dumps(records, sort_keys=True, separators=(",", ":"))


def handle(input):
    count = input.get("records", len(_document))
    rounds = input.get("rounds", 1)
    if not (isinstance(count, int) and 0 <= count <= len(_document)):
        raise ValueError(f"records must be an integer in 0..{len(_document)}")
    if not (isinstance(rounds, int) and 1 <= rounds <= 100):
        raise ValueError("rounds must be an integer in 1..100")
    records = _document[:count]
    for _ in range(rounds):
        text = serialize(records)
        parsed = json.loads(text)
        if parsed != records:
            raise RuntimeError("parsed document differs from the original")
    return {"records": count, "rounds": rounds, "bytes": len(text.encode()),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def state():
    return serialize(_document).encode()


def check(input, output):
    problems = []
    if output.get("records") != input.get("records", len(_document)):
        problems.append(f"records {output.get('records')} != requested")
    if not (isinstance(output.get("sha256"), str) and len(output["sha256"]) == 64):
        problems.append("sha256 is not a hex digest")
    if not output.get("bytes", 0) > 0 and output.get("records"):
        problems.append("empty serialization")
    return problems
