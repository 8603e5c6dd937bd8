"""Mixed precision (fp32 masters, 16-bit compute) stays exact against the reference; storage reuse."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_batch

import zoruntime
from zoruntime.models import OPTAdapter, adopt_into_flat
from zoruntime.models.groups import existing_flat
from zoruntime.policies import FixedDepth
from zoruntime.zo.reference import ReferenceZO

CONFIG = zoruntime.ZOSGD(lr=1e-2, eps=1e-2, weight_decay=0.1, seed=9)


@pytest.mark.asyncio
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
async def test_fp32_masters_with_16_bit_compute_equal_the_reference(compute_dtype: torch.dtype) -> None:
    ref_model, model = tiny_model(seed=3, num_hidden_layers=3), tiny_model(seed=3, num_hidden_layers=3)
    ref = ReferenceZO(ref_model, CONFIG, compute_dtype=compute_dtype)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(3)]
    async with zoruntime.Runtime(model, CONFIG, policy=FixedDepth(1), compute_dtype=compute_dtype) as rt:
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(3)]
        held_out = token_batch(model.config, seed=50)
        assert await rt.evaluate(held_out) == ref.evaluate(held_out)
    assert got == expected
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # and the 16-bit forward really differs from the fp32 one
    full = ReferenceZO(tiny_model(seed=3, num_hidden_layers=3), CONFIG).step(token_batch(model.config, seed=0))
    assert full.losses[0] != expected[0].losses[0]


def test_compute_dtype_wider_than_the_masters_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no wider than the master weights' torch.float16.*load the model in float32"):
        zoruntime.Runtime(tiny_model(dtype=torch.float16), CONFIG, compute_dtype=torch.float32)


@pytest.mark.asyncio
async def test_a_model_already_laid_out_flat_is_used_without_a_copy() -> None:
    model = tiny_model(num_hidden_layers=2)
    adapter = OPTAdapter(model)
    flat = adopt_into_flat(adapter.block_layouts[1], adapter.block_parameters(1), torch.empty(10**6)[100:])
    assert existing_flat(adapter.block_layouts[1], adapter.block_parameters(1)).data_ptr() == flat.data_ptr()
    assert existing_flat(adapter.block_layouts[0], adapter.block_parameters(0)) is None  # separate tensors
    async with zoruntime.Runtime(model, CONFIG) as rt:
        await rt.step(token_batch(model.config))
        assert rt._work is not None
        assert rt._work.storage.host[adapter.block_layouts[1].group].data_ptr() == flat.data_ptr()


def test_cuda_without_a_gpu_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rt = zoruntime.Runtime(tiny_model(), CONFIG, device="cuda")
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*Use device='cpu'"):
        zoruntime.run(rt.open())


@pytest.mark.parametrize("unit", ["block", "linear"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("vocab_chunk", [None, 300])  # None: the whole table is one chunk
@pytest.mark.parametrize(  # fp16 masters, bf16 forwards: as wide, yet z cannot be drawn in the copy's buffer
    ("masters", "compute_dtype"),
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)],
)
@pytest.mark.parametrize("policy", ["serial", "depth2", "some_resident", "all_resident"])
def test_the_memory_model_is_what_storage_allocates(
    masters: torch.dtype,
    compute_dtype: torch.dtype,
    policy: str,
    vocab_chunk: int | None,
    family: str,
    unit: str,
    monkeypatch,
) -> None:
    from zoruntime.device.cpu import CPUBackend
    from zoruntime.models import adapter_for
    from zoruntime.planning import memory
    from zoruntime.policies import MemoryBudget
    from zoruntime.storage import Storage, model_layout

    if vocab_chunk is not None:
        monkeypatch.setattr(memory, "VOCAB_CHUNK_ELEMENTS", vocab_chunk)
        monkeypatch.setattr(memory, "KEPT_SPAN_ELEMENTS", 512)
    adapter = adapter_for(tiny_model(family, num_hidden_layers=6, dtype=masters), unit)
    layout = model_layout(adapter, compute_dtype)
    chosen = {"serial": FixedDepth(0), "depth2": FixedDepth(2), "some_resident": MemoryBudget(6 * layout.unit_bytes),
              "all_resident": MemoryBudget(100 * layout.unit_bytes)}[policy]  # fmt: skip
    plan = chosen.plan(layout)
    backend = CPUBackend()
    allocated: list[torch.Tensor] = []
    allocate = backend.compute_empty
    backend.compute_empty = lambda numel, dtype: allocated.append(allocate(numel, dtype)) or allocated[-1]  # type: ignore[method-assign]
    try:
        Storage(adapter, plan, backend, compute_dtype)
    finally:
        backend.close()
    assert sum(t.numel() * t.element_size() for t in allocated) == layout.bytes_needed(plan)
    assert (policy == "some_resident") == (0 < len(plan.resident) < layout.num_units)
