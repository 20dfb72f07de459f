"""Keep OpenVINO's CPU plugin from leaving a thread's alternate signal stack on freed memory. Torch-free.

The plugin sets an alternate signal stack (``sigaltstack``, 11568 bytes of its own) on the thread that compiles a
model, remembering the one it replaced, and puts that one back when the compiled model is destroyed. With two
compiled models destroyed in another order than they were made (a predictor cache evicting, a deployment
switching, tests), the stack put back is the first model's, already freed. Python installs its signal handlers
with ``SA_ONSTACK``, so the next handled signal on that thread (SIGCHLD when a child exits, SIGTERM) writes its
frame into freed memory: a heap corruption that crashes later in unrelated code, or, where the memory is unmapped,
a SIGSEGV the kernel raises at the syscall that received the signal (``si_code`` SI_KERNEL). Both were seen: the
suite's process segfaulted in ``int()`` on a corrupted object and in ``waitpid`` (``tests/test_sigaltstack.py``
reproduces it in a child process).

:func:`kept_sigaltstack` saves the calling thread's alternate stack and puts it back after compiling or
destroying a model, so the plugin's stack is never the thread's and what it restores is always ours.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("ldd.deploy")


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]


def current() -> tuple[int | None, int, int]:
    """The calling thread's alternate signal stack: (address, flags, size)."""
    st = _StackT()
    if _libc.sigaltstack(None, ctypes.byref(st)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack")
    return st.ss_sp, st.ss_flags, st.ss_size


@contextmanager
def kept_sigaltstack() -> Iterator[None]:
    """Run the block, then give the calling thread back the alternate signal stack it had before."""
    saved = _StackT()
    ok = _libc.sigaltstack(None, ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if ok and _libc.sigaltstack(ctypes.byref(saved), None) != 0:
            log.warning("could not restore the thread's alternate signal stack (errno %d)", ctypes.get_errno())
