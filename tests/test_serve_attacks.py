"""``piofvlm serve`` as an attacker meets it: real server processes (``python -m piofvlm serve`` on the testbed) on
127.0.0.1, and a load test.

All traffic goes to 127.0.0.1: the image listener of these tests binds it, and the addresses a server must refuse are
loopback ones here (the refusal of other addresses is tested in ``test_serve_limits.py`` with the resolver and the
connector patched, so that no connection can leave this machine). Every request has a timeout; the fixtures stop
the processes. Needs the ``serve`` extra (skipped without it).
"""

from __future__ import annotations

import base64
import gc
import http.client
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

import piofvlm
from piofvlm.testbed import data
from piofvlm.testbed.model import CHECKPOINT_DIR

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEEP = 0.25
TIMEOUT_S = 120
MODEL = str(CHECKPOINT_DIR)
SRC = Path(piofvlm.__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A ~100-byte PNG that claims ``width x height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def sample(i: int) -> dict:
    return data.make_sample("test", i)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat_body(*parts, **fields) -> dict:
    content = [image_part(p) if isinstance(p, str) else p for p in parts]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 3,
        "temperature": 0,
        **fields,
    }


def ask(url: str, question: str, **fields) -> dict:
    return chat_body(url, {"type": "text", "text": question}, **fields)


class Reply:
    def __init__(self, status: int, headers: dict, raw: bytes) -> None:
        self.status, self.headers, self.raw = status, headers, raw

    @property
    def json(self):
        return json.loads(self.raw)

    @property
    def answer(self) -> str:
        return self.json["choices"][0]["message"]["content"].strip()

    @property
    def error(self) -> str:
        """The message of OpenAI's error JSON (asserting the shape)."""
        error = self.json["error"]
        assert set(error) >= {"message", "type"} and isinstance(error["message"], str) and error["message"]
        return error["message"]


class ServerProcess:
    """``python -m piofvlm serve`` on the testbed, on a free port of 127.0.0.1, its output in a log file."""

    def __init__(self, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "piofvlm", "serve", "--model", MODEL, "--method", "pio"]
        command += ["--keep", str(KEEP), "--port", str(self.port), *flags]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if self.request("GET", "/health", timeout=5).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {timeout} s")

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = TIMEOUT_S) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            connection.request(
                method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})}
            )
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def chat(self, body, **kwargs) -> Reply:
        return self.request("POST", "/v1/chat/completions", body, **kwargs)

    def memory_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(field)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


class Listener:
    """An HTTP server on 127.0.0.1 that records every request: ``/img.png`` (a sample image), ``/big`` (300 kB),
    ``/redirect`` (to ``/img.png``), ``/hang`` (answers after 30 s)."""

    def __init__(self, image: bytes) -> None:
        self.paths: list[str] = []
        self.hosts: list[str | None] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                listener.paths.append(self.path)
                listener.hosts.append(self.headers.get("Host"))
                if self.path == "/hang":
                    time.sleep(30)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/img.png")
                    self.end_headers()
                    return
                body = image if self.path == "/img.png" else b"\0" * 300_000
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    outside = tmp_path_factory.mktemp("outside")
    (folder / "sample0.png").write_bytes(png(sample(0)["image"]))
    (outside / "secret.png").write_bytes(png(sample(1)["image"]))
    (folder / "escape.png").symlink_to(outside / "secret.png")
    (folder / "passwd.png").symlink_to("/etc/passwd")
    with open(folder / "sparse.png", "wb") as handle:
        handle.truncate(2 * 1024**3)
    os.mkfifo(folder / "fifo.png")
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory, image_dir):
    """Three server processes, started together: ``default`` (safe defaults, ``--image-dir``, a 3 MB request cap),
    ``fetching`` (``--allow-fetch``) and ``private`` (``--allow-fetch --allow-private-fetch``, 1 s timeouts, a 200 kB
    image cap)."""
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "default": ServerProcess(
            logs / "default.log", "--image-dir", str(image_dir), "--max-request-bytes", "3000000"
        ),
        "fetching": ServerProcess(logs / "fetching.log", "--allow-fetch"),
        "private": ServerProcess(
            logs / "private.log",
            *("--allow-fetch", "--allow-private-fetch", "--fetch-timeout", "1", "--max-image-bytes", "200000"),
        ),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def listener():
    running = Listener(png(sample(0)["image"]))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def expected_answer(servers) -> str:
    """Sample 0 asked with a data URL (the reference answer)."""
    reply = servers["default"].chat(ask(data_url(png(sample(0)["image"])), sample(0)["question"]))
    assert reply.status == 200, reply.raw
    assert reply.headers["x-piofvlm-kept-visual-tokens"] == "64/256"
    return reply.answer


# ------------------------------------------------------------------------------------------- outbound fetches
def test_fetch_is_off_by_default(servers, listener):
    reply = servers["default"].chat(ask(listener.url("/img.png"), "how many ?"))
    assert reply.status == 403 and "--allow-fetch" in reply.error
    assert listener.paths == []


def test_fetch_allowed_still_refuses_loopback(servers, listener):
    server = servers["fetching"]
    urls = [
        listener.url("/img.png"),
        listener.url("/img.png", host="localhost"),
        listener.url("/img.png", host="127.1"),
        f"http://127.0.0.1:{server.port}/health",  # the server itself
    ]
    for url in urls:
        reply = server.chat(ask(url, "how many ?"))
        assert reply.status == 403 and "non-public address" in reply.error, url
    assert listener.paths == []
    for url, message in [("ftp://127.0.0.1/x.png", "scheme"), ("http://u:p@127.0.0.1/x.png", "credentials")]:
        reply = server.chat(ask(url, "how many ?"))
        assert reply.status == 400 and message in reply.error
    assert server.request("GET", "/health").status == 200


def test_private_fetch_when_allowed_is_bounded(servers, listener):
    server = servers["private"]
    reference = server.chat(ask(data_url(png(sample(0)["image"])), sample(0)["question"]))
    fetched = server.chat(ask(listener.url("/img.png"), sample(0)["question"]))
    assert fetched.status == 200 and fetched.answer == reference.answer
    assert fetched.headers["x-piofvlm-kept-visual-tokens"] == "64/256"
    assert listener.paths[-1] == "/img.png" and listener.hosts[-1] == f"127.0.0.1:{listener.port}"
    reply = server.chat(ask(listener.url("/big"), "how many ?"))
    assert reply.status == 413 and "--max-image-bytes" in reply.error
    count = len(listener.paths)
    reply = server.chat(ask(listener.url("/redirect"), "how many ?"))
    assert reply.status == 502 and "redirects are not followed" in reply.error
    assert listener.paths[count:] == ["/redirect"]  # the target was not fetched
    # The server's own URL: answered (not an image), no deadlock.
    start = time.monotonic()
    reply = server.chat(ask(f"http://127.0.0.1:{server.port}/health", "how many ?"), timeout=30)
    assert reply.status == 400 and "is not a" in reply.error and time.monotonic() - start < 20
    # A listener that never answers: the request ends on the read timeout while /health keeps answering.
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        hanging = pool.submit(server.chat, ask(listener.url("/hang"), "how many ?"), timeout=60)
        time.sleep(0.3)
        health_times = []
        while not hanging.done():
            t = time.monotonic()
            assert server.request("GET", "/health", timeout=10).status == 200
            health_times.append(time.monotonic() - t)
            time.sleep(0.2)
        reply = hanging.result()
    assert reply.status == 504 and "timed out" in reply.error
    assert time.monotonic() - start < 20
    assert health_times and max(health_times) < 5


# ------------------------------------------------------------------------------------------------ local files
def test_local_files_only_under_the_image_dir(servers, image_dir, expected_answer):
    server = servers["default"]
    question = sample(0)["question"]
    for reference in (str(image_dir / "sample0.png"), f"file://{image_dir / 'sample0.png'}"):
        reply = server.chat(ask(reference, question))
        assert reply.status == 200 and reply.answer == expected_answer
    refused = {
        "/etc/passwd": 403,
        "file:///etc/passwd": 403,
        "/dev/zero": 403,
        str(image_dir / "escape.png"): 403,  # a symlink to a file outside
        str(image_dir / "passwd.png"): 403,
        f"file://{image_dir}/../": 403,
        str(image_dir / "fifo.png"): 403,
        str(image_dir / "sparse.png"): 413,
        str(image_dir / "missing.png"): 404,
    }
    for reference, status in refused.items():
        start = time.monotonic()
        reply = server.chat(ask(reference, "how many ?"), timeout=30)
        assert reply.status == status, (reference, reply.raw)
        assert time.monotonic() - start < 10
        reply.error  # noqa: B018 - OpenAI's error shape
    reply = servers["fetching"].chat(ask(str(image_dir / "sample0.png"), "how many ?"))  # no --image-dir there
    assert reply.status == 403 and "local files are off" in reply.error


# ---------------------------------------------------------------------------------------- bombs and big bodies
def test_decompression_bombs_are_refused_before_decoding(servers):
    server = servers["default"]
    peak = server.memory_kb("VmHWM")
    for raw, status, message in [
        (png_header_only(9000, 9000), 413, "--max-image-pixels"),  # 81 Mpx
        (png(Image.new("RGB", (2, 5000))), 400, "--max-aspect-ratio"),  # 206 bytes, 282 Mpx
    ]:
        start = time.monotonic()
        reply = server.chat(ask(data_url(raw), "how many ?"), timeout=30)
        assert reply.status == status and message in reply.error
        assert time.monotonic() - start < 10
    assert server.memory_kb("VmHWM") - peak < 50_000  # the peak RSS did not grow by 50 MB
    assert server.request("GET", "/health").status == 200


def test_request_size_cap(servers):
    server = servers["default"]
    big = ask(data_url(b"\0" * 2_700_000), "how many ?")  # 3.6 MB of JSON, over the 3 MB cap
    reply = server.chat(big, timeout=60)
    assert reply.status == 413 and "--max-request-bytes" in reply.error
    assert server.request("GET", "/health").status == 200


# ---------------------------------------------------------------------------------------------- client errors
def test_client_errors_are_4xx_with_openai_error_json(servers):
    server = servers["default"]
    cases = [
        (b"{not json", 400),
        (b"[]", 400),
        ({"model": MODEL}, 400),
        ({"messages": "hi"}, 400),
        (chat_body({"type": "text", "text": "hi"}, max_tokens=0), 400),
        (chat_body({"type": "text", "text": "hi"}, max_tokens=-1), 400),
        (chat_body({"type": "audio_url", "audio_url": {"url": "x"}}), 400),
        (chat_body({"type": "image_url"}), 400),
        (chat_body({"type": "text", "text": "hi"}, temperature="hot"), 400),
        (chat_body({"type": "text", "text": "hi"}, generation_config='{"max_new_tokens": 100000}'), 400),
        (chat_body({"type": "text", "text": "hi"}, model="gpt2"), 404),
        (chat_body({"type": "text", "text": "hi"}, unknown_field=1), 422),
        (ask("data:image/png;base64,!!!!", "hi"), 400),
        (ask("javascript:alert(1)", "hi"), 400),
    ]
    for body, status in cases:
        reply = server.chat(body)
        assert reply.status == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], reply.raw)
        reply.error  # noqa: B018 - OpenAI's error shape
    for method, path, status in [
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/nope", 404),
        ("POST", "/v1/responses", 404),
    ]:
        reply = server.request(method, path)
        assert reply.status == status
        reply.error  # noqa: B018
    assert server.request("GET", "/health").status == 200


def test_host_header_allow_list(servers):
    server = servers["default"]
    for host in ("evil.example", "evil.example:80", f"127.0.0.1.nip.io:{server.port}"):
        reply = server.request("GET", "/health", headers={"Host": host})
        assert reply.status == 403 and reply.json["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert server.request("GET", "/health", headers={"Host": host}).status == 200


def test_only_the_pinned_model(servers):
    server = servers["default"]
    for other in ("gpt2", "/tmp", str(Path(MODEL).parent)):
        reply = server.request("POST", "/load_model", {"model": other})
        assert reply.status == 403 and "serves one model" in reply.error
    assert server.request("POST", "/load_model", {"model": MODEL}).status == 200
    listed = server.request("GET", "/v1/models").json["data"]
    assert [m["id"] for m in listed] == [MODEL]


def test_logs_never_echo_payloads(servers):
    server = servers["default"]
    marker = "SECRETPAYLOAD"
    payload = base64.b64encode((marker * 60_000).encode()).decode()  # ~1 MB, not an image
    assert server.chat(ask("data:image/png;base64," + payload, "hi")).status == 400
    assert server.chat(chat_body({"type": "text", "text": marker * 1000}, max_tokens=0)).status == 400
    assert server.chat({"messages": [{"role": marker * 1000, "content": "x"}]}).status == 400
    assert server.chat(ask("/" + marker * 1000, "hi")).status in (403, 404)
    time.sleep(0.5)
    log = server.log()
    assert marker not in log and payload[:40] not in log
    assert len(log) < 100_000


# -------------------------------------------------------------------------------------------------- reports
def test_text_only_turn_and_two_images(servers):
    server = servers["default"]
    reply = server.chat(chat_body({"type": "text", "text": "how many ?"}))
    assert reply.status == 200 and reply.headers["x-piofvlm-kept-visual-tokens"] == "none"
    report = reply.json["usage"]["piofvlm"]
    assert report["items"] == [] and report["pruned"] is False and "nothing to prune" in report["note"]
    two = chat_body(
        data_url(png(sample(0)["image"])), data_url(png(sample(1)["image"])), {"type": "text", "text": "how many ?"}
    )
    reply = server.chat(two)
    assert reply.status == 200 and reply.headers["x-piofvlm-kept-visual-tokens"] == "64/256,64/256"
    report = reply.json["usage"]["piofvlm"]
    assert report["visual_tokens"] == [256, 256] and report["stages"] == [{"layer": 2, "kept": [64, 64]}]
    assert report["items"] == [{"type": "image", "visual_tokens": 256, "kept": [64]}] * 2
    # A conversation continues without an image: the earlier turn's image is in the prompt again.
    history = [
        two["messages"][0],
        {"role": "assistant", "content": reply.answer},
        {"role": "user", "content": "and now ?"},
    ]
    follow_up = server.chat({**two, "messages": history})
    assert follow_up.status == 200 and follow_up.headers["x-piofvlm-kept-visual-tokens"] == "64/256,64/256"


def test_streaming_carries_the_report_in_its_last_chunk(servers, expected_answer):
    server = servers["default"]
    reply = server.chat(ask(data_url(png(sample(0)["image"])), sample(0)["question"], stream=True))
    assert reply.status == 200
    events = [
        json.loads(line[len("data: ") :]) for line in reply.raw.decode().splitlines() if line.startswith("data: ")
    ]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert text.strip() == expected_answer
    last = events[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["usage"]["piofvlm"]["stages"] == [{"layer": 2, "kept": [64]}]
    assert all("piofvlm" not in (e.get("usage") or {}) for e in events[:-1])


# -------------------------------------------------------------------------------------------------- no leak
def test_reset_removes_the_method_and_drops_the_model():
    """In process (to see the models): after ``/reset`` the old model carries no piofvlm hook and nothing holds it
    (a weak reference to every model the server loaded is dead after each reset)."""
    import uvicorn

    from piofvlm.core.handle import _ACTIVE
    from piofvlm.serve import build_app

    app, manager = build_app(MODEL, piofvlm.get_method("pio", keep=KEEP))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = ServerProcess.__new__(ServerProcess)
    client.port = port
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        request = ask(data_url(png(sample(0)["image"])), sample(0)["question"], max_tokens=1)
        loaded = []
        for cycle in range(3):
            reply = client.chat(request)
            assert reply.status == 200 and reply.headers["x-piofvlm-kept-visual-tokens"] == "64/256"
            model = manager.slot.model
            assert model in _ACTIVE and piofvlm_hooks(model)
            loaded.append(weakref.ref(model))
            assert client.request("POST", "/reset").status == 200
            assert model not in _ACTIVE and not piofvlm_hooks(model)  # the method is off the old model
            assert manager.slot is None and manager.processor is None
            del model
            gc.collect()
            assert [ref() for ref in loaded] == [None] * (cycle + 1)  # and nothing holds it any more
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        manager.shutdown()


def piofvlm_hooks(model) -> list:
    return [
        hook
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
        if getattr(hook, "__module__", "").startswith("piofvlm")
    ]


# ------------------------------------------------------------------------------------------------- load test
@pytest.mark.slow
def test_rss_is_flat_over_reset_cycles(servers):
    server = servers["default"]
    request = ask(data_url(png(sample(0)["image"])), sample(0)["question"], max_tokens=1)

    def cycle() -> None:
        assert server.request("POST", "/reset").status == 200
        assert server.chat(request).status == 200

    for _ in range(2):
        cycle()  # warm-up: allocator pools
    before = server.memory_kb()
    for _ in range(8):
        cycle()
    after = server.memory_kb()
    assert after < before * 1.03, (before, after)  # a leaked testbed model is ~10 MB a cycle


@pytest.mark.slow
def test_load_mixed_valid_and_invalid_requests(servers, image_dir):
    """~200 requests, 10 at a time, three rounds, a third of them valid (images as data URLs and files, two images,
    text only, streaming), the rest each a client error: every valid answer equals the one asked alone, every invalid
    one gets its 4xx, /health answers throughout, RSS stays flat from round to round, the run is bounded in time."""
    server = servers["default"]
    valid = [ask(data_url(png(sample(i)["image"])), sample(i)["question"], max_tokens=2) for i in range(4)]
    valid.append(ask(str(image_dir / "sample0.png"), sample(0)["question"], max_tokens=2))
    valid.append(chat_body({"type": "text", "text": "how many ?"}, max_tokens=2))
    valid.append(
        chat_body(
            data_url(png(sample(2)["image"])),
            data_url(png(sample(3)["image"])),
            {"type": "text", "text": "?"},
            max_tokens=2,
        )
    )
    invalid = [
        (chat_body({"type": "text", "text": "hi"}, max_tokens=0), 400),
        (ask("/etc/passwd", "hi"), 403),
        (ask(str(image_dir / "escape.png"), "hi"), 403),
        (ask(data_url(png_header_only(9000, 9000)), "hi"), 413),
        (ask("http://127.0.0.1:9/x.png", "hi"), 403),
        (b"{broken", 400),
        (chat_body({"type": "text", "text": "hi"}, model="gpt2"), 404),
        (ask("data:image/png;base64,AAAA", "hi"), 400),
    ]

    def answer(reply: Reply) -> tuple[str, str | None]:
        return reply.answer, reply.headers.get("x-piofvlm-kept-visual-tokens")

    sequential = []
    for body in valid:
        reply = server.chat(body)
        assert reply.status == 200, reply.raw
        sequential.append(answer(reply))
    jobs = []
    for i in range(200):
        if i % 3 == 0:
            jobs.append(("valid", (i // 3) % len(valid)))
        else:
            jobs.append(("invalid", i % len(invalid)))

    def run(job) -> tuple:
        kind, index = job
        if kind == "valid":
            reply = server.chat(valid[index])
            return job, reply.status, answer(reply) if reply.status == 200 else reply.raw
        body, _ = invalid[index]
        reply = server.chat(body, timeout=60)
        return job, reply.status, reply.json["error"]["message"] if reply.status < 500 else reply.raw

    health_times: list[float] = []
    done = threading.Event()

    def watch_health() -> None:
        while not done.is_set():
            start = time.monotonic()
            assert server.request("GET", "/health", timeout=10).status == 200
            health_times.append(time.monotonic() - start)
            time.sleep(0.5)

    # The same 200 requests three times. RSS is compared from the end of the first round on: the first concurrent
    # round grows the allocator (an arena per thread of the server's pools), which is not a leak; a leak grows with
    # every round.
    rss: list[int] = []
    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    start = time.monotonic()
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(run, jobs))
        rss.append(server.memory_kb())
        for (kind, index), status, outcome in results:
            if kind == "valid":
                assert status == 200 and outcome == sequential[index], (index, status, outcome)
            else:
                assert status == invalid[index][1], (index, status, outcome)
    elapsed = time.monotonic() - start
    done.set()
    watcher.join(timeout=15)
    assert elapsed < 900
    assert health_times and max(health_times) < 5
    assert rss[-1] < rss[0] * 1.05, rss
