"""PlainState.of finds every top-level Stateful and asks no value of a type that cannot be
one (issue #18: the runtime Protocol's isinstance was 60-70 ms for 3,000 plain tensors)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from shardckpt.engine import state as state_module
from shardckpt.engine.state import PlainState


class _Counter:
    def __init__(self) -> None:
        self.n = 3

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]


class _StatefulTensor(torch.Tensor):
    """A tensor subclass that is Stateful: not an exact type of the shortcut, so asked."""

    def state_dict(self) -> dict[str, Any]:
        return {"t": torch.Tensor(self).clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.copy_(sd["t"])


def test_statefuls_are_found_and_plain_values_are_not_asked(monkeypatch: Any) -> None:
    asked: list[type] = []
    real = isinstance

    def counting(obj: Any, cls: Any) -> bool:
        if cls is Stateful:
            asked.append(type(obj))
        return real(obj, cls)

    monkeypatch.setattr(state_module, "isinstance", counting, raising=False)
    sub = torch.zeros(2).as_subclass(_StatefulTensor)
    sd: dict[str, Any] = {
        **{f"w{i}": torch.zeros(2) for i in range(5)},
        "p": torch.nn.Parameter(torch.ones(1)),
        "step": 4,
        "lr": 0.1,
        "name": "run",
        "flag": True,
        "nested": {"a": torch.zeros(1)},
        "seq": [1, 2],
        "pair": (1, 2),
        "counter": _Counter(),
        "sub": sub,
        "none": None,
    }
    plain = PlainState.of(sd)
    assert set(plain.objects) == {("counter",), ("sub",)}
    assert plain.tree["counter"] == {"n": 3} and set(plain.tree["sub"]) == {"t"}
    assert plain.tree["w0"] is sd["w0"] and plain.tree["step"] == 4
    assert sorted(asked, key=str) == sorted([_Counter, _StatefulTensor], key=str)
