"""Windows and periods of limits and budgets, all in UTC: a fixed number of seconds since the epoch
(`second`, `minute`, `hour`, `day`, or any number of seconds), a week from Monday 00:00, or a calendar
month from the 1st at 00:00. The store counts fixed windows from an anchor (gateway/store/); a window
here says which anchor and length hold at a given moment.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from gateway.yaml_tree import shown

NAMED = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0, "week": 604800.0, "month": 0.0}
MONDAY = 4 * 86400.0
"""1970-01-05T00:00Z, the first Monday after the epoch: weeks are counted from it."""
LONGEST = 366 * 86400.0
"""A window in seconds may be at most a year long."""


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    """`minute`, `month`, ... or `<n>s` for a window given in seconds."""
    seconds: float
    """Its length; 0 for `month`, whose length depends on the month."""

    def bounds(self, now: float) -> tuple[float, float]:
        """(anchor, length) in seconds for the store, at time `now` (seconds since the epoch)."""
        if self.name == "month":
            start = datetime.datetime.fromtimestamp(now, datetime.UTC).replace(
                day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + datetime.timedelta(days=32)).replace(day=1)
            return start.timestamp(), (end - start).total_seconds()
        if self.name == "week":
            return MONDAY, self.seconds
        return 0.0, self.seconds


def parse_window(value: object) -> Window | str:
    """A Window, or why `value` is not one."""
    if isinstance(value, str) and value in NAMED:
        return Window(value, NAMED[value])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected one of {', '.join(NAMED)} or a number of seconds, got {shown(value)}"
    if not 1 <= value <= LONGEST:  # NaN fails this too
        return f"expected a number of seconds from 1 to {LONGEST:.0f}, got {shown(value)}"
    return Window(f"{value:g}s", float(value))
