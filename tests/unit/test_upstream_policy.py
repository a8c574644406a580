"""The operator's policy for model servers: parsing its settings, and which addresses,
hosts and ports it lets requests and keys go to."""

from __future__ import annotations

import ipaddress

import pytest

from app.upstream_policy import (
    HostPort,
    UpstreamPolicy,
    is_public,
    literal_address,
    parse_allow_list,
    parse_host_port,
    parse_key_bindings,
)

NOT_PUBLIC = [
    "127.0.0.1",
    "127.255.0.9",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fd00::5",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2001:db8::1",  # documentation
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_special_purpose_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    # ...and so denied by a policy that allows nothing.
    assert not UpstreamPolicy().address_allowed("models.example", ipaddress.ip_address(address), 443)


@pytest.mark.parametrize("address", ["8.8.8.8", "104.18.7.192", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed_without_rules(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
    assert UpstreamPolicy().address_allowed("models.example", ipaddress.ip_address(address), 443)


def test_allow_rules_match_address_network_host_and_port() -> None:
    policy = UpstreamPolicy(allow=parse_allow_list("127.0.0.1:11434, 10.0.0.0/8, [::1]:8000, ollama.internal:11434"))
    ip = ipaddress.ip_address
    assert policy.address_allowed("127.0.0.1", ip("127.0.0.1"), 11434)
    assert policy.address_allowed("localhost", ip("::ffff:127.0.0.1"), 11434)  # mapped counts as IPv4
    assert not policy.address_allowed("127.0.0.1", ip("127.0.0.1"), 6379)  # another port
    assert not policy.address_allowed("127.0.0.2", ip("127.0.0.2"), 11434)
    assert policy.address_allowed("db.internal", ip("10.9.8.7"), 5432)  # a network, any port
    assert policy.address_allowed("::1", ip("::1"), 8000) and not policy.address_allowed("::1", ip("::1"), 80)
    # A host rule lets that name (and port) through whatever it resolves to; no other name.
    assert policy.address_allowed("Ollama.Internal.", ip("192.168.5.5"), 11434)
    assert not policy.address_allowed("ollama.internal", ip("192.168.5.5"), 80)
    assert not policy.address_allowed("other.internal", ip("192.168.5.5"), 11434)


@pytest.mark.parametrize(
    "entry", ["", "10.0.0.0/33", "10.0.0.1:0", "10.0.0.1:99999", "host:port", "[::1", "[::1]x", "bad host", "a/b"]
)
def test_bad_allow_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_list(entry or ",:80")


def test_key_bindings() -> None:
    bindings = parse_key_bindings(" OPENAI_API_KEY=api.openai.com , LOCAL=127.0.0.1:8000|[::1]:8000|gpu.lan ")
    assert bindings == {
        "OPENAI_API_KEY": (HostPort("api.openai.com"),),
        "LOCAL": (HostPort("127.0.0.1", 8000), HostPort("::1", 8000), HostPort("gpu.lan")),
    }
    policy = UpstreamPolicy(key_hosts=bindings)
    assert policy.key_may_go_to("OPENAI_API_KEY", "API.openai.com", 443)
    assert policy.key_may_go_to("OPENAI_API_KEY", "api.openai.com", 8080)  # no port named: any
    assert not policy.key_may_go_to("OPENAI_API_KEY", "api.openai.com.evil.example", 443)
    assert not policy.key_may_go_to("OPENAI_API_KEY", "evil.example", 443)
    assert policy.key_may_go_to("LOCAL", "127.0.0.1", 8000) and not policy.key_may_go_to("LOCAL", "127.0.0.1", 8001)
    assert policy.key_may_go_to("LOCAL", "0:0::1", 8000)  # the same IPv6, spelled otherwise
    assert not policy.key_may_go_to("OTHER", "api.openai.com", 443)
    assert [str(h) for h in bindings["LOCAL"]] == ["127.0.0.1:8000", "[::1]:8000", "gpu.lan"]


@pytest.mark.parametrize("text", ["OPENAI_API_KEY", "OPENAI_API_KEY=", "OPENAI_API_KEY=|", "A=x,B"])
def test_a_variable_without_hosts_says_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match=r"names no host.*=api\.openai\.com"):
        parse_key_bindings(text)


@pytest.mark.parametrize("text", ["1BAD=host", "A B=host", "KEY=bad host", "KEY=host:http"])
def test_bad_key_bindings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_key_bindings(text)


def test_host_port_forms() -> None:
    assert parse_host_port("Example.COM") == HostPort("example.com")
    assert parse_host_port("example.com:8443") == HostPort("example.com", 8443)
    assert parse_host_port("[::1]:80") == HostPort("::1", 80)
    assert parse_host_port("::1") == HostPort("::1")


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),  # short forms the system resolver also reads
        ("0x7f000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("LOCALHOST.", "127.0.0.1"),
        ("db.localhost", "127.0.0.1"),
        ("::1", "::1"),
        ("api.openai.com", None),
    ],
)
def test_literal_addresses_are_known_without_dns(host: str, address: str | None) -> None:
    found = literal_address(host)
    assert (str(found) if found else None) == address
