"""Generated token ids to the text a client may be shown, honouring stop strings.

Two things keep text back: an incomplete UTF-8 character (a byte-level token may carry only
part of one), and text that could still turn into a stop string. No part of a stop string is
ever released, even one spread over several tokens: the unreleased tail keeps its longest
suffix that is a proper prefix of some stop string until the next tokens show whether it is
one. Each token costs work in the unreleased tail only (shorter than the longest stop string
plus the token's text), never a rescan of the whole text.
"""

from __future__ import annotations


class TextStream:
    """Token ids in, releasable text out, for one generated sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), prev_token: int | None = None) -> None:
        """`prev_token` is the last prompt token: a token's text depends on the one before it
        (after BOS a piece's leading space is dropped)."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._utf8 = tokenizer.stream()  # StreamDecoder: holds back incomplete UTF-8
        self._stop = tuple(stop)
        # Every proper prefix of a stop string: what the unreleased tail may have to hold back.
        self._prefixes = {s[:i] for s in self._stop for i in range(1, len(s))}
        self._longest_prefix = max(map(len, self._prefixes), default=0)
        self._prev = prev_token
        self._pending = ""  # decoded, not yet released
        self._released: list[str] = []
        self._finished = False
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far (a non-streaming response's text)."""
        return "".join(self._released)

    def feed(self, token: int) -> str:
        """The text that may be shown now that `token` was generated; "" when all is held back."""
        if self.stopped or self._finished:
            raise RuntimeError("TextStream.feed after a stop string or finish()")
        text = self._utf8.feed(self._prev, token)
        self._prev = token
        return self._take(text, hold=True)

    def finish(self) -> str:
        """Generation ended without a stop string: release what was held back (an incomplete
        UTF-8 tail becomes U+FFFD). That U+FFFD can still complete a stop string, so it is
        checked like any other text. "" when already stopped."""
        if self.stopped:
            return ""
        self._finished = True
        return self._take(self._utf8.flush(), hold=False)

    def _take(self, text: str, hold: bool) -> str:
        """Append `text` to the unreleased tail and release what can no longer be part of a stop
        string. A stop string can only start inside the tail: released text never ends with the
        start of one, so the search looks at the tail alone."""
        pending = self._pending + text
        starts = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if starts:
            self.stopped = True
            out, self._pending = pending[: min(starts)], ""
        else:
            keep = self._held(pending) if hold else 0
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._released.append(out)
        return out

    def _held(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        for n in range(min(len(pending), self._longest_prefix), 0, -1):
            if pending[-n:] in self._prefixes:
                return n
        return 0
