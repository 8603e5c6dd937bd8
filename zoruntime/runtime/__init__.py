"""The asyncio core: task graphs, the scheduler, lanes' protocol, instruments. Stdlib only."""

from .graph import Kind, Lane, Task, TaskGraph, eval_graph, flush_graph, load_graph, step_graph
from .instruments import Instrument, Instruments
from .scheduler import Completion, LaneRunner, Scheduler, TaskFailed, Work

__all__ = [
    "Completion",
    "Instrument",
    "Instruments",
    "Kind",
    "Lane",
    "LaneRunner",
    "Scheduler",
    "Task",
    "TaskFailed",
    "TaskGraph",
    "Work",
    "eval_graph",
    "flush_graph",
    "load_graph",
    "step_graph",
]
