"""2 processes x batch b and 1 process x batch 2b, on the same global batch, give the same update
when the in-batch gather carries gradients to every positive (inbatch_gradient "all"), and a
different one when only this process's positives get it ("own"; "none", the published behaviour,
is pinned in test_loss_model)."""
import os

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch.nn.parallel import DistributedDataParallel

from data import collate
from loss import f2llm_losses
from model import Embedder, load_backbone

B, K = 4, 3


def global_batch_rows(tokenized):
    table = pq.read_table(os.path.join(tokenized, "msmarco.parquet")).slice(0, 2 * B)
    cols = ["query_input_ids", "passage_input_ids"] + [f"negative_{i}_input_ids" for i in range(1, K + 1)]
    return table.select(cols)


def embedder(backbone):
    return Embedder(load_backbone(backbone, packed=True), layout="packed")  # the training default


def step_update(model, rows, gradient):
    """One optimizer step of the recipe's retrieval loss; returns the parameter change."""
    batch = collate(rows, num_neg=K, max_seq_length=64, eos_id=0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    losses = f2llm_losses(model(batch["input_ids"], batch["lengths"]), rows.num_rows, K,
                          "retrieval", inbatch_gradient=gradient)
    sum(losses.values()).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def _worker(rank, port, backbone, rows, gradient, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = DistributedDataParallel(embedder(backbone))  # averages gradients, as in training
    delta = step_update(model, rows.slice(rank * B, B), gradient)
    if rank == 0:
        torch.save(delta, out)
    dist.barrier()
    dist.destroy_process_group()


def two_process_update(tmp_path, backbone, rows, gradient):
    port = free_port()
    out = str(tmp_path / f"delta_{gradient}.pt")
    mp.spawn(_worker, args=(port, backbone, rows, gradient, out), nprocs=2, join=True)
    return torch.load(out)


def max_rel_diff(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def single(tiny, tokenized):
    rows = global_batch_rows(tokenized)
    return rows, step_update(embedder(f"{tiny}/backbone"), rows, "all")


def test_gradient_to_all_positives_matches_single_process(tmp_path, tiny, single):
    rows, reference = single
    two = two_process_update(tmp_path, f"{tiny}/backbone", rows, gradient="all")
    assert max_rel_diff(two, reference) < 1e-4


def test_gradient_to_own_positives_differs(tmp_path, tiny, single):
    rows, reference = single
    two = two_process_update(tmp_path, f"{tiny}/backbone", rows, gradient="own")
    assert max_rel_diff(two, reference) > 1e-2
