"""Method registry keyed by config type (torchao-style).

A handler turns one ``nn.Linear`` plus its calibration statistics into a replacement
module. Handlers are registered against the *type* of their config dataclass, so the
dispatcher never compares strings::

    @register(RTNConfig)
    def _rtn(linear: nn.Linear, config: RTNConfig, stats: LinearStats | None) -> nn.Module: ...

    module = handler_for(config)(linear, config, stats)
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

Handler = Callable[..., nn.Module]
_HANDLERS: dict[type, Handler] = {}
C = TypeVar("C")


def register(config_type: type) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of ``config_type`` (one handler per type)."""

    def deco(fn: Handler) -> Handler:
        if config_type in _HANDLERS and _HANDLERS[config_type] is not fn:
            raise ValueError(f"a handler for {config_type.__name__} is already registered")
        _HANDLERS[config_type] = fn
        return fn

    return deco


def handler_for(config: object) -> Handler:
    """The handler registered for ``type(config)``; a clear error names the known types."""
    fn = _HANDLERS.get(type(config))
    if fn is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS)) or "none"
        raise KeyError(f"no compression method is registered for {type(config).__name__}; known: {known}")
    return fn


def registered_types() -> list[type]:
    return list(_HANDLERS)
