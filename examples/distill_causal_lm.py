"""Distill a small causal LM into a smaller one with ued_fast.fused_linear_kd_loss, on CPU, in minutes.

Nothing is downloaded: both models are built from transformers configs with random initialization,
and the corpus is synthetic: token sequences from a random sparse Markov chain over a V-token
vocabulary (each token has a few likely successors with Zipf-like weights), padded to a fixed length
with label -100 (the LM padding case). Its exact per-token entropy is known, which gives the floor of
the achievable cross-entropy.

1. The teacher (Llama, 2 layers) is trained briefly with cross-entropy, so its distribution carries
   information about the chain.
2. Two students (Llama, 1 layer, half the width; the same initialization) are trained for the same
   steps: one with fused_linear_kd_loss on its final hidden states and LM head against the teacher's
   hidden states and LM head (teacher_weight=...: neither model's [N, V] logits are materialized
   whole), one with cross-entropy alone, as the baseline.
3. Validation cross-entropy of all three is logged and plotted.

    PYTHONPATH=. python examples/distill_causal_lm.py            # writes examples/distill_causal_lm.{png,log}
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ued_fast

HERE = Path(__file__).resolve().parent


class MarkovCorpus:
    """A random sparse first-order Markov chain over `vocab` tokens (token 0 starts every sequence)."""

    def __init__(self, vocab: int, successors: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.next_tokens = torch.stack([torch.randperm(vocab - 1, generator=gen)[:successors] + 1
                                        for _ in range(vocab)])  # [V, S]
        zipf = 1.0 / torch.arange(1, successors + 1, dtype=torch.float64) ** 1.2
        noise = torch.rand(vocab, successors, generator=gen, dtype=torch.float64) + 0.5
        self.next_probs = zipf * noise / (zipf * noise).sum(1, keepdim=True)  # [V, S]
        stationary = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        transition = torch.zeros(vocab, vocab, dtype=torch.float64)
        transition.scatter_(1, self.next_tokens, self.next_probs)
        for _ in range(200):
            stationary = stationary @ transition
        row_entropy = -(self.next_probs * self.next_probs.log()).sum(1)
        self.entropy = float((stationary * row_entropy).sum())  # nats per token: the CE floor

    def batch(self, batch_size: int, length: int, gen: torch.Generator):
        """ids [B, L] and next-token labels [B, L] with -100 past each sequence's random length."""
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        for t in range(1, length):
            pick = torch.multinomial(self.next_probs[ids[:, t - 1]], 1, generator=gen).squeeze(1)
            ids[:, t] = self.next_tokens[ids[:, t - 1], pick]
        lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=gen)
        positions = torch.arange(length)[None, :]
        attention_mask = (positions < lengths[:, None]).long()
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(positions[:, 1:] < lengths[:, None], ids[:, 1:], -100)
        ids = ids * attention_mask  # padding token 0
        return ids, attention_mask, labels


def build_llama(vocab, hidden, layers, heads, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def final_hidden(model, ids, attention_mask):
    """The hidden states the LM head reads, flattened to [B * L, H]."""
    out = model.model(input_ids=ids, attention_mask=attention_mask)
    return out.last_hidden_state.reshape(-1, model.config.hidden_size)


@torch.no_grad()
def validation_ce(model, val_batches):
    total, count = 0.0, 0
    for ids, mask, labels in val_batches:
        logits = model(input_ids=ids, attention_mask=mask).logits  # small: validation only
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def train(model, steps, lr, corpus, args, gen, loss_fn, log, name, val_batches, history):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        ids, mask, labels = corpus.batch(args.batch, args.length, gen)
        loss = loss_fn(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == steps:
            model.eval()
            val = validation_ce(model, val_batches)
            model.train()
            history.append({"model": name, "step": step, "train_loss": loss.item(), "val_ce": val})
            log(f"{name:>12} step {step:4d}  train loss {loss.item():.4f}  val CE {val:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--successors", type=int, default=12)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "distill_causal_lm"), help="writes OUT.png and OUT.log")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(line):
        print(line, flush=True)
        log_lines.append(line)

    started = time.time()
    corpus = MarkovCorpus(args.vocab, args.successors, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [corpus.batch(args.batch, args.length, torch.Generator().manual_seed(10_000 + i)) for i in range(4)]
    log(f"corpus: Markov chain, V={args.vocab}, {args.successors} successors per token, entropy "
        f"{corpus.entropy:.4f} nats/token (the CE floor); uniform guess {math.log(args.vocab):.4f}")
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ued_fast backends on cpu: "
        f"{ued_fast.available_backends('cpu')}, load average {os.getloadavg()[0]:.1f}")
    history = []

    def ce_loss(model, ids, mask, labels):
        h = final_hidden(model, ids, mask)
        return F.cross_entropy(h @ model.lm_head.weight.T, labels.reshape(-1))

    teacher = build_llama(args.vocab, 128, 2, 4, seed=args.seed)
    log(f"teacher: Llama 2 layers, hidden 128, {sum(p.numel() for p in teacher.parameters()):,} parameters")
    train(teacher, args.teacher_steps, 3e-3, corpus, args, gen, ce_loss, log, "teacher", val_batches, history)
    teacher.eval().requires_grad_(False)

    def kd_loss(model, ids, mask, labels):
        with torch.no_grad():
            teacher_hidden = final_hidden(teacher, ids, mask)
        return ued_fast.fused_linear_kd_loss(
            final_hidden(model, ids, mask), model.lm_head.weight, teacher_hidden, labels.reshape(-1),
            teacher_weight=teacher.lm_head.weight, temperature=args.temperature, alpha=args.alpha)

    for name, loss_fn in (("student KD", kd_loss), ("student CE", ce_loss)):
        student = build_llama(args.vocab, 64, 1, 2, seed=args.seed + 100)  # the same init for both
        if name == "student KD":
            log(f"student: Llama 1 layer, hidden 64, {sum(p.numel() for p in student.parameters()):,} parameters; "
                f"KD: fused_linear_kd_loss(T={args.temperature}, alpha={args.alpha}) on hidden states and LM heads")
        train(student, args.student_steps, 3e-3, corpus, args, torch.Generator().manual_seed(args.seed + 2), loss_fn,
              log, name, val_batches, history)

    finals = {name: [h for h in history if h["model"] == name][-1]["val_ce"]
              for name in ("teacher", "student KD", "student CE")}
    log("final validation CE: " + ", ".join(f"{k} {v:.4f}" for k, v in finals.items())
        + f"; floor {corpus.entropy:.4f}; wall time {time.time() - started:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f} (a shared machine)")
    out.with_suffix(".log").write_text("\n".join(log_lines) + "\n")
    plot(history, corpus.entropy, args, out.with_suffix(".png"))


def plot(history, floor, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("teacher", "k-"), ("student KD", "C0-"), ("student CE", "C1--")):
        rows = [h for h in history if h["model"] == name]
        steps = [h["step"] for h in rows]
        left.plot(steps, [h["val_ce"] for h in rows], style, label=name)
        if name == "student KD":
            right.plot(steps, [h["train_loss"] for h in rows], style, label="KD loss (fused_linear_kd_loss)")
    left.axhline(floor, color="gray", lw=0.8, ls=":", label="entropy of the corpus")
    left.set(xlabel="step", ylabel="validation cross-entropy (nats/token)",
             title=f"Markov corpus, V={args.vocab}: validation CE")
    left.legend()
    right.set(xlabel="step", ylabel="training loss", title=f"student KD loss (T={args.temperature}, alpha={args.alpha})")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
