"""IOOptions(direct_writes=True) (issue #18): a save's data files go through
Storage.open_write_direct (O_DIRECT on local disks), and the checkpoint is the one a
plain save writes: the same data files byte for byte, loaded back bitwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shardckpt import Checkpointer, IOOptions
from shardckpt.storage import local
from shardckpt.storage.direct import DirectWriteStream
from shardckpt.storage.local import LocalStorage


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(3 * 2**18 + 5, generator=g),  # ~3 MiB: written in checksum blocks
        "small": {f"t{i}": torch.randn(i + 1, 7, generator=g) for i in range(50)},  # batched
        "half": torch.randn(33, 3, generator=g).to(torch.bfloat16),
        "step": 7,
    }


def _data_files(folder: Path) -> dict[str, bytes]:
    """Each data file's bytes by its name without the save's random id, and that id (in
    every file's header) blanked."""
    files = {}
    for p in sorted((folder / "data").iterdir()):
        save_id, rest = p.name.split("-", 1)
        files[rest] = p.read_bytes().replace(save_id.encode(), b"-" * len(save_id))
    return files


def test_a_direct_save_writes_the_files_a_plain_save_writes(tmp_path: Path, monkeypatch: Any) -> None:
    opened: list[str] = []
    real = local.DirectWriteStream

    def counted(path: str) -> DirectWriteStream:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(local, "DirectWriteStream", counted)
    state = _state()
    with Checkpointer() as ckpt:
        ckpt.save(state, str(tmp_path / "plain"))
        assert not opened, "direct writes are off by default"
        ckpt.save(state, str(tmp_path / "direct"), io=IOOptions(direct_writes=True))
        async_handle = ckpt.async_save(state, str(tmp_path / "async"), io=IOOptions(direct_writes=True))
        async_handle.wait(60)
        target = {**_state(), "step": 0}
        for t in (target["big"], target["half"], *target["small"].values()):
            t.zero_()
        ckpt.load(target, str(tmp_path / "direct"))
    data = sorted(p.name for p in (tmp_path / "direct" / "data").iterdir())
    assert sorted(Path(p).name for p in opened if "/direct/" in p) == data
    assert any("/async/" in p for p in opened)
    # The files differ by the save's random id only (in their names and headers).
    assert _data_files(tmp_path / "direct") == _data_files(tmp_path / "plain") == _data_files(tmp_path / "async")
    assert torch.equal(target["big"], state["big"]) and torch.equal(target["half"], state["half"])
    assert all(torch.equal(target["small"][k], v) for k, v in state["small"].items()) and target["step"] == 7


def test_a_storage_that_overrides_open_write_still_sees_every_data_file(tmp_path: Path) -> None:
    """Fault injection and counting subclasses override open_write: direct writes must not
    go around them."""
    seen: list[str] = []

    class Counting(LocalStorage):
        def open_write(self, name: str) -> Any:
            seen.append(name)
            return super().open_write(name)

    with Checkpointer(io=IOOptions(direct_writes=True), storage_factory=lambda url, _opts: Counting(url)) as ckpt:
        ckpt.save(_state(), str(tmp_path / "c"))
    assert sorted(seen) == sorted(f"data/{p.name}" for p in (tmp_path / "c" / "data").iterdir())


def test_direct_writes_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="direct_writes must be True or False"):
        IOOptions(direct_writes="yes")  # type: ignore[arg-type]
