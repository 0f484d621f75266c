"""Train the demo model: a ~1M-parameter Llama that reads contract clauses.

    .venv/quantize/bin/python demo/train_tiny_llama.py            # writes demo/tiny-llama/
    .venv/quantize/bin/python demo/train_tiny_llama.py --evaluate # accuracy on the held-out set

Runs on 2 CPU cores in about 8 minutes: it scores a validation set every 100 steps and stops
once every skill reaches 96 % there (held-out: 100 % / 95 % / 98 %). The tokenizer is a
byte-level BPE trained here on the training text, so nothing is downloaded; it splits numbers
into groups of up to three digits (as Llama 3's does), each thousands group with its comma.
The loss is computed on the answer tokens only: with the loss on every token a model this
small learns the templates and never the answers. The committed weights in demo/tiny-llama/
came from this script with its defaults.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contracts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The chat template renders a conversation as the prompt format the model was trained on, so
# /v1/chat/completions works: the last user message is the question about a clause.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if not (messages[-1]['content'].rstrip().endswith('Answer:')) %}\nAnswer:{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int, numbers: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if numbers == "triples":
        # Numbers in groups of up to three digits, as Llama 3's tokenizer splits them, each
        # thousands group with its comma: an amount is "$", "123", ",456". Every piece of it
        # is then unique in its clause, so the answer is copied token by token (the clause's
        # piece after the one just written). BPE alone split each number its own way
        # ("12"+"3"+","+"45"+"6"), and after a bare "," the next piece could be any of the
        # clause's commas': the model copied those wrong.
        # GPT-2's split (the one ByteLevel applies), with the number rule first.
        pieces = r",?\d{1,3}|'(?:s|t|re|ve|m|ll|d)| ?\p{L}+| ?[^\s\p{L}\d]+|\s+(?!\S)|\s+"
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pieces), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    # Every encoding starts with <s>, as Llama tokenizers do: vLLM and lm-eval then see the
    # same token ids the model was trained on.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode(tokenizer, item: contracts.Item, max_len: int) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(item.prompt)["input_ids"]
    answer_ids = tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_len]
    labels = ([-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id])[:max_len]
    return ids, labels


def batches(encoded, batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield ids, labels, mask


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def evaluate(model, tokenizer, items: list[contracts.Item]) -> dict[str, float]:
    model.eval()
    hits: dict[str, list[bool]] = {}
    for it in items:
        hits.setdefault(it.task, []).append(greedy_answer(model, tokenizer, it.prompt) == it.answer)
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    eval_path = REPO / "calibration_data" / "contracts" / "eval.jsonl"
    held_out = {
        contracts.clause_of(json.loads(line)["prompt"])
        for line in eval_path.read_text().splitlines()
    }
    data = contracts.generate(args.examples, seed=args.seed, exclude=held_out)
    # A validation set apart from both: the checkpoint kept is the one that does best on its
    # weakest skill here (the held-out set stays unseen until the end).
    validation = contracts.generate(
        args.validation,
        seed=args.seed + 1,
        exclude=held_out | {contracts.clause_of(it.prompt) for it in data},
    )
    tokenizer = build_tokenizer(
        [f"{it.prompt} {it.answer}" for it in data],
        vocab_size=args.vocab_size,
        numbers=args.numbers,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"vocab {len(tokenizer)}, {len(data)} training examples",
        flush=True,
    )
    encoded = [encode(tokenizer, it, 160) for it in data]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total_steps = args.epochs * (len(encoded) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.05
    )
    started, step = time.time(), 0
    best, best_state = -1.0, None
    model.train()
    for epoch in range(args.epochs):
        if best >= args.stop_at:
            break
        for ids, labels, mask in batches(encoded, args.batch_size, tokenizer.pad_token_id, rng):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 100 == 0:
                print(
                    f"epoch {epoch} step {step}/{total_steps} loss {loss.item():.4f} "
                    f"({time.time() - started:.0f}s)",
                    flush=True,
                )
            if args.validate_every and step % args.validate_every == 0:
                scores = evaluate(model, tokenizer, validation)
                model.train()
                weakest = min(scores.values())
                print(f"  validation: {scores}", flush=True)
                if weakest > best:
                    best = weakest
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                if best >= args.stop_at:
                    print(f"every skill at {best:.0%} or more on validation: stopping", flush=True)
                    break
    if best_state is not None:
        print(f"keeping the checkpoint whose weakest skill scored {best:.0%} on validation")
        model.load_state_dict(best_state)
    out = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out} after {time.time() - started:.0f}s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(REPO / "demo" / "tiny-llama"))
    p.add_argument("--examples", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=3072)
    p.add_argument("--numbers", choices=["triples", "bpe"], default="triples")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--validation", type=int, default=150)
    # N: score the validation set every N steps and keep the checkpoint whose weakest skill
    # did best (how the committed weights were made); 0: keep the last checkpoint.
    p.add_argument("--validate-every", type=int, default=100)
    # With --validate-every: stop once the weakest skill scores this on validation.
    p.add_argument("--stop-at", type=float, default=0.96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--evaluate", action="store_true", help="only score the saved model")
    args = p.parse_args()
    if not args.evaluate:
        train(args)
    items = [
        contracts.Item(**json.loads(line))
        for line in (REPO / "calibration_data" / "contracts" / "eval.jsonl")
        .read_text()
        .splitlines()
    ]
    model = LlamaForCausalLM.from_pretrained(args.out, torch_dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out)
    scores = evaluate(model, tokenizer, items)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
