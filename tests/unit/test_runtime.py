"""meshd.io.runtime: the wiring. Every effect the node core can return is carried out by
exactly one service (a new effect without a runtime fails here, not on a device)."""

from __future__ import annotations

import typing

from meshd.config import resolve_config
from meshd.io.runtime import Runtime
from meshd.node import effects as fx


def test_every_effect_kind_is_carried_out_by_one_service(tmp_path):
    config = resolve_config({"data_dir": str(tmp_path)}, None, {}, "host1")
    runtime = Runtime(config)  # builds the context and services; nothing runs yet
    carried = set(runtime.ctx._effect_handlers)
    in_context = {fx.Commit, fx.Emit}  # NodeContext.execute itself commits and emits
    assert carried | in_context == set(typing.get_args(fx.Effect))
    assert not carried & in_context
