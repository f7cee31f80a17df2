"""The process's default :class:`Checkpointer`, behind ``shardckpt.save``, ``async_save``,
``load`` and ``staging_stats``.

Those four functions are the methods of the default Checkpointer, bound at call time:
same signature, same contract (documented once, on the methods). The default is created
on first use, again after someone closed it, and in a child made by ``fork()`` (the
parent's has no threads there); it is never closed for you (its pending
save, if any, is finished at interpreter exit because the save thread is not a daemon).
Use your own Checkpointer to inject storage, run several async saves at once, or free
the staging memory with ``close()``.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from shardckpt.engine.checkpointer import Checkpointer

__all__ = ["async_save", "default_checkpointer", "load", "save", "staging_stats", "wait_pending"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _Default:
    """Owns the one default Checkpointer (the only process-wide state in shardckpt)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # so two threads' first calls cannot create two defaults
        self._checkpointer: Checkpointer | None = None

    def get(self) -> Checkpointer:
        with self._lock:
            current = self._checkpointer
            # A forked child gets its own: the parent's has no threads there (and stays the parent's to close).
            if current is None or current.closed or current.process_id != os.getpid():
                current = self._checkpointer = Checkpointer()
            return current


_DEFAULT = _Default()


def default_checkpointer() -> Checkpointer:
    """The Checkpointer behind ``shardckpt.save``/``async_save``/``load``/``staging_stats``.

    Created on first use, and again after it was closed. Creating it is thread-safe;
    using it follows :class:`Checkpointer`'s contract.
    """
    return _DEFAULT.get()


def _on_default(method: Callable[Concatenate[Checkpointer, _P], _R]) -> Callable[_P, _R]:
    """``method`` as a function that runs on the default Checkpointer."""

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return method(default_checkpointer(), *args, **kwargs)

    sig = inspect.signature(method)
    call.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
    call.__doc__ = (method.__doc__ or "") + (
        "\n\n        Runs on the default Checkpointer (:func:`shardckpt.engine.default_checkpointer`).\n"
    )
    return call


save = _on_default(Checkpointer.save)
async_save = _on_default(Checkpointer.async_save)
load = _on_default(Checkpointer.load)
staging_stats = _on_default(Checkpointer.staging_stats)


def wait_pending() -> None:
    """Finish the default Checkpointer's pending async save; raise its error if nobody has seen it yet."""
    default_checkpointer().wait()
