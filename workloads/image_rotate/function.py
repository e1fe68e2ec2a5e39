"""Image rotation with Pillow (FunctionBench image_rotate / SeBS thumbnailer's cousin).

init() generates an RGB image from a seeded generator (noise: the same bytes on every Pillow
version, unlike drawn shapes); each invocation rotates it and returns the new size and a
SHA-256 of the raw pixels. Multiples of 90 degrees are exact transposes, so their hashes are
stable across Pillow versions; other angles resample and may differ between versions.
"""

import hashlib
import random

from PIL import Image

_image = None


def init(config):
    global _image
    width, height = config.get("width", 512), config.get("height", 384)
    pixels = random.Random(config.get("seed", 3)).randbytes(width * height * 3)
    _image = Image.frombytes("RGB", (width, height), pixels)
    _image.load()


def handle(input):
    degrees = input.get("degrees", 90)
    if not isinstance(degrees, (int, float)):
        raise ValueError("degrees must be a number")
    rotated = _image.rotate(degrees, expand=True)
    if input.get("grayscale", False):
        rotated = rotated.convert("L")
    return {"degrees": degrees, "width": rotated.width, "height": rotated.height,
            "mode": rotated.mode, "sha256": hashlib.sha256(rotated.tobytes()).hexdigest()}


def state():
    return _image.tobytes()


def check(input, output):
    problems = []
    degrees = input.get("degrees", 90)
    width, height = _image.size if _image is not None else (None, None)
    if width is not None and degrees % 180 == 90:
        width, height = height, width
    if width is not None and degrees % 90 == 0 and (output.get("width"), output.get("height")) != (width, height):
        problems.append(f"size {output.get('width')}x{output.get('height')} != {width}x{height}")
    if not (isinstance(output.get("sha256"), str) and len(output["sha256"]) == 64):
        problems.append("sha256 is not a hex digest")
    return problems
