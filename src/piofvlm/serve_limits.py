"""What ``piofvlm serve`` accepts from a client, and how it reads the images a request names.

Everything here is a limit with a safe default that the operator loosens with a flag of ``piofvlm serve`` (see
:func:`add_arguments`): no outbound fetch, no local file, a pixel, aspect-ratio, byte and image-count cap per image, a
request-size cap, a cap on new tokens, and a Host-header allow-list. A client mistake raises :class:`ClientError`
(the server answers it with a 4xx and OpenAI's error JSON); no message quotes more than a few characters of what the
client sent, so nothing of a payload reaches the logs.

Only the standard library and PIL are imported here (the ``serve`` extra is not needed to build the CLI).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # PIL loads on use: building the CLI's parser imports this module
    from PIL import Image

MIB = 1024 * 1024
#: Image formats the server decodes (PIL's parsers for anything else are never reached).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: Hostnames a server bound to a loopback address answers to by default (DNS rebinding is refused).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: Message roles and content-part types a chat request may carry.
ROLES = ("system", "developer", "user", "assistant", "tool")
PART_TYPES = ("text", "image_url", "video_url")
#: Request fields the server refuses: they would let a client change what the operator fixed.
REFUSED_FIELDS = {
    "generation_config": "a client may not replace the generation config",
    "chat_template_kwargs": "a client may not pass arguments to the chat template",
}
#: Fields of OpenAI's chat-completion request that the server honours.
HONOURED_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "frequency_penalty",
        "logit_bias", "seed", "stop", "stream", "stream_options",
    }
)  # fmt: skip
#: Fields of OpenAI's request that do not change the answer (bookkeeping on OpenAI's side): accepted and ignored.
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"}
)
#: Fields of OpenAI's request the server cannot honour, with the values that ask for nothing (accepted); any other
#: value is refused (400) rather than silently ignored.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0,),
    "modalities": (["text"],),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
}


class ClientError(Exception):
    """A request the server refuses: answered with ``status`` and OpenAI's error JSON
    (``{"error": {"message", "type", "param", "code"}}``)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def quote(value: Any, limit: int = 40) -> str:
    """``repr`` of a client value cut to ``limit`` characters (error messages and logs never carry a payload)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}...({len(text)} chars)"


@dataclass
class ServeLimits:
    """The limits of one server; every default is the safe one (see ``piofvlm serve --help``)."""

    #: Fetch ``http(s)`` image URLs at all (``--allow-fetch``).
    allow_fetch: bool = False
    #: Also fetch from loopback, link-local, private and other non-global addresses (``--allow-private-fetch``).
    allow_private_fetch: bool = False
    #: Seconds for the connection and for each read of a fetch; the whole fetch is cut at twice this.
    fetch_timeout_s: float = 10.0
    #: Folders whose regular files (after resolving symlinks) a client may name by path or ``file://`` URL.
    image_dirs: tuple[Path, ...] = ()
    #: Most bytes of one image (encoded: a file, a fetched body or a decoded data URL).
    max_image_bytes: int = 20 * MIB
    #: Most pixels (width x height) of one image, checked from its header before it is decoded.
    max_image_pixels: int = 25_000_000
    #: Most long side / short side of one image (a 2 x 5000 image resized to a short side of 336 is 282 Mpx).
    max_aspect_ratio: float = 20.0
    #: Most images and videos in one request.
    max_images: int = 8
    #: Most bytes of one request body.
    max_request_bytes: int = 32 * MIB
    #: Most new tokens a request may ask for (``max_tokens``); also the default when it asks for none.
    max_new_tokens: int = 1024
    #: Host header names (without port) the server answers; empty: any. Default: the loopback names.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    #: Extra check of every resolved address before a fetch connects (tests; None: none).
    resolver: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("fetch_timeout_s", "max_aspect_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_image_bytes", "max_image_pixels", "max_images", "max_request_bytes", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        dirs = []
        for folder in self.image_dirs:
            path = Path(folder).expanduser()
            if not path.is_dir():
                raise ValueError(f"--image-dir {str(folder)!r} is not a directory")
            dirs.append(path.resolve())
        self.image_dirs = tuple(dirs)
        self.allowed_hosts = tuple(h.lower().strip("[]") for h in self.allowed_hosts)

    def describe(self) -> dict[str, Any]:
        """The limits as plain data (logged at start-up)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resolver"}
        data["image_dirs"] = [str(p) for p in self.image_dirs]
        return data


# ---------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit flags of ``piofvlm serve`` (each with its safe default in ``--help``)."""
    d = ServeLimits()
    group = parser.add_argument_group("limits (safe defaults; each flag loosens one)")
    group.add_argument("--allow-fetch", action="store_true", help="fetch http(s) image URLs (default: refused)")
    group.add_argument(
        "--allow-private-fetch",
        action="store_true",
        help="with --allow-fetch, also fetch from loopback, link-local and private addresses (default: refused)",
    )
    numbers = [
        ("--fetch-timeout", float, d.fetch_timeout_s, "seconds to connect, and per read, of a fetch"),
        ("--max-image-bytes", int, d.max_image_bytes, "bytes of one encoded image"),
        ("--max-image-pixels", int, d.max_image_pixels, "pixels of one image, checked before decoding"),
        ("--max-aspect-ratio", float, d.max_aspect_ratio, "long side / short side of one image"),
        ("--max-images", int, d.max_images, "images and videos in one request"),
        ("--max-request-bytes", int, d.max_request_bytes, "bytes of one request body"),
        ("--max-new-tokens", int, d.max_new_tokens, "most new tokens a request may ask for (and its default)"),
    ]
    for flag, kind, default, text in numbers:
        group.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    group.add_argument(
        "--image-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose files clients may name by path or file:// URL (repeatable; default: none, local "
        "files refused)",
    )
    group.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name to answer besides 127.0.0.1, localhost and ::1 (repeatable; with --allow-remote "
        "and none given, any Host is answered)",
    )


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    """:class:`ServeLimits` of the parsed flags of :func:`add_arguments` (``ValueError`` on a bad value)."""
    if args.allow_private_fetch and not args.allow_fetch:
        raise ValueError("--allow-private-fetch needs --allow-fetch")
    loopback = args.host in LOOPBACK_HOSTS
    hosts = tuple(args.allowed_host)
    if loopback or hosts:
        hosts = LOOPBACK_HOSTS + hosts
    return ServeLimits(
        allow_fetch=args.allow_fetch,
        allow_private_fetch=args.allow_private_fetch,
        fetch_timeout_s=args.fetch_timeout,
        image_dirs=tuple(Path(p) for p in args.image_dir),
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_aspect_ratio=args.max_aspect_ratio,
        max_images=args.max_images,
        max_request_bytes=args.max_request_bytes,
        max_new_tokens=args.max_new_tokens,
        allowed_hosts=hosts,
    )


# ------------------------------------------------------------------------------------------------ Host header
def host_allowed(host_header: str | None, limits: ServeLimits) -> bool:
    """Whether a request's ``Host`` header names an allowed host (port ignored); any host when the list is empty."""
    if not limits.allowed_hosts:
        return True
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in limits.allowed_hosts


# ---------------------------------------------------------------------------------------------- the request
def _number(body: dict, name: str, low: float, high: float, *, integer: bool = False) -> None:
    value = body.get(name)
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ClientError(f"{name} must be {kind} in [{low}, {high}], got {quote(value)}", param=name)


def _same(value: Any, neutral: Any) -> bool:
    """``value == neutral`` without ``True == 1``: booleans equal booleans only."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return bool(value == neutral)


def validate_chat_body(body: Any, limits: ServeLimits, pinned_model: str) -> list[tuple[int, int, str]]:
    """Check a ``/v1/chat/completions`` body; return ``(message, part, kind)`` of each image / video part.

    Raises :class:`ClientError` naming the field that is wrong. Sets ``max_tokens`` to the server's cap when the
    request asks for none.
    """
    if not isinstance(body, dict):
        raise ClientError("the request body must be a JSON object")
    for name, why in REFUSED_FIELDS.items():
        if name in body:
            raise ClientError(f"{name} is not accepted: {why}", param=name)
    unexpected = sorted(set(body) - HONOURED_FIELDS - IGNORED_FIELDS - set(UNSUPPORTED_FIELDS))
    if unexpected:
        names = ", ".join(quote(name, 30) for name in unexpected[:5])
        raise ClientError(
            f"unexpected fields in the request: {names} (not fields of OpenAI's chat completion request)",
            status=422,
            param=unexpected[0][:40],
        )
    for name, neutral in UNSUPPORTED_FIELDS.items():
        value = body.get(name)
        if value is not None and not any(_same(value, v) for v in neutral):
            raise ClientError(
                f"{name} is not supported by piofvlm serve (only {neutral[0]!r} or null)"
                if neutral
                else f"{name} is not supported by piofvlm serve (leave it out or null)",
                param=name,
            )
    model = body.get("model")
    if model is not None and model != pinned_model:
        raise ClientError(
            f"this server serves one model, {pinned_model!r}; requested {quote(model)}",
            status=404,
            param="model",
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError("messages must be a non-empty list of {role, content} objects", param="messages")
    visuals: list[tuple[int, int, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ClientError(f"{where} must be an object with role and content", param=where)
        if message.get("role") not in ROLES:
            raise ClientError(f"{where}.role must be one of {ROLES}, got {quote(message.get('role'))}", param=where)
        content = message.get("content")
        if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
            continue
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ClientError(f"{where}.content must be a string or a list of parts", param=where)
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise ClientError(f"{at}.type must be one of {PART_TYPES}, got {quote(kind)}", param=at)
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ClientError(f"{at}.text must be a string", param=at)
                continue
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref if kind == "image_url" else None
            if not isinstance(url, str) or not url:
                raise ClientError(f'{at}.{kind} must be {{"url": "..."}}', param=at)
            visuals.append((i, j, kind))
    if len(visuals) > limits.max_images:
        raise ClientError(
            f"{len(visuals)} images and videos in one request; this server takes at most {limits.max_images} "
            "(--max-images)",
            param="messages",
        )
    for name in ("max_tokens", "max_completion_tokens"):
        _number(body, name, 1, limits.max_new_tokens, integer=True)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = limits.max_new_tokens
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "frequency_penalty", -2, 2)
    _number(body, "seed", 0, 2**63 - 1, integer=True)
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise ClientError(f"stream must be true or false, got {quote(body['stream'])}", param="stream")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise ClientError("stop must be a string or a list of strings", param="stop")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in bias.items()
        ):
            raise ClientError("logit_bias must map token ids (strings of digits) to numbers", param="logit_bias")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ClientError("stream_options must be an object", param="stream_options")
    return visuals


# ------------------------------------------------------------------------------------------------- images
def decode_image(data: bytes, limits: ServeLimits, what: str) -> Image.Image:
    """An RGB image from encoded bytes; size, pixel count and aspect ratio are checked from the header first."""
    from PIL import Image

    if len(data) > limits.max_image_bytes:
        raise ClientError(f"{what}: {len(data)} bytes, over --max-image-bytes {limits.max_image_bytes}", status=413)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        raise ClientError(f"{what} is not a {'/'.join(IMAGE_FORMATS)} image ({type(error).__name__})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ClientError(f"{what}: an image of {width} x {height} pixels")
    if width * height > limits.max_image_pixels:
        raise ClientError(
            f"{what}: {width} x {height} pixels, over --max-image-pixels {limits.max_image_pixels} (not decoded)",
            status=413,
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ClientError(
            f"{what}: {width} x {height} pixels, an aspect ratio over --max-aspect-ratio {limits.max_aspect_ratio} "
            "(not decoded)"
        )
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ClientError(f"{what} could not be decoded ({type(error).__name__})") from None


def read_data_url(url: str, limits: ServeLimits, what: str) -> bytes:
    """The bytes of a base64 ``data:`` URL (its decoded size is capped before decoding)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ClientError(f"{what}: a data URL must be data:<type>;base64,<data>")
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise ClientError(
            f"{what}: {len(payload) * 3 // 4} bytes, over --max-image-bytes {limits.max_image_bytes}", status=413
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{what}: the data URL is not valid base64") from None


def local_path(reference: str, limits: ServeLimits, what: str) -> Path:
    """The resolved path of a local file a client names: a regular file inside one of ``--image-dir``."""
    if not limits.image_dirs:
        raise ClientError(
            f"{what}: local files are off on this server (the operator names folders with --image-dir); send the "
            "image as a data URL",
            status=403,
        )
    raw = urllib.parse.unquote(reference[len("file://") :]) if reference.startswith("file://") else reference
    if "\x00" in raw:
        raise ClientError(f"{what}: a path with a NUL byte")
    try:
        path = Path(raw).resolve(strict=True)  # symlinks followed: where the file really is
    except (OSError, RuntimeError):
        raise ClientError(f"{what}: no such file under --image-dir", status=404) from None
    if not any(path.is_relative_to(folder) for folder in limits.image_dirs):
        raise ClientError(f"{what}: not a file under --image-dir (symlinks are resolved first)", status=403)
    if not stat.S_ISREG(path.stat().st_mode):
        raise ClientError(f"{what}: not a regular file", status=403)
    return path


def read_local_file(reference: str, limits: ServeLimits, what: str) -> bytes:
    """The bytes of a file under ``--image-dir`` (size checked on the opened file before reading)."""
    path = local_path(reference, limits, what)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        raise ClientError(f"{what}: the file cannot be opened", status=403) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ClientError(f"{what}: not a regular file", status=403)
        if info.st_size > limits.max_image_bytes:
            raise ClientError(
                f"{what}: {info.st_size} bytes, over --max-image-bytes {limits.max_image_bytes}", status=413
            )
        return handle.read(limits.max_image_bytes + 1)


def check_address(address: str, limits: ServeLimits, what: str) -> None:
    """Refuse a resolved address that is not global (loopback, link-local, private, multicast, reserved,
    unspecified) unless ``--allow-private-fetch``."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if limits.allow_private_fetch:
        return
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local:
        raise ClientError(
            f"{what}: the host resolves to a non-public address ({ip}); the operator allows those with "
            "--allow-private-fetch",
            status=403,
        )


def resolve(host: str, port: int, limits: ServeLimits, what: str) -> list[tuple[Any, ...]]:
    """Every address ``host`` resolves to, each checked by :func:`check_address` (all must pass)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ClientError(f"{what}: the host does not resolve") from None
    if not infos:
        raise ClientError(f"{what}: the host does not resolve")
    for info in infos:
        check_address(info[4][0], limits, what)
    return infos


def fetch(url: str, limits: ServeLimits, what: str) -> bytes:
    """GET an ``http(s)`` URL: every resolved address checked, then a connection to a checked address (never a second
    resolution), connect and read timeouts, the whole fetch cut at twice ``fetch_timeout_s``, no redirects, the body
    capped at ``max_image_bytes``."""
    if not limits.allow_fetch:
        raise ClientError(
            f"{what}: this server does not fetch URLs (the operator allows it with --allow-fetch); send the image "
            "as a data URL",
            status=403,
        )
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"{what}: only http and https URLs are fetched")
    if parts.username or parts.password:
        raise ClientError(f"{what}: URLs with credentials are not fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ClientError(f"{what}: a bad port") from None
    infos = resolve(parts.hostname, port, limits, what)
    deadline = time.monotonic() + 2 * limits.fetch_timeout_s
    last_error: Exception | None = None
    sock = None
    for *_, address in infos:
        try:
            sock = socket.create_connection(address[:2], timeout=limits.fetch_timeout_s)
            break
        except OSError as error:
            last_error = error
    if sock is None:
        raise ClientError(f"{what}: could not connect ({type(last_error).__name__})", status=502)
    try:
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        connection = http.client.HTTPConnection(parts.hostname, port, timeout=limits.fetch_timeout_s)
        connection.sock = sock  # the checked address: http.client never resolves the name again
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname if port == default_port else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:  # an IPv6 literal
            host = f"[{parts.hostname}]" if port == default_port else f"[{parts.hostname}]:{port}"
        headers = {"Host": host, "Accept": "image/*", "User-Agent": "piofvlm-serve"}
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise ClientError(
                f"{what}: the server answered HTTP {response.status} (redirects are not followed)", status=502
            )
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > limits.max_image_bytes:
            raise ClientError(f"{what}: {length} bytes, over --max-image-bytes {limits.max_image_bytes}", status=413)
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise ClientError(f"{what}: the fetch took over {2 * limits.fetch_timeout_s:g} s", status=504)
            chunk = response.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_image_bytes:
                raise ClientError(f"{what}: over --max-image-bytes {limits.max_image_bytes}", status=413)
            chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise ClientError(f"{what}: the fetch timed out after {limits.fetch_timeout_s:g} s", status=504) from None
    except (OSError, http.client.HTTPException, ssl.SSLError) as error:
        raise ClientError(f"{what}: the fetch failed ({type(error).__name__})", status=502) from None
    finally:
        sock.close()


def load_image(url: str, limits: ServeLimits, what: str = "image") -> Image.Image:
    """The RGB image a client's ``image_url`` names: a data URL, an http(s) URL (``--allow-fetch``), or a path /
    ``file://`` URL under ``--image-dir``. Blocking (reads files and sockets): call it off the event loop."""
    if url.startswith("data:"):
        data = read_data_url(url, limits, what)
    elif url.startswith(("http://", "https://")):
        data = fetch(url, limits, what)
    elif url.startswith("file://") or not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url):
        data = read_local_file(url, limits, what)
    else:
        raise ClientError(f"{what}: a URL scheme this server does not read ({quote(url.split(':', 1)[0], 16)})")
    return decode_image(data, limits, what)


def video_path(url: str, limits: ServeLimits, what: str = "video") -> str:
    """The resolved path of a client's ``video_url``: videos are read from files under ``--image-dir`` only (their
    frames are decoded by transformers' video loader; their size is capped in bytes, not in pixels)."""
    if not url.startswith("file://") and re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url):
        raise ClientError(f"{what}: videos are read from files under --image-dir only", status=403)
    path = local_path(url, limits, what)
    if path.stat().st_size > limits.max_image_bytes:
        raise ClientError(f"{what}: over --max-image-bytes {limits.max_image_bytes}", status=413)
    return str(path)
