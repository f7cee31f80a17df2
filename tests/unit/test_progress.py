"""convert.progress: the one byte progress bar (verify, export, import, diff) and the one
byte formatter (CLI tables and reports, export's memory message)."""

from __future__ import annotations

import pytest

from shardckpt.convert.progress import byte_bar, human_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (3 * 2**30 // 2, "1.5 GiB"),
        (2**40, "1.0 TiB"),
        (2**50, "1024.0 TiB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_byte_bar_counts_bytes_on_stderr_only_when_enabled(capsys):
    with byte_bar(3 * 2**20, "verify") as bar:
        bar.update(2**20)
        assert bar.n == 2**20
    out, err = capsys.readouterr()
    assert out == "" and "verify" in err and "1.00M/3.00M" in err  # 1024-based: 2**20 shows as 1.00M
    with byte_bar(10, "diff", enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr() == ("", "")
