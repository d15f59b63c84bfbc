"""python -m train.generate (--checkpoint DIR | --hf DIR | --preset NAME) (--prompt TEXT ... | --ids 1,2,3 ...)

Generates a continuation of each prompt with the continuous-batching engine and prints it: the text for --prompt,
the token ids for --ids (--json: one JSON object per prompt with both). Text is encoded with the model's tokenizer
(the run's for a checkpoint, tokenizer.json or bytes for an HF folder) after its BOS. Bad input is one line, exit 2.
"""

from __future__ import annotations

import json
import math
import sys


def _ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"invalid token ids {text!r} (expected integers, e.g. 1,2,3)") from None


def build_parser():
    from v4jax.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training workdir (train.train --workdir)")
    source.add_argument("--hf", help="a Hugging Face folder (config.json + *.safetensors)")
    source.add_argument("--preset", help="a preset with random weights (for trying the pipeline)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a text prompt (repeat for several)")
    prompts.add_argument("--ids", action="append", nargs="+", help="a prompt as token ids: 1,2,3 or 1 2 3")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--max-len", type=int, help="tokens per prompt + output (default: the model's context)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser


def check_settings(args) -> list[list[int]] | None:
    """ValueError for settings that are wrong whatever the model; the --ids prompts."""
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len must be >= 2, got {args.max_len}")
    if args.prompt is not None:
        if any(not p for p in args.prompt):
            raise ValueError("--prompt: empty prompt")
        return None
    prompts = [[i for part in parts for i in _ids(part)] for parts in args.ids]
    if any(not p for p in prompts):
        raise ValueError("--ids: empty prompt")
    return prompts


def check_prompts(prompts: list[list[int]], max_tokens: int, vocab_size: int, limit: int):
    for n, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {n}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        if len(prompt) + max_tokens > limit:
            raise ValueError(f"prompt {n}: {len(prompt)} tokens + --max-tokens {max_tokens} is more than the "
                             f"{limit}-token context (--max-len)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        id_prompts = check_settings(args)
    except ValueError as error:
        parser.error(str(error))

    from v4jax import serving
    from v4jax.serving import loading

    try:
        loaded = loading.load(checkpoint=args.checkpoint, hf=args.hf, preset=args.preset, step=args.step)
        tokenizer = loaded.tokenizer
        if id_prompts is None and tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json, vocabulary too small for bytes); "
                             "give --ids")
        prompts = id_prompts or [loading.encode_text(tokenizer, text) for text in args.prompt]
        check_prompts(prompts, args.max_tokens, loaded.cfg.vocab_size,
                      args.max_len or loaded.cfg.max_position_embeddings)
    except (FileNotFoundError, ValueError) as error:
        parser.error(" ".join(line.strip() for line in str(error).splitlines()))
    stop = () if args.ignore_eos or tokenizer is None else (tokenizer.eos_id,)
    outputs = serving.generate(loaded.cfg, loaded.params, prompts, args.max_tokens, args.temperature, args.seed,
                               top_k=args.top_k, top_p=args.top_p, stop_tokens=stop, max_len=args.max_len)
    for n, (prompt, ids) in enumerate(zip(prompts, outputs)):
        text = tokenizer.decode(ids) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"prompt": n, "prompt_ids": prompt, "ids": ids, "text": text}))
        elif id_prompts is None:
            print(text)
        else:
            print(" ".join(map(str, ids)))
    return 0


if __name__ == "__main__":
    from train import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
