"""The webhook URL policy: which callback URLs are accepted, and where a delivery may connect.

Owns: the form check at submission (``check_webhook_url``: http or https, a host, no
credentials, at most ``MAX_URL_CHARS``; unless private targets are allowed, no literal
non-public IP and no ``localhost`` name) and the check at delivery (``resolve_target``: the
host resolved once per attempt, by the system resolver or by the DNS server the
``webhook_dns_server`` setting names, and every answer checked). Leaves sending to
``webhooks.py``, which connects to one of the checked addresses and to nothing else.

Why no DNS at submission: an answer then says nothing about the address a delivery reaches
minutes or hours later, and a name that only resolves where the webhook worker runs is fine.
Why connect to the checked address: resolving the name again to connect would let a DNS
server with a zero TTL answer a public address to the check and a private one to the
connection (DNS rebinding).

Non-public means not globally routable by IANA's special-purpose registries (Python's
``is_global``: private, loopback, link-local, shared 100.64/10, documentation, reserved), or
multicast; an IPv6 address that embeds an IPv4 one (mapped, 6to4, the NAT64 prefix) is judged
by the IPv4 address it reaches.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import dns.exception
import dns.resolver

from worker.errors import InvalidWebhookUrl, WebhookAddressNotAllowed, WebhookDnsFailure
from worker.params import check_text

MAX_URL_CHARS = 2048
DNS_PORT = 53
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
PRIVATE_NOTE = "private targets are not allowed"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    """Where one delivery attempt may go: the URL as given, its host, and the checked
    addresses in the resolver's order (the sender tries them in turn)."""

    url: str
    host: str
    addresses: tuple[str, ...]


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches (mapped, 6to4, NAT64), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


def is_public(address: IPAddress) -> bool:
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return is_public(embedded)
    return address.is_global and not address.is_multicast


def _shown(address: IPAddress) -> str:
    embedded = _embedded_ipv4(address)
    return str(address) if embedded is None else f"{address} (IPv4 {embedded})"


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_webhook_url(url: str | None, *, allow_private: bool, field: str = "webhook_url") -> str | None:
    """The URL's form, without DNS: an http(s) URL with a host and no credentials; unless
    ``allow_private``, its host is not a literal non-public address nor a ``localhost`` name.
    Names are judged at delivery (``resolve_target``)."""
    if url is None:
        return None
    if len(url) > MAX_URL_CHARS:
        raise InvalidWebhookUrl(f"{field}: {len(url)} characters exceeds the {MAX_URL_CHARS} limit", field=field)
    check_text(url, field, allow_whitespace=False, error=InvalidWebhookUrl)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port raises ValueError for a bad one
    except ValueError as exc:
        raise InvalidWebhookUrl(f"{field}: {url!r} is not a valid URL ({exc})", field=field) from exc
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhookUrl(f"{field}: scheme {parts.scheme!r} is not allowed (use https or http)", field=field)
    if parts.username is not None or parts.password is not None:
        raise InvalidWebhookUrl(f"{field}: credentials in the URL are not allowed", field=field)
    host = parts.hostname
    if not host:
        raise InvalidWebhookUrl(f"{field}: {url!r} has no host", field=field)
    if allow_private:
        return url
    if host == "localhost" or host.endswith(".localhost"):
        raise InvalidWebhookUrl(f"{field}: host {host!r} is a loopback name ({PRIVATE_NOTE})", field=field)
    address = _literal(host)
    if address is not None and not is_public(address):
        raise InvalidWebhookUrl(f"{field}: host {host!r} is the non-public address {_shown(address)} "
                                f"({PRIVATE_NOTE})", field=field)
    return url


def parse_dns_server(value: str) -> tuple[str, int]:
    """``(ip, port)`` of a ``webhook_dns_server`` value: ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``
    (port 53 when none is given). Raises ValueError saying what is accepted."""
    spec = value.strip()
    problem = f"{value!r} is not IP, IP:PORT or [IPv6]:PORT (a DNS server's address, port 1..65535)"
    try:
        parts = urlsplit(f"//{spec}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"{problem}: {exc}") from exc
    if host is None or _literal(host) is None or parts.netloc != spec or "@" in spec or port == 0:
        raise ValueError(problem)
    return host, port or DNS_PORT


def _system_addresses(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookDnsFailure(f"{host} did not resolve ({exc})") from exc
    return [str(info[4][0]).split("%", 1)[0] for info in infos]


def _server_addresses(host: str, dns_server: str, timeout_s: float) -> list[str]:
    ip, port = parse_dns_server(dns_server)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = [ip], port, timeout_s
    try:
        answer = resolver.resolve_name(host, family=socket.AF_UNSPEC, search=False)
    except dns.exception.DNSException as exc:
        raise WebhookDnsFailure(f"{host} did not resolve at {dns_server} ({exc})") from exc
    # IPv4 first: where a worker has no IPv6 route, trying an AAAA answer first only costs time.
    return sorted(answer.addresses(), key=lambda a: ":" in a)


def resolve_target(url: str, *, allow_private: bool, dns_server: str | None, timeout_s: float) -> Target:
    """The URL's host resolved once (a literal IP is its own answer) and every answer checked:
    one non-public address refuses the whole attempt, as ``WebhookAddressNotAllowed``, so an
    answer that mixes public and private addresses cannot pick its way in. A name that does not
    resolve now raises ``WebhookDnsFailure`` (transient)."""
    check_webhook_url(url, allow_private=True, field="url")
    parts = urlsplit(url)
    host = parts.hostname or ""
    is_literal = _literal(host) is not None
    if is_literal:
        found = [host]
    elif dns_server is None:
        found = _system_addresses(host, parts.port or (443 if parts.scheme == "https" else 80))
    else:
        found = _server_addresses(host, dns_server, timeout_s)
    addresses = tuple(dict.fromkeys(str(ipaddress.ip_address(a)) for a in found))
    if not addresses:
        raise WebhookDnsFailure(f"{host} did not resolve (no address in the answer)")
    if not allow_private:
        for address in addresses:
            checked = ipaddress.ip_address(address)
            if not is_public(checked):
                said = f"{host} is" if is_literal else f"{host} resolved to"
                raise WebhookAddressNotAllowed(f"{said} {_shown(checked)} ({PRIVATE_NOTE})", field="url")
    return Target(url=url, host=host, addresses=addresses)
