"""``piofvlm serve``: the chat server with a method applied, on 127.0.0.1, queried with the ``openai`` client.

Needs the ``serve`` extra (fastapi, uvicorn, openai): skipped without it. Every request has a timeout and the
server is stopped by the fixture.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import piofvlm
from piofvlm import cli
from piofvlm.testbed import data
from piofvlm.testbed.model import CHECKPOINT_DIR

KEEP = 0.25
NUM_SAMPLES = 6
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``piofvlm.serve.build_app`` under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, **kwargs) -> None:
        uvicorn = pytest.importorskip("uvicorn")
        openai = pytest.importorskip("openai")
        pytest.importorskip("fastapi")
        from piofvlm.serve import build_app

        self.app, self.manager = build_app(str(CHECKPOINT_DIR), piofvlm.get_method("pio", keep=KEEP), **kwargs)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.05)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        )

    def ask(self, image_url: str, question: str):
        """(answer, usage, kept header) of one non-streaming chat completion."""
        raw = self.client.chat.completions.with_raw_response.create(
            model=str(CHECKPOINT_DIR),
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            max_tokens=3,
            temperature=0,
        )
        completion = raw.parse()
        return (
            completion.choices[0].message.content.strip(),
            completion.usage,
            raw.headers.get("x-piofvlm-kept-visual-tokens"),
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.manager.shutdown()


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def server(image_dir):
    from piofvlm.serve_limits import ServeLimits

    running = Server(limits=ServeLimits(image_dirs=(image_dir,)))
    yield running
    running.stop()


def samples():
    return [data.make_sample("test", i) for i in range(NUM_SAMPLES)]


@pytest.mark.slow
def test_concurrent_answers_equal_sequential_answers_and_piofvlm_run(server, tmp_path, capsys):
    requests = [(data_url(s["image"]), s["question"]) for s in samples()]
    sequential = [server.ask(*request) for request in requests]
    with ThreadPoolExecutor(max_workers=3) as pool:
        concurrent = list(pool.map(lambda request: server.ask(*request), requests))
    assert [a for a, _, _ in concurrent] == [a for a, _, _ in sequential]
    for _, usage, header in concurrent:
        assert header == "64/256"
        assert usage.piofvlm["visual_tokens"] == [256]
        assert usage.piofvlm["stages"] == [{"layer": 2, "kept": [64]}]
        assert usage.piofvlm["method"]["method"] == "pio"
    for i, sample in enumerate(samples()[:2]):  # the same question through `piofvlm run`
        path = tmp_path / f"{i}.png"
        sample["image"].save(path)
        args = ["run", "--model", str(CHECKPOINT_DIR), "--image", str(path), "--prompt", sample["question"]]
        assert cli.main([*args, "--method", "pio", "--keep", str(KEEP), "--max-new-tokens", "3"]) == 0
        printed = capsys.readouterr().out
        assert f"answer: {sequential[i][0]}\n" in printed
        assert "visual tokens: 256 -> 64" in printed
    correct = sum(a.lower().startswith(s["answer"]) for (a, _, _), s in zip(sequential, samples(), strict=True))
    assert correct >= NUM_SAMPLES // 2  # the testbed answers well at 25% (docs/quality.md)


@pytest.mark.slow
def test_local_files_and_file_urls(server, image_dir):
    sample = samples()[0]
    path = image_dir / "image.png"
    sample["image"].save(path)
    expected = server.ask(data_url(sample["image"]), sample["question"])[0]
    assert server.ask(str(path), sample["question"])[0] == expected
    assert server.ask(f"file://{path}", sample["question"])[0] == expected


@pytest.mark.slow
def test_compiled_server_answers_like_the_eager_one(server):
    compiled = Server(compile=True, compile_backend="eager")  # dynamo capture; inductor is tested in test_compile
    try:
        for sample in samples()[:2]:
            request = (data_url(sample["image"]), sample["question"])
            answer, usage, header = compiled.ask(*request)
            assert answer == server.ask(*request)[0]
            assert header == "64/256"
        model = compiled.manager.slot.model
        assert "_compiled_call" in model.__dict__  # decoding did go through torch.compile
    finally:
        compiled.stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "0.0.0.0"], "--allow-remote"),
        (["--keep", "2.5"], "keep"),
        (["--set", "nope=1"], "nope"),
        (["--allow-private-fetch"], "needs --allow-fetch"),
        (["--image-dir", "/nonexistent/images"], "is not a directory"),
        (["--max-request-bytes", "0"], "max_request_bytes"),
    ],
)
def test_serve_cli_errors(argv, message, capsys):
    assert cli.main(["serve", "--model", str(CHECKPOINT_DIR), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("piofvlm: error: ") and message in err


def test_serve_cli_refuses_a_directory_without_a_model(tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_testbed_chat_template_renders_the_training_prompt():
    from piofvlm.testbed.model import CHAT_TEMPLATE, PROMPT_TEMPLATE, build_processor, load_testbed

    _, processor = load_testbed()
    assert processor.chat_template == CHAT_TEMPLATE == build_processor().chat_template  # shipped == rebuilt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many ?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == PROMPT_TEMPLATE.format(question="how many ?")


@pytest.mark.slow
def test_streaming_answers_like_non_streaming(server):
    sample = samples()[1]
    url = data_url(sample["image"])
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": sample["question"]}]
    stream = server.client.chat.completions.create(
        model=str(CHECKPOINT_DIR),
        messages=[{"role": "user", "content": content}],
        max_tokens=3,
        temperature=0,
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed.strip() == server.ask(url, sample["question"])[0]
