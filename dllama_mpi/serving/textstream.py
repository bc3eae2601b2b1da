"""Generated token ids to the text a client may be shown, honouring stop strings.

Two things keep text back: an incomplete UTF-8 character (a byte-level token may carry only
part of one), and text that could still turn into a stop string. No part of a stop string is
ever released, even one spread over several tokens: the unreleased tail keeps its longest
suffix that is a proper prefix of some stop string until the next tokens show whether it is
one.

Each stop string has a Knuth-Morris-Pratt matcher whose state is the length of the longest
suffix of the text so far that is a prefix of it: the tail to hold back is the largest state,
and a state reaching the full length is a match. Memory is linear in the stop strings' total
length and each new character costs amortized constant time per stop string, so no stop
list, however long its strings, costs more than reading it (a set of every prefix cost
memory quadratic in the length: 778 MiB for one of 40,000 characters).
"""

from __future__ import annotations

from array import array


class _StopMatcher:
    """One stop string's Knuth-Morris-Pratt automaton over the characters fed to it."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        # border[i]: length of the longest proper prefix of stop[: i + 1] that is also its suffix
        border = array("i", [0]) * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = border[k - 1]
            if stop[i] == stop[k]:
                k += 1
            border[i] = k
        self._border = border
        self.state = 0  # length of the longest suffix of the text so far that is a prefix of stop

    def step(self, char: str) -> bool:
        """Read one character; True when the stop string ends with it."""
        stop, k = self.stop, self.state
        if k == len(stop):
            k = self._border[k - 1]
        while k and stop[k] != char:
            k = self._border[k - 1]
        if stop[k] == char:
            k += 1
        self.state = k
        return k == len(stop)


class TextStream:
    """Token ids in, releasable text out, for one generated sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), prev_token: int | None = None) -> None:
        """`prev_token` is the last prompt token: a token's text depends on the one before it
        (after BOS a piece's leading space is dropped)."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._utf8 = tokenizer.stream()  # StreamDecoder: holds back incomplete UTF-8
        self._matchers = [_StopMatcher(s) for s in stop]
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
        string. When stop strings complete in `text`, the text ends before the earliest start
        among them (one that started earlier may complete later in the same text)."""
        pending = self._pending + text
        stop_at = None
        for i, char in enumerate(text, len(self._pending)):
            for m in self._matchers:
                if m.step(char):
                    start = i + 1 - len(m.stop)  # >= 0: released text never holds the start of a match
                    stop_at = start if stop_at is None else min(stop_at, start)
        if stop_at is not None:
            self.stopped = True
            out, self._pending = pending[:stop_at], ""
        else:
            keep = max((m.state for m in self._matchers), default=0) if hold else 0
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._released.append(out)
        return out
