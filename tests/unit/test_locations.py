"""The one "is this local" test (storage.local_path) and the one "is this committed" test
(storage.folder.is_committed), and the places that ask them."""

from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from shardckpt.format import layout
from shardckpt.manager.steps import list_root
from shardckpt.storage import LocalStorage, folder, local_path, open_storage

URLS = {
    "runs/a": "runs/a",
    "/abs/runs/a": "/abs/runs/a",
    "file:///abs/runs/a": "/abs/runs/a",
    "file://runs/a": "runs/a",
    "s3://bucket/runs/a": None,
    "memory://runs/a": None,
    "gs://bucket/a": None,
    "weird:name/with:colons": "weird:name/with:colons",
}


@pytest.mark.parametrize(("url", "path"), URLS.items())
def test_local_path_and_open_storage_agree(url, path):
    assert local_path(url) == path
    if not url.startswith(("s3://", "gs://")):  # no credentials needed to open these
        assert isinstance(open_storage(url), LocalStorage) == (path is not None)


def test_remove_checkpoint_folder_takes_file_urls(tmp_path):
    pytest.importorskip("lightning")
    from shardckpt.integrations.lightning.checkpoint_io import remove_checkpoint_folder

    ckpt = tmp_path / "last.ckpt"
    shardckpt.save({"w": torch.ones(3)}, str(ckpt))
    remove_checkpoint_folder(f"file://{ckpt}", None)
    assert not ckpt.exists()
    # a file at a file:// URL is not a checkpoint folder: refused, kept (never unlinked)
    single = tmp_path / "other.ckpt"
    single.write_bytes(b"x")
    with pytest.raises(shardckpt.ShardckptError, match="refusing to delete"):
        remove_checkpoint_folder(f"file://{single}", None)
    assert single.read_bytes() == b"x"


def test_is_committed_is_the_manifest_and_nothing_else(tmp_path):
    root = tmp_path / "root"
    shardckpt.save({"w": torch.ones(3)}, str(root / layout.step_dir_name(1)))
    shardckpt.save({"w": torch.ones(3)}, str(root / layout.step_dir_name(2)))
    os.remove(root / layout.step_dir_name(2) / layout.MANIFEST_NAME)  # an interrupted save, as it looks
    storage = open_storage(str(root))
    assert folder.is_committed(storage, layout.step_dir_name(1))
    assert not folder.is_committed(storage, layout.step_dir_name(2))
    assert not folder.is_committed(storage, layout.step_dir_name(3))  # no folder at all
    assert not folder.is_committed(storage)  # the root is not a checkpoint
    assert folder.is_committed(storage.child(layout.step_dir_name(1)))
    assert [(i.step, i.committed) for i in list_root(str(root))] == [(1, True), (2, False)]
    with pytest.raises(shardckpt.NotCommittedError):
        shardckpt.load({"w": torch.empty(3)}, str(root / layout.step_dir_name(2)))
