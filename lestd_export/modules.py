"""Compressed-domain attention modules (DESIGN.md 2.4). No module holds or rebuilds a dense W.

How they plug into a Hugging Face attention module without copying its forward:
:class:`LatentAttention` wraps the original attention and hands it ``Z = X U1`` in place of the
hidden states; the original forward then calls its own ``q_proj``/``k_proj``/``v_proj`` (or fused
``c_attn``), now :class:`CoreProjection` modules that map ``Z`` to per-head outputs, applies rotary
embeddings, q/k norms, masks and the KV cache exactly as before, and finally calls ``o_proj``, now a
:class:`CoreOutput` that maps the heads back through ``U1^T`` once.

Tensor layout follows the ONNX format: activations are turned into ``[R1, N]`` (``N`` = batch x
tokens) so that the kept core rows are gathered along the leading axis, and each group of heads is
one batched MatMul with its gathered dense block. Weights are stored in the layout they are used
in, so that the exported graph has no weight-only arithmetic for ONNX Runtime to constant-fold.
"""

from __future__ import annotations

import torch
from torch import nn


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class CoreProjection(nn.Module):
    """``Z [B, T, R1] -> [B, T, sum_g n_g d_h]``: per head ``(Z M_i) U2^T`` for one or more groups.

    Group ``g`` stores ``rows_g [n_g * k_g]`` (int32, the kept core rows of its ``n_g`` slices,
    flattened) and ``block_g [n_g, R2, k_g]`` (the transposed gathered core block). A group with
    no ``rows`` buffer keeps all ``R1`` rows (a dense core, TensorLLM).
    """

    def __init__(self, u2: nn.Parameter, blocks: list[torch.Tensor], rows: list[torch.Tensor | None],
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.u2 = u2  # [d_h, R2], shared by all projections of the layer
        self.num_groups = len(blocks)
        for i, (block, kept) in enumerate(zip(blocks, rows)):
            self.register_parameter(f"block_{i}", _param(block))
            if kept is not None:
                self.register_buffer(f"rows_{i}", kept.to(torch.int32))
        self.bias = None if bias is None else _param(bias)

    def _rows(self, i: int) -> torch.Tensor | None:
        return self._buffers.get(f"rows_{i}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        zt = z.reshape(-1, z.shape[-1]).transpose(0, 1)  # [R1, N]
        outputs = []
        for i in range(self.num_groups):
            block = getattr(self, f"block_{i}")  # [n, R2, k]
            rows = self._rows(i)
            if rows is None:
                core_out = torch.matmul(block, zt)  # [n, R2, N]
            else:
                # explicit N: a group may keep no rows at all (k = 0) at small budgets
                picked = zt.index_select(0, rows).reshape(block.shape[0], block.shape[2], zt.shape[1])  # [n, k, N]
                core_out = torch.matmul(block, picked)  # [n, R2, N]
            heads = torch.matmul(self.u2, core_out)  # [n, d_h, N]
            outputs.append(heads.permute(2, 0, 1).reshape(*lead, -1))  # [B, T, n d_h]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        parts = []
        for i in range(self.num_groups):
            n, r2, k = getattr(self, f"block_{i}").shape
            parts.append(f"{n} heads x {'all' if self._rows(i) is None else k} rows x R2={r2}")
        return "; ".join(parts)


class CoreOutput(nn.Module):
    """Output projection ``[B, T, h d_h] -> [B, T, d]``: ``(sum_i (head_i U2) M_Oi^T) U1^T``.

    Stores ``rows [h * k]`` (int32) and ``block [h, k, R2]`` (the gathered core rows); the kept
    rows of all heads are scatter-added into one ``[R1, N]`` latent, which ``U1`` maps back once.
    """

    def __init__(self, u1: nn.Parameter, u2: nn.Parameter, block: torch.Tensor, rows: torch.Tensor | None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.u1 = u1  # [d, R1], shared with LatentAttention
        self.u2 = u2  # [d_h, R2]
        self.block = _param(block)
        self.register_buffer("rows", None if rows is None else rows.to(torch.int32))
        self.bias = None if bias is None else _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, _, rank2 = self.block.shape
        lead = x.shape[:-1]
        per_head = x.reshape(-1, heads, self.u2.shape[0]).transpose(0, 1)  # [h, N, d_h]
        latent_heads = torch.matmul(per_head, self.u2).transpose(1, 2)  # [h, R2, N]
        core_out = torch.matmul(self.block, latent_heads)  # [h, k, N]
        tokens = core_out.shape[-1]
        if self.rows is None:
            latent = core_out.sum(dim=0)  # [R1, N]
        else:
            index = self.rows.to(torch.int64).unsqueeze(1).expand(-1, tokens)  # [h k, N]
            zeros = core_out.new_zeros(self.u1.shape[1], tokens)
            latent = zeros.scatter_add(0, index, core_out.reshape(-1, tokens))  # [R1, N]
        out = torch.matmul(self.u1, latent).transpose(0, 1).reshape(*lead, -1)  # [B, T, d]
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        h, k, r2 = self.block.shape
        return f"{h} heads x {'all' if self.rows is None else k} rows x R2={r2} -> R1={self.u1.shape[1]}"


class LatentAttention(nn.Module):
    """Wraps an attention module whose projections are core modules; feeds it ``Z = X U1``."""

    def __init__(self, attention: nn.Module, u1: nn.Parameter, summary: dict):
        super().__init__()
        self.attention = attention
        self.u1 = u1  # [d, R1]
        self.summary = summary  # ranks, density, stored / dense parameters (for repr and reports)

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = torch.matmul(kwargs["hidden_states"], self.u1)  # [B, T, R1]
        else:
            args = (torch.matmul(args[0], self.u1), *args[1:])
        return self.attention(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["attention"], name)

    def extra_repr(self) -> str:
        s = self.summary
        return (f"ranks=({s['ranks'][0]}, {s['ranks'][1]}), density={s['density']:.3f}, "
                f"params={s['stored']}/{s['dense']} ({s['stored'] / s['dense']:.1%} of dense)")


class LowRankProjection(nn.Module):
    """Per-matrix truncated SVD baseline: ``x @ a_j @ b_j`` for each part ``j``, concatenated."""

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor | None = None):
        super().__init__()
        self.num_parts = len(factors)
        for j, (a, b) in enumerate(factors):
            self.register_parameter(f"a_{j}", _param(a))  # [in, r]
            self.register_parameter(f"b_{j}", _param(b))  # [r, out]
        self.bias = None if bias is None else _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.matmul(torch.matmul(x, getattr(self, f"a_{j}")), getattr(self, f"b_{j}"))
                 for j in range(self.num_parts)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return ", ".join(f"rank={getattr(self, f'a_{j}').shape[1]}" for j in range(self.num_parts))
