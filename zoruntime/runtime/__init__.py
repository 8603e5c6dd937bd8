"""The asyncio core: task graphs, the scheduler, lanes' protocol, instruments, units. Stdlib only."""

from .graph import Kind, Lane, Task, TaskGraph, eval_graph, flush_graph, load_graph, step_graph
from .instruments import Instrument, Instruments
from .scheduler import Completion, Enqueuer, LaneRunner, Scheduler, TaskFailed, Work
from .statistics import RuntimeStatistics
from .units import Stage, Unit, UnitTable, uniform_units

__all__ = [
    "Completion",
    "Enqueuer",
    "Instrument",
    "Instruments",
    "Kind",
    "Lane",
    "LaneRunner",
    "RuntimeStatistics",
    "Scheduler",
    "Stage",
    "Task",
    "TaskFailed",
    "TaskGraph",
    "Unit",
    "UnitTable",
    "Work",
    "eval_graph",
    "flush_graph",
    "load_graph",
    "step_graph",
    "uniform_units",
]
