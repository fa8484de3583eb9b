"""A small GPT for the ``lm`` task: token and learned position embeddings, pre-norm transformer blocks with
causal self-attention (``scaled_dot_product_attention``), a final LayerNorm and an LM head tied to the token
embedding (as GPT-2). ``forward`` returns the final hidden states, not logits: the trainer hands them and
``lm_head.weight`` to the fused linear loss, so the (tokens, vocab) logits are never materialised."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Positions are sized once per architecture (not per run), so a teacher checkpoint fits any seq_len <= MAX_LEN.
MAX_LEN = 512
SPECS = {
    "gpt_tiny": {"dim": 64, "layers": 2, "heads": 4},
    "gpt_small": {"dim": 128, "layers": 4, "heads": 4},
    "gpt_medium": {"dim": 256, "layers": 6, "heads": 8},
}


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int = MAX_LEN):
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) final hidden states; logits are ``self.lm_head(hidden)``."""
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's {self.max_len} positions")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build(name: str, vocab: int) -> GPT:
    return GPT(vocab, **SPECS[name])
