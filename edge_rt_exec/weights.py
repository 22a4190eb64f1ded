"""Weights on the device: the weights file checked against the plan, and groups streamed into arena slots.

Streamed groups are read with `pread` into a weight slot of the arena, so the page cache's copy is never
mapped into this process and a finished group leaves nothing resident behind: its slot is simply refilled.
Every read is checked against the group's checksum in the plan before the slot is handed to the kernels, so a
corrupt weights file is one line naming the group, not wrong tokens.
With two slots (`speculative_prefetch`) a reader thread fills the next slot while the kernels, which release
the GIL, compute on the current one. A group without a slot is resident (a `partial_residency` group, read
once at load by the engine, or a weightless one): the streamer's cycle skips it, so the reader fills the next
*streamed* group's slot while the kernels compute on the resident groups in between.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import formats as F
from .binfile import SafetensorsFile
from .checksum import fletcher, to_words
from .errors import InternalError, UserError
from .plan import Group, Plan


def open_weights(plan: Plan) -> SafetensorsFile:
    """Open the plan's weights file and check, cheaply, that it is the file the plan was compiled against:
    its size, the data fingerprint its header carries, and every tensor's byte range."""
    path = plan.file("weights")
    if not path.exists():
        raise UserError(f"{path}: weights file not found; copy the whole artifact folder next to the plan")
    st = SafetensorsFile(path)
    want = plan.files.get("weights_sha256")
    have = st.metadata.get("edge_rt_data_sha256")
    if st.file.size != plan.files.get("weights_size") or have != want:
        raise UserError(f"{path}: these weights (sha256 {str(have)[:12]}, {st.file.size} bytes) are not the ones "
                        f"plan {plan.path.name if plan.path else ''} was compiled for (sha256 {str(want)[:12]}, "
                        f"{plan.files.get('weights_size')} bytes); recompile the plan or copy the matching weights")
    for name, w in plan.weights.items():
        st.file.check(w.offset, w.nbytes, f"weight '{name}'")
        e = st.tensors.get(name)
        try:
            expected = F.get(w.format).nbytes(w.shape)
        except ValueError as err:
            raise UserError(f"{plan.path}: weight '{name}': {err}; the plan is corrupt") from None
        if e is None or e.offset != w.offset or e.nbytes != w.nbytes or expected != w.nbytes:
            raise UserError(f"{path}: weight '{name}' is not where the plan expects it; recompile the plan")
    for g in plan.groups:
        if g.slot is not None:
            st.file.check(g.byte_start, g.byte_end - g.byte_start, f"group {g.index}")
    return st


def verify_weights_sha(plan: Plan, st: SafetensorsFile) -> bool:
    """The full check: hash the data section (slow for large models; `inspect --verify`)."""
    import hashlib

    h = hashlib.sha256()
    off, end = st.data_start, st.file.size
    while off < end:
        n = min(1 << 22, end - off)
        h.update(st.file.read(off, n, "weights data"))
        off += n
    return h.hexdigest() == plan.files.get("weights_sha256")


#: How many of the latest read and use spans `StreamStats` keeps.
SPANS_KEPT = 256


@dataclass
class StreamStats:
    read_bytes: int = 0
    read_s: float = 0.0  #: time the reader spent in pread
    check_s: float = 0.0  #: time the reader spent checking group checksums (`edge_rt_exec.checksum`)
    wait_s: float = 0.0  #: time compute waited for a slot to be filled
    reads: int = 0
    #: the latest reads: (position in the cyclic read sequence, group index, perf_counter at start, at end)
    read_spans: deque[tuple[int, int, float, float]] = field(default_factory=lambda: deque(maxlen=SPANS_KEPT))
    #: the latest uses of a filled slot, from `acquire` returning it to `release` (the engine runs the group's
    #: ops in between): (position in the cyclic read sequence, group index, perf_counter at start, at end)
    use_spans: deque[tuple[int, int, float, float]] = field(default_factory=lambda: deque(maxlen=SPANS_KEPT))


class GroupStreamer:
    """Fills weight slots with groups in the plan's cyclic order (every forward pass runs all groups)."""

    def __init__(self, st: SafetensorsFile, groups: list[Group], slots: list[np.ndarray], prefetch: bool):
        self.st = st
        self.seq = [g for g in groups if g.slot is not None]
        self.slots = slots
        self.prefetch = prefetch and len(slots) >= 2 and len(self.seq) >= 2
        self.stats = StreamStats()
        self._fletcher = fletcher.load()  # the dispatcher itself (the kernel runs without the GIL)
        self._sums = np.zeros(2, np.uint64)  # used by the one thread that reads
        self._want: dict[int, tuple[np.uint64, np.uint64]] = {}
        for g in self.seq:
            if g.checksum is None:
                raise InternalError(f"streamed group {g.index} has no checksum (plan_check requires one)")
            a, b = to_words(g.checksum)
            self._want[g.index] = (np.uint64(a), np.uint64(b))
        self._k = 0  # consumer's position in the cyclic read sequence
        self._held: list[int | None] = [None] * len(slots)  # group index each slot holds (sync mode)
        self._use_start = 0.0  # when `acquire` returned the slot in use
        self._thread: threading.Thread | None = None
        if self.prefetch:
            self._cv = threading.Condition()
            self._filled: list[int | None] = [None] * len(slots)  # read number held by each slot
            self._free = [True] * len(slots)
            self._stop = False
            self._error: BaseException | None = None
            self._thread = threading.Thread(target=self._reader, name="edge-rt-prefetch", daemon=True)
            self._thread.start()

    def _read(self, g: Group, slot: int, k: int) -> None:
        """Read group `g` into `slot` and check its checksum (`edge_rt_exec.checksum`) before any kernel sees it:
        a mismatch is one line naming the group. One pread and one kernel call: the reader thread takes the GIL
        back as few times as it can while the kernels' thread runs."""
        t0 = time.perf_counter()
        n = g.byte_end - g.byte_start
        buf = self.slots[slot][:n]
        self.st.file.read_into(g.byte_start, buf, f"group {g.index}")
        t1 = time.perf_counter()
        self._fletcher(buf, self._sums)
        t2 = time.perf_counter()
        if (self._sums[0], self._sums[1]) != self._want[g.index]:
            f = self.st.file
            raise UserError(f"{f.path}: group {g.index} (bytes [{g.byte_start}, {g.byte_end}) of {f.path.name}) "
                            "does not match its checksum in the plan: the weights file is corrupt (a failing SD "
                            "card?); copy the artifact folder to the device again, or recompile")
        self.stats.read_s += t1 - t0
        self.stats.check_s += t2 - t1
        self.stats.read_bytes += n
        self.stats.reads += 1
        self.stats.read_spans.append((k, g.index, t0, t2))

    def _reader(self) -> None:
        k = 0
        try:
            while True:
                s = k % len(self.slots)
                with self._cv:
                    while not self._free[s] and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                    self._free[s] = False
                self._read(self.seq[k % len(self.seq)], s, k)
                with self._cv:
                    self._filled[s] = k
                    self._cv.notify_all()
                k += 1
        except BaseException as e:  # surfaced to the consumer
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def acquire(self, g: Group) -> int:
        """Block until group `g` is in a slot; return the slot index."""
        expected = self.seq[self._k % len(self.seq)]
        if expected.index != g.index:
            raise RuntimeError(f"group {g.index} requested out of the cyclic order (expected {expected.index})")
        if not self.prefetch:
            s = self._k % len(self.slots)
            if self._held[s] != g.index:
                t0 = time.perf_counter()
                self._read(g, s, self._k)
                self.stats.wait_s += time.perf_counter() - t0
                self._held[s] = g.index
            self._use_start = time.perf_counter()
            return s
        s = self._k % len(self.slots)
        t0 = time.perf_counter()
        with self._cv:
            while self._filled[s] != self._k and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise self._error
        self._use_start = time.perf_counter()
        self.stats.wait_s += self._use_start - t0
        return s

    def release(self, g: Group) -> None:
        s = self._k % len(self.slots)
        self.stats.use_spans.append((self._k, g.index, self._use_start, time.perf_counter()))
        self._k += 1
        if self.prefetch:
            with self._cv:
                self._free[s] = True
                self._cv.notify_all()

    def close(self) -> None:
        if self._thread is not None:
            with self._cv:
                self._stop = True
                self._cv.notify_all()
            self._thread.join()
            self._thread = None
