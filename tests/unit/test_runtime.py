"""meshd.io.runtime: the wiring. Every effect the node core can return is carried out by
exactly one service (a new effect without a runtime fails here, not on a device)."""

from __future__ import annotations

import datetime
import json
import logging
import typing

from meshd.config import resolve_config
from meshd.io.runtime import JsonLogFormatter, Runtime
from meshd.node import effects as fx


def test_every_effect_kind_is_carried_out_by_one_service(tmp_path):
    config = resolve_config({"data_dir": str(tmp_path)}, None, {}, "host1")
    runtime = Runtime(config)  # builds the context and services; nothing runs yet
    carried = set(runtime.ctx._effect_handlers)
    in_context = {fx.Commit, fx.Emit}  # NodeContext.execute itself commits and emits
    assert carried | in_context == set(typing.get_args(fx.Effect))
    assert not carried & in_context


def test_log_lines_are_json_with_an_iso_time_and_the_epoch():
    record = logging.makeLogRecord({"msg": "ready", "levelname": "INFO", "name": "meshd.daemon", "site": "lab",
                                    "created": 1_800_000_000.25})
    line = json.loads(JsonLogFormatter().format(record))
    assert line["ts"] == 1_800_000_000.25 and line["msg"] == "ready" and line["site"] == "lab"
    assert datetime.datetime.fromisoformat(line["time"]).timestamp() == 1_800_000_000.25
    assert line["time"].endswith(datetime.datetime.fromtimestamp(1_800_000_000).astimezone().isoformat()[-6:])
