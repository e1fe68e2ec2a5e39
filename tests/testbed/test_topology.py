"""The topology parser: what a user writes, what they get, and how bad files are refused."""
import ipaddress
import textwrap

import pytest

from snaptier_testbed.topology import (GiB, MiB, TopologyError, load_topology, max_cxl_hosts, parse_size,
                                      parse_topology)
from conftest import REPO

BASE = {
    "name": "t",
    "host": [
        {"name": "a", "role": "compute"},
        {"name": "b", "role": "compute", "memory": "1G", "cpus": 2},
        {"name": "m", "role": "memory", "pool": "256M"},
    ],
    "cxl": [{"name": "c0", "size": "512M", "hosts": ["a", "b"]}],
    "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "b", "m"]}],
}


def variant(**changes):
    import copy
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        target = doc
        parts = path.split("__")
        for p in parts[:-1]:
            target = target[int(p)] if p.isdigit() else target[p]
        last = parts[-1]
        if value is KeyError:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return doc


def test_default_topology_is_two_compute_hosts_sharing_cxl_and_a_memory_node():
    t = load_topology(REPO / "testbed/topologies/default.toml")
    assert [h.name for h in t.hosts] == ["host0", "host1", "mem0"]
    assert [h.role for h in t.hosts] == ["compute", "compute", "memory"]
    assert t.cxl[0].hosts == ("host0", "host1") and t.cxl[0].emulation == "type3"
    assert t.links[0].rdma and set(t.links[0].hosts) == {"host0", "host1", "mem0"}
    assert t.host("mem0").pool == 1 * GiB


def test_defaults_and_typed_values():
    t = parse_topology(BASE)
    a, b, m = t.hosts
    assert (a.cpus, a.memory) == (1, 2 * GiB)
    assert (b.cpus, b.memory) == (2, 1 * GiB)
    assert m.pool == 256 * MiB and a.pool == 0
    assert t.accel == "auto"
    assert t.cxl_of("a").size == 512 * MiB and t.cxl_of("m") is None
    assert t.links[0].address_of("m") == ipaddress.IPv4Interface("10.9.0.3/24")


@pytest.mark.parametrize("text,expected", [("512M", 512 * MiB), ("2G", 2 * GiB), ("1GiB", GiB), ("4096", 4096),
                                           (8192, 8192), ("1T", 1 << 40), ("64k", 64 << 10)])
def test_sizes(text, expected):
    assert parse_size(text, "k") == expected


@pytest.mark.parametrize("text", ["", "12X", "-1G", "0", 0, True, 1.5, "G"])
def test_bad_sizes_are_refused_with_the_key(text):
    with pytest.raises(TopologyError, match="^k:"):
        parse_size(text, "k")


@pytest.mark.parametrize("doc,message", [
    (variant(colour="blue"), r"topology: unknown key 'colour'"),
    (variant(host__0__disk="1G"), r"host\[0\]: unknown key 'disk'"),
    (variant(cxl__0__mode="x"), r"cxl\[0\]: unknown key 'mode'"),
    (variant(host__1__name="a"), r"host\[1\]\.name: host name 'a' is used twice"),
    (variant(host__0__role="gpu"), r"host\[0\]\.role: 'gpu' is not one of"),
    (variant(host__0__name="Host_0"), r"host\[0\]\.name: 'Host_0' is not a valid name"),
    (variant(host__0__memory="100T"), r"host\[0\]\.memory: .* is impossible"),
    (variant(host__0__memory="1M"), r"host\[0\]\.memory: .* is impossible"),
    (variant(host__0__cpus=0), r"host\[0\]\.cpus: 0 is out of range"),
    (variant(host__0__cpus="2"), r"host\[0\]\.cpus: expected a whole number"),
    (variant(host__2__pool="4G"), r"host\[2\]\.pool: .* does not fit"),
    (variant(host__0__pool="1G"), r"host\[0\]\.pool: only hosts with role 'memory'"),
    (variant(cxl__0__size="300M"), r"cxl\[0\]\.size: .* is impossible"),
    (variant(cxl__0__size="0"), r"cxl\[0\]\.size: size must be positive"),
    (variant(cxl__0__emulation="cxl3"), r"cxl\[0\]\.emulation: 'cxl3' is not one of"),
    (variant(cxl__0__hosts=["a", "zz"]), r"cxl\[0\]\.hosts\[1\]: no host named 'zz'"),
    (variant(cxl__0__hosts=["a", "a"]), r"cxl\[0\]\.hosts\[1\]: host 'a' listed twice"),
    (variant(cxl__0__hosts=[]), r"cxl\[0\]\.hosts: expected a non-empty list"),
    (variant(cxl__0__backing="rel/path"), r"cxl\[0\]\.backing: must be an absolute path"),
    (variant(link__0__subnet="10.9.0.1/24"), r"link\[0\]\.subnet: .* is not an IPv4 network"),
    (variant(link__0__subnet="10.0.2.0/24"), r"overlaps 10.0.2.0/24"),
    (variant(link__0__subnet="10.9.0.0/30"), r"link\[0\]\.subnet: prefix /30 is out of range"),
    (variant(link__0__rdma="yes"), r"link\[0\]\.rdma: expected true or false"),
    (variant(link__0__hosts=["a", "b"]), r"host 'm': a memory node needs a link with rdma = true"),
    (variant(host=[]), r"at least one \[\[host\]\]"),
    (variant(accel="hvf"), r"accel: 'hvf' is not one of"),
    (variant(host__0__name=KeyError), r"host\[0\]: missing required key 'name'"),
    (variant(cxl__0__size=KeyError), r"cxl\[0\]: missing required key 'size'"),
])
def test_bad_topologies_name_the_key(doc, message):
    with pytest.raises(TopologyError, match=message):
        parse_topology(doc)


def test_a_host_attaches_one_cxl_device_and_one_link():
    doc = variant()
    doc["cxl"].append({"name": "c1", "size": "256M", "hosts": ["b"]})
    with pytest.raises(TopologyError, match=r"cxl\[1\]\.hosts: host 'b' already attaches 'c0'"):
        parse_topology(doc)
    doc = variant()
    doc["link"].append({"name": "l1", "subnet": "10.8.0.0/24", "hosts": ["a"]})
    with pytest.raises(TopologyError, match=r"link\[1\]\.hosts: host 'a' is already on link 'l0'"):
        parse_topology(doc)


def test_a_cxl_device_has_at_most_as_many_hosts_as_the_agents_directory_has_slots():
    slots = max_cxl_hosts()
    assert slots >= 15
    doc = {"host": [{"name": f"h{i}", "role": "compute", "memory": "512M"} for i in range(slots + 1)],
           "cxl": [{"name": "c", "size": "256M", "hosts": [f"h{i}" for i in range(slots + 1)]}]}
    with pytest.raises(TopologyError, match=rf"cxl\[0\]\.hosts: {slots + 1} hosts; .* slots for {slots}"):
        parse_topology(doc)
    doc["cxl"][0]["hosts"] = doc["cxl"][0]["hosts"][:slots]
    assert len(parse_topology(doc).cxl[0].hosts) == slots


def test_file_errors(tmp_path):
    with pytest.raises(TopologyError, match="no such topology file"):
        load_topology(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[host]\nname=")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load_topology(bad)
    named = tmp_path / "lab.toml"
    named.write_text(textwrap.dedent("""
        [[host]]
        name = "x"
        role = "compute"
    """))
    t = load_topology(named)
    assert t.name == "lab"  # the file name is the default topology name
