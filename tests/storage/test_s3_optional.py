"""s3fs is optional (the ``s3`` extra): the core install has no s3fs, botocore or aiohttp.

An ``s3://`` path without s3fs must fail at once with an error that names the extra, and
everything else (local paths, ``memory://``, the transfer and retry settings, the CLI)
must work without the S3 stack. The missing packages are simulated with ``None`` in
``sys.modules``, which makes ``import s3fs`` raise ImportError as if it were not installed.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from distributed import run_command

import shardckpt
from shardckpt.errors import MissingDependencyError, ShardckptError
from shardckpt.storage import open_storage

HINT = "s3:// needs s3fs: pip install 'shardckpt[s3]'"
S3_STACK = ("s3fs", "aiobotocore", "botocore", "boto3", "aiohttp")


def test_s3_path_without_s3fs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(MissingDependencyError) as raised:
        shardckpt.save({"x": torch.arange(4.0)}, "s3://bucket/run/step_1")
    assert str(raised.value).startswith(HINT), str(raised.value)
    assert "'s3://bucket/run/step_1'" in str(raised.value)
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, ShardckptError)
    assert isinstance(raised.value.__cause__, ImportError)


@pytest.mark.parametrize(
    "url", ["s3://bucket/run/step_1", "s3a://bucket/run/step_1", "simplecache::s3://bucket/run/step_1"]
)
def test_every_s3_spelling_is_caught_before_fsspec(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(MissingDependencyError, match=r"needs s3fs: pip install 'shardckpt\[s3\]'"):
        open_storage(url)
    state = {"x": torch.zeros(4)}
    with pytest.raises(MissingDependencyError, match=r"needs s3fs"):
        shardckpt.load(state, url)


def test_other_urls_do_not_need_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)
    open_storage("memory://optional-s3/run")  # no error: s3fs is asked for only by s3:// paths


def test_core_install_works_without_the_s3_stack(tmp_path: Path) -> None:
    """A fresh interpreter in which s3fs, botocore and aiohttp cannot be imported: save and
    load on a local path and on memory://, the transfer settings, the retry classification,
    the CLI; and an s3:// path fails with the hint, not an ImportError from deep inside."""
    blocked = ", ".join(repr(m) for m in S3_STACK)
    script = textwrap.dedent(
        f"""
        import runpy, sys
        for name in ({blocked}):
            sys.modules[name] = None  # "not installed"
        import torch
        import shardckpt
        from shardckpt.storage.retry import is_transient

        local = sys.argv[1]
        shardckpt.save({{"x": torch.arange(4.0), "step": 3}}, local)
        io = shardckpt.IOOptions(transfer=shardckpt.TransferOptions(retry=shardckpt.RetryPolicy(max_attempts=2)))
        shardckpt.save({{"x": torch.arange(4.0)}}, "memory://core-install/ckpt", io=io)
        for path in (local, "memory://core-install/ckpt"):
            state = {{"x": torch.zeros(4)}}
            shardckpt.load(state, path, strict=False)
            assert state["x"].tolist() == [0.0, 1.0, 2.0, 3.0], state
        assert is_transient(ConnectionResetError()) and not is_transient(ValueError())
        try:
            shardckpt.save({{"x": torch.arange(4.0)}}, "s3://bucket/ckpt")
        except shardckpt.ShardckptError as e:
            print("S3 ERROR:", e)
        loaded = sorted(m for m in {S3_STACK!r} if sys.modules.get(m) is not None)
        assert not loaded, loaded
        sys.argv = ["shardckpt", "verify", local]
        runpy.run_module("shardckpt", run_name="__main__")
        """
    )
    result = run_command([sys.executable, "-c", script, f"{tmp_path}/ckpt"], timeout_s=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert f"S3 ERROR: {HINT}" in result.stdout, result.stdout
