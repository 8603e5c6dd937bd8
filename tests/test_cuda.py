"""GPU tests (``pytest -m cuda``; skipped without CUDA): the CUDA runtime equals the reference run
on the same GPU bitwise in fp32, never drifts in fp16, and overlaps upload with compute."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model, token_batch

import zoruntime
from zoruntime.device.measure import DeviceMeter
from zoruntime.models import adapter_for
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.testing import check_timeline
from zoruntime.zo.reference import ReferenceZO
from zoruntime.zo.update import perturb_into

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3)
BLOCKS = 6


def _gpu_model(seed: int = 1, dtype: torch.dtype = torch.float32):
    return tiny_model(seed=seed, dtype=dtype, num_hidden_layers=BLOCKS)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", [FixedDepth(0), FixedDepth(1), FixedDepth(3), "budget"])
async def test_cuda_runtime_equals_the_reference_on_the_same_gpu(policy) -> None:
    ref_model = _gpu_model().cuda()
    ref = ReferenceZO(ref_model, CONFIG)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(4)]
    model = _gpu_model()
    if policy == "budget":
        policy = MemoryBudget(7 * zoruntime.OPTAdapter(model).block_layouts[0].nbytes)
    async with zoruntime.Runtime(model, CONFIG, device="cuda", policy=policy) as rt:
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(4)]
    assert got == expected
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.asyncio
@pytest.mark.parametrize("family", ["pre_ln_tied", "llama_gqa"])
@pytest.mark.parametrize("resident", [False, True])
async def test_blocks_replayed_from_cuda_graphs_equal_the_reference(family: str, resident: bool) -> None:
    """cuda_graphs=True: each whole block's perturbed forward runs eagerly at its first step, is
    captured at its second and replayed after, on the masks and rotary tables each step brings;
    the bits are the eager reference's."""
    ref_model = tiny_model(family, seed=1, num_hidden_layers=BLOCKS).cuda()
    ref = ReferenceZO(ref_model, CONFIG)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(4)]
    model = tiny_model(family, seed=1, num_hidden_layers=BLOCKS)
    policy = MemoryBudget(3 * adapter_for(model).block_layouts[0].nbytes) if resident else FixedDepth(1)
    async with zoruntime.Runtime(model, CONFIG, device="cuda", policy=policy, cuda_graphs=True) as rt:
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(4)]
        assert rt._work is not None and rt._work.graphs is not None
        assert len(rt._work.graphs._graphs) == BLOCKS * 2  # a graph a block and probe, replayed twice
    assert got == expected
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.asyncio
@pytest.mark.parametrize(("family", "unit"), [("pre_ln_tied", "linear"), ("llama_gqa", "half")])
async def test_finer_units_and_chunked_ends_on_cuda_equal_the_reference_on_the_same_gpu(
    family: str, unit: str, monkeypatch
) -> None:
    """Each unit's forward runs in a greenlet that must enqueue on the compute lane's stream;
    small vocabulary chunks make the head and the embedding cross chunk boundaries."""
    from zoruntime.planning import memory

    monkeypatch.setattr(memory, "VOCAB_CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(memory, "KEPT_SPAN_ELEMENTS", 512)
    monkeypatch.setattr(memory, "LOSS_PIECE_ELEMENTS", 100)
    monkeypatch.setattr(memory, "FUSED_LOSS_PIECE_BYTES", 200)  # the loss kernel's pieces: several a chunk
    ref_model = tiny_model(family, seed=1, num_hidden_layers=BLOCKS).cuda()
    ref = ReferenceZO(ref_model, CONFIG, unit=unit)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(3)]
    model = tiny_model(family, seed=1, num_hidden_layers=BLOCKS)
    async with zoruntime.Runtime(model, CONFIG, device="cuda", policy=FixedDepth(2, unit=unit)) as rt:
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(3)]
    assert got == expected
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
async def test_16_bit_masters_round_stochastically_on_cuda_as_the_reference_does(dtype: torch.dtype) -> None:
    config = zoruntime.ZOSGD(lr=1e-3, eps=1e-2, weight_decay=0.1, seed=5)  # rounding: stochastic by default
    ref_model = _gpu_model(dtype=dtype).cuda()
    ref = ReferenceZO(ref_model, config)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(3)]
    model = _gpu_model(dtype=dtype)
    async with zoruntime.Runtime(model, config, device="cuda", policy=FixedDepth(1, offload_every=2)) as rt:
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(3)]
        assert rt.rounding == "stochastic" and got[2].changed_fraction is not None
    assert got == expected
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("q", "estimator", "dtype"), [(4, "two-sided", torch.float32), (3, "one-sided", torch.bfloat16)]
)
async def test_several_directions_on_cuda_equal_the_reference_on_the_same_gpu(q, estimator, dtype) -> None:
    """The directions' sum is made in float32 on the device; the coefficients stay device tensors."""
    config = zoruntime.ZOSGD(lr=1e-3, eps=1e-2, weight_decay=0.1, seed=5, directions=q, estimator=estimator)
    ref_model = tiny_model("llama_gqa", seed=1, dtype=dtype, num_hidden_layers=BLOCKS).cuda()
    ref = ReferenceZO(ref_model, config)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(3)]
    model = tiny_model("llama_gqa", seed=1, dtype=dtype, num_hidden_layers=BLOCKS)
    async with zoruntime.Runtime(model, config, device="cuda", policy=FixedDepth(1, offload_every=2)) as rt:
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(3)]
    assert got == expected and all(len(s.projected_grads) == q for s in got)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.asyncio
async def test_lr_zero_leaves_fp16_weights_bitwise_unchanged_on_cuda() -> None:
    model = _gpu_model(dtype=torch.float16)
    before = [p.clone() for p in model.parameters()]
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=0.0, eps=1e-2), device="cuda") as rt:
        for i in range(10):
            await rt.step(token_batch(model.config, seed=i))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.asyncio
async def test_upload_of_the_next_block_overlaps_compute_of_this_one() -> None:
    config = zoruntime.tiny_opt_config(
        hidden_size=1024, ffn_dim=4096, num_attention_heads=16, word_embed_proj_dim=1024,
        num_hidden_layers=8, max_position_embeddings=512,
    )  # fmt: skip
    model = zoruntime.random_opt(config, dtype=torch.float16)
    batch = {"input_ids": torch.randint(4, config.vocab_size, (4, 512))}
    async with zoruntime.Runtime(model, CONFIG, device="cuda", policy=FixedDepth(1), trace=True) as rt:
        for _ in range(3):
            await rt.step(batch)
    spans = rt.timeline.spans  # after close: every step's offloads are in
    # step 2's uploads: its own, and the first ones, which step 1 did ahead
    uploads = {s.block: s for s in spans if s.kind == "upload" and (s.step, s.ahead) in ((2, False), (1, True))}
    computes = {s.block: s for s in spans if s.kind == "compute" and s.step == 2}
    overlapping = [
        b for b in range(7) if uploads[b + 1].start < computes[b].end and computes[b].start < uploads[b + 1].end
    ]
    assert len(overlapping) >= 5, (uploads, computes)
    for mark in rt.timeline.steps:  # a step returns when the device has run its head, not when it is enqueued
        if mark.phase == "step":
            assert mark.end >= next(s.end for s in rt.timeline.for_step(mark.step) if s.kind == "head")
    check_timeline(rt.timeline)


def test_device_timing_leaves_out_the_hosts_launch_overhead() -> None:
    meter = DeviceMeter("cuda")
    x = torch.zeros(16, device="cuda")

    def many_tiny_kernels() -> None:
        for _ in range(300):
            x.add_(1.0)

    gpu, host = meter.seconds(many_tiny_kernels, repeat=5), meter.enqueue_seconds(many_tiny_kernels, repeat=5)
    assert 0 < gpu < host  # 300 launches take the host far longer than the GPU needs to run them


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_copy_perturbed_in_pieces_on_cuda_equals_one_perturbed_whole(dtype: torch.dtype) -> None:
    """CUDA's add applies one function to every element, aligned for its vector loads or not: the
    kept group's rows (61 of 27 here) equal a whole copy's, as ``perturb_into`` promises."""
    gen = torch.Generator().manual_seed(0)
    weights = (torch.randn(61 * 27, generator=gen) * 0.05).to(dtype).cuda()
    z = torch.randn(61 * 27, generator=gen).to(dtype).cuda()
    whole = perturb_into(torch.empty_like(weights), weights, z, 1e-3)
    rows = torch.empty_like(weights)
    for at in range(0, weights.numel(), 27):
        perturb_into(rows[at : at + 27], weights[at : at + 27], z[at : at + 27], 1e-3)
    assert torch.equal(rows.view(torch.int16), whole.view(torch.int16))


def test_the_meter_finds_cublas_workspace_where_pytorch_documents_it() -> None:
    """32 MiB a stream from compute capability 9 (Hopper) on, PyTorch's default there, unless
    CUBLAS_WORKSPACE_CONFIG says otherwise (cuBLASLt's beside it where it has its own); measured
    again after the meter freed it."""
    meter = DeviceMeter("cuda")
    found = meter.blas_workspace_bytes(torch.float16)
    assert found > 0 and meter.blas_workspace_bytes(torch.float16) > 0  # freed, then taken again
    if torch.cuda.get_device_capability()[0] == 9 and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        assert found >= 32 * 2**20  # exactly that where cuBLASLt shares cuBLAS's (recent PyTorch)


def test_a_batch_is_staged_pinned_so_its_copy_does_not_stop_the_host() -> None:
    from zoruntime.device.cuda import CUDABackend

    backend = CUDABackend("cuda")
    try:
        ids = torch.ones(2, 8, dtype=torch.long)
        assert backend.staged(ids).is_pinned() and torch.equal(backend.staged(ids), ids)
        on_device = ids.cuda()
        assert backend.staged(on_device) is on_device
    finally:
        backend.close()


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_16_bit_updates_on_cuda_equal_the_tensor_path_given_the_kernels_noise(rounding: str) -> None:
    """apply_update on a CUDA group with decayed and undecayed runs (one ``fused.update_span``
    keyed by the group's rounding seed) equals the tensor path run by run, given the noise the
    kernel draws at each element's index; bfloat16 narrows as the tensor path does (which the
    interpreter cannot show on a CPU)."""
    from zoruntime.models.groups import GroupLayout, ParamSlice
    from zoruntime.zo import fused
    from zoruntime.zo.directions import ROUNDING_DIRECTION, DirectionSampler, chunk_seed
    from zoruntime.zo.update import DROPPED_BITS, PendingUpdate, Rounding, _update_run, apply_update

    pytest.importorskip("triton")
    dtype, numel = torch.bfloat16, 3000
    slices = (ParamSlice("a", (1000,), 0, True), ParamSlice("b", (500,), 1000, False),
              ParamSlice("c", (1500,), 1500, True))  # fmt: skip
    layout = GroupLayout(4, slices, numel, dtype)
    weights = torch.randn(numel, device="cuda").to(dtype)
    z = torch.randn(numel, device="cuda").to(dtype)
    update = PendingUpdate.from_gradient(3, 99, 1e-2, 0.5, torch.tensor(0.7, device="cuda"), Rounding(rounding))
    got = weights.clone()
    apply_update(got, z, update, layout, DirectionSampler("cuda"))
    expected, seed = weights.clone(), chunk_seed(99, 4, 0, ROUNDING_DIRECTION)
    dropped = DROPPED_BITS[dtype] if rounding == "stochastic" else 0
    scaled_grad = update.scaled_grads[0]
    for lo, hi, decay in ((0, 1000, 5e-3), (1000, 1500, 0.0), (1500, 3000, 5e-3)):
        if dropped or decay:
            noise = fused.rounding_noise(hi - lo, dropped, seed, lo, weights.device) if dropped else None
            _update_run(expected[lo:hi], z[lo:hi], scaled_grad, decay, noise)
        else:
            expected[lo:hi].addcmul_(z[lo:hi], scaled_grad)
    differ = (got != expected).sum().item()
    assert differ <= numel // 1000, differ  # equal but where one path contracts a multiply-add and the other not
    assert not torch.equal(got, weights)
