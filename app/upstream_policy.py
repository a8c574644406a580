"""Where requests to model servers may go: the operator's rules, parsed and checked.

Agents are configured by company admins, this policy by the operator:
- an upstream address that is not public (loopback, private, link-local, unspecified,
  multicast, reserved...) is refused unless `CHATSTREAM_UPSTREAM_ALLOW` names it;
- an API key variable is sent only to the hosts `CHATSTREAM_MODEL_KEY_VARS` binds it to.

Pure code over text and addresses, no I/O and no app imports: settings parse with it at
startup, agent configs are checked with it, and the `openai` adapter checks every
address it connects to with it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def normal_host(host: str) -> str:
    """`host` as compared: lower case, no trailing dot, an IP in its standard spelling."""
    host = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def _split_port(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[ipv6]:port` or a bare IPv6 (several colons, no port)."""
    if entry.startswith("["):
        inside, closed, rest = entry[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: write an IPv6 address with a port as [address]:port")
        return inside, _port(rest[1:], entry) if rest else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(port, entry)
    return entry, None


@dataclass(frozen=True)
class HostPort:
    """A host (see :func:`normal_host`) and, when given, the only port it matches."""

    host: str
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        """True for `host` on `port`."""
        return self.host == normal_host(host) and self.port in (None, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_host_port(entry: str) -> HostPort:
    """`host[:port]` (an IPv6 with a port in brackets), or ValueError saying what is wrong."""
    text = entry.strip()
    host, port = _split_port(text)
    host = normal_host(host)
    if not _HOSTNAME.match(host) and _ip(host) is None:
        raise ValueError(f"{entry!r} is not a host name or IP address")
    return HostPort(host, port)


@dataclass(frozen=True)
class AllowRule:
    """One `CHATSTREAM_UPSTREAM_ALLOW` entry: a network (an IP is a network of one) or a
    host name, optionally on one port only."""

    network: IPNetwork | None = None
    host: str | None = None
    port: int | None = None

    def allows(self, host: str, address: IPAddress, port: int) -> bool:
        """True when this rule lets a request to `host` connect to `address`:`port`."""
        if self.port not in (None, port):
            return False
        if self.network is not None:
            return _plain(address) in self.network
        return self.host == normal_host(host)


def parse_allow_rule(entry: str) -> AllowRule:
    """A host, `host:port`, an IP or a CIDR, optionally with `:port` (`[...]:port` for IPv6)."""
    text = entry.strip()
    where, port = _split_port(text)
    if "/" in where:
        try:
            network: IPNetwork = ipaddress.ip_network(where, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not a valid network (CIDR)") from None
        return AllowRule(network=network, port=port)
    address = _ip(where)
    if address is not None:
        single = _plain(address)
        return AllowRule(network=ipaddress.ip_network(single), port=port)
    host = normal_host(where)
    if not _HOSTNAME.match(host):
        raise ValueError(f"{entry!r} is not a host name, IP address or network")
    return AllowRule(host=host, port=port)


def parse_allow_list(text: str) -> tuple[AllowRule, ...]:
    """Comma-separated allow rules (see :func:`parse_allow_rule`)."""
    return tuple(parse_allow_rule(entry) for entry in text.split(",") if entry.strip())


def parse_key_bindings(text: str) -> dict[str, tuple[HostPort, ...]]:
    """`VAR=host[:port]|host2,VAR2=host3`: each key variable and the hosts its key may go to."""
    bindings: dict[str, tuple[HostPort, ...]] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        variable, bound, hosts = (part.strip() for part in item.partition("="))
        if not _VARIABLE.match(variable):
            raise ValueError(f"{variable!r} is not an environment variable name")
        if not bound or not hosts.strip("| "):
            raise ValueError(
                f"{variable} names no host: bind each variable to the hosts its key may be sent to, "
                f"e.g. {variable}=api.openai.com (several: {variable}=host1|host2:8443)"
            )
        bindings[variable] = tuple(parse_host_port(host) for host in hosts.split("|") if host.strip())
    return bindings


def _ip(host: str) -> IPAddress | None:
    """`host` as an IP address, including the short and numeric IPv4 forms (`127.1`,
    `0x7f000001`) that the system's resolver also accepts; None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _plain(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, Teredo, NAT64), else itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_public(address: IPAddress) -> bool:
    """False for loopback, private, link-local, unspecified, multicast, reserved and other
    special-purpose addresses (IPv4 and IPv6, including IPv4 inside IPv6)."""
    plain = _plain(address)
    if plain.is_multicast or (isinstance(plain, ipaddress.IPv6Address) and plain.is_site_local):
        return False
    return plain.is_global


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host names without asking DNS: an IP, or loopback for
    `localhost` (and `*.localhost`); None for any other name."""
    host = normal_host(host)
    if host == "localhost" or host.endswith(".localhost"):
        return ipaddress.IPv4Address("127.0.0.1")
    return _ip(host)


@dataclass(frozen=True)
class UpstreamPolicy:
    """The operator's rules for model servers (see the module's docstring)."""

    allow: tuple[AllowRule, ...] = ()
    key_hosts: Mapping[str, tuple[HostPort, ...]] = field(default_factory=dict)

    def address_allowed(self, host: str, address: IPAddress, port: int) -> bool:
        """True when a request for `host` may connect to `address`:`port`."""
        return is_public(address) or any(rule.allows(host, address, port) for rule in self.allow)

    def key_may_go_to(self, variable: str, host: str, port: int) -> bool:
        """True when the key in `variable` may be sent to `host`:`port`."""
        return any(bound.matches(host, port) for bound in self.key_hosts.get(variable, ()))
