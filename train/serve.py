"""python -m train.serve (--checkpoint DIR | --hf DIR | --preset NAME) [--port 8000] [--host 127.0.0.1]

An OpenAI-compatible HTTP server: POST /v1/completions (streaming with server-sent events too), GET /v1/models,
GET /health. Requests share a continuous-batching engine of --slots rows of --max-len tokens. The logic lives in
v4jax/serving/server.py; bad arguments are one line, exit 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from v4jax.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m train.serve", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training workdir (train.train --workdir)")
    source.add_argument("--hf", help="a Hugging Face folder (config.json + *.safetensors)")
    source.add_argument("--preset", help="a preset with random weights (for trying the server)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the model id clients send (default: the config's name)")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded at once (default 8)")
    parser.add_argument("--max-len", type=int, help="tokens per request, prompt + output (default: the "
                        "model's context, at most 4096)")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk length (default 256)")
    args = parser.parse_args(argv)
    for flag, value, low in [("--port", args.port, 0), ("--slots", args.slots, 1), ("--chunk", args.chunk, 1),
                             ("--max-len", args.max_len, 2)]:
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        parser.error(f"--port must be <= 65535, got {args.port}")

    from v4jax.serving import engine, loading, server

    try:
        loaded = loading.load(checkpoint=args.checkpoint, hf=args.hf, preset=args.preset, step=args.step,
                              name=args.model_name)
    except (FileNotFoundError, ValueError) as error:
        parser.error(" ".join(line.strip() for line in str(error).splitlines()))
    max_len = args.max_len or min(loaded.cfg.max_position_embeddings, 4096)
    print(f"serving {loaded.name!r} ({loaded.cfg.summary().splitlines()[0]}): {args.slots} slots x {max_len} "
          f"tokens on http://{args.host}:{args.port}", file=sys.stderr)
    runner = engine.Engine(loaded.cfg, loaded.params, slots=args.slots, max_len=max_len, chunk=args.chunk)
    server.serve(runner, loaded.tokenizer, loaded.name, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    from train import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
