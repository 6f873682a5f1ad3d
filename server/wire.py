"""The stdio wire, between the client and the SDK's transport: a pump that can end the input (for signals), and
the repair of lone surrogates so that every request gets an answer."""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading

# a backslash run and a \\uD800-\\uDFFF escape after it (an odd run: the escape is real; even: literal text): a
# high surrogate with its low half, or any one surrogate
_SURROGATE = re.compile(rb"(\\+)u([dD][89abAB][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})|(\\+)u([dD][0-9a-fA-F]{3})")
REPLACEMENT = "\ufffd"  # what a lone surrogate becomes; the tools refuse arguments holding it


class SurrogateScrubber:
    """Replaces JSON escapes of lone UTF-16 surrogates (\\ud800 without its low half, or a low half alone) by \\ufffd
    in a byte stream of JSON lines, and leaves valid pairs and everything else byte for byte.

    A lone surrogate is no Unicode character: the SDK's JSON parser rejects the whole line, loses its id, and the
    client waited forever for an answer that never came. Repaired, the request is parsed and answered (the tools
    refuse text holding the replacement character, saying why).
    """

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        # an escape never spans a line's end: everything up to the last newline goes on at once
        cut = max(_safe_end(data), data.rfind(b"\n") + 1)
        self._carry = data[cut:]
        return _SURROGATE.sub(_repair, data[:cut])

    def flush(self) -> bytes:
        data, self._carry = self._carry, b""
        return _SURROGATE.sub(_repair, data)


def _safe_end(data: bytes) -> int:
    """Where `data` can be cut without splitting an escape or a pair: before the first backslash run that reaches
    into its final 18 bytes (a high escape whose low half may begin in the last 12), or at the end."""
    first = data.find(b"\\", max(0, len(data) - 18))
    if first < 0:
        return len(data)
    while first > 0 and data[first - 1:first] == b"\\":
        first -= 1
    return first


def _repair(m: re.Match) -> bytes:
    if m.group(1) is not None:  # a high escape and a low one
        if len(m.group(1)) % 2:  # a real escape: a valid pair
            return m.group(0)
        # text ("\\\\ud8xx": a backslash, then letters), then a low escape to judge on its own
        return m.group(1) + b"u" + m.group(2) + _SURROGATE.sub(_repair, m.group(3))
    slashes = m.group(4)
    if len(slashes) % 2 == 0:  # an escaped backslash then the letter u: text, not an escape
        return m.group(0)
    return slashes[:-1] + b"\\ufffd"


class StdinPump:
    """fd 0 as a pipe that a thread fills from the client's stdin, so that `stop()` can end the input as if the
    client had closed it.

    The SDK reads stdin on a worker thread that a cancellation cannot interrupt: cancelled while the client stays
    silent, the server would wait for the client's next line. Ending the input instead lets the SDK shut down as
    it does when the client hangs up. Only the pump thread touches the pipe's write end (a write blocked on a full
    pipe is abandoned through the control pipe, never by closing a descriptor under it). On the way, lone UTF-16
    surrogates are replaced (SurrogateScrubber), so that every request can be parsed and answered.
    """

    def __init__(self) -> None:
        self._scrub = SurrogateScrubber()
        self._wire = os.dup(0)
        read_end, self._out = os.pipe()
        os.dup2(read_end, 0)
        os.close(read_end)
        self._ctl_r, self._ctl_w = os.pipe()
        threading.Thread(target=self._run, name="stdin-pump", daemon=True).start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._ctl_w, b"x")

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._wire, self._ctl_r], [], [])
                if self._ctl_r in ready:
                    return
                chunk = os.read(self._wire, 1 << 16)
                data = self._scrub.feed(chunk) if chunk else self._scrub.flush()
                if not chunk and not data:
                    return
                while data:
                    _, writable, _ = select.select([self._ctl_r], [self._out], [])
                    if not writable:
                        return
                    data = data[os.write(self._out, data):]
        except OSError:
            return
        finally:
            os.close(self._out)  # end of input for the SDK


