"""Test helpers a user might write: a subclass that swaps one hook, a callback that kills the run."""
import os

import lightning as L
import torch

from zoo.e2rank.module import E2RankModule
from zoo.policy_gradient.module import GRPOModule


class ListMLEE2Rank(E2RankModule):
    ranking_calls = 0

    def ranking_loss(self, scores: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        self.ranking_calls += 1
        ordered = scores.gather(1, order) * self.hparams.ranknet_scale
        # log-likelihood of the teacher permutation under Plackett-Luce
        tail_logsumexp = ordered.flip(1).logcumsumexp(1).flip(1)
        return (tail_logsumexp - ordered).sum(1).mean()

    def on_train_end(self) -> None:
        print(f"ListMLE ranking loss used {self.ranking_calls} times")


class BrevityGRPO(GRPOModule):
    """GRPO whose reward also prefers short responses: one hook changed."""

    reward_calls = 0

    def reward(self, rollout, samples):
        total, parts = super().reward(rollout, samples)
        self.reward_calls += self.training        # evaluation calls it too; count the training steps
        return total - 0.01 * rollout.lengths.float(), parts

    def on_train_end(self) -> None:
        super().on_train_end()
        print(f"brevity reward used {self.reward_calls} times")


class KillAtEpochStart(L.Callback):
    """Ends the process abruptly when an epoch starts, as a crash or a pre-emption would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os._exit(17)
