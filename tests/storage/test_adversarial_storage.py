"""Adversarial storage: files that are not what they claim, and failures that are not "absent".

Item 9 of issue #13. A data file (or an import source) swapped for a FIFO must not block
the reader forever, and one swapped for a symlink to a host file must not be read. Each
check runs under a deadline in a thread (or a subprocess for the CLI entry point), so a
regression fails here instead of hanging the suite; a thread left blocked on a FIFO
open is released by opening the FIFO for writing.

Item 5, storage half. "Does not exist" is ENOENT / HTTP 404 only: EIO, ESTALE, EACCES on
a stat, or a 403 / 500 answer to a HEAD, raise StorageError, and a checkpoint whose
manifest cannot be looked up is never reported as missing or uncommitted.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from s3server import FaultProxy, S3Server
from safetensors.torch import save_file

import shardckpt
from shardckpt.cli import app as cli
from shardckpt.cli.base import EXIT_DAMAGED, EXIT_UNUSABLE
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.convert.importer import import_checkpoint
from shardckpt.errors import (
    CheckpointNotFoundError,
    ManifestError,
    NotCommittedError,
    StorageError,
)
from shardckpt.storage import LocalStorage
from shardckpt.storage.fsspec_storage import FsspecStorage, TransferOptions
from shardckpt.storage.retry import RetryPolicy

# A hang guard, not a speed claim: each call takes well under a second, a loaded 2-core
# machine may stretch that several times, and a reader blocked on a FIFO never returns.
# Only a failing test waits this long.
DEADLINE_S = 30.0


def original() -> dict[str, Any]:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 7}


def blank() -> dict[str, Any]:
    return {"w": torch.zeros(3, 4), "step": -1}


@pytest.fixture
def ckpt(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A committed checkpoint of :func:`original`, in format 1 unless a test parametrizes
    ``ckpt`` indirectly with 3 (its index records and page are in ``data/`` too)."""
    folder = tmp_path / "ckpt"
    shardckpt.save(original(), str(folder), format_version=getattr(request, "param", 1))
    return folder


BOTH_FORMATS = pytest.mark.parametrize("ckpt", [1, 3], indirect=True, ids=["v1", "v3"])


def data_file(folder: Path) -> Path:
    (only,) = (folder / "data").glob("*.safetensors")
    return only


def fifo_in_place_of(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


def host_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    """A file outside any checkpoint, exactly ``size`` bytes: a same-size data file
    passes the size check, so only the symlink check stands between it and a load."""
    content = (b"HOST-SECRET-" * (size // 12 + 1))[:size]
    path = tmp_path / "elsewhere" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(content)
    return path, content


def ends(fn: Callable[[], Any], *, fifos: tuple[Path, ...] = ()) -> Any:
    """``fn()``'s result, or the exception it raised, provided it ends within DEADLINE_S.

    A reader blocked opening a FIFO may hold the GIL (torch.load opens files from C++),
    so the watchdog is a process of its own: after DEADLINE_S it opens each FIFO for
    writing, which releases the reader, and the test then fails: a hang is the bug
    this file exists to catch."""
    watchdog = (
        subprocess.Popen(
            [
                "sh",
                "-c",
                f'sleep {DEADLINE_S}; for f in "$@"; do exec 3<>"$f"; exec 3>&-; done',
                "sh",
                *map(str, fifos),
            ],
        )
        if fifos
        else None
    )
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEADLINE_S + 5)
    elapsed = time.monotonic() - start
    if watchdog is not None:
        watchdog.kill()
        watchdog.wait()
    if worker.is_alive() or elapsed >= DEADLINE_S:
        pytest.fail(f"took {elapsed:.1f} s (deadline {DEADLINE_S} s): blocked on a FIFO or reading a device")
    return box[0]


def raised(fn: Callable[[], Any], kind: type[BaseException], *, fifos: tuple[Path, ...] = ()) -> BaseException:
    got = ends(fn, fifos=fifos)
    assert isinstance(got, kind), f"expected {kind.__name__}, got {got!r}"
    return got


# ---------------------------------------------------------------- load: FIFO


@pytest.mark.parametrize("verify", [False, True])
@BOTH_FORMATS
def test_load_of_a_data_file_replaced_by_a_fifo_fails_fast_naming_it(ckpt: Path, verify: bool) -> None:
    fifo = fifo_in_place_of(data_file(ckpt))
    target = blank()
    e = raised(lambda: shardckpt.load(target, str(ckpt), verify=verify), StorageError, fifos=(fifo,))
    assert fifo.name in str(e) and "FIFO" in str(e)
    assert "remove it" in str(e)  # says how to fix
    assert torch.equal(target["w"], torch.zeros(3, 4))


# ---------------------------------------------------------------- load: symlinks


@pytest.mark.parametrize("verify", [False, True])
@BOTH_FORMATS
def test_load_refuses_a_data_file_symlinked_to_a_host_file(ckpt: Path, tmp_path: Path, verify: bool) -> None:
    victim = data_file(ckpt)
    host, content = host_file(tmp_path, victim.stat().st_size)
    victim.unlink()
    victim.symlink_to(host)
    target = blank()
    e = raised(lambda: shardckpt.load(target, str(ckpt), verify=verify), StorageError)
    assert victim.name in str(e) and "outside the checkpoint folder" in str(e)
    assert "Replace the link" in str(e)
    assert host.read_bytes() == content  # untouched
    assert torch.equal(target["w"], torch.zeros(3, 4))  # and nothing of it was loaded


@BOTH_FORMATS
def test_load_follows_a_symlink_that_stays_inside_the_folder(ckpt: Path) -> None:
    victim = data_file(ckpt)
    real = ckpt / "data" / "moved.bin"
    victim.rename(real)
    victim.symlink_to(real.name)  # relative, inside data/
    target = blank()
    ends(lambda: shardckpt.load(target, str(ckpt), verify=True))
    assert torch.equal(target["w"], original()["w"]) and target["step"] == 7
    assert verify_checkpoint(str(ckpt)).ok


def test_load_and_verify_of_a_manifest_replaced_by_a_fifo_fail_fast(ckpt: Path) -> None:
    fifo = fifo_in_place_of(ckpt / "manifest.json")
    for call in (lambda: shardckpt.load(blank(), str(ckpt)), lambda: verify_checkpoint(str(ckpt))):
        e = raised(call, StorageError, fifos=(fifo,))
        assert "manifest.json" in str(e) and "FIFO" in str(e)


@pytest.mark.parametrize("command", ["export", "diff"])
@BOTH_FORMATS
def test_export_and_diff_of_a_fifo_data_file_fail_fast_naming_it(ckpt: Path, tmp_path: Path, command: str) -> None:
    from shardckpt import convert

    other = tmp_path / "other"
    shardckpt.save(original(), str(other))
    fifo = fifo_in_place_of(data_file(ckpt))
    out = tmp_path / "out.safetensors"
    call = {
        "export": lambda: convert.export_checkpoint(str(ckpt), str(out), format="safetensors"),
        "diff": lambda: convert.diff_checkpoints(str(other), str(ckpt)),
    }[command]
    e = raised(call, StorageError, fifos=(fifo,))
    assert fifo.name in str(e) and "FIFO" in str(e)


# ---------------------------------------------------------------- verify (library and CLI)


@BOTH_FORMATS
def test_verify_reports_a_fifo_data_file_as_damage_without_blocking(ckpt: Path) -> None:
    fifo = fifo_in_place_of(data_file(ckpt))
    report = ends(lambda: verify_checkpoint(str(ckpt)), fifos=(fifo,))
    (problem,) = report.problems
    assert problem.file == f"data/{fifo.name}"
    assert "FIFO" in problem.message and "remove it" in problem.message
    assert "run verify again" not in problem.message  # not a passing storage hiccup
    assert report.files_checked == 0


@BOTH_FORMATS
def test_verify_reports_an_out_of_folder_symlink_and_reads_nothing_of_it(ckpt: Path, tmp_path: Path) -> None:
    victim = data_file(ckpt)
    host, content = host_file(tmp_path, victim.stat().st_size)
    victim.unlink()
    victim.symlink_to(host)
    report = ends(lambda: verify_checkpoint(str(ckpt)))
    (problem,) = report.problems
    assert problem.file == f"data/{victim.name}" and "outside the checkpoint folder" in problem.message
    assert report.bytes_hashed == 0
    assert host.read_bytes() == content


def test_cli_verify_on_a_fifo_exits_damaged_within_the_deadline(ckpt: Path) -> None:
    """The real entry point, in a process of its own: `python -m shardckpt verify`."""
    fifo = fifo_in_place_of(data_file(ckpt))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "shardckpt", "verify", "--no-progress", str(ckpt)],
            capture_output=True,
            text=True,
            timeout=60,  # mostly the cost of importing torch
        )
    except subprocess.TimeoutExpired:  # run() has killed it
        pytest.fail("shardckpt verify blocked on a FIFO data file")
    assert done.returncode == EXIT_DAMAGED, done.stderr
    assert f"data/{fifo.name}" in done.stdout and "FIFO" in done.stdout


def test_cli_verify_on_an_out_of_folder_symlink_exits_damaged(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    victim = data_file(ckpt)
    host, _ = host_file(tmp_path, victim.stat().st_size)
    victim.unlink()
    victim.symlink_to(host)
    assert ends(lambda: cli.main(["verify", "--no-progress", str(ckpt)])) == EXIT_DAMAGED
    out = capsys.readouterr().out
    assert victim.name in out and "outside the checkpoint folder" in out


# ---------------------------------------------------------------- import


def small_safetensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    small_safetensors(folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("source_format", ["auto", "safetensors", "hf", "torch"])
def test_import_of_a_fifo_file_fails_fast_naming_it(tmp_path: Path, source_format: str) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    e = raised(lambda: import_checkpoint(str(fifo), str(out), source_format=source_format), StorageError, fifos=(fifo,))
    assert str(fifo) in str(e) and "FIFO" in str(e) and "regular file" in str(e)
    assert not out.exists()


@pytest.mark.parametrize("planted", ["model.safetensors", "model.safetensors.index.json"])
def test_import_of_a_hf_folder_holding_a_fifo_fails_fast(tmp_path: Path, planted: str) -> None:
    folder = hf_folder(tmp_path)
    fifo = folder / planted
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    out = tmp_path / "out"
    e = raised(lambda: import_checkpoint(str(folder), str(out)), StorageError, fifos=(fifo,))
    assert str(fifo) in str(e) and "FIFO" in str(e)
    assert not out.exists()


def test_import_refuses_a_symlink_to_a_device(tmp_path: Path) -> None:
    """/dev/null here; /dev/zero or /dev/urandom would never end: devices are refused as such."""
    folder = tmp_path / "hf"
    folder.mkdir()
    link = folder / "model.safetensors"
    link.symlink_to(os.devnull)
    e = raised(lambda: import_checkpoint(str(folder), str(tmp_path / "out")), StorageError)
    assert str(link) in str(e) and os.devnull in str(e) and "not a regular file" in str(e)


def test_import_refuses_a_shard_symlinked_to_a_host_file_naming_link_and_target(tmp_path: Path) -> None:
    host, content = host_file(tmp_path, 4096)
    folder = tmp_path / "hf"
    folder.mkdir()
    link = folder / "model.safetensors"
    link.symlink_to(host)
    out = tmp_path / "out"
    e = raised(lambda: import_checkpoint(str(folder), str(out)), ManifestError)
    assert str(link) in str(e) and str(host) in str(e)
    assert "HOST-SECRET" not in str(e)  # nothing of the host file is echoed
    assert host.read_bytes() == content and not out.exists()


def test_import_follows_a_symlink_to_a_regular_safetensors_file_like_the_hf_cache(tmp_path: Path) -> None:
    """huggingface_hub snapshots are symlinks into ../../blobs/: import accepts them."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    want = small_safetensors(blobs / "0123abcd")
    folder = tmp_path / "snapshots" / "rev"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "0123abcd")
    out = tmp_path / "out"
    report = ends(lambda: import_checkpoint(str(folder), str(out)))
    assert report.num_tensors == 2
    got = {k: torch.zeros_like(v) for k, v in want.items()}
    shardckpt.load(got, str(out))
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_import_of_a_dcp_folder_holding_a_fifo_fails_before_dcp_opens_it(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "dcp"
    dcp.save({"w": torch.ones(4)}, checkpoint_id=str(src), no_dist=True)
    (victim,) = [p for p in src.iterdir() if p.suffix == ".distcp"]
    fifo = fifo_in_place_of(victim)
    e = raised(
        lambda: import_checkpoint(str(src), str(tmp_path / "out"), trust_pickle=True), StorageError, fifos=(fifo,)
    )
    assert str(fifo) in str(e) and "FIFO" in str(e)


def test_cli_import_of_a_fifo_shard_exits_2_naming_it(tmp_path: Path, capsys: Any) -> None:
    folder = hf_folder(tmp_path)
    fifo = fifo_in_place_of(folder / "model.safetensors")
    code = ends(lambda: cli.main(["import", "--no-progress", str(folder), str(tmp_path / "out")]), fifos=(fifo,))
    assert code == EXIT_UNUSABLE
    err = capsys.readouterr().err
    assert str(fifo) in err and "FIFO" in err


# ---------------------------------------------------------------- stat failures are not "absent"


FAULTS = [errno.EIO, errno.ESTALE, errno.EACCES]


@pytest.fixture
def failing_stat(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, int], None]:
    """``fail(path, code)``: os.stat and os.scandir of ``path`` (as
    shardckpt.storage.local calls them) raise OSError(code); every other path is
    stat'ed for real."""
    real_stat, real_scandir = os.stat, os.scandir
    broken: dict[str, int] = {}

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        code = broken.get(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
        if code is not None:
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_stat(path, *args, **kwargs)

    def fake_scandir(path: Any = ".") -> Any:
        code = broken.get(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
        if code is not None:
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(os, "scandir", fake_scandir)

    def fail(path: Path, code: int) -> None:
        broken[str(path)] = code

    return fail


@pytest.mark.parametrize("code", FAULTS, ids=errno.errorcode.get)
def test_local_queries_raise_on_stat_errors_other_than_enoent(
    tmp_path: Path, failing_stat: Callable[[Path, int], None], code: int
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    failing_stat(tmp_path / "f", code)
    failing_stat(tmp_path / "d", code)
    storage = LocalStorage(str(tmp_path))
    for query in (lambda: storage.exists("f"), lambda: storage.is_dir("d"), lambda: storage.list_names("d")):
        with pytest.raises(StorageError) as info:
            query()
        assert info.value.errno == code
        assert str(tmp_path) in str(info.value)
    assert storage.exists("missing") is False and storage.is_dir("missing") is False
    assert storage.list_names("missing") == []


@pytest.mark.parametrize("code", FAULTS, ids=errno.errorcode.get)
def test_local_size_raises_storage_error_on_stat_errors(
    tmp_path: Path, failing_stat: Callable[[Path, int], None], code: int
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    failing_stat(tmp_path / "f", code)
    try:
        LocalStorage(str(tmp_path)).size("f")
    except OSError as e:
        assert isinstance(e, StorageError), f"{type(e).__name__}: {e}"
        assert e.errno == code and not isinstance(e, FileNotFoundError)
    else:
        pytest.fail("size() returned")


@pytest.mark.parametrize("code", FAULTS, ids=errno.errorcode.get)
def test_load_when_the_manifest_cannot_be_looked_up_is_a_storage_error_not_not_found(
    ckpt: Path, failing_stat: Callable[[Path, int], None], code: int
) -> None:
    failing_stat(ckpt / "manifest.json", code)
    with pytest.raises(StorageError) as info:
        shardckpt.load(blank(), str(ckpt))
    assert not isinstance(info.value, (CheckpointNotFoundError, NotCommittedError))
    assert info.value.errno == code and "manifest.json" in str(info.value)
    with pytest.raises(StorageError):  # verify says the same, not "no checkpoint here"
        verify_checkpoint(str(ckpt))


def test_load_when_the_folder_cannot_be_looked_up_is_not_reported_missing(
    tmp_path: Path, failing_stat: Callable[[Path, int], None]
) -> None:
    folder = tmp_path / "gone-stale"  # manifest ENOENT, folder ESTALE: "absent" is not proven
    failing_stat(folder, errno.ESTALE)
    with pytest.raises(StorageError) as info:
        shardckpt.load(blank(), str(folder))
    assert not isinstance(info.value, CheckpointNotFoundError) and info.value.errno == errno.ESTALE


def test_verify_reports_an_unreadable_data_file_as_unreadable_not_missing(
    ckpt: Path, failing_stat: Callable[[Path, int], None]
) -> None:
    victim = data_file(ckpt)
    failing_stat(victim, errno.EIO)
    (problem,) = verify_checkpoint(str(ckpt)).problems
    assert problem.file == f"data/{victim.name}"
    assert "missing" not in problem.message and "run verify again" in problem.message


# ---------------------------------------------------------------- S3: a HEAD that is not a 404


@pytest.fixture(scope="module")
def shared_head_proxy(s3: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3.port)
    yield p
    p.stop()  # half a second: one proxy for the module


@pytest.fixture
def head_proxy(shared_head_proxy: FaultProxy) -> FaultProxy:
    shared_head_proxy.fail = lambda n, method, path: False
    shared_head_proxy.faults = 0
    shared_head_proxy.log.clear()
    return shared_head_proxy


def fresh_storage(s3: S3Server, proxy: FaultProxy, url: str) -> FsspecStorage:
    """A storage retrying nothing (botocore and RetryPolicy alike; s3fs does not retry a
    403 or a 500), so each query below is exactly one HEAD."""
    options = s3.storage_options(endpoint_url=proxy.endpoint_url, config_kwargs={"retries": {"total_max_attempts": 1}})
    return FsspecStorage(url, options, TransferOptions(retry=RetryPolicy(max_attempts=1)))


@pytest.mark.parametrize("status,code", [(403, "AccessDenied"), (500, "InternalError")])
def test_s3_head_answered_403_or_500_is_not_absent(
    s3: S3Server,
    head_proxy: FaultProxy,
    status: int,
    code: str,
) -> None:
    bucket = s3.create_bucket()
    url = f"s3://{bucket}/ckpt"
    shardckpt.save(original(), url, storage_options=s3.storage_options())
    assert fresh_storage(s3, head_proxy, url).exists("manifest.json")  # 200 and 404 read as such
    assert fresh_storage(s3, head_proxy, url).exists("nothing-here") is False
    head_proxy.status, head_proxy.code = status, code
    head_proxy.fail = lambda n, method, path: method == "HEAD"
    queries: list[Callable[[FsspecStorage], Any]] = [
        lambda st: st.exists("manifest.json"),
        lambda st: st.size("manifest.json"),
        lambda st: st.exists("nothing-here"),
        lambda st: st.is_dir(""),
    ]
    for query in queries:
        with pytest.raises(StorageError) as info:
            query(fresh_storage(s3, head_proxy, url))
        assert not isinstance(info.value, FileNotFoundError)
        assert f"bucket {bucket!r}" in str(info.value) and str(status) in str(info.value)
    assert head_proxy.faults == len(queries)  # one HEAD each: nothing was retried into a 404


def test_s3_load_whose_manifest_head_is_denied_is_a_storage_error(s3: S3Server, head_proxy: FaultProxy) -> None:
    bucket = s3.create_bucket()
    url = f"s3://{bucket}/ckpt"
    shardckpt.save(original(), url, storage_options=s3.storage_options())
    head_proxy.status, head_proxy.code = 403, "AccessDenied"
    head_proxy.fail = lambda n, method, path: method == "HEAD"
    options = s3.storage_options(endpoint_url=head_proxy.endpoint_url)
    with pytest.raises(StorageError) as info:
        shardckpt.load(blank(), url, storage_options=options)
    assert not isinstance(info.value, CheckpointNotFoundError)
    assert "manifest.json" in str(info.value) and "403" in str(info.value) and "IAM" in str(info.value)


# ---------------------------------------------------------------- export --overwrite over exclusive creates


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "hf"])
def test_export_overwrite_replaces_an_output_of_the_same_name(ckpt: Path, tmp_path: Path, fmt: str) -> None:
    """Local storage creates files exclusively (never writes into one someone else
    wrote): overwrite must remove the old output first, including HF shards whose
    names the new export reuses."""
    from shardckpt import convert

    out = tmp_path / ("out" if fmt == "hf" else f"out.{fmt}")
    convert.export_checkpoint(str(ckpt), str(out), format=fmt)
    first = sorted(p.name for p in out.iterdir()) if fmt == "hf" else [out.name]
    stale = out / first[0] if fmt == "hf" else out
    stale.write_bytes(b"stale")
    convert.export_checkpoint(str(ckpt), str(out), format=fmt, overwrite=True)
    assert (sorted(p.name for p in out.iterdir()) if fmt == "hf" else [out.name]) == first
    assert stale.read_bytes() != b"stale"
