"""Shared command-line behaviour for the entry points in `train/`: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is a single line (`prog: error: message`) instead of usage + message."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
