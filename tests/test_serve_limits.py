"""``piofvlm serve``'s input limits and prune report, in process (no server).

The fetch tests never let a connection leave this machine: ``socket.getaddrinfo`` is patched to answer the addresses
under test and ``socket.create_connection`` is patched to record the attempt and fail, so a refused address is one
that was never connected to, and an allowed one is recorded, not reached.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import struct
import zlib

import pytest
import torch
from PIL import Image

import piofvlm
from piofvlm import serve_limits
from piofvlm.serve_limits import ClientError, ServeLimits

# ------------------------------------------------------------------------------------------ resolver and fetch


class Resolver:
    """Patches name resolution (to ``addresses``) and connecting (recorded, then refused) for one test."""

    def __init__(self, monkeypatch, addresses: list[str]) -> None:
        self.connects: list[tuple] = []
        self.lookups: list[str] = []

        def getaddrinfo(host, port, *args, **kwargs):
            self.lookups.append(host)
            infos = []
            for address in addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
                infos.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
            return infos

        def create_connection(address, *args, **kwargs):
            self.connects.append(address)
            raise ConnectionRefusedError("test: no connection is ever made")

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", create_connection)


FETCH = ServeLimits(allow_fetch=True)


@pytest.mark.parametrize(
    "addresses",
    [
        ["10.0.0.5"],  # private
        ["192.168.1.20"],
        ["172.16.3.4"],
        ["100.64.0.1"],  # shared address space (carrier NAT)
        ["169.254.169.254"],  # link-local: cloud metadata
        ["127.0.0.1"],
        ["0.0.0.0"],
        ["::1"],
        ["fd00::1"],  # unique local
        ["fe80::1"],  # link-local
        ["::ffff:10.0.0.1"],  # IPv4-mapped private
        ["224.0.0.1"],  # multicast
        ["93.184.216.34", "10.0.0.5"],  # one bad address among good ones: refused (a rebinding client picks)
    ],
)
def test_fetch_refuses_non_public_addresses_without_connecting(monkeypatch, addresses):
    resolver = Resolver(monkeypatch, addresses)
    with pytest.raises(ClientError, match="non-public address") as caught:
        serve_limits.load_image("http://images.example.test/a.png", FETCH)
    assert caught.value.status == 403
    assert resolver.lookups == ["images.example.test"]
    assert resolver.connects == []  # refused before any connection


def test_fetch_connects_to_the_checked_public_address_only(monkeypatch):
    resolver = Resolver(monkeypatch, ["93.184.216.34"])
    with pytest.raises(ClientError, match="could not connect") as caught:
        serve_limits.load_image("http://images.example.test:8080/a.png", FETCH)
    assert caught.value.status == 502
    assert resolver.connects == [("93.184.216.34", 8080)]  # the address that was checked, not the name again


def test_private_addresses_are_fetched_only_when_allowed(monkeypatch):
    resolver = Resolver(monkeypatch, ["10.0.0.5"])
    with pytest.raises(ClientError, match="could not connect"):
        serve_limits.load_image(
            "https://intranet.example.test/a.png", ServeLimits(allow_fetch=True, allow_private_fetch=True)
        )
    assert resolver.connects == [("10.0.0.5", 443)]


@pytest.mark.parametrize(
    ("url", "limits", "message"),
    [
        ("http://images.example.test/a.png", ServeLimits(), "does not fetch URLs"),  # the default: no fetch
        ("ftp://images.example.test/a.png", FETCH, "scheme"),
        ("gopher://images.example.test/", FETCH, "scheme"),
        ("http://user:secret@images.example.test/a.png", FETCH, "credentials"),
        ("http:///a.png", FETCH, "only http and https"),
    ],
)
def test_fetch_refusals_need_no_lookup(monkeypatch, url, limits, message):
    resolver = Resolver(monkeypatch, ["93.184.216.34"])
    with pytest.raises(ClientError, match=message):
        serve_limits.load_image(url, limits)
    assert resolver.lookups == [] and resolver.connects == []


# --------------------------------------------------------------------------------------------- local files
def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels with almost no data (what a decompression bomb looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.png").write_bytes(png_bytes((20, 10)))
    (outside / "secret.png").write_bytes(png_bytes((20, 10)))
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "passwd").symlink_to("/etc/passwd")
    (allowed / "inner.png").symlink_to(allowed / "ok.png")  # a symlink that stays inside is fine
    (allowed / "sub").mkdir()
    with open(allowed / "sparse.png", "wb") as handle:  # 2 GB that take no disk
        handle.truncate(2 * 1024**3)
    os.mkfifo(allowed / "fifo.png")
    return allowed, outside


def test_local_files_only_under_image_dirs(folders):
    allowed, outside = folders
    limits = ServeLimits(image_dirs=(allowed,))
    assert serve_limits.load_image(str(allowed / "ok.png"), limits).size == (20, 10)
    assert serve_limits.load_image(f"file://{allowed / 'ok.png'}", limits).size == (20, 10)
    assert serve_limits.load_image(str(allowed / "inner.png"), limits).size == (20, 10)
    refused = {
        str(outside / "secret.png"): (403, "not a file under --image-dir"),
        f"file://{allowed}/../outside/secret.png": (403, "not a file under --image-dir"),
        str(allowed / "escape.png"): (403, "not a file under --image-dir"),
        str(allowed / "passwd"): (403, "not a file under --image-dir"),
        "/etc/passwd": (403, "not a file under --image-dir"),
        "/dev/zero": (403, "not a file under --image-dir"),
        str(allowed / "sub"): (403, "not a regular file"),
        str(allowed / "fifo.png"): (403, "not a regular file"),  # never opened: a FIFO would block the reader
        str(allowed / "sparse.png"): (413, "over --max-image-bytes"),
        str(allowed / "missing.png"): (404, "no such file"),
    }
    for reference, (status, message) in refused.items():
        with pytest.raises(ClientError, match=message) as caught:
            serve_limits.load_image(reference, limits)
        assert caught.value.status == status, reference
    with pytest.raises(ClientError, match="local files are off") as caught:
        serve_limits.load_image(str(allowed / "ok.png"), ServeLimits())  # the default: no folder
    assert caught.value.status == 403


# ------------------------------------------------------------------------------------------------- images
def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_pixel_and_aspect_caps_refuse_before_decoding(monkeypatch):
    bomb, thin = data_url(png_header_only(9000, 9000)), data_url(png_bytes((2, 5000)))  # 81 Mpx in 100 bytes
    loads = []
    original = Image.Image.load

    def counting_load(self, *args, **kwargs):
        loads.append(self.size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    limits = ServeLimits()
    with pytest.raises(ClientError, match="over --max-image-pixels") as caught:
        serve_limits.load_image(bomb, limits)
    assert caught.value.status == 413
    with pytest.raises(ClientError, match="aspect ratio"):
        serve_limits.load_image(thin, limits)
    assert loads == []  # neither was decoded
    assert serve_limits.load_image(data_url(png_bytes((40, 30))), limits).size == (40, 30)
    assert serve_limits.load_image(data_url(png_bytes((40, 30))), ServeLimits(max_image_pixels=1200)).size == (40, 30)
    with pytest.raises(ClientError, match="over --max-image-pixels 1199"):
        serve_limits.load_image(data_url(png_bytes((40, 30))), ServeLimits(max_image_pixels=1199))


def test_image_byte_cap_and_bad_images():
    limits = ServeLimits(max_image_bytes=1000)
    with pytest.raises(ClientError, match="over --max-image-bytes") as caught:
        serve_limits.load_image(data_url(b"\0" * 5000), limits)
    assert caught.value.status == 413
    for url, message in [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png,rawdata", "base64"),
        (data_url(b"GIF89a-but-not-really"), "is not a"),
        (data_url(png_header_only(50, 50)), "could not be decoded"),  # the header passes, the data is short
        ("javascript:alert(1)", "scheme"),
    ]:
        with pytest.raises(ClientError, match=message):
            serve_limits.load_image(url, ServeLimits())


def test_error_messages_never_carry_the_payload():
    marker = "PAYLOADMARKER" * 2000
    body = {"messages": [{"role": marker, "content": "x"}]}
    with pytest.raises(ClientError) as caught:
        serve_limits.validate_chat_body(body, ServeLimits(), "m")
    assert len(caught.value.message) < 200 and marker not in caught.value.message
    with pytest.raises(ClientError) as caught:
        serve_limits.load_image("data:image/png;base64," + base64.b64encode(marker.encode()).decode(), ServeLimits())
    assert "PAYLOADMARKER" not in caught.value.message


# ------------------------------------------------------------------------------------------- request checks
def chat(**fields):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], **fields}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ([], 400, None),
        ({}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": [1]}, 400, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "audio_url"}]}]}, 400, "messages[0].content[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400, "messages[0].content[0]"),
        (chat(max_tokens=0), 400, "max_tokens"),
        (chat(max_tokens=-5), 400, "max_tokens"),
        (chat(max_tokens=10**9), 400, "max_tokens"),
        (chat(max_tokens="10"), 400, "max_tokens"),
        (chat(max_completion_tokens=0), 400, "max_completion_tokens"),
        (chat(temperature=-1), 400, "temperature"),
        (chat(temperature="hot"), 400, "temperature"),
        (chat(top_p=2), 400, "top_p"),
        (chat(stream="yes"), 400, "stream"),
        (chat(stop=5), 400, "stop"),
        (chat(logit_bias={"x": 1}), 400, "logit_bias"),
        (chat(seed=1.5), 400, "seed"),
        (chat(generation_config="{}"), 400, "generation_config"),
        (chat(chat_template_kwargs={}), 400, "chat_template_kwargs"),
        (chat(model="another/model"), 404, "model"),
    ],
)
def test_bad_requests_are_client_errors(body, status, param):
    with pytest.raises(ClientError) as caught:
        serve_limits.validate_chat_body(body, ServeLimits(), "pinned/model")
    assert caught.value.status == status
    assert caught.value.param == param
    error = caught.value.body()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_image_count_cap_and_default_max_tokens():
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    body = {"messages": [{"role": "user", "content": [image] * 3}]}
    with pytest.raises(ClientError, match="--max-images"):
        serve_limits.validate_chat_body(dict(body), ServeLimits(max_images=2), "m")
    visuals = serve_limits.validate_chat_body(body, ServeLimits(max_images=3, max_new_tokens=7), "m")
    assert visuals == [(0, 0, "image_url"), (0, 1, "image_url"), (0, 2, "image_url")]
    assert body["max_tokens"] == 7


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8000", True),
        ("localhost:8000", True),
        ("LOCALHOST", True),
        ("[::1]:8000", True),
        ("evil.example:8000", False),
        ("127.0.0.1.evil.example", False),
        ("", False),
        (None, False),
    ],
)
def test_host_allow_list(host, allowed):
    assert serve_limits.host_allowed(host, ServeLimits()) is allowed
    assert serve_limits.host_allowed(host, ServeLimits(allowed_hosts=())) is True  # the check is off


def test_cli_flags_and_their_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    serve_limits.add_arguments(parser)
    limits = serve_limits.limits_from_args(parser.parse_args([]))
    assert limits == ServeLimits()  # the flags' defaults are the safe ones
    assert not limits.allow_fetch and not limits.image_dirs and "localhost" in limits.allowed_hosts
    args = parser.parse_args(["--host", "0.0.0.0", "--allow-fetch", "--image-dir", str(tmp_path), "--max-images", "2"])
    limits = serve_limits.limits_from_args(args)
    assert limits.allow_fetch and limits.image_dirs == (tmp_path.resolve(),) and limits.max_images == 2
    assert limits.allowed_hosts == ()  # --allow-remote without --allowed-host: any Host
    for argv, message in [
        (["--allow-private-fetch"], "needs --allow-fetch"),
        (["--image-dir", str(tmp_path / "nope")], "not a directory"),
        (["--max-images", "0"], "max_images"),
    ]:
        with pytest.raises(ValueError, match=message):
            serve_limits.limits_from_args(parser.parse_args(argv))
    help_text = " ".join(parser.format_help().split())
    for flag in ("--allow-fetch", "--allow-private-fetch", "--image-dir", "--max-image-pixels", "--max-request-bytes"):
        assert flag in help_text
    assert "(default: 25000000)" in help_text and "(default: 33554432)" in help_text


# ------------------------------------------------------------------------------------ per-item prune report
def _kinds() -> list[str]:
    from test_qwen import KINDS

    return list(KINDS)


@pytest.mark.parametrize("kind", _kinds())
def test_report_uses_the_mechanism_items_for_every_family(kind):
    """Every family of the invariant tests (``test_qwen.KINDS``), standard sample 1 (an image and a video, or two
    images / tiles): one report entry per image / video with the counts the processor laid out (not per row: Mistral
    3's row breaks; not per frame) and, per stage, the kept tokens of each item equal to that item's budget; their sum
    is what the stage kept; the header says the same; nothing of piofvlm is left on the model."""
    from piofvlm.serve import _Slot, kept_header
    from test_qwen import EXPECTED_COUNTS, FAMILIES, ONEVISION, QWEN_KINDS, make_inputs, model

    m = model(kind)
    own_video = kind in QWEN_KINDS or kind == ONEVISION or (kind in FAMILIES and FAMILIES[kind].has_video)
    slot = _Slot(m, piofvlm.get_method("random", layers=[1, 2], keep=[0.5, 0.25]))
    try:
        _, report = slot.generate({**make_inputs(kind, (1,)), "max_new_tokens": 1, "do_sample": False})
    finally:
        slot.close()
    counts = EXPECTED_COUNTS[kind][1]
    assert len(counts) >= 2 and report["visual_tokens"] == counts
    kinds = ["image"] * (len(counts) - 1) + ["video" if own_video else "image"]
    assert [item["type"] for item in report["items"]] == kinds
    for stage, ratio in zip(report["stages"], (0.5, 0.25), strict=True):
        assert stage["kept"] == [max(1, int(ratio * n + 0.5)) for n in counts], stage
    records = slot.method.last_selection
    assert [sum(s["kept"]) for s in report["stages"]] == [len(r.kept[0]) for r in records]
    per_item = [list(k) for k in zip(*[s["kept"] for s in report["stages"]], strict=True)]
    assert [item["kept"] for item in report["items"]] == per_item
    last = report["stages"][-1]["kept"]
    assert kept_header(report) == ",".join(f"{k}/{n}" for k, n in zip(last, counts, strict=True))
    assert not piofvlm_hooks(m)


def piofvlm_hooks(m: torch.nn.Module) -> list:
    """Hooks of piofvlm (the method's or the server's) still on ``m``."""
    return [
        hook
        for module in m.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
        if getattr(hook, "__module__", "").startswith("piofvlm")
    ]


def test_text_only_turn_runs_unhooked_and_says_nothing_was_pruned():
    from piofvlm.serve import TEXT_ONLY_NOTE, _Slot, kept_header
    from test_qwen import make_inputs, model

    m = model("qwen2_vl")
    inputs = make_inputs("qwen2_vl", (0,))
    visual = (inputs["input_ids"] == m.config.image_token_id) | (inputs["input_ids"] == m.config.video_token_id)
    text_ids = inputs["input_ids"][~visual][None]
    kwargs = {
        "input_ids": text_ids,
        "attention_mask": torch.ones_like(text_ids),
        "max_new_tokens": 3,
        "do_sample": False,
    }
    with torch.no_grad():
        expected = m.generate(**kwargs)
    slot = _Slot(m, piofvlm.get_method("pio", keep=0.5))
    try:
        output, report = slot.generate(dict(kwargs))
        assert slot.handle.active  # the method is back on for the next turn
    finally:
        slot.close()
    assert torch.equal(output, expected)
    assert report["items"] == [] and report["stages"] == [] and report["note"] == TEXT_ONLY_NOTE
    assert report["pruned"] is False and kept_header(report) == "none"
    assert not piofvlm_hooks(m)
