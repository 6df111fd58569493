"""PyTorch reference for the nanoGPT-style ``shakespeare_char`` CPU recipe.

Standalone (no ``llm_jax`` imports): trains a small character-level GPT on
tinyshakespeare and prints ONE JSON line on stdout with the final validation
loss and training throughput, for comparison with the JAX implementation.
Progress goes to stderr.

Quick smoke test::

    python3 benchmarks/torch_shakespeare_char.py --steps 50 --eval_batches 5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

BATCH_SIZE = 12
BLOCK_SIZE = 64
PEAK_LR = 1e-3
MIN_LR = 1e-4
LR_WARMUP = 100
BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
TRAIN_LOSS_WINDOW = 50


@dataclass(frozen=True)
class GPTConfig:
    """Model hyperparameters of the shakespeare_char recipe."""

    vocab_size: int
    block_size: int = BLOCK_SIZE
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 512


def log(msg: str) -> None:
    """Print a progress message to stderr."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def load_splits(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Read text, build the sorted char vocabulary, return (train, val, vocab)."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))
    n_train = int(0.9 * len(ids))
    return ids[:n_train], ids[n_train:], len(chars)


def sample_batch(data: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw BATCH_SIZE random windows; offsets uniform in [0, len-block-1]."""
    offsets = rng.integers(0, len(data) - BLOCK_SIZE, size=BATCH_SIZE)
    idx = offsets[:, None] + np.arange(BLOCK_SIZE)[None, :]
    x = torch.from_numpy(data[idx])
    y = torch.from_numpy(data[idx + 1])
    return x, y


# -------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention without biases."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """Two-layer feed-forward block with exact GELU, no biases."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only GPT with learned positions and a tied output head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) for Linear/Embedding; scaled std for residual projections."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.out_proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(blk.mlp.down.weight, mean=0.0, std=resid_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the mean next-token cross-entropy."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.tok_emb.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


# ---------------------------------------------------------------------- training


def lr_at(update: int, horizon: int) -> float:
    """Linear warmup from 0 over LR_WARMUP updates, cosine to MIN_LR at `horizon`."""
    if update < LR_WARMUP:
        return PEAK_LR * update / LR_WARMUP
    if update >= horizon:
        return MIN_LR
    frac = (update - LR_WARMUP) / (horizon - LR_WARMUP)
    return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on params of dim>=2 only."""
    params = list(model.parameters())  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=BETAS, eps=ADAM_EPS)


@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, n_batches: int, seed: int) -> float:
    """Mean loss over a fixed set of validation windows (fresh rng each call)."""
    rng = np.random.default_rng(seed + 1)
    model.eval()
    total = 0.0
    for _ in range(n_batches):
        x, y = sample_batch(val, rng)
        total += model(x, y).item()
    model.train()
    return total / n_batches


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float
) -> float:
    """One forward/backward/clip/AdamW update; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    return loss.item()


def maybe_compile(
    model: nn.Module, enabled: bool, sample: tuple[torch.Tensor, torch.Tensor]
) -> tuple[nn.Module, bool]:
    """Try torch.compile (forcing a trial fwd/bwd); fall back to eager on failure."""
    if not enabled:
        return model, False
    try:
        compiled = torch.compile(model)
        compiled(*sample).backward()
        model.zero_grad(set_to_none=True)
        log("torch.compile: ok")
        return compiled, True
    except Exception as exc:  # noqa: BLE001 - any backend failure means fallback
        model.zero_grad(set_to_none=True)
        log(f"torch.compile failed ({type(exc).__name__}: {exc}); using eager")
        return model, False


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", type=Path, default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_batches", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--warmup_steps", type=int, default=50, help="steps excluded from timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--compile", action="store_true")
    return p.parse_args()


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train: np.ndarray,
    val: np.ndarray,
    args: argparse.Namespace,
) -> tuple[list[float], list[float], list[list[float]]]:
    """Run all updates; return (train losses, per-step seconds, intermediate evals)."""
    rng = np.random.default_rng(args.seed)
    losses: list[float] = []
    step_s: list[float] = []
    evals: list[list[float]] = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = sample_batch(train, rng)
        losses.append(train_step(model, opt, x, y, lr_at(step, args.steps)))
        step_s.append(time.perf_counter() - t0)
        done = step + 1
        if args.log_every and done % args.log_every == 0:
            ms = 1000.0 * float(np.mean(step_s[-args.log_every :]))
            lr = lr_at(step, args.steps)
            log(f"step {done} loss {losses[-1]:.4f} lr {lr:.2e} {ms:.1f} ms/step")
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            v = evaluate(model, val, args.eval_batches, args.seed)
            evals.append([done, v])
            log(f"step {done} val_loss {v:.4f}")
    return losses, step_s, evals


def run(args: argparse.Namespace) -> dict[str, object]:
    """Train per the recipe and return the JSON-able result record."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, val, vocab = load_splits(args.data_path)
    log(f"vocab={vocab} train={len(train)} val={len(val)} tokens")
    model = GPT(GPTConfig(vocab_size=vocab))
    log(f"params={sum(p.numel() for p in model.parameters())}")
    opt = make_optimizer(model)
    sample = sample_batch(train, np.random.default_rng(args.seed + 2))
    step_model, compiled = maybe_compile(model, args.compile, sample)

    losses, step_s, evals = train_loop(step_model, opt, train, val, args)
    final_val = evaluate(step_model, val, args.eval_batches, args.seed)
    evals.append([args.steps, final_val])
    log(f"final val_loss {final_val:.4f}")

    skip = args.warmup_steps if args.steps > args.warmup_steps else 0
    if skip != args.warmup_steps:
        log(f"steps <= warmup_steps; timed all {args.steps} steps")
    timed = np.asarray(step_s[skip:])
    return {
        "final_val_loss": final_val,
        "tokens_per_second": len(timed) * BATCH_SIZE * BLOCK_SIZE / float(timed.sum()),
        "ms_per_step": 1000.0 * float(timed.mean()),
        "ms_per_step_median": 1000.0 * float(np.median(timed)),
        "train_loss_last": float(np.mean(losses[-TRAIN_LOSS_WINDOW:])),
        "steps": args.steps,
        "timed_steps": len(timed),
        "threads": args.threads,
        "torch_version": torch.__version__,
        "compiled": compiled,
        "seed": args.seed,
        "eval_batches": args.eval_batches,
        "eval_every": args.eval_every,
        "evals": evals,
    }


def main() -> None:
    """Entry point: run and print one JSON line on stdout."""
    args = parse_args()
    t0 = time.perf_counter()
    result = run(args)
    result["wall_time_s"] = time.perf_counter() - t0
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
