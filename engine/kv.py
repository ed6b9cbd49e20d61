"""Per-sample cross-attention K/V: each sample's own concept deltas, computed once per request.

For every cross-attention layer l and text row b (a prompt or negative prompt of one request):

    K_l[b] = c_b W0ᵀ + Σ_concepts w (c_b downᵀ) upᵀ        (a dense delta Δ adds w c_b Δᵀ)

and likewise V, with w the concept's weight in that row's request. That is exactly what
``c_b (W0 + w Δ)ᵀ`` gives with the scaled deltas added to the weights
(`concepts.apply.apply_concepts`), but leaves the weights shared, so samples with different concepts
(or one concept at different weights) share one UNet batch. The weight is applied here, to the
factors of this batch, never to the cached `Concept`: the cache holds one entry per digest whatever
the weights it is used at. The text embedding is fixed over the denoising loop, so K/V are computed
before it and every step's attention reads them through `PrecomputedKVProcessor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from concepts.artifact import Concept

# layer path -> (K, V), each [rows, heads, tokens, head_dim]; set for the duration of one UNet call
# stack. A ContextVar, not an attribute, so threads generating at once each see their own K/V.
_KV: ContextVar[dict[str, tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar("customdiff_kv", default=None)


class PrecomputedKVProcessor:
    """The attn2 processor: scaled dot-product attention of the layer's query over precomputed K/V.

    Mirrors diffusers' `AttnProcessor2_0` for the features Stable Diffusion's cross-attention uses
    (`install_kv_processors` refuses layers with others).
    """

    def __init__(self, layer: str) -> None:
        self.layer = layer

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [rows, pixels, dim] -> [rows, pixels, dim]; `encoder_hidden_states` is unused."""
        kv = _KV.get()
        if kv is None:
            raise RuntimeError(f"{self.layer}: the UNet ran outside `precomputed_kv`; it has no K/V to attend to")
        if attention_mask is not None:
            raise ValueError(f"{self.layer}: cross-attention masks are not supported")
        key, value = kv[self.layer]
        rows = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        query = query.view(rows, -1, attn.heads, key.shape[-1]).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * key.shape[-1]).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def install_kv_processors(unet: nn.Module) -> dict[str, nn.Module]:
    """Give every cross-attention (attn2) layer a `PrecomputedKVProcessor`; return those layers by path.

    Raises:
        ValueError: a layer uses a feature the processor does not implement (norms, residuals).
    """
    modules = dict(unet.named_modules())
    processors, layers = {}, {}
    for key, processor in unet.attn_processors.items():
        path = key.removesuffix(".processor")
        if not path.endswith("attn2"):
            processors[key] = processor
            continue
        attn = modules[path]
        unsupported = [f for f in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(attn, f) is not None]
        if attn.norm_cross or attn.residual_connection or attn.rescale_output_factor != 1.0:
            unsupported.append("norm_cross/residual_connection/rescale_output_factor")
        if unsupported:
            raise ValueError(f"{path}: cross-attention with {unsupported} is not supported by the engine")
        processors[key] = PrecomputedKVProcessor(path)
        layers[path] = attn
    unet.set_attn_processor(processors)
    return layers


# A row's concepts with their weights; zero-weight concepts are left out (they add nothing).
Weighted = tuple[tuple[Concept, float], ...]


@dataclass
class _Sets:
    """The distinct weighted concept sets of a batch's text rows (a request's rows share one), indexed."""

    concepts: list[Weighted]
    rows: list[torch.Tensor]  # per set, its rows
    with_concepts: torch.Tensor  # every row that has concepts
    set_of_row: torch.Tensor  # per row of `with_concepts`, its set
    text: torch.Tensor  # [len(with_concepts), tokens, hidden]


def _weighted(row_concepts: Sequence[tuple[Concept, ...]], row_weights: Sequence[Sequence[float]] | None,
              ) -> list[Weighted]:
    """Each row's (concept, weight) pairs, zero weights left out; no `row_weights` is weight 1 everywhere.

    Raises:
        ValueError: `row_weights` is not aligned with `row_concepts` (a caller's bug, not a request's).
    """
    if row_weights is None:
        return [tuple((c, 1.0) for c in concepts) for concepts in row_concepts]
    if len(row_weights) != len(row_concepts) or any(len(w) != len(c)
                                                    for w, c in zip(row_weights, row_concepts)):
        raise ValueError(f"row_weights {[len(w) for w in row_weights]} is not aligned with row_concepts "
                         f"{[len(c) for c in row_concepts]}")
    return [tuple((c, float(w)) for c, w in zip(concepts, weights) if w != 0.0)
            for concepts, weights in zip(row_concepts, row_weights)]


def _sets(text: torch.Tensor, row_concepts: Sequence[Weighted]) -> _Sets | None:
    index: dict[tuple[tuple[int, float], ...], int] = {}
    sets: list[Weighted] = []
    rows: list[list[int]] = []
    with_concepts, set_of_row = [], []
    for row, concepts in enumerate(row_concepts):
        if not concepts:
            continue
        key = tuple((id(c), w) for c, w in concepts)
        if key not in index:
            index[key] = len(sets)
            sets.append(concepts)
            rows.append([])
        rows[index[key]].append(row)
        with_concepts.append(row)
        set_of_row.append(index[key])
    if not sets:
        return None
    device = text.device
    with_t = torch.tensor(with_concepts, device=device)
    return _Sets(sets, [torch.tensor(r, device=device) for r in rows], with_t,
                 torch.tensor(set_of_row, device=device), text.index_select(0, with_t))


def _factors(name: str, concepts: Weighted) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A set's low-rank deltas on layer `name` as one pair: a sum of products w_i up_i down_i is the
    product of the factors concatenated along the rank, [out, Σr] @ [Σr, in], each w_i folded into
    its `up` (a new tensor: the cached concept is never changed)."""
    low = [(c.deltas[name], w) for c, w in concepts if name in c.deltas and c.deltas[name].dense is None]
    if not low:
        return None
    ups = [d.up if w == 1.0 else d.up * w for d, w in low]
    if len(low) == 1:
        return ups[0], low[0][0].down
    return torch.cat(ups, 1), torch.cat([d.down for d, _ in low], 0)


def _padded(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """`factor` zero-padded along `dim` (its rank dimension) to `rank`."""
    missing = rank - factor.shape[dim]
    if missing == 0:
        return factor
    return F.pad(factor, (0, missing) if dim == 1 else (0, 0, 0, missing))


def _add_deltas(out: torch.Tensor, name: str, sets: _Sets, text: torch.Tensor) -> None:
    """out [rows, tokens, out] += every row's concepts' text Δᵀ on layer `name`, in place.

    The low-rank deltas of all sets go through two batched matmuls (factors zero-padded to one
    rank), so the number of kernel launches does not grow with the number of concepts in a batch.
    """
    factors = [_factors(name, concepts) for concepts in sets.concepts]
    present = [f for f in factors if f is not None]
    if present:
        rank = max(up.shape[1] for up, _ in present)
        (out_f, _), (_, in_f) = present[0][0].shape, present[0][1].shape
        zero_up, zero_down = out.new_zeros(out_f, rank), out.new_zeros(rank, in_f)
        ups = torch.stack([zero_up if f is None else _padded(f[0], rank, 1) for f in factors])
        downs = torch.stack([zero_down if f is None else _padded(f[1], rank, 0) for f in factors])
        ups, downs = ups.index_select(0, sets.set_of_row), downs.index_select(0, sets.set_of_row)
        out.index_add_(0, sets.with_concepts,
                       torch.bmm(torch.bmm(sets.text, downs.transpose(1, 2)), ups.transpose(1, 2)))
    for concepts, rows in zip(sets.concepts, sets.rows):  # dense (uncompressed) deltas: one matmul each
        for concept, weight in concepts:
            delta = concept.deltas.get(name)
            if delta is not None and delta.dense is not None:
                out.index_add_(0, rows, F.linear(text.index_select(0, rows), delta.dense), alpha=weight)


def compute_kv(layers: dict[str, nn.Module], text: torch.Tensor, row_concepts: Sequence[tuple[Concept, ...]],
               row_weights: Sequence[Sequence[float]] | None = None,
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """K/V of every cross-attention layer for every text row, with that row's concepts' deltas.

    Args:
        layers: attn2 modules by path (from `install_kv_processors`).
        text: [rows, tokens, hidden] text-encoder output.
        row_concepts: for each row, the concepts whose deltas apply to it (empty: the base).
        row_weights: for each row, its concepts' weights in `row_concepts` order (the request's
            `GenerationRequest.weights`): each delta is scaled by its weight, 0 drops it; None is 1 for all.

    Returns:
        layer path -> (K, V), each [rows, heads, tokens, head_dim].

    Raises:
        ValueError: `row_weights` does not match `row_concepts` row for row.
    """
    sets = _sets(text, _weighted(row_concepts, row_weights))
    result = {}
    for path, attn in layers.items():
        pair = []
        for proj in ("to_k", "to_v"):
            out = getattr(attn, proj)(text)
            if sets is not None:
                _add_deltas(out, f"{path}.{proj}", sets, text)
            pair.append(out.view(text.shape[0], -1, attn.heads, out.shape[-1] // attn.heads).transpose(1, 2))
        result[path] = (pair[0], pair[1])
    return result


def expand_kv(kv: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """K/V per UNet row: `rows` [unet_rows] holds the text row each UNet row attends to."""
    return {path: (k.index_select(0, rows), v.index_select(0, rows)) for path, (k, v) in kv.items()}


@contextlib.contextmanager
def precomputed_kv(kv: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Make `kv` what every `PrecomputedKVProcessor` attends to in this context (thread, task)."""
    token = _KV.set(kv)
    try:
        yield
    finally:
        _KV.reset(token)
