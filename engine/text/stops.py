"""Stop strings found across token boundaries.

A stop string can end in the middle of a token or span several tokens, so
the text released to the client holds back whatever could still be the start
of one; the held text is released when it cannot be, or dropped when the stop
string completes (OpenAI semantics: the stop string is not part of the output).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string completed)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False
