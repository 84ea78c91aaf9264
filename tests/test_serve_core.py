"""``piofvlm serve``'s own chat-completion core (``serve.ServedModel``): what a request becomes (processor messages,
generation config, stop strings), and what the server answers (text, usage, finish_reason, the prune report,
refusals as 4xx also when streaming) against a direct ``generate()`` on the testbed. In-process servers on
127.0.0.1; every request has a timeout. Needs the ``serve`` extra (skipped without it).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time

import pytest
import torch
from transformers import GenerationConfig

import piofvlm
from piofvlm.serve_limits import ClientError, ServeLimits, validate_chat_body
from piofvlm.testbed import data
from piofvlm.testbed.model import CHECKPOINT_DIR, PROMPT_TEMPLATE, load_testbed

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = str(CHECKPOINT_DIR)
TIMEOUT_S = 120
EOS = 2  # the testbed's eos_token_id (generation_config.json)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class InProcess:
    """``build_app`` under uvicorn in a thread, queried with ``http.client``."""

    def __init__(self, method) -> None:
        import uvicorn

        from piofvlm.serve import build_app

        self.app, self.served = build_app(MODEL, method)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def request(self, method: str, path: str, body=None) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        try:
            payload = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def chat(self, body) -> tuple[int, dict, bytes]:
        return self.request("POST", "/v1/chat/completions", body)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.served.shutdown()


def ask(image, question: str, **fields) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def events(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def server():
    running = InProcess(piofvlm.get_method("pio", keep=0.25))
    yield running
    running.stop()


def direct(sample: dict, max_new_tokens: int, **generate_kwargs) -> tuple[list[int], int]:
    """(new token ids, prompt length) of the testbed asked directly: the training prompt through the processor (not
    the chat template), ``pio`` at 25% applied, greedy ``generate()``."""
    model, processor = load_testbed()
    inputs = processor(images=[sample["image"]], text=[PROMPT_TEMPLATE.format(question=sample["question"])],
                       return_tensors="pt")  # fmt: skip
    handle = piofvlm.get_method("pio", keep=0.25).apply(model)
    try:
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    finally:
        handle.remove()
    prompt = inputs["input_ids"].shape[-1]
    return output[0, prompt:].tolist(), prompt


# ----------------------------------------------------------------------------------------- request -> inputs
def test_processor_messages():
    from piofvlm.serve import processor_messages

    image = object()  # the server hands the decoded image through as it is
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "?"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "/srv/v.mp4"}}]},
    ]
    converted, has_video = processor_messages(messages)
    assert has_video
    assert converted == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [], "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c1"},
        {"role": "user", "content": [{"type": "video", "url": "/srv/v.mp4"}]},
    ]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the request is not modified
    assert processor_messages(messages[:2])[1] is False
    bad = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]
    with pytest.raises(ClientError, match="arguments must be JSON"):
        processor_messages(bad)


def test_generation_config_maps_the_openai_fields():
    from piofvlm.serve import generation_config

    base = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=EOS)
    config = generation_config({"max_tokens": 7}, base)
    assert config.max_new_tokens == 7 and config.do_sample is False
    assert config.cache_implementation is None and base.max_new_tokens == 20  # a copy: the model's is untouched
    body = {
        "max_tokens": 7,
        "max_completion_tokens": 5,  # OpenAI's newer name wins
        "temperature": 0.7,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "logit_bias": {"12": -3, "7": 2.5},
    }
    config = generation_config(body, base, compile=True)
    assert config.max_new_tokens == 5 and config.do_sample is True and config.temperature == 0.7
    assert config.top_p == 0.9 and config.repetition_penalty == 1.5
    assert config.sequence_bias == {(12,): -3.0, (7,): 2.5}
    assert config.cache_implementation == "static"
    assert generation_config({"max_tokens": 3, "temperature": 0}, GenerationConfig(do_sample=True)).do_sample is False


@pytest.mark.parametrize(
    ("stops", "pieces", "sent", "hit"),
    [
        (None, ["ab", "c"], ["ab", "c"], False),
        ("END", ["two E", "N", "D more"], ["two ", "", ""], True),
        ("END", ["two E", "N", "x"], ["two ", "", "ENx"], False),  # held back, then released: no stop after all
        (["\n", "ab"], ["xa", "b\ny"], ["x", ""], True),
        (["zz"], ["abz"], ["ab"], False),  # finish() releases the held "z"
    ],
)
def test_stop_cut(stops, pieces, sent, hit):
    from piofvlm.serve import StopCut

    cut = StopCut(stops)
    assert [cut.feed(piece) for piece in pieces] == sent
    rest = cut.finish()
    assert cut.hit is hit
    text = "".join(pieces)
    if hit:
        stop = [stops] if isinstance(stops, str) else stops
        assert "".join(sent) + rest == text[: min(text.find(s) for s in stop if s in text)]
    else:
        assert "".join(sent) + rest == text


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"unknown_field": 1}, 422, "unknown_field"),
        ({"n": 2}, 400, "n"),
        ({"logprobs": True}, 400, "logprobs"),
        ({"presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"reasoning_effort": "high"}, 400, "reasoning_effort"),
        ({"n": True}, 400, "n"),  # not 1
        ({"stream_options": "yes"}, 400, "stream_options"),
    ],
)
def test_fields_the_server_cannot_honour_are_refused(fields, status, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ClientError) as caught:
        validate_chat_body(body, ServeLimits(), "m")
    assert caught.value.status == status and caught.value.param == param


def test_neutral_values_and_bookkeeping_fields_are_accepted():
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        **{"n": 1, "logprobs": False, "presence_penalty": 0.0, "tools": [], "tool_choice": "none"},
        **{"user": "u1", "metadata": {"k": "v"}, "store": False, "stream_options": {"include_usage": True}},
    }
    assert validate_chat_body(body, ServeLimits(), "m") == []


# ------------------------------------------------------------------------------------------------ answers
def test_answer_usage_and_finish_reason_equal_a_direct_generate(server):
    sample = data.make_sample("test", 0)
    status, headers, raw = server.chat(ask(sample["image"], sample["question"], max_tokens=3))
    assert status == 200, raw
    reply = json.loads(raw)
    new, prompt = direct(sample, 3)
    _, processor = load_testbed()
    assert reply["object"] == "chat.completion" and reply["model"] == MODEL
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": processor.decode(new, skip_special_tokens=True)}
    assert choice["finish_reason"] == ("stop" if new[-1] == EOS else "length")
    usage = reply["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, len(new))
    assert usage["total_tokens"] == prompt + len(new)
    assert (
        usage["piofvlm"]["stages"] == [{"layer": 2, "kept": [64]}]
        and headers["x-piofvlm-kept-visual-tokens"] == "64/256"
    )


def test_logit_bias_on_eos_ends_the_answer_at_once_and_stop_strings_are_cut(server):
    sample = data.make_sample("test", 1)
    status, _, raw = server.chat(ask(sample["image"], sample["question"], max_tokens=5, logit_bias={str(EOS): 100}))
    assert status == 200, raw
    reply = json.loads(raw)
    assert reply["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": ""},
        "finish_reason": "stop",
    }
    assert reply["usage"]["completion_tokens"] == 1
    # eos pushed down: the answer runs to max_tokens ("length"), as a direct generate() with the same bias.
    no_eos = {str(EOS): -100}
    status, _, raw = server.chat(ask(sample["image"], sample["question"], max_tokens=6, logit_bias=no_eos))
    reply = json.loads(raw)
    new, _ = direct(sample, 6, sequence_bias={(EOS,): -100.0})
    full = load_testbed()[1].decode(new, skip_special_tokens=True)
    assert reply["choices"][0]["message"]["content"] == full and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 6 and EOS not in new
    # A stop string (spanning tokens): the answer ends before it, and says "stop", streamed or not.
    stop = full.strip()[2:5]
    assert len(stop) == 3 and full.find(stop) > 0, full
    expected = full[: full.find(stop)]
    for stream in (False, True):
        body = ask(sample["image"], sample["question"], max_tokens=6, logit_bias=no_eos, stop=[stop], stream=stream)
        status, _, raw = server.chat(body)
        assert status == 200, raw
        if stream:
            chunks = events(raw)
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = json.loads(raw)["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
        assert (text, finish) == (expected, "stop"), stream


def test_stream_chunks_and_models(server):
    sample = data.make_sample("test", 2)
    _, _, raw = server.chat(ask(sample["image"], sample["question"], max_tokens=3))
    expected = json.loads(raw)
    status, headers, raw = server.chat(ask(sample["image"], sample["question"], max_tokens=3, stream=True))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    chunks = events(raw)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == expected["usage"]  # token counts and the prune report
    status, _, raw = server.request("GET", "/v1/models")
    assert status == 200
    assert json.loads(raw)["data"] == [
        {"id": MODEL, "object": "model", "created": 0, "owned_by": "local", "status": {"value": "loaded"}}
    ]


def test_a_refused_prompt_is_a_4xx_also_when_streaming():
    """A method whose count exceeds the image's 256 visual tokens refuses the prompt in the prefill: a stream is
    answered with the same 400 as a plain request (the server waits for the prefill before sending headers); a text
    turn on the same server is answered; the model is unloaded until the first request."""
    refusing = InProcess(piofvlm.get_method("random", keep=300))
    try:
        status, _, raw = refusing.request("GET", "/v1/models")
        assert json.loads(raw)["data"][0]["status"] == {"value": "unloaded"}
        sample = data.make_sample("test", 0)
        for stream in (False, True):
            status, headers, raw = refusing.chat(ask(sample["image"], sample["question"], max_tokens=2, stream=stream))
            assert status == 400, raw
            assert headers["content-type"] == "application/json"
            assert "the pruning method refused this prompt" in json.loads(raw)["error"]["message"]
        status, headers, raw = refusing.chat(
            {"messages": [{"role": "user", "content": "how many ?"}], "max_tokens": 2}
        )
        assert status == 200 and headers["x-piofvlm-kept-visual-tokens"] == "none"
        assert refusing.served.slot.handle.active  # the hooks are back on after the text turn
    finally:
        refusing.stop()
    assert refusing.served.slot is None  # shutdown removed the method and dropped the model
    with pytest.raises(RuntimeError, match="shutting down"):
        refusing.served._submit(lambda: None)


def test_seed_makes_sampling_reproducible(server):
    sample = data.make_sample("test", 3)

    def answer(seed: int) -> str:
        body = ask(sample["image"], sample["question"], max_tokens=4, temperature=2, seed=seed)
        status, _, raw = server.chat(body)
        assert status == 200, raw
        return json.loads(raw)["choices"][0]["message"]["content"]

    assert answer(1234) == answer(1234)
    assert len({answer(seed) for seed in range(6)}) > 1  # temperature > 0 does sample
    torch.manual_seed(0)  # the seed is set in this process (the inference thread): leave later tests a known state


def test_a_client_that_leaves_a_stream_stops_its_generation(server):
    """A stream of up to 400 tokens (eos pushed down) whose client reads its first event and disconnects: the
    generation stops (the model ran far fewer than 400 steps), and the next request is answered."""
    sample = data.make_sample("test", 4)
    server.chat(ask(sample["image"], sample["question"], max_tokens=1))  # loaded
    steps = []
    hook = server.served.slot.model.register_forward_pre_hook(lambda *args: steps.append(1))
    try:
        body = ask(sample["image"], sample["question"], max_tokens=400, logit_bias={str(EOS): -100}, stream=True)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT_S)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200
        assert response.read(6) == b"data: "  # the first event has come
        response.close()  # the socket closes with the last of its users
        connection.close()
        status, _, raw = server.chat(ask(sample["image"], sample["question"], max_tokens=2))  # queued behind it
        assert status == 200, raw
    finally:
        hook.remove()
    assert len(steps) < 200, len(steps)
