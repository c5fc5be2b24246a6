"""Database values as JSON carries them: what the read endpoint sends and `llmtap sql --json`
/ `--csv` print. No DuckDB here, so the commands that only format rows do not load it."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import uuid
from typing import Any


def jsonable(value: Any, finite: bool = False) -> Any:
    """`value` as a JSON value: times as ISO text, bytes as {"base64": ...}, decimals as
    numbers, UUIDs and intervals as text, lists and structs item by item. With `finite`, NaN
    and the infinities become null (JSON has none; Python's json module writes them anyway,
    which the endpoint's own client reads back)."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, decimal.Decimal):
        return float(value)
    if finite and isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (uuid.UUID, dt.timedelta)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v, finite) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v, finite) for k, v in value.items()}
    return value
