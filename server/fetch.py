"""An SSRF-safe downloader for `transcribe_url`.

Each hop: only http/https, no credentials in the URL; the host is resolved once and *every* address
must be allowed (by default: public unicast only - no loopback, private, link-local incl. cloud
metadata, CGNAT, multicast, reserved, IPv4-mapped/Teredo, and 6to4/NAT64 only around a public IPv4);
the connection then goes to one of those checked addresses, never to a fresh lookup, while the Host
header and TLS SNI/certificate check keep the name. Redirects are followed by hand, each hop checked
again (at most 5). Environment proxies are never used (httpcore reads no environment). The body
streams into a private temporary folder under a byte cap and a wall-clock deadline, and the folder
is always removed. Error messages name the problem, never the response body or socket details.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Literal
from urllib.parse import urljoin, urlsplit

import anyio
import httpcore2

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
ProgressFn = Callable[[int, int | None], Awaitable[None]]

MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_USER_AGENT = "funasr-nano-mcp (speech-to-text; +https://github.com/)"


class FetchError(Exception):
    """The URL cannot be fetched; the message tells the caller how to fix the call."""


@dataclass(frozen=True)
class Download:
    path: Path
    size_bytes: int
    content_type: str | None
    seconds: float


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (IPv4 and IPv6), in the resolver's order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in out:
            out.append(addr)
    return out


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """None when `ip` is a public unicast address; otherwise what kind of address it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if ip.teredo is not None:
            return "a Teredo tunnel address"
        if ip.sixtofour is not None:
            inner = address_problem(ip.sixtofour)
            return f"a 6to4 address around {inner}" if inner else None
        if ip in _NAT64:
            inner = address_problem(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"a NAT64 address around {inner}" if inner else None
        if ip.scope_id:
            return "a scoped (link-local) address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (this includes cloud metadata services)"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return "a carrier-grade NAT address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private-network address"
    if not ip.is_global:
        return "a non-global (special-purpose) address"
    return None


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class _Counting(httpcore2.AsyncNetworkStream):
    """A connection that counts what it received (and keeps its first bytes), so that a response body longer than
    its Content-Length, which HTTP/1.1 framing silently cuts, can be told apart from a whole one."""

    def __init__(self, inner: httpcore2.AsyncNetworkStream):
        self._inner = inner
        self.received = 0
        self.head = b""

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        self.received += len(data)
        if len(self.head) < 1 << 16:
            self.head += data[: (1 << 16) - len(self.head)]
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:
        return _Counting(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)

    async def surplus(self, body: int) -> int:
        """Bytes received beyond the response head and `body` bytes of body (reading for a moment what may still
        be on its way)."""
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return 0
        with contextlib.suppress(Exception):
            await self.read(1 << 16, timeout=0.05)
        return self.received - (end + 4) - body


class _PinnedBackend(httpcore2.AsyncNetworkBackend):
    """Connects to one pre-checked address whatever host name the request carries."""

    def __init__(self, address: str):
        self._address = address
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Iterable | None = None,
                          ) -> httpcore2.AsyncNetworkStream:
        return _Counting(await self._inner.connect_tcp(self._address, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable | None = None) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not used")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class Fetcher:
    """Downloads one URL at a time under the configured policy."""

    def __init__(
        self,
        *,
        policy: Literal["public", "allowlist", "any", "off"] = "public",
        allow_hosts: Iterable[str] = (),
        max_bytes: int = 200 * 2**20,
        timeout_s: float = 120.0,
        resolver: Resolver | None = None,
        tmp_dir: str | None = None,
        network: Callable[[str], httpcore2.AsyncNetworkBackend] | None = None,
    ):
        """resolver: host name -> addresses (default: the system's); network: a checked address -> the network
        backend that connects to it (default: a real TCP connection pinned to that address)."""
        self.policy = policy
        self.allow_hosts = {h.strip().lower().strip("[]").rstrip(".") for h in allow_hosts if h.strip()}
        self.allow_ips = {ip for ip in (_parse_ip(h) for h in self.allow_hosts) if ip is not None}
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.resolver = resolver or system_resolver
        self.tmp_dir = tmp_dir
        self.network = network or _PinnedBackend

    # ---- policy --------------------------------------------------------------------------------
    def _check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, ascii host, port) of an acceptable URL, or FetchError."""
        if not isinstance(url, str) or not url.strip():
            raise FetchError("The URL is empty. Pass an http:// or https:// link to an audio file.")
        if len(url) > 8192 or any(c in url for c in "\x00\r\n\t "):
            raise FetchError("The URL is malformed (too long, or contains spaces or control characters).")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise FetchError("The URL is malformed (bad host or port). Pass an http:// or https:// link.") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(
                f"Only http:// and https:// URLs are accepted (got {scheme or 'no'} scheme). For a file on this "
                "computer use transcribe_file with its absolute path."
            )
        if parts.username is not None or parts.password is not None:
            raise FetchError("URLs with embedded credentials (user:password@) are not accepted.")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise FetchError("The URL has no host name. Pass a full link such as https://example.com/talk.mp3.")
        try:
            ascii_host = host if _parse_ip(host) else host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchError("The URL's host name is not a valid domain name.") from None
        return scheme, ascii_host.lower(), port or (443 if scheme == "https" else 80)

    def _host_allowlisted(self, host: str) -> bool:
        ip = _parse_ip(host)
        return host in self.allow_hosts or (ip is not None and ip in self.allow_ips)

    async def _addresses(self, host: str, port: int) -> list[str]:
        allowlisted = self._host_allowlisted(host)
        if self.policy == "off":
            raise FetchError("Fetching URLs is disabled on this server (--url-policy off).")
        if self.policy == "allowlist" and not allowlisted:
            raise FetchError(
                f"The host {host!r} is not on this server's URL allowlist. Ask the user to add it with "
                "--url-allow-host, or download the file and use transcribe_file."
            )
        literal = _parse_ip(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                with anyio.fail_after(min(15.0, self.timeout_s)):
                    addresses = await self.resolver(host, port)
            except TimeoutError:
                raise FetchError(f"Looking up the host {host!r} timed out. Check the URL or try again later.") from None
            except OSError:
                raise FetchError(f"The host {host!r} could not be found (DNS lookup failed). Check the URL.") from None
            if not addresses:
                raise FetchError(f"The host {host!r} could not be found (no addresses). Check the URL.")
        checked = []
        for text in addresses:
            ip = _parse_ip(text) if "%" not in text else None  # scoped (link-local) addresses are refused
            if ip is None:
                raise FetchError(f"The host {host!r} resolves to an address this server does not contact.")
            problem = address_problem(ip)
            if problem is not None:
                if self.policy == "any" or allowlisted or ip in self.allow_ips:
                    if ip.is_multicast or ip.is_unspecified:
                        raise FetchError(f"The host {host!r} resolves to {problem}, which cannot be fetched.")
                else:
                    verb = "is" if literal is not None else "resolves to"
                    raise FetchError(
                        f"Refused: the host {host!r} {verb} {problem}. This server only fetches from public "
                        "internet addresses, so that local services stay unreachable. Pass a public URL; to fetch "
                        "from a trusted local host the user can start the server with --url-allow-host."
                    )
            checked.append(str(ip))
        return checked

    # ---- download ------------------------------------------------------------------------------
    @asynccontextmanager
    async def download(self, url: str, progress: ProgressFn | None = None) -> AsyncIterator[Download]:
        """Fetch `url` into a private temporary file, yielded while the context is open."""
        tmp = Path(tempfile.mkdtemp(prefix="funasr-nano-mcp-", dir=self.tmp_dir))
        try:
            start = anyio.current_time()
            try:
                with anyio.fail_after(self.timeout_s):
                    result = await self._fetch(url, tmp, progress)
            except TimeoutError:
                raise FetchError(
                    f"The download did not finish within {self.timeout_s:.0f} s (--download-timeout-s). Try a "
                    "smaller file, a faster host, or download it and use transcribe_file."
                ) from None
            yield Download(result[0], result[1], result[2], anyio.current_time() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _fetch(self, url: str, tmp: Path, progress: ProgressFn | None) -> tuple[Path, int, str | None]:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            scheme, host, port = self._check_url(current)
            addresses = await self._addresses(host, port)
            outcome = await self._get(current, host, port, addresses, tmp, progress)
            if isinstance(outcome, str):
                current = outcome
                continue
            return outcome
        raise FetchError(f"The URL redirected more than {MAX_REDIRECTS} times. Pass the final link to the file.")

    async def _get(self, url: str, host: str, port: int, addresses: Sequence[str], tmp: Path,
                   progress: ProgressFn | None) -> str | tuple[Path, int, str | None]:
        last_error: Exception | None = None
        for address in addresses[:4]:
            try:
                async with httpcore2.AsyncConnectionPool(
                    network_backend=self.network(address), max_connections=1, retries=0, http2=False
                ) as pool:
                    async with pool.stream(
                        "GET", url,
                        headers=[(b"User-Agent", _USER_AGENT.encode()), (b"Accept", b"audio/*, video/*, */*;q=0.5"),
                                 (b"Accept-Encoding", b"identity")],
                        extensions={"timeout": {"connect": 10.0, "read": 30.0, "write": 10.0, "pool": 10.0}},
                    ) as response:
                        return await self._handle(response, url, tmp, progress)
            except httpcore2.ConnectError as exc:
                last_error = exc
                continue
            except httpcore2.TimeoutException:
                raise FetchError(f"The server at {host!r} stopped responding. Try again later.") from None
            except httpcore2.RemoteProtocolError as exc:
                if "peer closed" in str(exc):  # a cut connection, not a malformed response
                    raise FetchError(f"The connection to {host!r} failed while downloading: the server closed it "
                                     f"before the whole file arrived ({exc}). Try again later.") from None
                raise FetchError(
                    f"The server at {host!r} sent an invalid HTTP response ({exc}). Check that the link works in a "
                    "browser, or download the file and use transcribe_file."
                ) from None
            except (httpcore2.ProtocolError, httpcore2.NetworkError, httpcore2.UnsupportedProtocol):
                raise FetchError(
                    f"The connection to {host!r} failed while downloading (network or TLS error). Check that the "
                    "link works in a browser, or download the file and use transcribe_file."
                ) from None
        log.info("could not connect to %s:%d (%s)", host, port, type(last_error).__name__)
        raise FetchError(f"Could not connect to {host!r} on port {port}. Check the URL or try again later.")

    async def _handle(self, response: httpcore2.Response, url: str, tmp: Path,
                      progress: ProgressFn | None) -> str | tuple[Path, int, str | None]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
        status = response.status
        if status in _REDIRECTS:
            location = headers.get("location", "").strip()
            if not location:
                raise FetchError(f"The server answered a redirect (HTTP {status}) without a target.")
            return urljoin(url, location)
        if status >= 400:
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "error"
            hint = " Check that the link is public and still valid." if status in (401, 403, 404, 410) else ""
            raise FetchError(f"The server answered HTTP {status} ({phrase}) instead of the audio file.{hint}")
        if status != 200:
            raise FetchError(f"The server answered HTTP {status}, not 200 with the file.")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower() or None
        if content_type and (content_type.startswith("text/") or content_type in (
                "application/json", "application/xhtml+xml", "application/xml")):
            raise FetchError(
                f"The URL returned a {content_type} document (probably a web page), not an audio file. Pass a "
                "direct link to the audio file itself."
            )
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise FetchError(self._too_large(int(declared)))
        total = int(declared) if declared is not None and declared.strip().isdigit() else None
        target = tmp / ("download" + _suffix(url))
        size = 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            async for chunk in response.aiter_stream():
                size += len(chunk)
                if size > self.max_bytes:
                    raise FetchError(self._too_large(None))
                out.write(chunk)
                if progress is not None:
                    await progress(size, total)
        if size == 0:
            raise FetchError("The server sent an empty file. Check the link.")
        stream = response.extensions.get("network_stream")
        if total is not None and isinstance(stream, _Counting) and await stream.surplus(size) > 0:
            raise FetchError(f"The server sent more than the {total:,} bytes its Content-Length header declares, so "
                             "the download cannot be trusted whole. Check the link, or download the file and use "
                             "transcribe_file.")
        return target, size, content_type

    def _too_large(self, size: int | None) -> str:
        what = f"is {size / 2**20:.1f} MiB, over" if size is not None else "is larger than"
        return (
            f"The file {what} this server's {self.max_bytes / 2**20:.0f} MiB download limit (--max-download-mb). "
            "Pass a shorter or more compressed file."
        )


def _suffix(url: str) -> str:
    """A harmless extension from the URL path ('.mp3'), which helps container detection."""
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    match = re.search(r"\.([A-Za-z0-9]{1,5})$", name)
    return "." + match.group(1).lower() if match else ""
