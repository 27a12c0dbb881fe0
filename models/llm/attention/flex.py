"""Block-sparse attention as dense *tiles* through one fused kernel — PyTorch's FlexAttention
(`torch.nn.attention.flex_attention`, compiled by torch.compile: inductor's C++ kernel on CPU, Triton on CUDA) or,
for tiles that need no per-row mask, SDPA's own fused CPU kernel — for the sparse methods of this kit (HiP:
Lee et al. 2024; HyperAttention: Han et al. 2023).

**Tiles, not sequence-coordinate blocks.** HiP picks key blocks of b_k = 2 tokens and HyperAttention attends
inside LSH-sorted diagonal blocks of a *permuted* sequence; neither is a union of wide blocks of the original
sequence. FlexAttention's kernel pays a fixed cost per (query block, key block) pair it visits (on CPU a few µs:
a BlockMask with 2-token key blocks ran HiP's key set 1.5× *slower* than dense SDPA at 8k tokens), so each
method gathers the keys a group of queries attends into one contiguous *tile* and gives flex one tile per
query group: queries [N, H, L_q, d] and keys/values [N, H, L_k, d]. The `BlockMask` is over the tile's blocks
(all of them, or a causal staircase for exact causal tiles), and the `mask_mod` masks single keys:

    allowed(n, h, i, j) = key_pos[n, h, j] ≤ query_pos[n, h, i],

with the original positions for causality (HiP), 0 / `NEVER` for a plain keep / drop and −1 (`ALWAYS`) for a key
every query sees. An optional additive `key_bias[n, h, j]` is the `score_mod`. Memory is that of the tiles,
T·L_k/L_q keys per head: linear in T for a fixed budget, never T².

**Compilation** is cached by torch.compile per bucket — (heads, head dim, L_q, L_k, tiles per call, dtype,
device) — and every shape is static: a call takes `chunk_tiles` tiles (a fixed memory budget), the last chunk
padded to a power of two (≥ `SMALL_TILES`) with tiles the BlockMask skips, so a tile shape compiles a handful of
times (log₂ of the chunk / 16, plus one) whatever the sequence length, and a deployment never recompiles for a
request whose tile count lands in a bucket it has seen.

**Log-sum-exp.** The CPU kernel cannot return the lse (torch 2.13 raises "return_lse is not supported"), which
HyperAttention's merges need (`kit.merge_lse`). `tile_attention_lse` recovers it exactly with an *anchor*: one
extra key with score a (set through an extra channel, q' = [q, a/scale], k' = [0, 1]) and value e (an extra
value channel, 0 for real keys). With Z = Σ_j e^{s_j} over the row's keys, the kernel returns

    o' = Z·o / (Z + e^a),    p = e^a / (Z + e^a)   (the extra channel),

so o = o' / (1 − p) and lse = log Z = a + log(1 − p) − log p. The caller passes a ≤ lse — by Jensen,
a = scale·q·k̄ + log c for the mean k̄ of c keys the row is known to see — so 1 − p ≥ ½ is computed to float
precision and p only loses precision if e^{a − lse} underflows (the row's scores spread by more than ~80 nats);
such rows, and rows with p > 0.9 (no known key), are recomputed exactly on their tiles.

**Dense tiles on CPU** (`tiles_lse`, kernel "sdpa-tiles"): a tile whose mask is the same for all its rows (a key
bias, or causal) is plain attention, and SDPA's fused CPU flash kernel — the op SDPA itself calls, which also
returns the lse — runs it 2.4× faster than FlexAttention with the anchor (HyperAttention's 128 × 257 tiles,
measured here); tiles with a per-row mask (HiP's) are faster on FlexAttention than with a materialised mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from models.llm.attention.kit import attention_with_lse

log = logging.getLogger(__name__)

FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NEVER = 2**31 - 1  # key_pos of a key no query sees (padding, an excluded sample); int32
ALWAYS = -1  # key_pos of a key every query sees (HyperAttention's anchor)
RECOMPILE_LIMIT = 64  # torch.compile's per-function limit (8 by default): one entry per tile bucket in use
# Buffers stay below glibc's largest dynamic mmap threshold (32 MiB): larger ones are mmapped afresh on every call
# and page-faulted in (64 MiB of gathered rows took 47 ms that way, 8 × 8 MiB reused from the heap 3.5 ms).
TILE_CHUNK_BYTES = 16 << 20  # q/k/v tiles per FlexAttention call (`chunk_tiles`)
SMALL_TILES = 16  # tiles of the small bucket (short inputs)

_state: dict[str, Any] = {"compiled": None, "compilations": 0, "broken": None, "buckets": set()}


def _counting_inductor(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """inductor, counting the graphs it compiles (a test holds serving to one compilation per bucket)."""
    from torch._inductor.compile_fx import compile_fx

    _state["compilations"] += 1
    return compile_fx(gm, example_inputs)


def compilations() -> int:
    """How many FlexAttention graphs this process has compiled (each bucket once, plus recompiles)."""
    return _state["compilations"]


def buckets() -> set[tuple]:
    """The buckets called so far: (heads, head dim, value dim, L_q, L_k, tiles, dtype, device type, with bias)."""
    return set(_state["buckets"])


def available(*tensors: torch.Tensor) -> bool:
    """Whether the FlexAttention path can run these inputs: a float32/bfloat16/float16 CPU or CUDA tensor, no
    gradient wanted (the CPU kernel is inference-only), and no earlier compile failure in this process."""
    if _state["broken"] is not None:
        return False
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not wants_grad and all(t.dtype in FLEX_DTYPES and t.device.type in ("cpu", "cuda") for t in tensors)


def sdpa_tiles_available(*tensors: torch.Tensor) -> bool:
    """Whether SDPA's fused CPU flash kernel can run dense tiles with their lse (`tiles_lse`): CPU float32 /
    bfloat16 / float16 inference and the kernel present (an internal op of torch's SDPA)."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (
        hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
        and not wants_grad
        and all(t.dtype in FLEX_DTYPES and t.device.type == "cpu" for t in tensors)
    )


def choose(path: str, tensors: tuple[torch.Tensor, ...], kernels: tuple[str, ...] = ("flex",)) -> str:
    """The path a method takes: `path` "auto" picks the first of `kernels` that can run the inputs ("sdpa-tiles":
    `sdpa_tiles_available`; "flex": `available`), else "gather" (the pure-torch path); a kernel named outright
    must be able to run them (ValueError otherwise); "gather" is always possible."""
    ok = {"flex": available, "sdpa-tiles": sdpa_tiles_available}
    if path == "gather":
        return path
    if path in kernels:
        if not ok[path](*tensors):
            raise ValueError(
                f"the {path} path runs float32/bfloat16/float16 inference only ({_state['broken'] or 'inputs'})"
            )
        return path
    if path != "auto":
        raise ValueError(f"path must be auto, {', '.join(kernels)} or gather, not {path!r}")
    return next((kernel for kernel in kernels if ok[kernel](*tensors)), "gather")


def mark_broken(error: BaseException, path: str) -> None:
    """Give up on FlexAttention in this process after a failed compile (a missing C++ compiler, say): the
    pure-torch path runs instead, unless the caller asked for "flex" outright."""
    if path == "flex":
        raise error
    _state["broken"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    log.warning("FlexAttention unavailable, using the pure-torch path: %s", _state["broken"])


def _flex() -> Callable[..., torch.Tensor]:
    if _state["compiled"] is None:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _state["compiled"] = torch.compile(flex_attention, backend=_counting_inductor)
    return _state["compiled"]


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def tile_width(width: int) -> tuple[int, int]:
    """(L_k, key block) for tiles of `width` keys: one key block up to 512 keys (rounded up to 16), else blocks of
    128 — the bucket a tile width compiles under."""
    return (round_up(width, 16),) * 2 if width <= 512 else (round_up(width, 128), 128)


def staircase(l_q: int, l_k: int, block: int) -> torch.Tensor:
    """Causal `kv_blocks` for tiles whose key j sits at query position j, in square blocks: the blocks below the
    diagonal full (2), the diagonal masked (1), those above skipped (0); [L_q / block, L_k / block] int8."""
    i = torch.arange(l_q // block).unsqueeze(1)
    j = torch.arange(l_k // block).unsqueeze(0)
    return ((j < i).to(torch.int8) * 2 + (j == i).to(torch.int8)).to(torch.int8)


def allowed(key_pos: torch.Tensor, query_pos: torch.Tensor, b: Any, h: Any, i: Any, j: Any) -> Any:
    """The mask_mod of every tile: key j is attended by query i of tile b, head h."""
    return key_pos[b, h, j] <= query_pos[b, h, i]


def dense_mask(key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """The mask_mod evaluated on every (tile, head, query, key): [N, H, L_q, L_k] bool (for tests and checks)."""
    n, heads, l_q = query_pos.shape
    b, h, i, j = (
        torch.arange(size, device=key_pos.device).view(*([1] * axis), size, *([1] * (3 - axis)))
        for axis, size in enumerate((n, heads, l_q, key_pos.shape[-1]))
    )
    return allowed(key_pos, query_pos, b, h, i, j)


def chunk_tiles(heads: int, l_q: int, l_k: int, d: int, d_v: int, element_size: int = 4) -> int:
    """Tiles per FlexAttention call for this tile shape: a power of two (≥ `SMALL_TILES`) whose q/k/v tiles hold
    about `TILE_CHUNK_BYTES`."""
    per_tile = heads * (l_q * (d + d_v) + l_k * (d + d_v)) * element_size
    return max(SMALL_TILES, 1 << int(math.log2(max(1, TILE_CHUNK_BYTES // per_tile))))


def tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    kv_blocks: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """softmax(scale·q kᵀ + key_bias, masked where key_pos > query_pos) v per tile (module docstring): q [N, H, L_q,
    d], k [N, H, L_k, d], v [N, H, L_k, d_v], key_pos [N, H, L_k] and query_pos [N, H, L_q] (int32), key_bias
    [N, H, L_k] or None; `block` = (query block, key block) dividing L_q and L_k (default: the whole tile), and
    `kv_blocks` [L_q / query block, L_k / key block] which key blocks each query block visits: 0 skipped, 1 masked
    by the mask_mod, 2 *full* (every key allowed for every query of the block: no mask_mod, the kernel's fast
    path); default all 1. Returns [N, H, L_q, d_v]; a row with no allowed key is 0.

    Every call has a static shape — `chunk_tiles` tiles, the last chunk padded to a power of two (at least
    `SMALL_TILES`) with tiles the BlockMask skips: the tile count never enters the compiled kernel as a variable
    (a dynamic one meets a codegen bug of torch 2.13's CPU template, which renames size symbols by string
    prefix)."""
    n, heads, l_q, d = q.shape
    l_k, d_v = k.shape[-2], v.shape[-1]
    block = block or (l_q, l_k)
    if l_q % block[0] or l_k % block[1]:
        raise ValueError(f"blocks {block} must divide the tile ({l_q}, {l_k})")
    if kv_blocks is None:
        kv_blocks = torch.ones(l_q // block[0], l_k // block[1], dtype=torch.int8)
    chunk = chunk_tiles(heads, l_q, l_k, d, d_v, q.element_size())
    out = q.new_empty(n, heads, l_q, d_v)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        size = min(chunk, max(SMALL_TILES, 1 << (e - s - 1).bit_length()))  # a power of two: ≤ 2× padding
        parts = [x[s:e] for x in (q, k, v, key_pos, query_pos)] + ([] if key_bias is None else [key_bias[s:e]])
        out[s:e] = _flex_call(parts, size, scale, kv_blocks, block)[: e - s]
    return out


def _flex_call(
    parts: list[torch.Tensor], size: int, scale: float, kv_blocks: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """One compiled FlexAttention call on `size` tiles (the real ones first, then skipped padding)."""
    from torch.nn.attention.flex_attention import BlockMask

    real = parts[0].shape[0]
    if real < size:
        fill = [0, 0, 0, NEVER, 0, 0]
        parts = [torch.cat([x, x.new_full((size - real, *x.shape[1:]), f)]) for x, f in zip(parts, fill)]
    q, k, v, key_pos, query_pos, *rest = (x.contiguous() for x in parts)
    key_bias = rest[0] if rest else None
    for t in (q, k, v, key_pos, query_pos, *rest):  # static shapes: one graph per bucket, no automatic dynamic
        for dim in range(t.dim()):
            torch._dynamo.mark_static(t, dim)
    heads, l_q, d = q.shape[1:]
    l_k, d_v = k.shape[-2], v.shape[-1]
    tiles = torch.arange(size, device=q.device).view(size, 1, 1) < real

    def listed(which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # BlockMask's (counts, indices)
        counts = torch.where(tiles, which.sum(-1).to(torch.int32).to(q.device).view(1, 1, -1), 0).to(torch.int32)
        order = torch.argsort(which.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts, order.to(q.device).view(1, 1, *order.shape).expand(size, 1, *order.shape).contiguous()

    partial, full = listed(kv_blocks == 1), (listed(kv_blocks == 2) if bool((kv_blocks == 2).any()) else (None, None))

    def mask_mod(b: Any, h: Any, i: Any, j: Any) -> Any:
        return allowed(key_pos, query_pos, b, h, i, j)

    def score_mod(score: Any, b: Any, h: Any, i: Any, j: Any) -> Any:
        return score + key_bias[b, h, j]

    block_mask = BlockMask.from_kv_blocks(
        *partial,
        *full,
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(l_q, l_k),
        compute_q_blocks=False,
    )
    _state["buckets"].add((heads, d, d_v, l_q, l_k, size, q.dtype, q.device.type, key_bias is not None))
    return _flex()(q, k, v, score_mod=None if key_bias is None else score_mod, block_mask=block_mask, scale=scale)


def lse_tiles(
    n: int, heads: int, l_q: int, l_k: int, d: int, d_v: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed tiles with the anchor's extra channel for `tile_attention_lse`: q [n, H, L_q, d + 1], k [n, H, L_k,
    d + 1], v [n, H, L_k, d_v + 1]; the caller fills [..., :d] / [..., :d_v] (building them in place saves
    concatenating the channel to every tile afterwards)."""
    return (
        torch.zeros(n, heads, l_q, d + 1, dtype=dtype, device=device),
        torch.zeros(n, heads, l_k, d + 1, dtype=dtype, device=device),
        torch.zeros(n, heads, l_k, d_v + 1, dtype=dtype, device=device),
    )


def tile_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    anchor: torch.Tensor,
    anchor_column: int,
    key_bias: torch.Tensor | None = None,
    kv_blocks: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`tile_attention` with each row's log-sum-exp, through the anchor of the module docstring. q, k, v come from
    `lse_tiles` (their last channel is the anchor's, set here); `anchor_column` is a key column the caller
    reserved (key_pos `ALWAYS`) and `anchor` [N, H, L_q] a lower bound of each row's lse. Returns (o [N, H, L_q,
    d_v], lse [N, H, L_q] in float32), o = 0 and lse = −inf for a row with no allowed key; rows the anchor
    cannot resolve (p > 0.9, or p underflowing) are recomputed exactly on their tiles."""
    dtype = q.dtype
    q[..., -1] = anchor / scale
    k[..., anchor_column, :] = 0
    v[..., anchor_column, :] = 0
    k[..., anchor_column, -1] = 1
    v[..., anchor_column, -1] = 1
    if key_bias is not None:  # the anchor's score is exactly a
        key_bias = key_bias.index_fill(-1, torch.tensor([anchor_column], device=key_bias.device), 0.0)
    out = tile_attention(q, k, v, scale, key_pos, query_pos, key_bias, kv_blocks, block).float()
    p = out[..., -1]
    unresolved = (p > 0.9) | (p < 1e-30) | ~torch.isfinite(p)
    o = (out[..., :-1] / (1 - p.clamp(max=0.9)).unsqueeze(-1)).to(dtype)
    lse = anchor.float() + torch.log1p(-p.clamp(max=0.9)) - torch.log(p.clamp(min=1e-30))
    if bool(unresolved.any()):
        tiles = unresolved.flatten(1).any(-1).nonzero().squeeze(-1)
        bias = torch.zeros(key_pos[tiles].shape, dtype=torch.float32, device=q.device)
        if key_bias is not None:
            bias = bias + key_bias[tiles].float()
        allowed = key_pos[tiles].unsqueeze(-2) <= query_pos[tiles].unsqueeze(-1)
        allowed[..., anchor_column] = False
        exact_o, exact_lse = attention_with_lse(
            q[tiles, ..., :-1],
            k[tiles, ..., :-1],
            v[tiles, ..., :-1],
            scale,
            bias=bias.unsqueeze(-2).masked_fill(~allowed, -math.inf),
        )
        rows = unresolved[tiles]
        o[tiles] = torch.where(rows.unsqueeze(-1), exact_o, o[tiles])
        lse[tiles] = torch.where(rows, exact_lse, lse[tiles])
    return o, lse


def tiles_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    causal: bool = False,
    kernel: str = "sdpa-tiles",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention inside dense tiles, with each row's lse: q [N, H, L_q, d], k/v [N, H, L_k, ·]; `key_bias`
    [N, H, L_k] is added to every row's scores (−inf drops a key, a finite value weights it); `causal`: query i
    sees keys j ≤ i (then no bias). Returns (o [N, H, L_q, d_v], lse [N, H, L_q] float32; o = 0, lse = −inf for
    a row that sees no key).

    kernel "sdpa-tiles": SDPA's fused CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, the
    op SDPA itself calls, which also returns the lse SDPA's public call drops), the bias as its mask broadcast
    over the rows — 2.4× faster than FlexAttention on HyperAttention's 128 × 257 tiles, which need no per-row
    mask. kernel "flex": FlexAttention tiles with the anchor (`tile_attention_lse`), for devices without that
    kernel; a = scale·q·k̄ + log c over the c zero-bias keys the row sees (its causal prefix), ≤ lse by Jensen."""
    n, heads, l_q, d = q.shape
    l_k, d_v = k.shape[-2], v.shape[-1]
    if kernel == "sdpa-tiles":
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        mask = None if key_bias is None else key_bias.to(q.dtype).unsqueeze(-2)
        o, lse = flash(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        lse = lse.float()
        if key_bias is not None:  # the kernel leaves a row that sees nothing at o = 0, lse = 0
            lse = lse.masked_fill(torch.isneginf(key_bias).all(-1, keepdim=True), -math.inf)
        return o, lse
    block = 64 if causal and l_q > 64 else round_up(l_q, 16)
    p_q = round_up(l_q, block)
    p_k, kv_block = (p_q + block, block) if causal else tile_width(l_k + 1)
    anchor_column = p_q if causal else l_k
    q_t, k_t, v_t = lse_tiles(n, heads, p_q, p_k, d, d_v, q.dtype, q.device)
    q_t[..., :l_q, :d], k_t[..., :l_k, :d], v_t[..., :l_k, :d_v] = q, k, v
    column = torch.arange(p_k, device=q.device)
    kept = column < l_k
    if key_bias is not None:
        kept = kept & torch.cat([~torch.isneginf(key_bias), key_bias.new_zeros(n, heads, p_k - l_k).bool()], -1)
    key_pos = torch.where(kept, column if causal else 0, NEVER).masked_fill(column == anchor_column, ALWAYS)
    key_pos = key_pos.to(torch.int32).expand(n, heads, p_k)
    rows = torch.arange(p_q, device=q.device)
    query_pos = (rows if causal else torch.zeros_like(rows)).to(torch.int32).expand(n, heads, p_q)
    zero = kept[..., :l_k] & (True if key_bias is None else key_bias == 0)  # the keys the anchor averages
    weights = zero.float().unsqueeze(-1)
    if causal:
        count = weights[..., :l_q, :].cumsum(-2)[..., :l_q, :]
        mean = (k_t[..., :l_q, :d].float() * weights[..., :l_q, :]).cumsum(-2) / count.clamp(min=1)
        anchor = scale * (q_t[..., :l_q, :d].float() * mean).sum(-1) + torch.log(count.squeeze(-1).clamp(min=1))
    else:
        count = weights.sum(-2)
        mean = (k.float() * weights).sum(-2) / count.clamp(min=1)
        anchor = scale * torch.einsum("nhqd,nhd->nhq", q.float(), mean) + torch.log(count.clamp(min=1))
    anchor = torch.cat([anchor, anchor.new_zeros(n, heads, p_q - l_q)], dim=-1)
    bias = None
    if key_bias is not None:
        bias = torch.cat([key_bias.float(), key_bias.new_zeros(n, heads, p_k - l_k).float()], -1)
        bias = bias.masked_fill(torch.isneginf(bias), 0.0)
    kv_blocks = None
    if causal:
        kv_blocks = staircase(p_q, p_k, block)
        kv_blocks[:, -1] = 1  # the anchor's block
    o, lse = tile_attention_lse(
        q_t,
        k_t,
        v_t,
        scale,
        key_pos,
        query_pos,
        anchor,
        anchor_column,
        bias,
        kv_blocks,
        (block if causal else p_q, kv_block),
    )
    return o[..., :l_q, :], lse[..., :l_q]
