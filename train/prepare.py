"""Tokenize text files into a token directory for training (`train.data=DIR`); the work is `v4jax.training.data`.

    python -m train.prepare --out DIR [--tokenizer PATH/tokenizer.json] [--shard-tokens N] [--force] INPUTS...
    python -m train.prepare --out DIR --stdlib

INPUTS are files, directories (walked recursively, hidden names skipped) or globs; each file is one document.
Writes DIR/tokens-NNNNN.bin (uint16 or uint32) and DIR/metadata.json, then prints a one-line summary. Bad input is
one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys


def _parser():
    from v4jax.cli import ArgumentParser
    from v4jax.training.data import DEFAULT_SHARD_TOKENS

    parser = ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", metavar="INPUTS", help="text files, directories or globs")
    parser.add_argument("--out", required=True, metavar="DIR", help="output token directory")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes' (default: byte-level, EOS=256 PAD=257 BOS=258) or a local tokenizer.json")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"start a new shard after this many tokens (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--stdlib", action="store_true",
                        help="use the running Python's standard-library .py files as the inputs")
    parser.add_argument("--force", action="store_true", help="replace an existing token directory at --out")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from v4jax.training import data

    if args.stdlib == bool(args.inputs):
        parser.error("give INPUTS or --stdlib (exactly one)")
    if args.shard_tokens <= 0:
        parser.error(f"--shard-tokens must be > 0, got {args.shard_tokens}")
    inputs = [str(f) for f in data.stdlib_files()] if args.stdlib else args.inputs
    try:
        tokenizer = data.load_tokenizer(args.tokenizer)
        meta = data.prepare(inputs, args.out, tokenizer, shard_tokens=args.shard_tokens, overwrite=args.force)
    except (OSError, ValueError) as e:
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(f"{args.out}: {meta['num_documents']} documents, {meta['num_tokens']} tokens ({meta['dtype']}, "
          f"vocab {meta['vocab_size']}) in {len(meta['shards'])} shard(s)"
          + (f"; skipped {len(meta['skipped'])} file(s)" if meta["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
