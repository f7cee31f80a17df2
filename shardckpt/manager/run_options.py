"""What every save and restore of one CheckpointManager passes on to its Checkpointer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.options import IOOptions, SaveKwargs, Timeouts, check_io_threads


@dataclass(frozen=True)
class RunOptions:
    """The ranks, storage options, I/O settings, timeout and staging bound of a manager's
    saves and restores (see :class:`~shardckpt.manager.CheckpointManager` for each one).
    Checked at construction; ``timeouts`` is ``timeout_s`` resolved (:class:`Timeouts`)."""

    process_group: Any = None
    storage_options: dict[str, Any] | None = None
    io: IOOptions | None = None
    num_io_threads: int | None = None
    timeout_s: float | None = None
    max_staging_bytes: int | None = None
    timeouts: Timeouts = field(init=False)

    def __post_init__(self) -> None:
        if self.max_staging_bytes is not None and self.max_staging_bytes < 0:
            raise ValueError(f"max_staging_bytes must be >= 0 or None (no bound), got {self.max_staging_bytes}")
        if self.io is not None and not isinstance(self.io, IOOptions):
            raise TypeError(f"io must be a shardckpt.IOOptions or None, got {type(self.io).__name__}")
        if self.num_io_threads is not None:
            check_io_threads(self.num_io_threads)
        object.__setattr__(self, "timeouts", Timeouts.of(self.timeout_s))

    def save_kwargs(self, metadata: dict[str, Any]) -> SaveKwargs:
        """The keywords of one ``Checkpointer.save``/``async_save`` with ``metadata``."""
        return SaveKwargs(
            process_group=self.process_group,
            storage_options=self.storage_options,
            metadata=metadata,
            timeout_s=self.timeout_s,
            io=self.io,
            num_io_threads=self.num_io_threads,
        )

    def load(
        self, checkpointer: Checkpointer, state_dict: dict[str, Any], path: str, *, strict: bool, allow_dtype_cast: bool
    ) -> None:
        """Collective. ``checkpointer.load`` of ``path`` into ``state_dict`` with these options."""
        checkpointer.load(
            state_dict,
            path,
            process_group=self.process_group,
            strict=strict,
            allow_dtype_cast=allow_dtype_cast,
            storage_options=self.storage_options,
            timeout_s=self.timeout_s,
            io=self.io,
            num_io_threads=self.num_io_threads,
        )
