"""Chat templates run under a deadline.

A chat template is part of an uploaded model, so it is hostile: a trace function on the template's own frames
raises once the deadline has passed, so `{% for i in range(10**5) %}{% for j in range(10**5) %}` ends with a
422, not minutes later.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")
TEMPLATE_FILENAME = "<template>"  # what Jinja names the code of a template compiled from a string


class TemplateTimeout(Exception):
    """A template ran past its deadline."""


def render_with_deadline(render: Callable[[], T], timeout_s: float) -> T:
    """render() with Jinja template frames stopped after `timeout_s` seconds (TemplateTimeout).

    Only frames of template code are traced line by line, so the rest of the work (the tokenizer's own
    Python) runs at full speed; the trace is this thread's only and is removed afterwards."""
    deadline = time.monotonic() + timeout_s

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateTimeout(f"the template ran longer than {timeout_s:g} s")
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == TEMPLATE_FILENAME:
            return local(frame, event, arg)
        return None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        return render()
    finally:
        sys.settrace(previous)
