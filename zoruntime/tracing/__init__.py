"""Timelines of steps: the recorder instrument and its spans."""

from .recorder import Span, StepMark, Timeline, TimelineRecorder

__all__ = ["Span", "StepMark", "Timeline", "TimelineRecorder"]
