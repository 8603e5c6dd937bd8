"""Timelines of steps: the recorder instrument, its spans, and their exports (Chrome trace, PNG,
summary). Importing this package loads neither torch nor matplotlib."""

from .recorder import Span, StepMark, Timeline, TimelineRecorder

__all__ = ["Span", "StepMark", "Timeline", "TimelineRecorder"]
