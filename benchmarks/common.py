"""Options every benchmark takes."""
from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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


def compose_config(overrides: Sequence[str]):
    """The config ``python train.py <overrides>`` would run (Hydra composition)."""
    from hydra import compose, initialize_config_dir

    import train  # noqa: F401  (registers the zoo_root resolver)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def quiet_trainer(prefix: str, callbacks: Sequence = (), **kwargs):
    """A CPU trainer without logger, checkpoints, progress bar or validation, rooted in a scratch
    folder (RL modules write rl_history.jsonl into their root, not the working directory)."""
    import lightning as L

    kwargs.setdefault("limit_val_batches", 0)
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=tempfile.mkdtemp(prefix=prefix), logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)


def silence_lightning() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
