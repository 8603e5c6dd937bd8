"""The one memory model: compute-side bytes of a plan, the figure ``Storage`` allocates. No torch.

A model is seen as groups (flat buffers of one dtype). A group is either streamable (a
decoder block: it may be streamed through a slot or kept resident, as the plan says) or kept
(the embedding and head group: always on the compute device). For a plan the compute side holds

- every kept group's weights, and beside them never a whole perturbed copy nor a whole
  direction: its vocabulary-sized parameters (``chunked_numel`` elements) are perturbed a chunk
  of rows at a time into buffers of one chunk each (``rows_numel`` in all), the rest of the
  group whole (in the compute dtype), and z is drawn ``KEPT_SPAN_ELEMENTS`` at a time into a
  span buffer in the masters' dtype;
- the streamable groups the plan keeps resident, the streaming slots (each the size of the
  largest streamable group), and one perturbed copy shared by all of them.

Where the compute dtype is the masters' dtype, a streamed group's z is drawn straight into the
perturbed copy's buffer (and drawn again for each probe and for the update), so no direction
buffer exists. With 16-bit compute over fp32 masters z must be drawn in fp32: then the
streamable groups share a direction buffer. A run of several directions per step sums their
z for an update in a float32 buffer of ``STEP_SPAN_ELEMENTS`` (or the largest group, if less),
shared by every group.

Activations come on top and are not counted here. Policies (``MemoryBudget``), ``Storage``, the
runtime's statistics, the out-of-memory advice and the benchmark all read this model; a test
checks that it equals what ``Storage`` allocates. Knows sizes and the plan; nothing of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..policies.base import Plan


KEPT_SPAN_ELEMENTS = 1 << 24
"""Elements of a kept group's z drawn at a time: one chunk of the direction scheme
(``zo.directions.CHUNK_ELEMENTS``), so a span is one whole draw; also of the chunk it keeps
drawn whole for the parts of it that its pieces and rows need."""


STEP_SPAN_ELEMENTS = 1 << 24
"""Elements of an update of several directions summed at a time (float32): one chunk of the
direction scheme, so each direction's span is one whole draw."""


UPDATE_SPAN_ELEMENTS = 1 << 22
"""Elements an update computes at once where it needs float32 temporaries (16-bit masters, or
weight decay; ``zo.update.apply_update``): four pieces of stochastic rounding, whose noise is
drawn side by side. Longer spans issue fewer kernels (a 1.3B block's update: about 760 dispatched
operations with spans of one piece, 389 with four; ``bench.overhead``); its temporaries, 12 bytes
an element (the float32 sum and step, the int32 noise), are counted with the activations."""


@dataclass(frozen=True, slots=True)
class GroupSize:
    """One group as the planner sees it: elements, bytes per element of its master copy, and
    whether a plan may stream it; for a kept group, the elements of its vocabulary-sized
    parameters and of one chunk of rows of each (see the module's docstring)."""

    numel: int
    itemsize: int
    streamable: bool
    chunked_numel: int = 0
    rows_numel: int = 0

    def kept_bytes(self, compute_itemsize: int) -> int:
        """Compute-side bytes of a kept group: its weights, the rest of it perturbed whole, one
        chunk of rows of each vocabulary-sized parameter, z's span buffer and the chunk kept drawn."""
        perturbed = (self.numel - self.chunked_numel + self.rows_numel) * compute_itemsize
        return self.nbytes + perturbed + 2 * min(self.numel, KEPT_SPAN_ELEMENTS) * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Compute-side bytes of a plan, by what they hold."""

    kept: int  # kept groups: their weights, and their perturbed rows and z a chunk at a time
    resident: int  # streamable groups the plan keeps on the compute device
    slots: int  # streaming slots
    working: int  # the perturbed copy (and direction, with mixed dtypes; the step of several directions)

    @property
    def units(self) -> int:
        """What the streamable units need (what ``MemoryBudget`` budgets): resident, slots, working."""
        return self.resident + self.slots + self.working

    @property
    def total(self) -> int:
        return self.kept + self.units


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """What a policy may know about a model: its groups' sizes (in group order), the compute
    dtype's width, and whether a step may use several directions (its updates then need a step
    buffer). The streamable groups are the units a plan places, numbered in model order."""

    groups: tuple[GroupSize, ...]
    compute_itemsize: int
    several_directions: bool = False
    mixed_dtypes: bool = False  # the streamed groups' dtype is not the compute dtype, even one as wide (fp16, bf16)

    def __post_init__(self) -> None:
        if not self.streamable:
            raise ValueError("a model layout needs at least one streamable group (a decoder block)")
        if self.compute_itemsize <= 0 or any(g.numel <= 0 or g.itemsize <= 0 for g in self.groups):
            raise ValueError("group sizes and itemsizes must be positive")

    @classmethod
    def uniform(cls, num_units: int, unit_bytes: int) -> ModelLayout:
        """``num_units`` streamable units of ``unit_bytes`` each (one byte per element), nothing
        kept: for simulations and policy tests."""
        if num_units <= 0 or unit_bytes <= 0:
            raise ValueError(f"need num_units > 0 and unit_bytes > 0, got {num_units} and {unit_bytes}")
        return cls(tuple(GroupSize(unit_bytes, 1, True) for _ in range(num_units)), 1)

    @property
    def streamable(self) -> tuple[GroupSize, ...]:
        return tuple(g for g in self.groups if g.streamable)

    @property
    def num_units(self) -> int:
        """Units a plan places: the streamable groups (the decoder blocks today)."""
        return len(self.streamable)

    @property
    def unit_bytes(self) -> int:
        """Bytes of the largest streamable unit (a slot holds any of them)."""
        return max(g.nbytes for g in self.streamable)

    @property
    def needs_directions(self) -> bool:
        """Whether the streamed groups' z needs a buffer of its own: it is drawn in the masters'
        dtype, so only when the compute dtype differs (else it is drawn into the perturbed copy's
        buffer), if only in kind (fp16 masters, bf16 forwards)."""
        return self.mixed_dtypes or any(g.itemsize != self.compute_itemsize for g in self.streamable)

    def breakdown(self, plan: Plan) -> MemoryBreakdown:
        """Compute-side bytes ``plan`` takes (before activations)."""
        plan.validate(self.num_units)
        units = self.streamable
        direction = self.needs_directions
        kept = sum(g.kept_bytes(self.compute_itemsize) for g in self.groups if not g.streamable)
        numel, itemsize = max(g.numel for g in units), max(g.itemsize for g in units)
        working = numel * (itemsize * direction + self.compute_itemsize)  # a perturbed copy (and a direction)
        working += self.step_span * 4
        return MemoryBreakdown(
            kept=kept,
            resident=sum(units[i].nbytes for i in plan.resident),
            slots=plan.slots(len(units)) * self.unit_bytes,
            working=working,
        )

    @property
    def step_span(self) -> int:
        """Elements of the float32 buffer an update of several directions is summed in (0: none)."""
        return min(max(g.numel for g in self.groups), STEP_SPAN_ELEMENTS) if self.several_directions else 0

    def bytes_needed(self, plan: Plan) -> int:
        """Every compute-side byte of ``plan``: what ``Storage`` allocates."""
        return self.breakdown(plan).total


LOSS_PIECE_ELEMENTS = 1 << 21
"""Float32 logits per piece of the head's causal-LM loss (``models.vocab.loss_piece_tokens``
tokens of one chunk of the vocabulary): 8 MB, with the 16-bit logits and the log-sum-exp's
temporary 20 MB at 16-bit compute, where every token's logits over a 50,272-word vocabulary at
2,048 tokens take 1 GB. About 50 pieces cover 2,048 tokens of that vocabulary at any width."""

FUSED_LOSS_PIECE_BYTES = 1 << 24
"""Bytes of logits per piece where one kernel takes each piece's figures (``models.fused_loss``,
on a GPU): 16 MB in the compute dtype and nothing beside them, within what a piece of the tensor
path takes, in a quarter as many pieces at 16-bit compute (14 for opt-1.3b's 2,048 tokens, not 56)."""

VOCAB_CHUNK_ELEMENTS = 1 << 24
"""Elements per chunk of a vocabulary-sized parameter (whole rows: ``rows_per_chunk``)."""


def rows_per_chunk(width: int) -> int:
    """Rows of ``width`` elements in one chunk of ``VOCAB_CHUNK_ELEMENTS`` (at least one)."""
    return max(1, VOCAB_CHUNK_ELEMENTS // width)


def loss_piece_tokens(rows: int, fused_itemsize: int = 0) -> int:
    """Tokens whose logits over ``rows`` rows of the vocabulary fill one piece (at least one):
    float32 logits of ``LOSS_PIECE_ELEMENTS``, or where the loss kernel takes the pieces
    (``fused_itemsize``: the logits' bytes an element) ``FUSED_LOSS_PIECE_BYTES`` of them."""
    per_piece = FUSED_LOSS_PIECE_BYTES // fused_itemsize if fused_itemsize else LOSS_PIECE_ELEMENTS
    return max(1, per_piece // rows)


def loss_pieces(vocab: int, width: int, tokens: int, fused_itemsize: int = 0) -> int:
    """Pieces the head's causal-LM loss takes over ``tokens`` tokens: for each chunk of
    ``VOCAB_CHUNK_ELEMENTS`` of the vocabulary's rows (``width`` wide), its tokens a piece at a
    time (``fused_itemsize`` as ``loss_piece_tokens`` takes it)."""
    rows = rows_per_chunk(width)
    return -(-vocab // rows) * -(-tokens // loss_piece_tokens(min(vocab, rows), fused_itemsize))


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The widths activations scale with: hidden size, FFN width, vocabulary, attention heads;
    and how many hidden-wide and FFN-wide intermediates a block's forward holds at once at its
    peak, besides its input (``device.live_bytes`` counts them in HF's own layers: OPT's MLP
    holds fc1's output and its ReLU's, beside the attention's residual sum; the Llama family's
    holds the gate's activation, the up projection and their product, beside the residual sum
    and the normalised input)."""

    hidden: int
    ffn: int
    vocab: int
    heads: int
    hidden_live: int
    ffn_live: int


def activation_bytes(
    dims: ModelDims,
    rows: int,
    length: int,
    itemsize: int,
    *,
    attention_scores: bool,
    chunked_loss: bool = True,
    paused: bool = False,
    probes: int = 2,
) -> int:
    """A generous estimate of a step's working memory beside the buffers: the logits with the
    loss's float32 copies (for the causal-LM loss, of a piece of ``LOSS_PIECE_ELEMENTS`` at a
    time, which bounds the loss kernel's pieces of ``FUSED_LOSS_PIECE_BYTES`` too, and per token
    one figure a chunk; for a user's loss, of every token and word), the blocks' forwards
    (``block_bytes``), the attention scores where the kernel materialises them (a CPU; not CUDA's
    fused attention); or, if more, an update's float32 temporaries beside the probes' hidden
    streams."""
    tokens = rows * length
    if chunked_loss:
        words = min(dims.vocab, rows_per_chunk(dims.hidden))
        chunks = -(-dims.vocab // words)  # each token's log-sum-exp and target logit per chunk
        logits = min(tokens, loss_piece_tokens(words)) * words * (itemsize + 8) + 2 * chunks * tokens * 4
    else:
        logits = tokens * dims.vocab * (itemsize + 8)
    hidden = block_bytes(dims, tokens, itemsize, paused=paused, probes=probes)
    scores = rows * dims.heads * length * length * itemsize if attention_scores else 0
    update = probes * tokens * dims.hidden * itemsize + 12 * UPDATE_SPAN_ELEMENTS  # beside the probes' streams
    return max(logits + hidden + scores, update)


def block_bytes(dims: ModelDims, tokens: int, itemsize: int, *, paused: bool = False, probes: int = 2) -> int:
    """The blocks' working memory over ``tokens`` tokens: a hidden-state stream per probe (two for
    MeZO's step) and one forward's intermediates at their peak (``ModelDims.hidden_live`` and
    ``ffn_live``; attention fused, as on CUDA): exact for whole blocks and halves. With ``paused``
    (blocks streamed as several units, each probe's forward paused between them) the other
    probes' forwards held inside a block, at most two hidden-wide tensors and one FFN-wide each
    (a bound, met by the Llama family paused between linear layers; OPT's hold one hidden-wide
    fewer, and between halves either holds one hidden-wide tensor)."""
    width = (probes + dims.hidden_live) * dims.hidden + dims.ffn_live * dims.ffn
    if paused:
        width += (probes - 1) * (2 * dims.hidden + dims.ffn)
    return tokens * width * itemsize


def show_size(size: int) -> str:
    """``size`` bytes for people, to four significant figures in the largest unit it reaches
    (``1.235 MB``, ``24 GB``, ``999 bytes``), decimal as ``--gpu-memory`` and ``memory=`` take
    them (1 MB = 10**6 bytes): a budget of a few MB is not shown as 0.00 GB."""
    for scale, unit in ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "KB")):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} bytes"
