"""Fetch task images: Label Studio uploads and local files, presigned cloud URLs, allowed http(s) hosts.

No SSRF into the backend's network: every hop of a download (the first URL and each redirect) goes to
Label Studio itself or to a host whose every address is public (ALLOW_PRIVATE_MEDIA lifts that), and the
connection is made to the address that was checked (no second DNS answer). Credentials go to Label
Studio's own host only.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
from urllib.parse import urljoin, urlparse

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter

from ..core.errors import MediaError
from ..core.settings import Settings

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://", "azure-spi://")
"""Cloud URIs Label Studio resolves through /tasks/<id>/presign/."""
MAX_REDIRECTS = 5
TIMEOUT_S = (5, 30)


def _is_private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified


def resolve_checked(host: str, allow_private: bool) -> str:
    """One address of `host` to connect to; MediaError if any of its addresses is private (unless allowed)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise MediaError(f"cannot resolve media host {host!r} ({exc})") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise MediaError(f"media host {host!r} has no address")
    if not allow_private and any(_is_private(a) for a in addresses):
        raise MediaError(f"host {host!r} resolves to a private address; set ALLOW_PRIVATE_MEDIA=true to allow")
    return str(addresses[0])


class _PinnedTLS(HTTPAdapter):
    """HTTPS to an IP address while checking the certificate (and sending SNI) for the original host name."""

    def __init__(self, hostname: str):
        self.hostname = hostname
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        kwargs.update(server_hostname=self.hostname, assert_hostname=self.hostname)
        super().init_poolmanager(*args, **kwargs)


def pinned_get(url: str, address: str, headers: dict[str, str] | None = None) -> requests.Response:
    """GET `url` by connecting to `address` (already checked), never following redirects or proxies."""
    parsed = urlparse(url)
    host = f"[{address}]" if ":" in address else address
    target = parsed._replace(netloc=host + (f":{parsed.port}" if parsed.port else "")).geturl()
    session = requests.Session()
    session.trust_env = False  # an environment proxy would resolve the name again
    if parsed.scheme == "https":
        session.mount("https://", _PinnedTLS(parsed.hostname or ""))
    host_header = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
    return session.get(target, headers={**(headers or {}), "Host": host_header}, stream=True, timeout=TIMEOUT_S,
                       allow_redirects=False)


def check_image(data: bytes, settings: Settings, url: str) -> bytes:
    """Refuse bytes that are not an image, or an image over MAX_IMAGE_PIXELS; returns the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise MediaError(f"{url}: not a decodable image ({exc})") from None
    if width * height > settings.max_image_pixels:
        raise MediaError(f"{url}: {width}x{height} exceeds MAX_IMAGE_PIXELS={settings.max_image_pixels}")
    return data


def _read_limited(response: requests.Response, settings: Settings, url: str) -> bytes:
    if response.status_code != 200:
        raise MediaError(f"{url}: HTTP {response.status_code} while fetching the image")
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
        raise MediaError(f"{url}: {declared} bytes exceeds MAX_IMAGE_BYTES={settings.max_image_bytes}")
    chunks, total = [], 0
    for chunk in response.iter_content(1 << 16):
        total += len(chunk)
        if total > settings.max_image_bytes:
            raise MediaError(f"{url}: more than MAX_IMAGE_BYTES={settings.max_image_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class MediaFetcher:
    """Download a task's image by the rules of this deployment (no SSRF into the backend's network)."""

    def __init__(self, settings: Settings, api=None):
        self.settings = settings
        self.api = api  # LabelStudioAPI or None

    def _ls_host(self) -> str:
        return urlparse(self.api.url).netloc.lower() if self.api else ""

    def fetch(self, url: str, task_id: int) -> bytes:
        """The image bytes behind a task's data URL; MediaError saying why not."""
        if not isinstance(url, str) or not url:
            raise MediaError(f"task {task_id}: image URL is missing or not a string")
        try:
            if url.startswith("data:"):
                return check_image(self._data_uri(url), self.settings, "data URI")
            if url.startswith(CLOUD_SCHEMES):
                fileuri = base64.urlsafe_b64encode(url.encode()).decode()
                return self._from_ls(f"/tasks/{task_id}/presign/?fileuri={fileuri}", url)
            parsed = urlparse(url)
            if url.startswith("/"):
                return self._from_ls(url, url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise MediaError(f"{url}: unsupported URL scheme {parsed.scheme or '(none)'!r}")
            if parsed.netloc.lower() == self._ls_host():
                return self._from_ls(url, url)
            return self._from_allowed_host(url, parsed.hostname.lower())
        except requests.RequestException as exc:
            raise MediaError(f"{url}: download failed ({exc.__class__.__name__}: {exc})") from None

    def _data_uri(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise MediaError("data URI images must be base64-encoded")
        if len(payload) * 3 // 4 > self.settings.max_image_bytes:
            raise MediaError(f"data URI exceeds MAX_IMAGE_BYTES={self.settings.max_image_bytes}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"data URI is not valid base64 ({exc})") from None

    def _from_ls(self, path: str, shown: str) -> bytes:
        """From Label Studio, with its credential; redirects (presigned cloud URLs) are checked hop by hop."""
        if self.api is None:
            raise MediaError(
                f"{shown}: this image lives in Label Studio; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
            )
        url = path if path.startswith(("http://", "https://")) else self.api.url + path
        for _ in range(MAX_REDIRECTS + 1):
            parsed = urlparse(url)
            if parsed.netloc.lower() == self._ls_host():  # Label Studio itself: trusted, and the only one with auth
                response = self.api.get(url, allow_redirects=False)
            else:
                if parsed.scheme not in ("http", "https") or not parsed.hostname:
                    raise MediaError(f"{shown}: Label Studio redirected to an unsupported URL {url!r}")
                address = resolve_checked(parsed.hostname, self.settings.allow_private_media)
                response = pinned_get(url, address)
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                if response.status_code in (401, 403) and parsed.netloc.lower() == self._ls_host():
                    raise MediaError(f"{shown}: {self.api.refused_credential(response.status_code).message}")
                return check_image(_read_limited(response, self.settings, shown), self.settings, shown)
        raise MediaError(f"{shown}: more than {MAX_REDIRECTS} redirects")

    def _from_allowed_host(self, url: str, host: str) -> bytes:
        if host not in self.settings.media_hosts:
            raise MediaError(f"{url}: host {host!r} is not allowed; add it to MEDIA_HOSTS to fetch from it")
        address = resolve_checked(host, self.settings.allow_private_media)
        with pinned_get(url, address) as response:
            if response.is_redirect:
                raise MediaError(f"{url}: redirects are not followed for external media hosts")
            return check_image(_read_limited(response, self.settings, url), self.settings, url)
