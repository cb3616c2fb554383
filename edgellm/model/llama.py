"""The Llama-family decoder in torch: the exact-float reference every other backend is checked against.

Written from the math (RMSNorm, RoPE, grouped-query attention, SwiGLU) on the dequantized weights of a
ModelDescription. It runs any contiguous range of layers against a caller-owned KV cache, so the
offloader and hybrid backends can split the network without a second model definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgellm.model.config import ModelConfig
from edgellm.model.description import ModelDescription
from edgellm.model.rope import inverse_frequencies


@dataclass
class KVCache:
    """Preallocated keys/values for layers [start, stop): (n_layers, max_tokens, n_kv_heads, head_dim).

    With per-layer KV head counts (a structurally pruned model) n_kv_heads is the largest in the range;
    a layer with fewer uses the leading heads of its slot.
    """

    keys: torch.Tensor
    values: torch.Tensor
    start_layer: int
    length: int = 0

    @classmethod
    def allocate(cls, config: ModelConfig, start: int, stop: int, max_tokens: int,
                 dtype: torch.dtype = torch.float32) -> KVCache:
        kv_heads = max((config.n_kv_heads_at(i) for i in range(start, stop)), default=config.n_kv_heads)
        shape = (stop - start, max_tokens, kv_heads, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), start)

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate feature pairs of x (T, heads, d) by position angles; cos/sin are (T, 1, d/2)."""
    if style == "interleaved":  # pairs (0,1), (2,3), ...
        pairs = x.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # pairs (i, i + d/2)
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class LlamaModel(torch.nn.Module):
    """Decoder-only transformer over float copies of a ModelDescription's weights."""

    def __init__(self, description: ModelDescription, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = description.config
        self.dtype = dtype
        w = description.weights

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(w.float(name), dtype=np.float32)).to(dtype)

        self.embedding = tensor("token_embd.weight")  # (vocab, hidden)
        self.lm_head = self.embedding if self.config.tie_embeddings else tensor("output.weight")
        self.output_norm = tensor("output_norm.weight")
        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down")
        self.layers = [{n: tensor(f"blk.{i}.{n}.weight") for n in names} for i in range(self.config.n_layers)]
        self.inv_freq = torch.from_numpy(inverse_frequencies(description))  # float64
        # unit name -> list of (T, K) inputs; set to a dict to record what each fused linear group sees
        self.capture: dict[str, list[torch.Tensor]] | None = None
        # structure gates: "blk.{i}.attn" (n_heads,) scales each query head's output, "blk.{i}.ffn" (F,) each
        # FFN channel; all ones = the model unchanged. Pruning reads importance from d(loss)/d(gate).
        self.gates: dict[str, torch.Tensor] | None = None

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[token_ids]  # (T, hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.output_norm, self.config.norm_eps) @ self.lm_head.T  # (T, vocab)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]  # (T, d/2)
        return angles.cos().to(self.dtype)[:, None, :], angles.sin().to(self.dtype)[:, None, :]

    def trace(self, token_ids: torch.Tensor, layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits (T, vocab) of one sequence from position 0 and the hidden states (T, hidden) after each of
        `layers`; differentiable (no torch.no_grad), for training passes such as distillation."""
        t = token_ids.shape[0]
        cos, sin = self.rope_tables(torch.arange(t))
        hidden, kept = self.embed(token_ids), {}
        for i in range(self.config.n_layers):
            # one cache per layer: autograd must not see a later layer's in-place write into a shared buffer
            cache = KVCache.allocate(self.config, i, i + 1, t, self.dtype)
            hidden = self._block(i, hidden, cache, 0, 0, cos, sin)
            if i in layers:
                kept[i] = hidden
        return self.head(hidden), kept

    @torch.no_grad()
    def run_layers(self, hidden: torch.Tensor, cache: KVCache, start: int, stop: int) -> torch.Tensor:
        """Advance hidden states (T, hidden) through layers [start, stop), appending to `cache`."""
        t = hidden.shape[0]
        pos0 = cache.length
        positions = torch.arange(pos0, pos0 + t)
        cos, sin = self.rope_tables(positions)
        for i in range(start, stop):
            hidden = self._block(i, hidden, cache, i - cache.start_layer, pos0, cos, sin)
        cache.length = pos0 + t
        return hidden

    def _block(self, i: int, x: torch.Tensor, cache: KVCache, slot: int, pos0: int,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg, p = self.config, self.layers[i]
        t = x.shape[0]
        n_heads, n_kv = cfg.n_heads_at(i), cfg.n_kv_heads_at(i)  # per layer: structured pruning may differ
        h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
        self._record(f"blk.{i}.attn_qkv", h)
        q = (h @ p["attn_q"].T).view(t, n_heads, cfg.head_dim)  # (T, n_head, d)
        k = (h @ p["attn_k"].T).view(t, n_kv, cfg.head_dim)  # (T, n_kv, d)
        v = (h @ p["attn_v"].T).view(t, n_kv, cfg.head_dim)
        q = apply_rope(q, cos, sin, cfg.rope_style)
        k = apply_rope(k, cos, sin, cfg.rope_style)
        cache.keys[slot, pos0:pos0 + t, :n_kv] = k
        cache.values[slot, pos0:pos0 + t, :n_kv] = v
        keys = cache.keys[slot, :pos0 + t, :n_kv]  # (S, n_kv, d)
        values = cache.values[slot, :pos0 + t, :n_kv]
        attn = self._attention(q, keys, values, pos0)  # (T, n_head * d)
        if self.gates is not None:
            attn = (attn.view(t, n_heads, cfg.head_dim) * self.gates[f"blk.{i}.attn"][:, None]).view(t, -1)
        self._record(f"blk.{i}.attn_output", attn)
        x = x + attn @ p["attn_output"].T
        h = rms_norm(x, p["ffn_norm"], cfg.norm_eps)
        self._record(f"blk.{i}.ffn_gate_up", h)
        gate = h @ p["ffn_gate"].T
        up = h @ p["ffn_up"].T
        act = torch.nn.functional.silu(gate) * up
        if self.gates is not None:
            act = act * self.gates[f"blk.{i}.ffn"]
        self._record(f"blk.{i}.ffn_down", act)
        return x + act @ p["ffn_down"].T

    def _record(self, unit: str, inputs: torch.Tensor) -> None:
        if self.capture is not None:
            self.capture.setdefault(unit, []).append(inputs.detach().clone())

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos0: int) -> torch.Tensor:
        t, s = q.shape[0], keys.shape[0]
        n_heads, n_kv, d = q.shape[1], keys.shape[1], q.shape[2]
        group = n_heads // n_kv
        # (n_kv, group, T, d) x (n_kv, 1, d, S) -> (n_kv, group, T, S): query head h uses kv head h // group
        qg = q.view(t, n_kv, group, d).permute(1, 2, 0, 3)
        scores = qg @ keys.permute(1, 2, 0).unsqueeze(1) / (d ** 0.5)
        causal = torch.arange(s)[None, :] > (pos0 + torch.arange(t))[:, None]  # (T, S)
        scores = scores.masked_fill(causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = probs @ values.permute(1, 0, 2).unsqueeze(1)  # (n_kv, group, T, d)
        return out.permute(2, 0, 1, 3).reshape(t, n_heads * d)
