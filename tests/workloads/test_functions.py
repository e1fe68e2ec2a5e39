"""Every function's handle() output passes its checks, in-process (no runtime, no socket)."""

import hashlib
import shutil
import subprocess

import pytest

from conftest import WORKLOADS, function_names, python_function_names
from function_folder import check_output, import_function_module, load_function_folder, run_init

# Debian packages a function needs on the host; missing ones skip that function's tests.
REQUIRED_PACKAGES = {"pyaes": "python3-pyaes", "image_rotate": "python3-pil",
                     "matmul": "python3-numpy", "lookup_table": "python3-numpy", "weights_scan": "python3-numpy"}

# Inputs beyond the example, each run through the function's check().
MORE_INPUTS = {
    "helloworld": [{}, {"name": "Ada"}],
    "json_serdes": [{"records": 0}, {"records": 17, "rounds": 3}],
    "pyaes": [{"bytes": 1}, {"bytes": 1000, "nonce": 2**64}],
    "image_rotate": [{"degrees": 180}, {"degrees": 270, "grayscale": True}, {"degrees": 45}],
    "matmul": [{"size": 1}, {"size": 37}],
    "lookup_table": [{"keys": [0, 1, 2, 16777215]}, {"random": 0}, {"random": 50, "seed": 9}],
    "weights_scan": [{}, {"passes": 3}],
}
BAD_INPUTS = {
    "helloworld": {"name": 5},
    "json_serdes": {"records": -1},
    "pyaes": {"bytes": 0},
    "image_rotate": {"degrees": "ninety"},
    "matmul": {"size": 100_000},
    "lookup_table": {"keys": [16777216]},
    "weights_scan": {"passes": 0},
}

_loaded = {}


def loaded_function(name):
    """(folder, module) with init() done once per test session; skips if a library is missing."""
    if name not in _loaded:
        folder = load_function_folder(str(WORKLOADS / name))
        try:
            module = import_function_module(folder)
        except ImportError as error:
            pytest.skip(f"{name} needs {REQUIRED_PACKAGES.get(name, 'a library')} on the host ({error})")
        run_init(module, folder.config)
        _loaded[name] = (folder, module)
    return _loaded[name]


def test_every_function_folder_is_complete():
    names = function_names()
    assert {"helloworld", "json_serdes", "pyaes", "image_rotate", "matmul", "lookup_table"} <= set(names)
    assert "memops" in names
    for name in names:
        folder = load_function_folder(str(WORKLOADS / name))
        assert folder.description, f"{name}: function.toml has no description"
        assert isinstance(folder.example_input, dict), f"{name}: no [example] input"
        assert folder.example_expect, f"{name}: no [example.expect] fields"
        if folder.is_native:
            # Tested over its socket (test_memops.py); its sources are in the folder.
            assert folder.native_program and list((WORKLOADS / name).glob("*.c")), f"{name}: native, but no C source"
            continue
        assert name in MORE_INPUTS and name in BAD_INPUTS, f"{name}: add it to MORE_INPUTS and BAD_INPUTS"


@pytest.mark.parametrize("name", python_function_names())
def test_example_output_passes_checks(name):
    folder, module = loaded_function(name)
    output = module.handle(folder.example_input)
    assert check_output(folder, module, folder.example_input, output) == []
    # Deterministic: the same input gives the same output.
    assert module.handle(folder.example_input) == output


@pytest.mark.parametrize("name", python_function_names())
def test_more_inputs_pass_checks(name):
    folder, module = loaded_function(name)
    for input in MORE_INPUTS[name]:
        output = module.handle(input)
        assert check_output(folder, module, input, output) == [], input


@pytest.mark.parametrize("name", python_function_names())
def test_bad_input_is_refused(name):
    _, module = loaded_function(name)
    with pytest.raises(ValueError):
        module.handle(BAD_INPUTS[name])


def test_lookup_table_check_catches_a_wrong_value():
    folder, module = loaded_function("lookup_table")
    output = module.handle({"keys": [5, 6]})
    output["sample"][0][1] = "0" * 16
    assert check_output(folder, module, {"keys": [5, 6]}, output)


def test_weights_scan_reads_weights_it_cannot_write_and_its_check_catches_a_wrong_one():
    folder, module = loaded_function("weights_scan")
    with pytest.raises(ValueError):
        module.state()[0] = 1           # read-only after init: the pages a restore can share
    output = module.handle({})
    assert output["sum"] == folder.example_expect["sum"] and output["xor"] == folder.example_expect["xor"]
    output["sample"][1][1] = "0" * 16
    assert check_output(folder, module, {}, output)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_pyaes_expected_ciphertext_matches_openssl():
    # Independent of pyaes: the ciphertext hash in function.toml is what OpenSSL's AES-128-CTR
    # gives for the same key, counter and plaintext (so the check runs even without pyaes).
    import random
    folder = load_function_folder(str(WORKLOADS / "pyaes"))
    size, nonce = folder.example_input["bytes"], folder.example_input["nonce"]
    key = hashlib.sha256(b"snaptier pyaes key").digest()[:16]
    plaintext = random.Random(folder.config["seed"]).randbytes(folder.config["buffer_bytes"])[:size]
    ciphertext = subprocess.run(
        ["openssl", "enc", "-aes-128-ctr", "-K", key.hex(), "-iv", nonce.to_bytes(16, "big").hex()],
        input=plaintext, capture_output=True, check=True, timeout=10).stdout
    assert hashlib.sha256(plaintext).hexdigest() == folder.example_expect["plaintext_sha256"]
    assert hashlib.sha256(ciphertext).hexdigest() == folder.example_expect["ciphertext_sha256"]
