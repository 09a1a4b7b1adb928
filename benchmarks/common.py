"""Options every benchmark takes."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 resists a busy machine)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out, write and announce a matplotlib figure (creating its folder)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    print(f"figure: {path}")
