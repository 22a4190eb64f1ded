"""edge-rt executor: replays compiled plans with numba kernels on the device.

Imports only numpy, numba, psutil, tokenizers and the standard library.
"""

import os as _os

__version__ = "0.1.0"



def _kernel_sources_fingerprint() -> str:
    """Size and mtime of every kernel source: numba's cache checks only the file of the kernel itself, so a kernel
    whose inlined helper (in another module) changed would keep its old machine code. A new fingerprint is a new
    cache folder (one compile after an upgrade or an edit; a few stat calls at import)."""
    import hashlib

    here = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "ops")
    h = hashlib.sha1(__version__.encode())
    for name in sorted(_os.listdir(here)):
        if name.endswith(".py"):
            st = _os.stat(_os.path.join(here, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


# numba's on-disk cache goes to a per-user folder, never into the installed package (which may be read-only
# or shared between architectures). Set before numba is imported anywhere.
if "NUMBA_CACHE_DIR" not in _os.environ:
    _os.environ["NUMBA_CACHE_DIR"] = _os.path.join(
        _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache"), "edge-rt", "numba",
        _kernel_sources_fingerprint())

# GNU OpenMP (numba's threading layer) spins ~300k iterations at each barrier by default. On a shared or
# busy board a spinning pool starves the thread it waits for and one parallel region can take milliseconds;
# a short spin keeps back-to-back kernels hot and then sleeps. Measured in benchmarks/bench_threads.py.
_os.environ.setdefault("GOMP_SPINCOUNT", "20000")

__all__ = ["Decoder", "Engine", "Session", "load_plan", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - lazy, so `import edge_rt_exec` (the compiler does) stays cheap
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "Session":
        from .generate import Session

        return Session
    if name == "Decoder":
        from .decoder import Decoder

        return Decoder
    if name == "load_plan":
        from .plan import load_plan

        return load_plan
    raise AttributeError(f"module 'edge_rt_exec' has no attribute {name!r}")
