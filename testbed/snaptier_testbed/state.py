"""Where a running topology keeps its files, and the record of what `up` started."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def state_dir_for(topology_name: str) -> Path:
    base = Path(os.environ.get("SNAPTIER_STATE", REPO / "run"))
    return base / topology_name


@dataclass
class TestbedState:
    topology: str              # path of the topology file that was brought up
    name: str
    boot_id: str
    accel: str
    image_dir: str
    ssh_ports: dict[str, int] = field(default_factory=dict)
    # Hosts on another machine: [ssh destination, port or None] of the machine whose loopback
    # their forwarded ssh port listens on (libvirt topologies on several machines).
    ssh_via: dict[str, list] = field(default_factory=dict)
    switches: dict[str, int] = field(default_factory=dict)   # link name -> vde_switch pid
    started_unix: float = 0.0
    backend: str = "qemu"
    netns: list[str] = field(default_factory=list)           # native: network namespaces `up` made

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / "state.json"

    def save(self, state_dir: Path) -> None:
        tmp = state_dir / ".state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(self.path(state_dir))

    @classmethod
    def load(cls, state_dir: Path) -> "TestbedState | None":
        try:
            return cls(**json.loads(cls.path(state_dir).read_text()))
        except (OSError, ValueError, TypeError):
            return None
