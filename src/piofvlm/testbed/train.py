"""Train the testbed VLM from scratch on the synthetic tasks (CPU, fp32).

Usage::

    python -m piofvlm.testbed.train --out DIR [--steps 2400] [--batch-size 32] [--seed 0]

The loss is the next-token cross-entropy of the answer word and ``</s>`` plus an auxiliary per-patch loss on the
vision tower output (a linear probe predicting each patch's colour and shape/letter class). The auxiliary head
gives dense supervision so the from-scratch vision tower learns local features quickly; it is discarded, and the
saved checkpoint is a plain ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .model import (
    BOS_ID,
    DEFAULT_SHAPES,
    EOS_ID,
    IMAGE_MEAN,
    IMAGE_STD,
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    PAD_ID,
    build_model,
    build_processor,
    build_tokenizer,
    prompt,
)

log = logging.getLogger("piofvlm.testbed.train")

KIND_NAMES: tuple[str, ...] = data.SHAPES + data.LETTERS  # aux classes 1..10, 0 = background
COLOUR_NAMES: tuple[str, ...] = tuple(data.COLOURS)  # aux classes 1..6, 0 = background


def pixel_values(images: Sequence[Any]) -> torch.Tensor:
    """CLIP-normalised pixels, identical to the processor's output for 336 px inputs (no resize or crop needed)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def encode(samples: Sequence[dict[str, Any]], vocab: dict[str, int], with_answer: bool) -> dict[str, torch.Tensor]:
    """Token ids as the processor makes them (image token expanded 576x), left-padded; answer + eos if asked."""
    seqs = []
    for s in samples:
        words = s["question"].split()
        ids = [BOS_ID, vocab["USER"], vocab[":"]] + [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS
        ids += [vocab[w] for w in words] + [vocab["ASSISTANT"], vocab[":"]]
        if with_answer:
            ids += [vocab[s["answer"]], EOS_ID]
        seqs.append(ids)
    n = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, x in enumerate(seqs):
        input_ids[i, n - len(x) :] = torch.tensor(x)
        mask[i, n - len(x) :] = 1
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def aux_targets(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch colour class and shape/letter class (0 = background) of one sample with ``ids``."""
    owner = data.patch_labels(sample["ids"])
    colour = np.zeros(owner.shape, dtype=np.int64)
    kind = np.zeros(owner.shape, dtype=np.int64)
    for j, o in enumerate(sample["objects"]):
        sel = owner == j
        colour[sel] = COLOUR_NAMES.index(o["colour"]) + 1
        kind[sel] = KIND_NAMES.index(o["name"]) + 1
    return colour, kind


def make_batch(split: str, start: int, size: int, vocab: dict[str, int]) -> dict[str, Any]:
    """Training batch of ``size`` consecutive samples (tasks cycle) with auxiliary per-patch targets."""
    samples = [data.make_sample(split, i, with_ids=True) for i in range(start, start + size)]
    batch: dict[str, Any] = encode(samples, vocab, with_answer=True)
    batch["pixel_values"] = pixel_values([s["image"] for s in samples])
    targets = [aux_targets(s) for s in samples]
    batch["aux_colour"] = torch.from_numpy(np.stack([t[0] for t in targets]))
    batch["aux_kind"] = torch.from_numpy(np.stack([t[1] for t in targets]))
    batch["tasks"] = [s["task"] for s in samples]
    return batch


@torch.no_grad()
def quick_eval(
    model: nn.Module, samples: Sequence[dict[str, Any]], vocab: dict[str, int], bs: int = 32, bf16: bool = False
) -> dict:
    """Accuracy of the first greedy answer token (one forward pass; equals greedy generation's first token)."""
    model.eval()
    correct: dict[str, list[bool]] = {}
    for i in range(0, len(samples), bs):
        chunk = samples[i : i + bs]
        enc = encode(chunk, vocab, with_answer=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**enc, pixel_values=pixel_values([s["image"] for s in chunk]), logits_to_keep=1)
        pred = out.logits[:, -1].argmax(-1)
        for s, p in zip(chunk, pred.tolist(), strict=True):
            correct.setdefault(s["task"], []).append(p == vocab[s["answer"]])
    model.train()
    res = {t: round(sum(v) / len(v), 4) for t, v in sorted(correct.items())}
    res["all"] = round(sum(sum(v) for v in correct.values()) / len(samples), 4)
    return res


def train(
    out: Path,
    steps: int = 2400,
    batch_size: int = 32,
    lr: float = 2e-3,
    aux_weight: float = 1.0,
    seed: int = 0,
    shapes: dict[str, int] | None = None,
    eval_every: int = 200,
    n_val: int = 250,
    bf16: bool = False,
    log_every: int = 25,
) -> dict[str, Any]:
    """Train from scratch and save the checkpoint to ``out``; returns a summary dict (also written as JSON)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    processor = build_processor(tok)
    model = build_model(shapes, seed=seed)
    model.train()
    vis_dim = model.config.vision_config.hidden_size
    aux_head = nn.Linear(vis_dim, 1 + len(COLOUR_NAMES) + 1 + len(KIND_NAMES))
    captured: dict[str, torch.Tensor] = {}

    def grab(_mod: nn.Module, _inp: Any, output: Any) -> None:
        captured["h"] = output.last_hidden_state

    handle = model.model.vision_tower.register_forward_hook(grab)
    params = list(model.parameters()) + list(aux_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    val = data.make_split("val", n_val)
    history = []
    t0 = time.time()
    n_col = 1 + len(COLOUR_NAMES)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = make_batch("train", step * batch_size, batch_size, vocab)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outp = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                pixel_values=batch["pixel_values"],
                logits_to_keep=3,
            )
            aux = aux_head(captured.pop("h")[:, 1:])
        logits = outp.logits.float()
        answer_ids = batch["input_ids"][:, -2]
        lm_loss = F.cross_entropy(logits[:, 0], answer_ids) + 0.25 * F.cross_entropy(
            logits[:, 1], torch.full_like(answer_ids, EOS_ID)
        )
        aux = aux.float()
        aux_loss = F.cross_entropy(aux[..., :n_col].reshape(-1, n_col), batch["aux_colour"].reshape(-1))
        aux_loss = aux_loss + F.cross_entropy(aux[..., n_col:].reshape(-1, aux.shape[-1] - n_col), batch["aux_kind"].reshape(-1))
        loss = lm_loss + aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            acc = (logits[:, 0].argmax(-1) == answer_ids).float().mean().item()
            log.info(
                "step %d/%d lr %.2e lm %.3f aux %.3f train-acc %.2f  %.0fs",
                step, steps, lr_at(step), lm_loss.item(), aux_loss.item(), acc, time.time() - t0,
            )  # fmt: skip
        if (step + 1) % eval_every == 0 or step == steps - 1:
            res = quick_eval(model, val, vocab, bf16=bf16)
            history.append({"step": step + 1, "seconds": round(time.time() - t0, 1), "val": res})
            log.info("eval step %d: %s", step + 1, res)
    handle.remove()
    train_seconds = time.time() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "aux_weight": aux_weight,
        "seed": seed,
        "shapes": dict(DEFAULT_SHAPES, **(shapes or {})),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 for this tiny model here)")
    ap.add_argument("--shapes", type=str, default="{}", help='JSON overrides of DEFAULT_SHAPES, e.g. {"text_layers": 6}')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = train(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        aux_weight=args.aux_weight,
        seed=args.seed,
        shapes=json.loads(args.shapes),
        eval_every=args.eval_every,
        n_val=args.n_val,
        bf16=args.bf16,
        log_every=args.log_every,
    )
    log.info("done in %.0f s; final val %s", summary["train_seconds"], summary["history"][-1]["val"])


if __name__ == "__main__":
    main()
