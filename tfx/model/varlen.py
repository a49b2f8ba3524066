"""Attention of packed rows, one sample at a time: no cross-sample scores computed.

Data flow position: packing -> splice -> **LLM attention** -> loss. A packed row's samples are
marked by `position_ids` that restart at 0 (`tfx.data.packing`). `varlen_kwargs` turns them
into flash-attn's varlen arguments (`cu_seq_lens_*` over the flattened rows, `max_length_*`),
which transformers hands to every attention call:
- flash_attention_2 reads them directly (its own inference from `position_ids` only works for
  one row: with several rows it would attend across samples);
- `sdpa_varlen`, registered here, runs SDPA on each sample's own slice, so a row costs the sum
  of its samples' squares instead of its full T x T, as flash-attn's varlen kernel does.
  Without those arguments (unpacked batches, generation) it is transformers' SDPA unchanged.
  Packed calls pass an empty 4-D `attention_mask` (R, 1, 0, 0): transformers takes a 4-D mask
  as already built, so it does not build its (R, 1, T, T) block mask (8 x 8192^2 bytes would be
  half a GB), and any attention that did read it would fail on its shape instead of silently
  attending across samples.
Shape legend: R rows, T sequence, H heads, S samples.
"""

from __future__ import annotations

import torch

NAME = "sdpa_varlen"
BOUNDS = "tfx_packed_bounds"  # keyword: `cu_seq_lens_q` as Python ints (sdpa_varlen only)


def varlen_kwargs(position_ids_RT: torch.Tensor) -> dict:
    """flash-attn varlen arguments for packed rows: sample starts (position 0) over the
    flattened (R*T,) rows, as int32 offsets (S+1,), and the longest sample."""
    flat = position_ids_RT.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}


def packed_attention(llm_config, embeds_RTD: torch.Tensor, position_ids_RT: torch.Tensor) -> dict:
    """The LLM call's keyword arguments that keep packed rows' attention inside each sample:
    the varlen arguments for `sdpa_varlen` and flash-attn, else (eager, plain sdpa) the exact
    block-diagonal causal mask in the backend's form. The mask is built explicitly:
    transformers infers it only when no 2-D mask and no cache are passed, and silently
    attends across samples otherwise."""
    impl = llm_config._attn_implementation
    if impl == NAME:
        empty = torch.ones((position_ids_RT.shape[0], 1, 0, 0), dtype=torch.bool,
                           device=position_ids_RT.device)
        kw = varlen_kwargs(position_ids_RT)
        # the offsets as Python ints once per forward, not one device sync per layer
        return {"attention_mask": empty, **kw, BOUNDS: tuple(kw["cu_seq_lens_q"].tolist())}
    if impl in ("flash_attention_2", "flash_attention_3"):  # their mask is None here anyway
        return varlen_kwargs(position_ids_RT)
    from transformers.masking_utils import create_causal_mask

    return {"attention_mask": create_causal_mask(llm_config, embeds_RTD, attention_mask=None,
                                                 past_key_values=None,
                                                 position_ids=position_ids_RT)}


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """transformers' attention signature: query (R, H, T, d), key and value (R, H_kv, T, d)
    -> ((R, T, H, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    bounds = kwargs.pop(BOUNDS, None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(f"{NAME}: sliding-window attention with packed rows")
    R, _, T, _ = query.shape
    bounds = bounds or cu.tolist()
    rows = [[] for _ in range(R)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        r, a, b = start // T, start % T, start % T + (end - start)
        if b > T:
            raise ValueError(f"{NAME}: a sample crosses rows ({start}..{end}, rows of {T}): "
                             "position_ids must restart at every row start")
        span = (slice(r, r + 1), slice(None), slice(a, b))
        out, _ = sdpa_attention_forward(module, query[span], key[span], value[span], None,
                                        dropout=dropout, scaling=scaling, is_causal=True)
        rows[r].append(out)  # (1, n, H, d)
    return torch.cat([torch.cat(parts, dim=1) for parts in rows], dim=0), None


def register() -> None:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent). Its mask is
    SDPA's: unpacked batches need their padding masked exactly as with `sdpa`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
