"""One engine object: :class:`Checkpointer` owns everything a save or load keeps between calls.

That is: the staging buffers of async saves (one host copy of the rank's shard, pinned
on GPU hosts), the pending async save, the last bounded save's source statistics (these
three in its :class:`~shardckpt.engine.async_slot.AsyncSlot`), the gloo process groups the
saves and loads talk over, the DTensor write items of the last save (reused by the next
save of the same layout), the writer threads and their batch buffers, and the storage
factory. Before it existed these were module globals, so a process could have one async save at a time
and could never free the staging copy; now two Checkpointers are two independent
engines, and :meth:`Checkpointer.close` gives everything back.

``shardckpt.save``, ``async_save``, ``load`` and ``staging_stats`` are thin wrappers
over a default Checkpointer, created lazily on first use (and again after someone
closed it); :func:`default_checkpointer` returns it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardckpt.engine.async_slot import AsyncSlot
from shardckpt.engine.collective import RankGroup, checkpoint_group, destroy_groups
from shardckpt.engine.loading import LoadResult, load_from
from shardckpt.engine.local_items import ItemCache
from shardckpt.engine.options import IOOptions, SaveKwargs, Timeouts, resolve_format_version
from shardckpt.engine.protocol import Rounds
from shardckpt.engine.saved_chunks import SavedChunks
from shardckpt.engine.saving import (
    SLOW_IO,
    AsyncSaveHandle,
    SaveRequest,
    checkpoint_path,
    forked_child_problem,
    persist,
    writer_options,
)
from shardckpt.engine.state import to_plain_state_dict
from shardckpt.engine.write_threads import WriteThreads
from shardckpt.errors import ShardckptError
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage, open_storage

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Checkpointer", "StorageFactory"]

StorageFactory = Callable[..., Storage]
"""Opens a checkpoint folder, called like :func:`shardckpt.storage.open_storage`:
``factory(url, storage_options)``, with a third argument, the
:class:`~shardckpt.storage.TransferOptions`, when the :class:`IOOptions` in effect set
``transfer`` and ``url`` is an fsspec URL (so a two-argument factory keeps working
until someone sets ``transfer``)."""


class Checkpointer:
    """Saves and loads checkpoints; owns staging buffers, the pending async save, and
    the checkpoint process groups it creates.

    ``io``: the :class:`IOOptions` of every save and load of this Checkpointer (threads,
    checksum block size, object-store transfer and retry settings; default ``IOOptions()``).
    A call overrides it with ``io=``, and one field of it with the ``num_io_threads=`` or
    ``hash_block_bytes=`` shortcut.

    ``storage_factory(url, storage_options[, transfer]) -> Storage`` opens every checkpoint
    folder this Checkpointer saves to or loads from (default :func:`shardckpt.storage.open_storage`;
    see :data:`StorageFactory` for when ``transfer`` is passed), e.g. to add a cache,
    metrics, or fault injection in tests.

    Example::

        io = shardckpt.IOOptions(transfer=shardckpt.TransferOptions(max_concurrency=16))
        with shardckpt.Checkpointer(io=io) as ckpt:
            ckpt.save(state, "s3://bucket/run/step_100")
            ckpt.save(state, "s3://bucket/run/step_200", num_io_threads=16)  # this save only

    Contract:

    * ``save``, ``async_save``, ``load`` and ``close`` are collective whenever a process
      group exists: every rank of the group calls them, in the same order, each on its
      own Checkpointer (the ranks' Checkpointers must be created in the same order too,
      since each creates its own gloo groups on first use).
    * Drive a Checkpointer from one thread. Its background thread is its own business;
      :meth:`wait`, :meth:`staging_stats` and :attr:`pending` may be called from any thread.
    * At most one async save per Checkpointer is pending: the next call of any method
      but ``staging_stats`` finishes it first. Use two Checkpointers for two saves
      in flight at once (two staging copies, two gloo groups).
    * A Checkpointer works in the process that created it (:attr:`process_id`): in a
      child made by ``fork()`` its calls raise ShardckptError; create one there.
    * Whoever creates a Checkpointer closes it (``close()`` or a ``with`` block). A
      pending save keeps the interpreter alive until it ends (its thread is not a
      daemon), so an unclosed Checkpointer loses no checkpoint at exit; it only keeps
      its staging memory and groups until then.
    """

    def __init__(self, *, io: IOOptions | None = None, storage_factory: StorageFactory | None = None) -> None:
        if io is not None and not isinstance(io, IOOptions):
            raise TypeError(f"io must be a shardckpt.IOOptions or None, got {type(io).__name__}")
        self._io = io if io is not None else IOOptions()
        self._storage_factory = storage_factory
        self._async = AsyncSlot()  # staging buffers, the pending async save, the last bounded source
        self._groups: dict[Any, Any] = {}  # (purpose, timeout) -> the gloo group this object created
        self._rounds = Rounds()  # per group: the round trips' numbering and the last save's plan
        self._items = ItemCache()  # this rank's DTensor write items of the last save
        self._chunks = SavedChunks()  # this rank's last save with digests, for the next incremental one
        self._threads = WriteThreads()  # this rank's writer threads and batch buffers, between saves
        self._closed = False
        self._pid = os.getpid()  # fork() copies this object but not its threads nor its groups

    # ------------------------------------------------------------ context manager

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def process_id(self) -> int:
        """The process that created this Checkpointer, the only one it works in: a child
        made by ``fork()`` has none of its threads, its pending save or its groups, so
        there every method but ``staging_stats`` and ``close`` raises ShardckptError
        (``shardckpt.save`` and ``load`` use a default Checkpointer of each process's own)."""
        return self._pid

    @property
    def io(self) -> IOOptions:
        """The I/O options of this Checkpointer's saves and loads (those a call does not override)."""
        return self._io

    @property
    def pending(self) -> AsyncSaveHandle | None:
        """The async save started last and not yet waited for by this object, if any."""
        return self._async.pending

    # ------------------------------------------------------------ storage and groups

    def open_storage(
        self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, io: IOOptions | None = None
    ) -> Storage:
        """The Storage for ``url`` from this Checkpointer's factory, with the transfer
        settings of ``io`` (default: this Checkpointer's). Not collective."""
        url = checkpoint_path(url)
        factory = self._storage_factory if self._storage_factory is not None else open_storage
        transfer = (io if io is not None else self._io).transfer_for(url)
        if transfer is None:
            return factory(url, storage_options)
        return factory(url, storage_options, transfer)

    def group(self, process_group: Any, timeout_s: float, purpose: str = "save") -> Any:
        """The gloo group for ``purpose`` and ``timeout_s`` (see
        :func:`shardckpt.engine.collective.checkpoint_group`). Collective on first use, by every
        rank; owned by this object and destroyed by :meth:`close`."""
        self._check_open(f"using a process group for {purpose}")
        return checkpoint_group(process_group, timeout_s, self._groups, purpose)

    # ------------------------------------------------------------ save / load

    def save(
        self, state_dict: dict[str, Any], path: str | os.PathLike[str], **options: Unpack[SaveKwargs]
    ) -> Manifest | ManifestV3 | None:
        """Save ``state_dict`` to the checkpoint folder ``path`` (a local path or fsspec URL, as a
        ``str`` or ``os.PathLike`` such as ``pathlib.Path``).

        Keyword options (:class:`SaveKwargs`, all optional): ``process_group``,
        ``overwrite=False``, ``metadata=None``, ``storage_options=None``, ``timeout_s=None``,
        ``io`` (default: this Checkpointer's :class:`IOOptions`), and the shortcuts
        ``num_io_threads``, ``hash_block_bytes`` that replace one field of ``io``.

        Collective when torch.distributed is initialized (or ``process_group`` is given):
        every rank of the group must call it with its own shard of the state. Works with no
        process group too. Each rank writes the tensors it owns (replicated tensors once,
        spread over ranks) with ``num_io_threads`` threads (default 4 for local paths, 8 for
        object stores); rank 0 then writes ``manifest.json``, which commits the checkpoint.
        When this returns on any rank the checkpoint is committed and durable. On failure
        nothing is committed, nothing that existed before is touched, and every rank
        raises the same ShardckptError.

        ``state_dict`` holds nested dicts/lists of tensors and DTensors, modules and
        optimizers (saved as DCP's ``get_model_state_dict``/``get_optimizer_state_dict``
        give them, keyed by parameter names; an optimizer needs its model in the same
        ``state_dict``), top-level Stateful objects (``state_dict()``/``load_state_dict()``),
        and JSON-representable values (int, float, str, bool, None, list, tuple, str-keyed
        dict). ``path`` must be a new or empty
        folder; a committed checkpoint already there is refused unless ``overwrite=True``,
        and a folder holding anything else always is. ``metadata`` (plain JSON, the
        coordinator's copy is kept) is stored in the manifest, e.g. a step and metrics.

        This Checkpointer's pending ``async_save`` is finished first. Every wait for
        other ranks is bounded, and ends in RankTimeoutError naming the ranks missing: a
        rank that never calls ``save`` is reported after 600 s, a rank whose writes have not
        finished 1800 s after the others' (the defaults, ``timeout_s=None``: waiting for
        real I/O gets longer; a number sets both, see :class:`~shardckpt.engine.options.Timeouts`).
        The save's collectives run on a gloo group with the caller's ranks,
        created on the first call (by every rank) and owned by this Checkpointer.
        It writes version 1 (2 for an incremental save; ``format_version=1`` says so
        explicitly) and returns its Manifest; ``format_version=3`` writes format 3
        (docs/format.md section 12) and returns its ManifestV3. Returns the committed
        manifest on the coordinator, None on other ranks.
        """
        request = self._start_save("save", path, options)
        return persist(to_plain_state_dict(state_dict), request)

    def async_save(
        self,
        state_dict: dict[str, Any],
        path: str | os.PathLike[str],
        *,
        max_staging_bytes: int | None = None,
        **options: Unpack[SaveKwargs],
    ) -> AsyncSaveHandle:
        """Like :meth:`save` (the same keyword options), but returns once the state is
        copied to host memory.

        Collective, like ``save``. First finishes this Checkpointer's previous async save
        (raising its error if it failed and nobody called ``wait`` on it). Then copies every
        tensor into host buffers kept from the previous save (pinned on GPU hosts), so the
        caller may mutate its tensors as soon as this returns. Writing, checksumming and the
        commit run on a (non-daemon) background thread whose collectives use this
        Checkpointer's dedicated gloo group (created on the first call, by every rank), never
        the training group; ``timeout_s`` bounds every wait for other ranks, as in ``save``
        (a rank that never calls ``async_save`` is reported after 600 s by default). The handle is
        also :attr:`pending` until :meth:`wait` (or the next call) collects it.

        ``max_staging_bytes`` bounds the host memory used for staging on this rank (default:
        none, one copy of the rank's shard). When the rank's tensors exceed it, the writer
        streams them from the caller's tensors while this call waits, and copies only the
        last ``max_staging_bytes`` into a reused buffer before returning: the call blocks
        for about the time it takes to write the rest. 0 makes the save synchronous.

        The staging buffers live until :meth:`close`; the interpreter waits for a pending
        save at exit. For several saves in flight at once, use several Checkpointers.
        """
        if max_staging_bytes is not None and max_staging_bytes < 0:
            raise ValueError(f"max_staging_bytes must be >= 0 or None (no bound), got {max_staging_bytes}")
        request = self._start_save("async save", path, options)
        return self._async.start(state_dict, request, self._rounds.over(request.process_group)[0], max_staging_bytes)

    def _start_save(self, action: str, path: str | os.PathLike[str], options: SaveKwargs) -> SaveRequest:
        """The preamble ``save`` and ``async_save`` share: check the arguments, finish the
        pending save, and get the checkpoint group (collective on first use)."""
        unknown = sorted(set(options) - SaveKwargs.__optional_keys__)
        if unknown:
            raise TypeError(f"{action}() got unexpected keyword arguments {unknown}; see shardckpt.SaveKwargs")
        path = checkpoint_path(path)
        self._check_open(f"{action} to {path}")
        io = self._call_io(options.get("io"), options.get("num_io_threads"), options.get("hash_block_bytes"))
        storage_options = options.get("storage_options")
        base = options.get("base")
        digests = bool(options.get("incremental", False)) or base is not None
        version, found = resolve_format_version(options.get("format_version")), None
        if base is not None:  # finds the base's chunks (SavedChunks.base_index), opened with our factory
            opened = functools.partial(self.open_storage, checkpoint_path(base), storage_options, io=io)
            found = functools.partial(self._chunks.base_index, checkpoint_path(base), opened, format_version=version)
        writer = writer_options(
            io,
            path,
            overwrite=options.get("overwrite", False),
            metadata=options.get("metadata"),
            digests=digests,
            format_version=options.get("format_version"),
            base=found,
        )
        timeout_s = options.get("timeout_s")
        timeouts = Timeouts.of(timeout_s)
        self.wait()
        process_group = options.get("process_group")
        group = RankGroup.current(process_group)
        ckpt_group = self.group(process_group, timeouts.arrive_s) if group.is_distributed else None
        return SaveRequest(
            path,
            writer,
            open_storage=functools.partial(self.open_storage, path, storage_options, io=io),
            process_group=ckpt_group,
            timeout_s=timeout_s,
            committed=self._chunks.remember,
            rounds=self._rounds,
            items=self._items,
            threads=self._threads,
        )

    def load(
        self,
        state_dict: dict[str, Any],
        path: str | os.PathLike[str],
        *,
        process_group: Any = None,
        strict: bool = True,
        allow_dtype_cast: bool = False,
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        io: IOOptions | None = None,
        num_io_threads: int | None = None,
    ) -> LoadResult:
        """Fill ``state_dict`` in place from the checkpoint at ``path``.

        Collective when torch.distributed is initialized (or ``process_group`` is given).
        The target's layout decides what each rank reads: tensors and DTensors receive
        their local part of the saved global tensor, whatever world size saved it.
        Non-tensor values are replaced by the saved ones (``state_dict["step"]`` becomes
        the saved step); top-level Stateful objects get ``load_state_dict`` with their
        loaded state.

        Modules and optimizers (``torch.nn.Module``, ``torch.optim.Optimizer``; plain, DDP
        or FSDP2), as values or inside dicts and lists, are filled in place through DCP's
        ``get/set_model_state_dict`` and ``get/set_optimizer_state_dict``: a fresh
        optimizer that has not taken a step gets the saved state and param_groups (lr,
        ...). An optimizer needs the module(s) holding its parameters in the same
        ``state_dict`` (``{"model": model, "optim": optim}``); see :mod:`shardckpt.engine.live`.

        ``strict``: every key of the target must be in the checkpoint and vice versa
        (otherwise StateDictMismatchError lists them); with ``strict=False`` keys missing
        from the checkpoint are left untouched, and the keys skipped on either side are
        returned and logged once (a WARNING of the ``shardckpt`` logger, on each rank that
        skipped any). Shape and dtype must match either way, unless ``allow_dtype_cast``.
        ``allow_dtype_cast``: a floating tensor saved in another floating dtype fills the
        target anyway, converted to the target's dtype as each chunk is read (after its
        checksums are verified), rounded as ``target.copy_(saved)`` rounds: an fp32
        checkpoint loads into a bf16 model and back. Integer, bool and complex tensors
        must still match exactly, and shapes always must.
        ``verify``: check every byte read against the checksums recorded at save time.
        ``io``: threads and object-store transfer/retry settings (default: this
        Checkpointer's :class:`IOOptions`); ``num_io_threads`` replaces its thread count
        (None there too: 4). ``storage_options``: handed to fsspec for fsspec URLs.
        A problem on any rank raises on every rank, naming the rank; a rank that does not
        call ``load`` makes the others raise RankTimeoutError after 600 s, a rank whose
        reads have not finished, 1800 s after the others' (the defaults, ``timeout_s=None``;
        a number sets both). Like ``save``, the collectives run on this Checkpointer's gloo
        group, after its pending async save (if any) has finished.

        Returns, on every rank, that rank's :class:`~shardckpt.engine.loading.LoadResult`
        ``(missing_keys, unexpected_keys)``: flattened keys (``"model.fc.weight"``) of
        the target the checkpoint lacks, and of the checkpoint the target lacks. Both
        are empty unless ``strict=False``.
        """
        path = checkpoint_path(path)
        io = self._call_io(io, num_io_threads, None)
        timeouts = Timeouts.of(timeout_s)
        self._check_open(f"load of {path}")
        self.wait()
        distributed = RankGroup.current(process_group).is_distributed
        ckpt_group = self.group(process_group, timeouts.arrive_s) if distributed else None
        storage = self.open_storage(path, storage_options, io=io)
        return load_from(
            state_dict,
            path,
            storage,
            self._rounds.over(ckpt_group)[0],
            strict=strict,
            verify=verify,
            num_io_threads=io.load_threads(),
            allow_dtype_cast=allow_dtype_cast,
            timeouts=timeouts,
            slow_io_hint=SLOW_IO,
        )

    def _call_io(self, io: IOOptions | None, num_io_threads: int | None, hash_block_bytes: int | None) -> IOOptions:
        """The IOOptions of one call: ``io`` (default this Checkpointer's) with the shortcuts applied."""
        if io is not None and not isinstance(io, IOOptions):
            raise TypeError(f"io must be a shardckpt.IOOptions or None, got {type(io).__name__}")
        return (io if io is not None else self._io).with_shortcuts(
            num_io_threads=num_io_threads, hash_block_bytes=hash_block_bytes
        )

    # ------------------------------------------------------------ pending save, stats, close

    def wait(self) -> Manifest | ManifestV3 | None:
        """Finish this Checkpointer's pending async save, if any, and forget it. Returns
        its Manifest (coordinator) or None; raises its error unless someone already saw it
        through the handle's ``wait()``. Not collective by itself (the save is). Any thread."""
        self._check_process("wait for the pending async save")
        return self._async.wait()

    def staging_stats(self) -> dict[str, int]:
        """Host memory held by this Checkpointer's staging buffers, how often they were
        allocated, and for its last bounded save how many bytes were written from live
        tensors vs staged. Any thread."""
        return self._async.stats()

    def forget_chunks(self) -> None:
        """Forget the chunk locations of the last save (the next incremental save against it
        reads the base's manifest instead). Any thread."""
        self._chunks.forget()

    def close(self) -> None:
        """Collective (every rank of the groups it created calls it). Idempotent.

        Waits for the pending async save, then frees the staging buffers and destroys
        the gloo groups this Checkpointer created; raises the pending save's error (after
        freeing) if nobody saw it. Afterwards ``save``/``async_save``/``load`` raise
        ShardckptError; ``wait``, ``staging_stats`` and ``close`` still work.
        """
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # a forked child: what this object holds belongs to the parent, which closes it
        try:
            self._async.close()
        finally:
            self._chunks.forget()
            groups, self._groups = list(self._groups.values()), {}
            self._rounds.close()
            self._items.clear()
            self._threads.close()
            destroy_groups(groups)

    def _check_open(self, action: str) -> None:
        self._check_process(action)
        if self._closed:
            raise ShardckptError(
                f"{action}: this Checkpointer is closed; create a new one (or use shardckpt.save/load)"
            )

    def _check_process(self, action: str) -> None:
        """Refuse to work in a forked child (see :attr:`process_id`) instead of waiting
        forever for threads that do not exist there."""
        if self._pid != os.getpid():
            raise ShardckptError(forked_child_problem(action, "Checkpointer", self._pid))
