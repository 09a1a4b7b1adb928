"""One process vs two gloo DDP processes: the same InfoNCE loss and gradients on one global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from zoo.backbones import build_backbone
from zoo.blocks.encoder import EmbeddingEncoder
from zoo.blocks.losses import InfoNCELoss

N_QUERIES = 4


def _batch(hard_negatives: int) -> tuple[list[str], list[str]]:
    queries = [f"query {i} about topic {i}" for i in range(N_QUERIES)]
    docs = [f"document {i} variant {j} " + "word " * (i + j) for i in range(N_QUERIES) for j in range(1 + hard_negatives)]
    return queries, docs


def _encoder() -> EmbeddingEncoder:
    torch.manual_seed(0)
    model, tokenizer = build_backbone("tiny-bert")
    return EmbeddingEncoder(model.eval(), tokenizer, pooling="mean", max_length=32)


def _loss_and_grads(encoder, queries, docs, gather: bool):
    emb = encoder.embed(queries + docs)
    loss = InfoNCELoss(temperature=0.05, gather_across_devices=gather)(emb[:len(queries)], emb[len(queries):])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, hard_negatives: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        encoder = _encoder()
        ddp = DistributedDataParallel(encoder)
        queries, docs = _batch(hard_negatives)
        per_rank = N_QUERIES // world
        group = 1 + hard_negatives
        local_q = queries[rank * per_rank:(rank + 1) * per_rank]
        local_d = docs[rank * per_rank * group:(rank + 1) * per_rank * group]
        # One DDP forward per backward: queries and documents go through together.
        emb = ddp(**encoder.tokenize(local_q + local_d))
        loss = InfoNCELoss(temperature=0.05, gather_across_devices=True)(emb[:per_rank], emb[per_rank:])
        loss.backward()
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            grads = {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}
            torch.save({"losses": torch.stack(losses), "grads": grads}, out)
        # Teardown order matters: gloo's worker thread frees the tensors of finished collectives and
        # needs the GIL for it. The barrier's wait releases the GIL so it can; then DDP goes before
        # its process group. Destroying the group first deadlocks about one run in two.
        dist.barrier()
        del ddp, loss, emb, losses
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("hard_negatives", [0, 1, 2])
def test_two_gloo_ranks_equal_one_process(tmp_path, hard_negatives):
    queries, docs = _batch(hard_negatives)
    single_loss, single_grads = _loss_and_grads(_encoder(), queries, docs, gather=False)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), hard_negatives, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    # Each rank's loss covers its own queries; equal shards, so their mean is the global loss.
    torch.testing.assert_close(result["losses"].mean(), single_loss, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(result["losses"][0], result["losses"][1])
    assert set(result["grads"]) == set(single_grads)
    for name, grad in single_grads.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
