"""A function folder: function.py (or an executable `run`) plus function.toml.

function.toml keys (all optional except description):
    description = "one line"
    [config]            # passed to init(config); start-function --config overrides keys
    [example]
    input = {...}       # a request input that exercises the function
    [example.expect]    # output fields that must equal these values for the example input

This module reads that metadata and checks outputs against it without importing function.py,
so a client (bin/invoke --check) stays light; check_output() additionally runs the module's own
check(input, output) when a caller has imported it.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import tomllib
from dataclasses import dataclass, field
from types import ModuleType

FUNCTION_MODULE = "function.py"
FUNCTION_METADATA = "function.toml"
NATIVE_ENTRY_POINT = "run"
# function.toml's `native = "PROGRAM"`: a program the project's CMake build makes from the
# folder; workloads/bin/start-function says where it is found and how it is started.
NATIVE_PROGRAM_KEY = "native"


@dataclass
class FunctionFolder:
    path: str
    name: str
    description: str
    config: dict = field(default_factory=dict)
    example_input: dict | None = None
    example_expect: dict = field(default_factory=dict)
    native_program: str | None = None

    @property
    def module_path(self) -> str:
        return os.path.join(self.path, FUNCTION_MODULE)

    @property
    def is_native(self) -> bool:
        """Served by its own program (built, or an executable `run`), not by function.py."""
        return self.native_program is not None or os.access(os.path.join(self.path, NATIVE_ENTRY_POINT), os.X_OK)


def load_function_folder(path: str) -> FunctionFolder:
    path = os.path.abspath(path)
    metadata_path = os.path.join(path, FUNCTION_METADATA)
    if not os.path.isfile(metadata_path):
        raise FileNotFoundError(f"{path} is not a function folder: no {FUNCTION_METADATA}")
    with open(metadata_path, "rb") as metadata_file:
        metadata = tomllib.load(metadata_file)
    example = metadata.get("example", {})
    return FunctionFolder(
        path=path,
        name=metadata.get("name", os.path.basename(path)),
        description=metadata.get("description", ""),
        config=dict(metadata.get("config", {})),
        example_input=example.get("input"),
        example_expect=dict(example.get("expect", {})),
        native_program=metadata.get(NATIVE_PROGRAM_KEY),
    )


def import_function_module(folder: FunctionFolder) -> ModuleType:
    """Import function.py under a name unique to the folder (several may be loaded in tests)."""
    module_name = f"snaptier_function_{folder.name}"
    spec = importlib.util.spec_from_file_location(module_name, folder.module_path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {folder.module_path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_init(module: ModuleType, config: dict) -> None:
    """The module's init(config), or init() if it takes no configuration, or nothing."""
    init = getattr(module, "init", None)
    if init is None:
        return
    if inspect.signature(init).parameters:
        init(dict(config))
    else:
        init()


def check_expected(folder: FunctionFolder, output: dict) -> list[str]:
    """Problems with an output for the example input, against [example.expect]."""
    problems = []
    for key, expected in folder.example_expect.items():
        if key not in output:
            problems.append(f"{folder.name}: output has no field {key!r}")
        elif output[key] != expected:
            problems.append(f"{folder.name}: {key} = {output[key]!r}, expected {expected!r}")
    return problems


def check_output(folder: FunctionFolder, module: ModuleType | None, input: dict,
                 output: dict) -> list[str]:
    """All problems with output for input: [example.expect] if input is the example input,
    then the module's check(input, output) if it has one."""
    problems = []
    if folder.example_input is not None and input == folder.example_input:
        problems += check_expected(folder, output)
    module_check = getattr(module, "check", None) if module is not None else None
    if module_check is not None:
        problems += [f"{folder.name}: {problem}" for problem in (module_check(input, output) or [])]
    return problems
