"""The credential strings a storage's messages mask: found at any depth of its options."""

from __future__ import annotations

import pytest

from shardckpt.storage.redact import MASK, Redactor, secret_values


def test_secret_values_are_found_under_secret_keys_at_any_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    options = {
        "key": "AKIAPUBLICKEYID",  # an access key id is not a secret
        "secret": "top-level-secret",
        "client_kwargs": {"region_name": "us-east-1", "config": {"password": "deep-password"}},
        "credentials": ["listed-one", ("listed-two",), "abc"],  # under a secret key: every string of 4+
        "other": ["not-a-secret"],
    }
    found = secret_values(options)
    assert set(found) == {"top-level-secret", "deep-password", "listed-one", "listed-two"}
    assert list(map(len, found)) == sorted(map(len, found), reverse=True)  # longest first: masked before its parts
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-from-env")
    assert "session-token-from-env" in secret_values(None)
    masked = Redactor(found)("failed with deep-password and listed-two")
    assert "deep-password" not in masked and "listed-two" not in masked and MASK in masked
