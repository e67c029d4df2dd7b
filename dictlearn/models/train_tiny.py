"""Train the embedded default model: a byte-level GPT-2 on the Python standard library.

    python -m dictlearn.models.train_tiny --out dictlearn/models/tiny_stdlib

reproduces the shipped weights (same seed, steps and corpus: the stdlib of the same Python minor
version; bit-identical only on the same torch build and thread count). It trains on the corpus's
train split, evaluates bits per byte on the whole held-out split and writes ``config.json``,
``model.safetensors`` and ``training.json`` (the command, sizes, timings, machine, numbers) into
``--out`` atomically. Progress goes to stdout, one line per ``--log-every`` steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F

from dictlearn.models.corpus import corpus_name, iter_documents, iter_windows
from dictlearn.io import atomic_dir
from dictlearn.models.tiny import DEFAULT_CONTEXT, ByteTokenizer, tiny_config

IGNORE = -100  # F.cross_entropy's ignore_index


def window_tensor(split: str, context: int, limit: int | None = None) -> tuple[torch.Tensor, dict]:
    """All windows of the stdlib `split` (or the first `limit`) -> (tokens [n, context] int16,
    {files, bytes}) of the documents read."""
    seen = {"files": 0, "bytes": 0}

    def counted():
        for document in iter_documents(None, split):
            seen["files"] += 1
            seen["bytes"] += len(document.data)
            yield document

    rows = []
    for window in iter_windows(counted(), ByteTokenizer(), context):
        rows.append(window.tokens.to(torch.int16))
        if limit is not None and len(rows) == limit:
            break
    return torch.stack(rows), seen


def targets(tokens: torch.Tensor, bos: int) -> torch.Tensor:
    """tokens [n, context] -> next-token targets [n, context - 1], BOS targets set to IGNORE.

    BOS (window start and document separator) is never predicted: it carries no byte.
    """
    shifted = tokens[:, 1:].long()
    return shifted.masked_fill(shifted == bos, IGNORE)


def next_byte_loss(model, tokens: torch.Tensor, bos: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of predicting each non-BOS token from the ones before it."""
    logits = model(input_ids=tokens.long()).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets(tokens, bos).flatten(),
                           ignore_index=IGNORE, reduction=reduction)


@torch.no_grad()
def bits_per_byte(model, tokens: torch.Tensor, bos: int, batch: int = 64) -> tuple[float, int]:
    """tokens [n, context] -> (mean next-byte cross-entropy in bits, number of predicted bytes)."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch):
        chunk = tokens[start:start + batch]
        total += next_byte_loss(model, chunk, bos, reduction="sum").double().item()
        count += int((targets(chunk, bos) != IGNORE).sum())
    return total / count / math.log(2), count


def unigram_entropy_bits(tokens: torch.Tensor, bos: int) -> float:
    """Entropy (bits) of the byte frequencies of exactly the bytes `bits_per_byte` predicts."""
    predicted = targets(tokens, bos)
    counts = torch.bincount(predicted[predicted != IGNORE], minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak / 10 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Weight decay on matrices (embeddings included), not on biases or LayerNorm gains (nanoGPT).
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train(model, train_tokens: torch.Tensor, args, log) -> list[dict]:
    """AdamW with warm-up + cosine decay over `args.steps` batches drawn without replacement."""
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_tokens), generator=generator)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    bos, curve, start = ByteTokenizer.bos_token_id, [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        rows = order[(step * args.batch + torch.arange(args.batch)) % len(order)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = next_byte_loss(model, train_tokens[rows], bos)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            curve.append({"step": step + 1, "train_bits_per_byte": round(loss.item() / math.log(2), 4),
                          "seconds": round(elapsed, 1)})
            log(f"step {step + 1}/{args.steps} train_bpb {curve[-1]['train_bits_per_byte']:.3f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {elapsed:.0f}s")
    model.eval()
    return curve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dictlearn.models.train_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=45)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-windows", type=int, default=None, help="train on the first N windows only (tests)")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows to evaluate (default: all)")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = "python -m dictlearn.models.train_tiny " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.utils.logging.disable_progress_bar()  # the log stays one line per event

    def log(message: str) -> None:
        print(message, flush=True)

    began = time.perf_counter()
    train_tokens, train_seen = window_tensor("train", args.context, args.train_windows)
    heldout_tokens, heldout_seen = window_tensor("heldout", args.context, args.eval_windows)
    log(f"train windows {len(train_tokens)}, held-out windows {len(heldout_tokens)}")
    model = transformers.GPT2LMHeadModel(tiny_config(context=args.context))
    prepared = time.perf_counter()
    curve = train(model, train_tokens, args, log)
    trained = time.perf_counter()
    bos = ByteTokenizer.bos_token_id
    heldout_bpb, heldout_bytes = bits_per_byte(model, heldout_tokens, bos)
    finished = time.perf_counter()
    log(f"held-out bits per byte {heldout_bpb:.4f} over {heldout_bytes} bytes")

    record = {
        "command": command, "seed": args.seed, "steps": args.steps, "batch": args.batch, "context": args.context,
        "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "schedule": "AdamW(0.9, 0.95), linear warm-up then cosine to lr/10, grad-norm clip 1.0",
        "tokens_seen": args.steps * args.batch * args.context,
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": corpus_name(None), "train_files": train_seen["files"], "train_bytes": train_seen["bytes"],
        "train_windows": len(train_tokens), "heldout_files": heldout_seen["files"],
        "heldout_bytes": heldout_seen["bytes"], "heldout_windows": len(heldout_tokens),
        "heldout_predicted_bytes": heldout_bytes,
        "heldout_bits_per_byte": round(heldout_bpb, 4),
        "heldout_unigram_entropy_bits": round(unigram_entropy_bits(heldout_tokens, bos), 4),
        "seconds": {"data": round(prepared - began, 1), "train": round(trained - prepared, 1),
                    "evaluate": round(finished - trained, 1), "total": round(finished - began, 1)},
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
        "curve": curve,
    }
    save(model, record, Path(args.out))
    log(f"wrote {args.out}")
    return record


def save(model, record: dict, out: Path) -> None:
    """config.json + model.safetensors + training.json, all or nothing."""
    # a folder this script wrote before (it holds training.json) may be replaced; nothing else
    with atomic_dir(out, previous=lambda folder: (folder / "training.json").is_file()) as tmp:
        model.save_pretrained(tmp)
        (tmp / "generation_config.json").unlink(missing_ok=True)  # derived from config.json on load
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        # mkdtemp and save_pretrained create owner-only modes; installed package data must be readable.
        tmp.chmod(0o755)
        for child in tmp.iterdir():
            child.chmod(0o644)


if __name__ == "__main__":
    main()
