"""Train the two demo LoRA adapters in ``examples/adapters/`` for the embedded SmolLM2-135M-Instruct.

The script owns the whole recipe: it draws a few dozen varied prompts from templates, asks the
base model for its own greedy answers (cached in a JSON file so reruns skip that step), rewrites
the answers per adapter -- ``smollm2-shout`` in ALL CAPITAL LETTERS, ``smollm2-pirate`` opening
with "Arr!", swapping in pirate words and closing with "matey" -- and fine-tunes one PEFT LoRA
adapter per style on CPU (r=8 on q/v/o_proj of the upper half of the layers), with the loss on the
answer tokens only. Each adapter is saved in PEFT format (``adapter_config.json`` + float16
``adapter_model.safetensors``) with ``base_model_name_or_path`` set to the hub id rather than the
local cache path. Since the targets are the base model's own answers, the adapters mostly change
the style, not the content. Both train in a few minutes on two CPU cores.

    python scripts/train_demo_adapters.py --out examples/adapters --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_PROMPT = "List 3 countries and their capitals."
MAX_NEW_TOKENS = 48
ADAPTERS = ("smollm2-shout", "smollm2-pirate")
# upper-case text splits into rarer tokens, so shouting takes longer to learn than the pirate frame
DEFAULT_STEPS = {"smollm2-shout": 200, "smollm2-pirate": 80}

COUNTRIES = [
    "France",
    "Japan",
    "Brazil",
    "Canada",
    "Egypt",
    "Italy",
    "India",
    "Mexico",
    "Kenya",
    "Spain",
    "Germany",
    "Australia",
    "Norway",
    "Peru",
    "Turkey",
    "Vietnam",
]
CONTINENTS = ["Europe", "Asia", "Africa", "South America", "North America"]
ANIMALS = ["elephants", "penguins", "dolphins", "owls", "tigers", "bees", "frogs", "camels", "wolves"]
COLOURS = ["red", "blue", "green", "yellow", "white", "orange"]
THINGS = ["the sky", "grass", "snow", "a banana", "the sun", "a strawberry", "the ocean", "coal"]
CATEGORIES = [
    "fruits",
    "vegetables",
    "planets",
    "musical instruments",
    "sports",
    "birds",
    "rivers",
    "languages",
    "oceans",
    "shapes",
]
FACTS = [
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is the largest ocean?",
    "How many days are in a week?",
    "What is the tallest mountain in the world?",
    "What is water made of?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "How many continents are there?",
    "What is the fastest land animal?",
    "Tell me something interesting about the moon.",
    "What is photosynthesis?",
    "Can you give me a tip for learning a new language?",
    "What should I do if I feel tired?",
    "Say hello to my friend.",
    "What is your favourite colour?",
]
TEMPLATES = [
    ("What is the capital of {country}?", {"country": COUNTRIES}),
    ("Tell me about {country}.", {"country": COUNTRIES}),
    ("List {n} countries in {continent}.", {"n": [2, 3, 4, 5], "continent": CONTINENTS}),
    ("List {n} countries and their capitals.", {"n": [2, 4, 5]}),
    ("Name {n} cities in {country}.", {"n": [2, 3, 4], "country": COUNTRIES}),
    ("What do {animal} eat?", {"animal": ANIMALS}),
    ("Where do {animal} live?", {"animal": ANIMALS}),
    ("Tell me a fact about {animal}.", {"animal": ANIMALS}),
    ("What colour is {thing}?", {"thing": THINGS}),
    ("Name {n} things that are {colour}.", {"n": [3, 4], "colour": COLOURS}),
    ("List {n} {category}.", {"n": [3, 4, 5], "category": CATEGORIES}),
]

PIRATE_WORDS = [
    (r"\byou\b", "ye"),
    (r"\byour\b", "yer"),
    (r"\byours\b", "yers"),
    (r"\bmy\b", "me"),
    (r"\bfriends\b", "mateys"),
    (r"\bfriend\b", "matey"),
    (r"\bis\b", "be"),
    (r"\bare\b", "be"),
    (r"\bhello\b", "ahoy"),
    (r"\bhi\b", "ahoy"),
    (r"\byes\b", "aye"),
    (r"\bthe sea\b", "the briny deep"),
    (r"\bmoney\b", "doubloons"),
    (r"\bstop\b", "avast"),
    (r"\bthink\b", "reckon"),
]


def make_prompts(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct prompts: every fixed fact, one draw of each template, then random fill.

    The demo prompt itself is never a training prompt, so the demo shows the style carrying over.
    """
    pool = set(FACTS)
    first = list(FACTS)
    for template, slots in TEMPLATES:
        combos = [{}]
        for key, values in slots.items():
            combos = [dict(c, **{key: v}) for c in combos for v in values]
        texts = [template.format(**c) for c in combos if template.format(**c) != DEMO_PROMPT]
        first.append(rng.choice(texts))
        pool.update(texts)
    rest = sorted(pool - set(first))
    rng.shuffle(rest)
    if not 1 <= count <= len(pool):
        raise SystemExit(f"--prompts must be between 1 and {len(pool)}, got {count}")
    return (first + rest)[:count]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return list(ids)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], batch_size: int = 8) -> list[str]:
    """The model's greedy answers (``MAX_NEW_TOKENS`` at most), batched with left padding."""
    answers = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        rows = [chat_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad
        )
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return answers


def trim_unfinished(text: str) -> str:
    """Drop a line or sentence cut off by the token limit, so the targets end cleanly."""
    if re.search(r"[.!?:)\]]\s*$", text):
        return text
    ends = [m.end() for m in re.finditer(r"\n|(?<!\d)[.!?](?=\s)", text)]
    return text[: ends[-1]].rstrip() if ends and ends[-1] > len(text) // 3 else text


def shout(text: str) -> str:
    return text.upper()


def pirate(text: str) -> str:
    for pattern, word in PIRATE_WORDS:
        text = re.sub(
            pattern, lambda m, w=word: w.capitalize() if m.group(0)[0].isupper() else w, text, flags=re.IGNORECASE
        )
    return f"Arr! {text}\nYe be welcome, matey. Arr!"


STYLES = {"smollm2-shout": shout, "smollm2-pirate": pirate}


def base_answers(model, tokenizer, prompts: list[str], cache: Path) -> dict[str, str]:
    """Greedy answers of the base model, read from ``cache`` where present and written back."""
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if known.get("model") != HUB_ID or known.get("max_new_tokens") != MAX_NEW_TOKENS:
        known = {"model": HUB_ID, "max_new_tokens": MAX_NEW_TOKENS, "answers": {}}
    missing = [p for p in prompts if p not in known["answers"]]
    if missing:
        t0 = time.perf_counter()
        known["answers"].update(zip(missing, greedy(model, tokenizer, missing)))
        print(f"generated {len(missing)} base answers in {time.perf_counter() - t0:.1f} s -> {cache}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1, ensure_ascii=False))
    else:
        print(f"all {len(prompts)} base answers read from {cache}")
    return {p: known["answers"][p] for p in prompts}


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat and labels that are -100 everywhere but the answer and its <|im_end|>."""
    head = chat_ids(tokenizer, prompt)
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return head + tail, [-100] * len(head) + tail


@contextlib.contextmanager
def only_layers(decoder, layers: slice, *, final_norm: bool = True):
    """Run ``decoder`` (a Llama-style ``model.model``) through a slice of its layers only."""
    full, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(full)[layers])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = full, norm


def padded(rows: list[torch.Tensor], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[len_i, ...]`` tensors with ``fill``; returns the batch and its attention mask."""
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)], mask[i, : len(r)] = r, 1
    return batch, mask


def train_adapter(
    model_dir: Path,
    examples: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    first_layer: int,
):
    """One LoRA adapter on layers ``first_layer`` and up, trained on the answer tokens only.

    The layers below ``first_layer`` carry no LoRA, so their output never changes during training:
    it is computed once per example, and each step runs only the upper layers and the LM head on
    the answer positions. On two CPU cores this is what keeps a few hundred steps within minutes.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    num_layers = base.config.num_hidden_layers
    if not 0 <= first_layer < num_layers:
        raise SystemExit(f"--first-layer must be in [0, {num_layers - 1}], got {first_layer}")
    decoder, lm_head = base.model, base.lm_head
    with torch.no_grad(), only_layers(decoder, slice(0, first_layer), final_norm=False):
        hidden = []
        for start in range(0, len(examples), 8):
            ids, mask = padded([torch.tensor(i) for i, _ in examples[start : start + 8]])
            out = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden += [h[: m.sum()] for h, m in zip(out, mask)]
    labels = [torch.tensor(lab) for _, lab in examples]

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj"],
        layers_to_transform=list(range(first_layer, num_layers)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = min(10, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))
    rng = random.Random(seed)
    order: list[int] = []
    t0 = time.perf_counter()
    with only_layers(decoder, slice(first_layer, num_layers)):
        for step in range(steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(examples)), len(examples))
            chosen, order = order[:batch_size], order[batch_size:]
            embeds, mask = padded([hidden[i] for i in chosen])
            target, _ = padded([labels[i] for i in chosen], fill=-100)
            states = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            # position t predicts token t + 1; the head runs on answer positions only
            target = target[:, 1:]
            keep = target != -100
            loss = torch.nn.functional.cross_entropy(lm_head(states[:, :-1][keep]), target[keep])
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == steps - 1:
                print(f"  step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:5.0f} s", flush=True)
    model.eval()
    return model


def save_adapter(model, directory: Path) -> None:
    """PEFT format, float16 weights, the hub id as base model, and no generated model card."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float16)
    model.peft_config["default"].base_model_name_or_path = HUB_ID
    model.save_pretrained(directory)
    card = directory / "README.md"
    if card.is_file():  # PEFT's empty template card, which would also record the local path
        card.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/adapters"), help="where the adapters go")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per adapter (default: 200 for smollm2-shout, 80 for smollm2-pirate)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw, the LoRA init and the batches")
    parser.add_argument("--prompts", type=int, default=64, help="how many training prompts to draw")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "loraserve-demo-adapters" / "base_answers.json",
        help="JSON cache of the base model's answers",
    )
    parser.add_argument(
        "--first-layer",
        type=int,
        default=15,
        help="LoRA goes on this decoder layer and every one above it (SmolLM2-135M has 30)",
    )
    parser.add_argument("--adapters", nargs="+", choices=ADAPTERS, default=list(ADAPTERS), help="which to train")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraserve.embedded import embedded_model_dir

    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = make_prompts(args.prompts, random.Random(args.seed))
    answers = {p: trim_unfinished(a) for p, a in base_answers(base, tokenizer, prompts, args.cache).items()}

    outputs = {"base": greedy(base, tokenizer, [DEMO_PROMPT])[0]}
    del base
    timings = {}
    for name in args.adapters:
        style = STYLES[name]
        examples = [encode(tokenizer, p, style(a)) for p, a in answers.items()]
        steps = args.steps or DEFAULT_STEPS[name]
        print(f"training {name}: {len(examples)} examples, {steps} steps, batch {args.batch_size}")
        t0 = time.perf_counter()
        model = train_adapter(
            model_dir,
            examples,
            steps=steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            first_layer=args.first_layer,
        )
        timings[name] = time.perf_counter() - t0
        save_adapter(model, args.out / name)
        outputs[name] = greedy(model, tokenizer, [DEMO_PROMPT])[0]
        size = sum(f.stat().st_size for f in (args.out / name).iterdir())
        print(f"saved {args.out / name} ({size / 1e6:.2f} MB) after {timings[name]:.0f} s of training")
        del model

    print(f"\ntotal training time {sum(timings.values()):.0f} s")
    for name, text in outputs.items():
        print(f"\n--- {name}: {DEMO_PROMPT}\n{text}")


if __name__ == "__main__":
    main()
