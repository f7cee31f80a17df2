"""Keep secrets out of error messages: every storage error text passes through a Redactor.

Secrets are the credential values a storage was given (``storage_options`` keys such as
``secret``, ``token``, ``password``, nested ``client_kwargs``) and the standard AWS
environment variables that hold one, plus anything that looks like a signature or
credentials inside a URL. Access key ids are identifiers, not secrets, and are kept:
they help tell which identity was refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
SECRET_OPTION_NAMES = frozenset(
    {
        "secret",
        "token",
        "password",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "secret_access_key",
        "sas_token",
        "account_key",
        "client_secret",
        "credential",
        "credentials",
    }
)
SECRET_ENV_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_PATTERNS = (
    re.compile(r"(?i)(x-amz-(?:signature|security-token|credential)=)[^&\s'\"]+"),
    re.compile(
        r"(?i)(\b(?:aws_secret_access_key|aws_session_token|secret|token|password)\s*[=:]\s*['\"]?)[^\s'\",}&]{4,}"
    ),
    re.compile(r"(?i)(Signature=)[^,\s'\"]+"),
    re.compile(r"(://[^/@\s:]+:)[^/@\s]+(@)"),  # user:password@host in a URL
)


def secret_values(options: Mapping[str, Any] | None) -> list[str]:
    """Credential strings found in ``options`` (recursively) and in the AWS environment."""
    found: list[str] = []
    _visit(dict(options or {}), False, found)
    found.extend(v for name in SECRET_ENV_NAMES if len(v := os.environ.get(name, "")) >= 4)
    return sorted(set(found), key=len, reverse=True)


def _visit(value: Any, secret: bool, found: list[str]) -> None:
    """Add to ``found`` the secret strings in ``value`` (a module function: a recursive
    closure would be a reference cycle holding them until the cyclic collector ran)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _visit(v, secret or str(k).lower() in SECRET_OPTION_NAMES, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _visit(v, secret, found)
    elif secret and isinstance(value, str) and len(value) >= 4:
        found.append(value)


class Redactor:
    """Masks the given secrets and secret-shaped substrings in a text. Immutable."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(s for s in secrets if s)

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + MASK + (m.group(2) if m.lastindex == 2 else ""), text)
        return text
