"""Train the testbed VLM from scratch on the synthetic tasks (CPU, fp32).

Usage (the shipped checkpoint; README.md has the measured times)::

    python -m piofvlm.testbed.train --out stage1 --threads 1            # from scratch, 1879 steps
    python -m piofvlm.testbed.train --out stage2 --init stage1 --steps 600 --lr 5e-4 --data-offset 40000

Losses (the defaults are the shipped recipe; every auxiliary head is dropped at save time, so the checkpoint is a
plain ``LlavaForConditionalGeneration`` + ``LlavaProcessor``):

* the next-token cross-entropy of the answer word (+ 0.25 x that of ``</s>``);
* per-patch probes on the vision tower output: colour, shape/letter class and "holds an object's centre"
  (dense supervision, so the from-scratch tower learns local features quickly);
* alignment: each visual token entering the decoder reads, through the tied word embeddings, as the words of its
  colour and shape/letter;
* routing (``--route-weight``): head 0 of decoder layer ``--route-layer`` at the answer-predicting position attends
  to the question's colour word, and a linear probe on that position's input to layer ``--attn-layer`` must name
  the asked colour;
* reading (``--attn-weight``): head 0 of decoder layer ``--attn-layer`` (3: after a K = 2 prune point) at the
  answer-predicting position attends uniformly to ``<s>`` and the centre patch of each object the answer depends
  on, so its ``<s>`` share, 1 / (n + 1), carries presence and count (see :func:`attention_supervision_loss`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.context import StageContext
from ..methods.base import TokenPruner
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
    """Token ids as the processor makes them (image token expanded 256x), left-padded; answer + eos if asked."""
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


def relevant_patch_mask(sample: dict[str, Any]) -> np.ndarray:
    """Boolean mask (``GRID * GRID``) of the patches owned by the objects the answer depends on (needs ``ids``)."""
    owner = data.patch_labels(sample["ids"])
    return np.isin(owner, np.asarray(sample["relevant"], dtype=np.int64))


def anchor_patches(sample: dict[str, Any], only_relevant: bool) -> np.ndarray:
    """Boolean mask (``GRID * GRID``) of the patches holding the centre of each object (one patch per object).

    Objects never overlap, so two centres are always more than a patch apart and each object has its own anchor.
    """
    mask = np.zeros(data.GRID * data.GRID, dtype=bool)
    for j, o in enumerate(sample["objects"]):
        if only_relevant and j not in sample["relevant"]:
            continue
        row = min(data.GRID - 1, int(o["cy"]) // data.PATCH_SIZE)
        col = min(data.GRID - 1, int(o["cx"]) // data.PATCH_SIZE)
        mask[row * data.GRID + col] = True
    return mask


def answer_attention_log_probs(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor, head: int = 0
) -> torch.Tensor:
    """Log attention probabilities ``(B, S)`` of one head of ``attn`` at the answer-predicting position.

    ``hidden`` is the (normed) input of the attention module; the answer is predicted at position -3
    (``... ASSISTANT : answer </s>``); ``valid`` marks the keys that position may attend to.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, n, _ = hidden.shape
    hd = attn.head_dim
    q = attn.q_proj(hidden[:, -3:-2]).view(b, 1, -1, hd).transpose(1, 2)[:, head : head + 1]
    k = attn.k_proj(hidden).view(b, n, -1, hd).transpose(1, 2)[:, head : head + 1]
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -3:-2], sin[:, -3:-2])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    logits = (q @ k.transpose(-1, -2))[:, 0, 0] * attn.scaling  # (B, S)
    return logits.float().masked_fill(~valid, float("-inf")).log_softmax(-1)


def attention_supervision_loss(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    batch: dict[str, Any],
    head: int = 0,
    target: str = "relevant",
) -> torch.Tensor | None:
    """Supervision of one head's attention at the answer-predicting position.

    * ``target="relevant"``: ``-log`` of the attention mass on the patches of the objects the answer depends on;
      samples without relevant patches (e.g. "no" answers) are skipped.
    * ``target="anchors"``: cross-entropy against a uniform distribution over the ``<s>`` token and the centre patch
      of each relevant object. The ``<s>`` share (``1 / (n + 1)`` for ``n`` relevant objects) then tells presence and
      the count directly, which softmax attention over the matching patches alone cannot (it normalises the count
      away, and objects cover different numbers of patches).
    * ``target="colour_words"``: uniform over the colour words of the question (the routing step: the answer
      position learns which colour was asked before a later head looks for it among the patches).
    """
    valid = batch["attention_mask"].bool().clone()
    valid[:, -2:] = False  # the answer and </s> are not visible from the answer-predicting position
    is_img = batch["input_ids"] == IMAGE_TOKEN_ID
    wanted = torch.zeros_like(valid)
    if target == "colour_words":
        wanted = torch.isin(batch["input_ids"], batch["colour_word_ids"]) & valid
    else:
        wanted[is_img] = (batch["relevant_patches"] if target == "relevant" else batch["relevant_anchors"]).reshape(-1)
    if target == "anchors":
        wanted |= batch["input_ids"] == BOS_ID
    has = wanted.any(-1)
    if not bool(has.any()):
        return None
    log_probs = answer_attention_log_probs(attn, hidden, cos, sin, valid, head)
    if target == "relevant":
        return -torch.logsumexp(log_probs.masked_fill(~wanted, float("-inf")), -1)[has].mean()
    per_sample = log_probs.masked_fill(~wanted, 0.0).sum(-1) / wanted.sum(-1).clamp(min=1)
    return -per_sample[has].mean()


@dataclass
class KeepRelevantPruner(TokenPruner):
    """Training-time pruning (``--prune-prob``): keeps every patch of the objects the answer depends on, then random
    others up to the budget, so the model learns that the answer depends on those patches and not on how much of the
    rest survives. Budget: visual tokens kept per image (``keep``, a count)."""

    name: ClassVar[str] = "testbed_keep_relevant"

    priority: torch.Tensor | None = None  # (B, N_vis): 10 + noise for a relevant patch, noise elsewhere

    def score(self, ctx: StageContext) -> torch.Tensor:
        assert self.priority is not None
        return self.priority.to(ctx.groups.device).gather(1, ctx.visual_index.clamp(min=0))  # (B, S)


def make_batch(
    split: str, start: int, size: int, vocab: dict[str, int], tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """Training batch of ``size`` consecutive samples (tasks cycle) with auxiliary per-patch targets."""
    tasks = tuple(tasks or data.TASKS)
    samples = [data.make_sample(split, i, tasks[i % len(tasks)], with_ids=True) for i in range(start, start + size)]
    batch: dict[str, Any] = encode(samples, vocab, with_answer=True)
    batch["pixel_values"] = pixel_values([s["image"] for s in samples])
    targets = [aux_targets(s) for s in samples]
    batch["aux_colour"] = torch.from_numpy(np.stack([t[0] for t in targets]))
    batch["aux_kind"] = torch.from_numpy(np.stack([t[1] for t in targets]))
    batch["relevant_patches"] = torch.from_numpy(np.stack([relevant_patch_mask(s) for s in samples]))
    batch["anchors"] = torch.from_numpy(np.stack([anchor_patches(s, only_relevant=False) for s in samples]))
    batch["relevant_anchors"] = torch.from_numpy(np.stack([anchor_patches(s, only_relevant=True) for s in samples]))
    batch["colour_word_ids"] = torch.tensor([vocab[c] for c in data.COLOURS])
    # Index of the first colour named in the question (-100: none), target of the routing probe.
    asked = [next((COLOUR_NAMES.index(w) for w in s["question"].split() if w in COLOUR_NAMES), -100) for s in samples]
    batch["asked_colour"] = torch.tensor(asked)
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
    steps: int = 1879,
    batch_size: int = 16,
    lr: float = 1.5e-3,
    aux_weight: float = 1.0,
    seed: int = 0,
    shapes: dict[str, int] | None = None,
    eval_every: int = 200,
    n_val: int = 250,
    bf16: bool = False,
    log_every: int = 25,
    minutes: float | None = None,
    save_every: int = 0,
    align_weight: float = 1.0,
    init: Path | None = None,
    data_offset: int = 0,
    tasks: Sequence[str] | None = None,
    attn_weight: float = 1.0,
    attn_layer: int = 3,
    attn_target: str = "anchors",
    centre_weight: float = 1.0,
    route_weight: float = 1.0,
    route_layer: int = 1,
    prune_prob: float = 0.0,
    prune_layers: Sequence[int] = (0, 2),
    prune_min_keep: int = 16,
) -> dict[str, Any]:
    """Train from scratch and save the checkpoint to ``out``; returns a summary dict (also written as JSON).

    The LR schedule is a fixed 30-step linear warm-up then a cosine decay to 5% over ``steps``. With ``minutes``,
    the total number of steps is instead fixed once, right after the warm-up, from the measured step time so that
    training fits the budget; the chosen number is logged and saved, and ``--steps N`` reproduces the same run.
    """
    torch.manual_seed(seed)
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    processor = build_processor(tok)
    model = build_model(shapes, seed=seed)
    if init is not None:
        # Warm start (stage 2 of the recipe): same architecture, weights from a previous run.
        from transformers import LlavaForConditionalGeneration

        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(init).state_dict())
    model.train()
    emb = model.get_input_embeddings()
    # Word ids of the aux classes, for the alignment loss of the visual tokens with the word embeddings.
    colour_word = torch.tensor([-100] + [vocab[c] for c in COLOUR_NAMES])
    kind_word = torch.tensor([-100] + [vocab[k.lower()] for k in KIND_NAMES])
    vis_dim = model.config.vision_config.hidden_size
    n_aux = 1 + len(COLOUR_NAMES) + 1 + len(KIND_NAMES)
    # Optional 2 more outputs: does this patch hold an object's centre (anchor for counting, see --attn-target).
    aux_head = nn.Linear(vis_dim, n_aux + (2 if centre_weight > 0 else 0))
    captured: dict[str, torch.Tensor] = {}

    def grab(_mod: nn.Module, _inp: Any, output: Any) -> None:
        captured["h"] = output.last_hidden_state

    def grab_proj(_mod: nn.Module, _inp: Any, output: Any) -> None:
        captured["proj"] = output

    def grab_attn_input(layer: int) -> Any:
        def grab_attn(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[f"attn{layer}"] = (hidden, *kwargs["position_embeddings"])

        return grab_attn

    # Supervised heads (head 0 of each layer): "route" = answer position -> the question's colour word,
    # "attn" = answer position -> relevant patches / anchors.
    supervised = {
        name: (layer, weight)
        for name, layer, weight in (("route", route_layer, route_weight), ("attn", attn_layer, attn_weight))
        if weight > 0
    }
    layers = model.model.language_model.layers
    attn_handles = [
        layers[layer].self_attn.register_forward_pre_hook(grab_attn_input(layer), with_kwargs=True)
        for layer in sorted({layer for layer, _ in supervised.values()})
    ]
    handle = model.model.vision_tower.register_forward_hook(grab)
    handle_proj = model.model.multi_modal_projector.register_forward_hook(grab_proj)
    params = list(model.parameters()) + list(aux_head.parameters())
    # Routing probe: the answer position's input to the reading layer must name the asked colour (linear).
    route_probe = nn.Linear(model.config.text_config.hidden_size, len(COLOUR_NAMES)) if "route" in supervised else None
    if route_probe is not None and "attn" in supervised:
        params += list(route_probe.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    warmup = 30

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    prune_rng = np.random.default_rng([seed, 7])
    val_tasks = tuple(tasks or data.TASKS)
    val = [data.make_sample("val", i, val_tasks[i % len(val_tasks)]) for i in range(n_val)]
    history = []
    t0 = time.time()
    n_col = 1 + len(COLOUR_NAMES)
    step = 0
    while step < steps:
        if minutes is not None and step == warmup:
            per_step = (time.time() - t0) / warmup
            steps = warmup + int((minutes * 60 - (time.time() - t0)) / per_step)
            log.info("time budget %.1f min: %.2f s/step -> %d steps in total", minutes, per_step, steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = make_batch("train", data_offset + step * batch_size, batch_size, vocab, tasks)
        pruned = prune_prob > 0 and prune_rng.random() < prune_prob
        pruning: Any = contextlib.nullcontext()
        if pruned:
            # Keep the answer's patches (+ their anchors) and a random share of the rest, at a random prune point.
            must = (batch["relevant_patches"] | batch["relevant_anchors"]).double().numpy()
            priority = torch.from_numpy(10.0 * must + prune_rng.random(must.shape))
            n_keep = int(prune_rng.integers(max(prune_min_keep, int(must.sum(1).max())), NUM_IMAGE_TOKENS + 1))
            layer = int(prune_rng.choice(list(prune_layers)))
            pruning = KeepRelevantPruner(layers=[layer], keep=n_keep, priority=priority)(model)
        with pruning, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
        aux_loss = aux_loss + F.cross_entropy(
            aux[..., n_col:n_aux].reshape(-1, n_aux - n_col), batch["aux_kind"].reshape(-1)
        )
        if centre_weight > 0:
            # Centre patches are ~1 in 50: up-weight them so the tower marks every object once.
            aux_loss = aux_loss + centre_weight * F.cross_entropy(
                aux[..., n_aux:].reshape(-1, 2), batch["anchors"].reshape(-1).long(), weight=torch.tensor([1.0, 5.0])
            )
        loss = lm_loss + aux_weight * aux_loss
        if align_weight > 0:
            # Visual tokens entering the decoder should read as the words of their colour and shape/letter
            # (tied embeddings): this makes question-word -> patch matching and answer copying easy to learn.
            proj = captured.pop("proj").float().reshape(-1, emb.weight.shape[1])
            word_logits = proj @ emb.weight.float().t()
            align = F.cross_entropy(word_logits, colour_word[batch["aux_colour"].reshape(-1)], ignore_index=-100)
            align = align + F.cross_entropy(word_logits, kind_word[batch["aux_kind"].reshape(-1)], ignore_index=-100)
            loss = loss + align_weight * align
        attn_losses: dict[str, float] = {}
        if not pruned:  # on a pruned step the supervised heads saw a shorter sequence: their targets do not apply
            for name, (layer, weight) in supervised.items():
                target = attn_target if name == "attn" else "colour_words"
                inputs = captured[f"attn{layer}"]
                sup = attention_supervision_loss(layers[layer].self_attn, *inputs, batch, target=target)
                if sup is not None:
                    loss = loss + weight * sup
                    attn_losses[name] = sup.item()
            if route_probe is not None and "attn" in supervised:
                probe_logits = route_probe(captured[f"attn{attn_layer}"][0][:, -3].float())
                probe = F.cross_entropy(probe_logits, batch["asked_colour"], ignore_index=-100)
                loss = loss + route_weight * probe
                attn_losses["probe"] = probe.item()
        captured.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            acc = (logits[:, 0].argmax(-1) == answer_ids).float().mean().item()
            log.info(
                "step %d/%d lr %.2e lm %.3f aux %.3f attn %.3f route %.3f probe %.3f train-acc %.2f  %.0fs",
                step, steps, lr_at(step), lm_loss.item(), aux_loss.item(),
                attn_losses.get("attn", 0.0), attn_losses.get("route", 0.0), attn_losses.get("probe", 0.0),
                acc, time.time() - t0,
            )  # fmt: skip
        if (step + 1) % eval_every == 0 or step == steps - 1:
            res = quick_eval(model, val, vocab, bf16=bf16)
            history.append({"step": step + 1, "seconds": round(time.time() - t0, 1), "val": res})
            log.info("eval step %d: %s", step + 1, res)
        if save_every and (step + 1) % save_every == 0:
            model.save_pretrained(out / f"step{step + 1}")
            processor.save_pretrained(out / f"step{step + 1}")
        step += 1
    handle.remove()
    handle_proj.remove()
    for h in attn_handles:
        h.remove()
    train_seconds = time.time() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "steps": steps,
        "minutes_budget": minutes,
        "batch_size": batch_size,
        "lr": lr,
        "aux_weight": aux_weight,
        "align_weight": align_weight,
        "init": str(init) if init else None,
        "data_offset": data_offset,
        "tasks": list(tasks) if tasks else list(data.TASKS),
        "attn_weight": attn_weight,
        "attn_layer": attn_layer,
        "attn_target": attn_target,
        "centre_weight": centre_weight,
        "route_weight": route_weight,
        "route_layer": route_layer,
        "prune_prob": prune_prob,
        "prune_layers": list(prune_layers),
        "prune_min_keep": prune_min_keep,
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
    ap.add_argument("--steps", type=int, default=1879)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--minutes", type=float, default=None, help="fit the number of steps to this time budget")
    ap.add_argument("--save-every", type=int, default=0, help="also save intermediate checkpoints to OUT/stepN")
    ap.add_argument("--align-weight", type=float, default=1.0)
    ap.add_argument("--init", type=Path, default=None, help="warm start from this checkpoint (stage 2)")
    ap.add_argument("--data-offset", type=int, default=0, help="first training sample index (fresh data per stage)")
    ap.add_argument("--tasks", type=str, default=None, help="comma-separated subset of task types")
    ap.add_argument(
        "--attn-weight", type=float, default=1.0, help="attention supervision weight (answer -> relevant patches)"
    )
    ap.add_argument("--attn-layer", type=int, default=3, help="decoder layer whose head 0 is supervised")
    ap.add_argument(
        "--attn-target",
        choices=("relevant", "anchors"),
        default="anchors",
        help="relevant: mass on the answer's object patches; anchors: uniform over <s> + their centre patches",
    )
    ap.add_argument("--centre-weight", type=float, default=1.0, help="weight of the per-patch object-centre probe")
    ap.add_argument("--route-weight", type=float, default=1.0, help="routing supervision: answer -> colour word")
    ap.add_argument("--route-layer", type=int, default=1, help="decoder layer whose head 0 does the routing")
    ap.add_argument("--prune-prob", type=float, default=0.0, help="share of steps trained with pruned visual tokens")
    ap.add_argument("--prune-layers", type=str, default="0,2", help="prune points drawn from for those steps")
    ap.add_argument("--prune-min-keep", type=int, default=16, help="fewest visual tokens kept in those steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 for this tiny model here)")
    ap.add_argument(
        "--shapes", type=str, default="{}", help='JSON overrides of DEFAULT_SHAPES, e.g. {"text_layers": 6}'
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
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
        minutes=args.minutes,
        save_every=args.save_every,
        align_weight=args.align_weight,
        init=args.init,
        data_offset=args.data_offset,
        tasks=args.tasks.split(",") if args.tasks else None,
        attn_weight=args.attn_weight,
        attn_layer=args.attn_layer,
        attn_target=args.attn_target,
        centre_weight=args.centre_weight,
        route_weight=args.route_weight,
        route_layer=args.route_layer,
        prune_prob=args.prune_prob,
        prune_layers=[int(x) for x in args.prune_layers.split(",")],
        prune_min_keep=args.prune_min_keep,
    )
    log.info("done in %.0f s; final val %s", summary["train_seconds"], summary["history"][-1]["val"])


if __name__ == "__main__":
    main()
