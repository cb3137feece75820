"""``ConformanceReport``: which checks of a conformance run ran, how often, and which were skipped and why.

The kit returns one so a plugin's test can see (and assert) that a path really ran: a check that
did not run is listed as skipped with its reason, never counted as passed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ConformanceReport:
    """What one ``check_*`` call checked.

    :ivar subject: what was checked, e.g. ``"backend 'triton' on cpu"``.
    :ivar checks: every check the kit knows for this kind of subject, name -> one-line description,
        in the order they are listed.
    :ivar ran: how many times each check ran and passed (a failed check raises instead).
    :ivar skipped: name -> why a check never ran (only for checks with ``ran[name] == 0``).
    """

    subject: str
    checks: dict[str, str]
    ran: Counter = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)

    def passed(self, check: str, times: int = 1) -> None:
        if check not in self.checks:
            raise KeyError(f"unknown check {check!r}; known: {', '.join(self.checks)}")
        self.ran[check] += times
        self.skipped.pop(check, None)

    def skip(self, check: str, reason: str) -> None:
        """Record why ``check`` did not run (kept only while it has not run at all)."""
        if check not in self.checks:
            raise KeyError(f"unknown check {check!r}; known: {', '.join(self.checks)}")
        if not self.ran[check]:
            self.skipped.setdefault(check, reason)

    def finish(self) -> ConformanceReport:
        """Give every check that never ran and has no reason yet the reason "not exercised"."""
        for check in self.checks:
            if not self.ran[check]:
                self.skipped.setdefault(check, "not exercised by these cases")
        return self

    def __str__(self) -> str:
        width = max(map(len, self.checks))
        lines = [f"conformance of {self.subject}:"]
        for check, description in self.checks.items():
            if self.ran[check]:
                lines.append(f"  ran     {check:<{width}}  x{self.ran[check]:<4} {description}")
            else:
                lines.append(f"  skipped {check:<{width}}  {self.skipped.get(check, 'not run')}")
        return "\n".join(lines)
