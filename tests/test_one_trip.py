"""A pass in one trip (``Scheduler`` with an ``Enqueuer``, CUDA's path): every task handed to the
enqueueing thread in graph order, each after exactly its dependencies' handles and the previous
pass's slot releases; the uploads done ahead are not done twice; a failure or a cancellation
stops the trip at a task; the runtime through it equals the reference bit for bit; and CUDA's
enqueuer (with stand-in streams and events) orders each task on its own lane's stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import pytest
import torch
from conftest import OneTripCPUBackend, tiny_model, token_batch

import zoruntime
from zoruntime.models import adapter_for
from zoruntime.planning.memory import ModelLayout
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.runtime import Instruments, Scheduler, Task, TaskFailed, Work, step_graph, uniform_units
from zoruntime.zo.reference import ReferenceZO


class RecordingEnqueuer:
    """Records each task it is given with the tasks its ``after`` handles stand for."""

    def __init__(self, block: Callable[[Task], None] = lambda task: None) -> None:
        self.enqueued: list[tuple[str, list[str]]] = []
        self.trips = 0
        self.threads: set[int] = set()
        self.block = block

    def enqueue(self, step: int, task: Task, work: Work, after: Sequence[object]) -> str:
        self.threads.add(threading.get_ident())
        self.block(task)
        work()
        self.enqueued.append((f"{step}: {task}", [str(handle) for handle in after]))
        return f"{step}: {task}"

    async def call(self, fn: Callable[[], object]) -> object:
        self.trips += 1
        return await asyncio.get_running_loop().run_in_executor(None, fn)


def _graphs(blocks: int = 3) -> tuple:
    plan = FixedDepth(1).plan(ModelLayout.uniform(blocks, 100))
    first = step_graph(uniform_units(blocks), plan)
    return first, step_graph(uniform_units(blocks), plan, rotation=first.rotation_after)


def _nothing(task: Task) -> Work:
    return lambda: None


@pytest.mark.asyncio
async def test_each_pass_is_one_trip_in_graph_order_and_each_task_waits_for_exactly_its_dependencies() -> None:
    enqueuer = RecordingEnqueuer()
    scheduler = Scheduler(enqueuer)
    first, second = _graphs()
    await scheduler.run(first, _nothing, 0)
    await scheduler.run(second, _nothing, 1)
    assert enqueuer.trips == 2 and threading.get_ident() not in enqueuer.threads and not scheduler.busy
    assert enqueuer.enqueued == [
        ("0: embed", []),
        ("0: upload of block.0", []),
        ("0: compute of block.0", ["0: upload of block.0", "0: embed"]),
        ("0: offload of block.0", ["0: compute of block.0"]),
        ("0: upload of block.1", []),
        ("0: compute of block.1", ["0: upload of block.1", "0: compute of block.0"]),
        ("0: offload of block.1", ["0: compute of block.1"]),
        ("0: upload of block.2", ["0: compute of block.0"]),
        ("0: compute of block.2", ["0: upload of block.2", "0: compute of block.1"]),
        ("0: offload of block.2", ["0: compute of block.2"]),
        ("0: head", ["0: compute of block.2"]),
        ("0: upload of block.0", ["0: offload of block.0"]),  # ahead, for the next pass
        ("0: upload of block.1", ["0: offload of block.1"]),
        # the next pass takes the uploads done ahead as its own: block.0 and block.1 come up once
        ("1: embed", []),
        ("1: compute of block.0", ["0: upload of block.0", "1: embed"]),
        ("1: offload of block.0", ["1: compute of block.0"]),
        ("1: compute of block.1", ["0: upload of block.1", "1: compute of block.0"]),
        ("1: offload of block.1", ["1: compute of block.1"]),
        ("1: upload of block.2", ["1: compute of block.0", "0: offload of block.2"]),  # slot 2, freed last pass
        ("1: compute of block.2", ["1: upload of block.2", "1: compute of block.1"]),
        ("1: offload of block.2", ["1: compute of block.2"]),
        ("1: head", ["1: compute of block.2"]),
        ("1: upload of block.0", ["1: offload of block.0"]),
        ("1: upload of block.1", ["1: offload of block.1"]),
    ]


class _Hooks:
    def __init__(self) -> None:
        self.events: list[str] = []

    def step_started(self, step: int, time: float, phase: str) -> None:
        self.events.append(f"start {step}")

    def task_issued(self, step: int, task: Task, time: float) -> None:
        self.events.append(str(task))

    def step_finished(self, step: int, time: float, phase: str) -> None:
        self.events.append(f"end {step}")


@pytest.mark.asyncio
async def test_the_instruments_hear_of_each_task_issued_in_order_and_the_step_end_when_asked() -> None:
    hooks = _Hooks()
    scheduler = Scheduler(RecordingEnqueuer(), instruments=Instruments([hooks]))
    first, _ = _graphs(1)
    await scheduler.run(first, _nothing, 0, mark_end=False)
    await scheduler.run(first, _nothing, 1)
    tasks = [str(t) for t in first.tasks]
    assert hooks.events == ["start 0", *tasks, "start 1", tasks[0], *tasks[2:], "end 1"]  # the upload was done ahead


@pytest.mark.asyncio
async def test_a_failing_task_ends_the_trip_and_the_next_pass_waits_on_nothing_of_the_failed_one() -> None:
    enqueuer = RecordingEnqueuer()
    scheduler = Scheduler(enqueuer)
    first, _ = _graphs()

    def failing(task: Task) -> Work:
        def work() -> None:
            if str(task) == "compute of block.1":
                raise ValueError("boom")

        return work

    with pytest.raises(TaskFailed, match=r"^step 0: compute of block.1 failed: ValueError: boom") as info:
        await scheduler.run(first, failing, 0)
    assert info.value.step == 0 and isinstance(info.value.__cause__, ValueError)
    assert [name for name, _ in enqueuer.enqueued][-1] == "0: upload of block.1"  # nothing after the failure
    enqueuer.enqueued.clear()
    await scheduler.run(first, _nothing, 1)  # from scratch: every upload its own, none after the failed pass
    assert enqueuer.enqueued[:3] == [
        ("1: embed", []),
        ("1: upload of block.0", []),
        ("1: compute of block.0", ["1: upload of block.0", "1: embed"]),
    ]


@pytest.mark.asyncio
async def test_a_cancelled_pass_waits_for_the_task_being_enqueued_and_enqueues_no_more() -> None:
    entered, release = threading.Event(), threading.Event()

    def block(task: Task) -> None:
        if str(task) == "compute of block.0":
            entered.set()
            release.wait(10)

    enqueuer = RecordingEnqueuer(block)
    scheduler = Scheduler(enqueuer)
    first, _ = _graphs()
    running = asyncio.create_task(scheduler.run(first, _nothing, 0))
    await asyncio.to_thread(entered.wait, 10)
    running.cancel()
    await asyncio.sleep(0.05)
    assert not running.done()  # still waiting for the thread's task in flight
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert [name for name, _ in enqueuer.enqueued][-1] == "0: compute of block.0"


RUNS = {
    "depth 1": (FixedDepth(1), {}),
    "depth 2, writing back every 3 steps": (FixedDepth(2, offload_every=3), {}),
    "linear units": (FixedDepth(1, unit="linear"), {}),
    "resident blocks, two directions": ("budget", {"directions": 2}),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("family", ["pre_ln_tied", "llama_gqa"])
@pytest.mark.parametrize("run", sorted(RUNS))
async def test_the_runtime_in_one_trip_a_pass_equals_the_reference(
    one_trip: list[OneTripCPUBackend], family: str, run: str
) -> None:
    policy, options = RUNS[run]
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=5, **options)
    ref_model = tiny_model(family, seed=1, num_hidden_layers=4)
    ref = ReferenceZO(ref_model, config, unit=getattr(policy, "unit", "block"))
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(4)]
    model = tiny_model(family, seed=1, num_hidden_layers=4)
    if policy == "budget":
        policy = MemoryBudget(6 * adapter_for(model).block_layouts[0].nbytes)
    async with zoruntime.Runtime(model, config, policy=policy) as rt:
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(4)]
        evaluated = await rt.evaluate(token_batch(model.config, seed=9))
        passes = 1 + 4 + 1  # the load, the steps, the evaluation
    (backend,) = one_trip
    assert backend.lanes.trips == passes + 1  # and the flush on leaving
    assert len(backend.lanes.threads) == 1
    assert got == expected
    assert evaluated == ref.evaluate(token_batch(ref_model.config, seed=9))
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


class _FakeStream:
    def __init__(self, device: object = None) -> None:
        self.log: list[str] = []

    def wait_event(self, event: object) -> None:
        self.log.append(f"wait {event}")


class _FakeEvent:
    made = 0

    def __init__(self, enable_timing: bool = False) -> None:
        _FakeEvent.made += 1
        self.name = f"event {_FakeEvent.made}"

    def record(self, stream: _FakeStream) -> None:
        stream.log.append(f"record {self.name}")

    def __str__(self) -> str:
        return self.name


@pytest.mark.asyncio
async def test_the_cuda_enqueuer_orders_each_task_on_its_own_lanes_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """``StreamEnqueuer`` with stand-ins for CUDA's streams and events: a task's stream waits for
    each dependency's event, runs the work with that stream current, and records the event its
    dependants get. Every call runs on the one enqueueing thread."""
    from zoruntime.device import cuda

    current: list[_FakeStream] = []

    class _Current:
        def __init__(self, stream: _FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current.append(self.stream)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(_FakeEvent, "made", 0)
    monkeypatch.setattr(torch.cuda, "stream", _Current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)

    class _Untimed:
        def timing_event(self) -> None:
            return None

    enqueuer = cuda.StreamEnqueuer(torch.device("cpu"), _Untimed())  # type: ignore[arg-type]
    first, _ = _graphs(1)
    ran: list[tuple[str, _FakeStream, int]] = []

    def work_for(task: Task) -> Work:
        return lambda: ran.append((str(task), current[-1], threading.get_ident()))

    try:
        await Scheduler(enqueuer).run(first, work_for, 0)
    finally:
        enqueuer.close()
    streams = {lane.value: stream.log for lane, stream in enqueuer.streams.items()}
    assert streams == {
        "upload": ["record event 2", "wait event 4", "record event 6"],  # the next pass's upload, after the offload
        "compute": [
            "record event 1",
            "wait event 2",
            "wait event 1",
            "record event 3",
            "wait event 3",
            "record event 5",
        ],
        "offload": ["wait event 3", "record event 4"],
    }
    assert [(name, stream) for name, stream, _ in ran] == [(str(t), enqueuer.streams[t.lane]) for t in first.tasks]
    assert len({thread for _, _, thread in ran}) == 1 and threading.get_ident() not in {t for _, _, t in ran}


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["thread lanes", "one trip"])
async def test_a_step_cancelled_part_way_loses_nothing_and_the_run_goes_on(
    request: pytest.FixtureRequest, path: str
) -> None:
    """The caller cancels a step while block 2's compute runs: the cancellation waits for that
    task (a thread cannot be interrupted), nothing after it runs, the step is not counted, and
    the same step called again continues the run bitwise as if nothing had happened."""
    if path == "one trip":
        request.getfixturevalue("one_trip")
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=5)
    ref_model = tiny_model(seed=1, num_hidden_layers=4)
    ref = ReferenceZO(ref_model, config)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(4)]
    model = tiny_model(seed=1, num_hidden_layers=4)
    entered, release = threading.Event(), threading.Event()
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1, offload_every=2)) as rt:
        work = rt._work
        assert work is not None
        got = [await rt.step(token_batch(model.config, seed=0))]
        original = work.for_task

        def for_task(task: Task) -> Work:
            run = original(task)
            if work.state is None or work.state.step != 1 or str(task) != "compute of block.2" or entered.is_set():
                return run

            def blocked() -> None:
                entered.set()
                release.wait(10)
                run()

            return blocked

        work.for_task = for_task  # type: ignore[method-assign]
        running = asyncio.create_task(rt.step(token_batch(model.config, seed=1)))
        await asyncio.to_thread(entered.wait, 10)
        running.cancel()
        await asyncio.sleep(0.05)
        assert not running.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert rt.step_index == 1 and rt.statistics().failed_steps == 1
        got += [await rt.step(token_batch(model.config, seed=i)) for i in range(1, 4)]
    assert got == expected
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
