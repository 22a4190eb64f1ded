"""`edge-rt-exec chat` driven through a pseudo-terminal: two turns, the second reusing the first's KV cache."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest


class Terminal:
    """A child process on a pseudo-terminal (stdin and stdout), stderr kept apart."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(list(args), stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True)
        os.close(slave)
        self.out = b""
        self.err = b""

    def read_until(self, done, timeout: float = 300) -> None:  # noqa: ANN001
        """Read stdout and stderr until `done(self)` holds."""
        deadline = time.time() + timeout
        while not done(self):
            fds = [self.master] + ([self.proc.stderr.fileno()] if self.proc.stderr else [])
            ready, _, _ = select.select(fds, [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"timed out; stdout {self.out[-500:]!r}, stderr {self.err[-2000:]!r}")
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"chat exited: {self.err.decode(errors='replace')[-2000:]}")
                if fd == self.master:
                    self.out += chunk
                else:
                    self.err += chunk

    def prompts(self) -> int:
        return self.out.count(b"> ")

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> None:
        try:
            self.send("/exit")
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def _stats(err: bytes) -> list[dict[str, float]]:
    rows = []
    for m in re.finditer(rb"prompt (\d+) tokens, (\d+) reused from the KV cache, prefill (\d+) ms", err):
        rows.append({"prompt": int(m.group(1)), "reused": int(m.group(2)), "prefill_ms": int(m.group(3))})
    return rows


@pytest.mark.slow
def test_two_turns_reuse_the_kv_cache(smollm2_artifacts) -> None:
    plan = smollm2_artifacts("greedy_grouping", "512M")
    t = Terminal(sys.executable, "-m", "edge_rt_exec", "chat", str(plan), "-n", "24")
    try:
        t.read_until(lambda t: t.prompts() >= 1)
        t.send("What is the capital of France?")
        t.read_until(lambda t: t.prompts() >= 2 and len(_stats(t.err)) >= 1)
        first_reply = t.out.decode(errors="replace")
        t.send("And of Italy?")
        t.read_until(lambda t: t.prompts() >= 3 and len(_stats(t.err)) >= 2)
        s1, s2 = _stats(t.err)[:2]
        assert s1["reused"] == 0
        # the second prompt re-sends the whole conversation; all of the first exchange but its last tokens
        # (the reply re-tokenized) comes from the cache
        assert s2["prompt"] > s1["prompt"] and s2["reused"] >= s1["prompt"], (s1, s2)
        print(f"turn 1: {s1}; turn 2: {s2} ({s2['reused']} of {s2['prompt']} prompt tokens not recomputed)")
        assert "Paris" in first_reply
        t.send("/reset")
        t.read_until(lambda t: b"conversation cleared" in t.err and t.prompts() >= 4)
    finally:
        t.close()
