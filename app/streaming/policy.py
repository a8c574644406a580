"""Streaming policies: what happens when readers leave, answers stop, or users interrupt."""

from __future__ import annotations

from typing import Literal

import msgspec

PartialPolicy = Literal["keep", "discard"]
BusyPolicy = Literal["reject", "interrupt"]


class StreamPolicy(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Defaults come from settings; a request may override them (see `MessageCreate`).

    - `disconnect_grace`: seconds to wait, once the last reader has left, for a reader to
      come back before cancelling the answer. 0 cancels at once (the origin's behaviour).
    - `partial`: on cancel, `keep` stores what was produced as a `partial` message;
      `discard` stores nothing (the origin's behaviour).
    - `if_busy`: a new user message while an answer runs: `reject` (409) or `interrupt`
      (cancel the running answer and start the new one).
    """

    disconnect_grace: float = 30.0
    partial: PartialPolicy = "keep"
    if_busy: BusyPolicy = "reject"
