"""Lazy numba: kernels are declared at import time without importing numba, and compiled (or loaded from
numba's on-disk cache) only when a plan needs them.

Why: the compiler reads the op registry (names, shape rules, numpy twins) and must not pay for numba; the
executor must load only the kernels its plan calls (start-up time grows with every kernel otherwise).

How a family module uses it::

    from ._jit import F32, I64, arr, helper, kernel, prange

    @helper
    def _row(x, out): ...                      # inlined into the kernels that call it

    @kernel("void", arr(F32, 2, ro=True), arr(F32, 2), parallel=True)
    def scale_rows(x, out):
        for i in prange(x.shape[0]):
            _row(x[i], out[i])

`kernel(...)` returns a `Kernel`: `Kernel.load()` gives the numba dispatcher (compiling the declared signature,
or loading it from the cache), `Kernel.warm(*types)` loads one specialization of a kernel declared without a
signature. Before a module's first kernel is built, `_materialize` swaps the module's `prange` and every
`@helper` function it references for their numba versions (helpers defined elsewhere too, recursively), so
kernel bodies read as ordinary numba code. Kernels never call other kernels, only helpers.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

prange = range  #: replaced by `numba.prange` in a module's globals when its first kernel is built

_LOCK = threading.RLock()
_HELPERS: dict[int, Any] = {}  #: id(python function) -> its numba version
#: Called (once per kernel) just before a kernel that numba's cache does not hold is compiled: the executor's
#: first-run notice ("compiling kernels once, ~N s").
on_compile: Callable[[Kernel], None] | None = None

# ---- numba itself ------------------------------------------------------------------------------------------

#: Set by the executor's CLIs (processes edge-rt owns, never a library user's): when numba first loads its
#: registries, the optional integrations no kernel uses are not imported. numba imports scipy.linalg to see
#: whether `np.dot` may call BLAS, and cffi (which parses C headers with pycparser) to type cffi functions; in a
#: development environment both are installed and cost more start-up than numba's own import, while on a device
#: with only the executor's dependencies neither exists and numba takes the same path as here.
LEAN_IMPORTS = False
_NOT_FOR_KERNELS = ("scipy", "cffi")
_numba: Any = None


class _Refuse:
    """A meta-path finder that makes `_NOT_FOR_KERNELS` look uninstalled while numba loads its registries."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in _NOT_FOR_KERNELS:
            raise ImportError(f"{name} is not imported by the edge-rt executor (no kernel uses it)")
        return None


def numba_module() -> Any:
    """`numba`, with its typing and target registries loaded (once), lean when `LEAN_IMPORTS` is set."""
    global _numba
    if _numba is not None:
        return _numba
    with _LOCK:
        if _numba is None:
            lean = LEAN_IMPORTS and not any(m in sys.modules for m in _NOT_FOR_KERNELS)
            if lean:
                sys.meta_path.insert(0, _Refuse)  # type: ignore[arg-type]
            try:
                import numba
                from numba.core.registry import cpu_target

                cpu_target.typing_context.refresh()
                cpu_target.target_context.refresh()
            finally:
                if lean:
                    sys.meta_path.remove(_Refuse)  # type: ignore[arg-type]
            _numba = numba
    return _numba


# ---- type tokens (resolved to numba types when a kernel is built) --------------------------------------------

F32, F64, F16, I64, I32, I8, U8, U16, U32, U64, BOOL = ("float32", "float64", "float16", "int64", "int32", "int8",
                                                        "uint8", "uint16", "uint32", "uint64", "bool")


class arr:  # noqa: N801 - reads like a type in signatures
    """An array type token: `arr(F32, 2, ro=True)` is a C-contiguous read-only float32 matrix."""

    __slots__ = ("dtype", "ndim", "ro", "layout")

    def __init__(self, dtype: str, ndim: int, ro: bool = False, layout: str = "C") -> None:
        self.dtype, self.ndim, self.ro, self.layout = dtype, ndim, ro, layout

    def __repr__(self) -> str:
        return f"arr({self.dtype}, {self.ndim}{', ro=True' if self.ro else ''})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, arr) and (self.dtype, self.ndim, self.ro, self.layout) == (
            other.dtype, other.ndim, other.ro, other.layout)

    def __hash__(self) -> int:
        return hash((self.dtype, self.ndim, self.ro, self.layout))


def _nb_type(tok: Any) -> Any:
    from numba import types as nt

    if isinstance(tok, arr):
        return nt.Array(getattr(nt, "boolean" if tok.dtype == "bool" else tok.dtype), tok.ndim, tok.layout,
                        readonly=tok.ro)
    if tok == "void":
        return nt.void
    if tok == "bool":
        return nt.boolean
    return getattr(nt, tok)


def typeof_array(a: Any) -> arr:
    """The token of a numpy array (bool arrays are passed to kernels as their uint8 view)."""
    dt = "uint8" if a.dtype.name == "bool" else a.dtype.name
    return arr(dt, a.ndim, ro=not a.flags.writeable, layout="C" if a.flags.c_contiguous else "A")


# ---- helpers and kernels -------------------------------------------------------------------------------------

def helper(fn: Callable) -> Callable:
    """Mark a function as a numba helper: inlined (at numba-IR level) into every kernel that calls it, so the
    kernel's fastmath flags and `prange` loops apply to its body."""
    fn.__edge_rt_helper__ = True  # type: ignore[attr-defined]
    return fn


def routine(fastmath: Any = False) -> Callable[[Callable], Callable]:
    """Mark a function as a numba routine: compiled on its own (not inlined) with its own fastmath flags, and
    called from kernels. Why not a helper: the body of a `prange` loop is compiled into a separate function
    without the kernel's fastmath flags and with weaker alias information, and LLVM then leaves its inner
    reductions scalar (measured: attention scores 8x slower). A routine called from the `prange` body keeps
    them vectorised."""

    def mark(fn: Callable) -> Callable:
        fn.__edge_rt_helper__ = True  # type: ignore[attr-defined]
        fn.__edge_rt_routine__ = set(fastmath) if isinstance(fastmath, frozenset) else fastmath  # type: ignore
        return fn
    return mark


def _helper_dispatcher(fn: Callable, error_model: str) -> Any:
    with _LOCK:
        d = _HELPERS.get(id(fn))
        if d is None:
            numba = numba_module()
            _materialize(fn.__globals__, error_model)
            fm = getattr(fn, "__edge_rt_routine__", None)
            if fm is None:
                d = numba.njit(inline="always", nogil=True, error_model=error_model)(fn)
            else:
                d = numba.njit(inline="never", nogil=True, fastmath=fm, error_model=error_model)(fn)
            _HELPERS[id(fn)] = d
        return d


def _materialize(globs: dict[str, Any], error_model: str) -> None:
    """Swap `prange` and the helpers a module references for their numba versions (once per module)."""
    with _LOCK:
        if globs.get("__edge_rt_materialized__"):
            return
        globs["__edge_rt_materialized__"] = True
        numba = numba_module()

        if globs.get("prange") is range:
            globs["prange"] = numba.prange
        for name, v in list(globs.items()):
            if callable(v) and getattr(v, "__edge_rt_helper__", False):
                globs[name] = _helper_dispatcher(v, error_model)


class Kernel:
    """A numba kernel declared lazily: `load()` builds it (once), `warm(*types)` loads one specialization."""

    def __init__(self, fn: Callable, signature: tuple | None, parallel: bool, fastmath: Any,
                 error_model: str) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.module = fn.__module__
        self.signature = signature
        self.parallel = parallel
        self.fastmath = fastmath
        self.error_model = error_model
        self.__doc__ = fn.__doc__
        self._disp: Any = None

    def __repr__(self) -> str:
        return f"<kernel {self.module}.{self.name}{' (loaded)' if self._disp is not None else ''}>"

    @property
    def loaded(self) -> bool:
        return self._disp is not None

    def cached(self) -> bool:
        """Whether numba's on-disk cache has an index for this kernel (compiled on this machine before). A
        heuristic for the first-run notice: numba names the index `<module>.<function>-<line>.py*.nbi` in a
        folder named after the source folder."""
        import glob
        import os

        code = self.fn.__code__
        src = os.path.abspath(code.co_filename)
        root = os.environ.get("NUMBA_CACHE_DIR", "")
        stem = os.path.splitext(os.path.basename(src))[0]
        pattern = os.path.join(glob.escape(root), f"{glob.escape(os.path.basename(os.path.dirname(src)))}_*",
                               f"{stem}.{self.fn.__qualname__}-{code.co_firstlineno}.py*.nbi")
        return bool(root) and bool(glob.glob(pattern))

    def load(self) -> Any:
        """The numba dispatcher. With a declared signature this compiles it or loads it from the cache."""
        d = self._disp
        if d is not None:
            return d
        with _LOCK:
            if self._disp is None:
                numba = numba_module()
                _materialize(self.fn.__globals__, self.error_model)
                if self.signature is not None:
                    self._announce()
                opts = dict(cache=True, nogil=True, parallel=self.parallel,
                            fastmath=set(self.fastmath) if isinstance(self.fastmath, frozenset) else self.fastmath,
                            error_model=self.error_model)
                if self.signature is not None:
                    ret, *args = self.signature
                    sig = _nb_type(ret)(*[_nb_type(a) for a in args])
                    self._disp = numba.njit(sig, **opts)(self.fn)
                else:
                    self._disp = numba.njit(**opts)(self.fn)
            return self._disp

    def warm(self, *types: Any) -> None:
        """Load (from the cache, or compile) the specialization for argument type tokens `types`; a kernel with
        a declared signature has exactly one, loaded by `load()`."""
        d = self.load()
        if self.signature is None:
            sig = tuple(_nb_type(t) for t in types)
            if sig not in d.overloads:
                self._announce()
                d.compile(sig)

    def _announce(self) -> None:
        if on_compile is not None and not self.cached():
            on_compile(self)

    def __call__(self, *args: Any) -> Any:
        """Call through the lazy wrapper (tests, one-off calls). The engine binds `load()` instead."""
        return self.load()(*args)


def kernel(*signature: Any, parallel: bool = False, fastmath: Any = False,
           error_model: str = "python") -> Callable[[Callable], Kernel]:
    """Declare a kernel: `@kernel("void", arr(F32, 2, ro=True), ..., parallel=True)`, or `@kernel()` for one
    compiled per argument types (the ONNX ops that take any numeric dtype). Always `cache=True, nogil=True`."""

    def wrap(fn: Callable) -> Kernel:
        return Kernel(fn, tuple(signature) if signature else None, parallel, fastmath, error_model)

    return wrap


#: The dot-product flags: let LLVM reassociate and contract (FMA) reductions so they vectorise. torch's BLAS
#: does not sum in sequential order either; no-NaN / no-inf / approximate functions stay off.
DOT_FLAGS = frozenset({"reassoc", "contract"})
