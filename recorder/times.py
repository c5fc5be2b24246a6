"""The time forms every filter accepts: `--since 2h` on the command line, `since:2h` in the UI.

One parser, so that what works in one place works in the other. Headless and free of the UI
(the UI imports the recorder, never the other way round).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

# Said after "expected" in every error about a time, so each caller names its own flag or key.
TIME_FORMS = "an age like 2h, 30m, 7d, 1w or a date like 2026-11-01 or 2026-11-01T14:30"

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime | None = None) -> str:
    """An ISO date/time or an age before `now` (`2h`, `30m`, `7d`) -> ISO string with a zone.

    Raises ValueError (without a message of its own: callers name the flag and TIME_FORMS).
    An ISO string rather than a datetime is returned because a remote reader sends
    parameters as JSON."""
    m = _AGE.match(text.strip().lower())
    if m:
        try:
            delta = timedelta(**{_AGE_UNITS[m.group(2)]: float(m.group(1))})
            return ((now or datetime.now(timezone.utc)) - delta).isoformat()
        except OverflowError:  # 99999999999d: before year 1
            raise ValueError(text) from None
    parsed = datetime.fromisoformat(text.strip())
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # the user means their own local time
    return parsed.isoformat()
