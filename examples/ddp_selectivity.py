"""Selectivity regularization under DistributedDataParallel, with SI on the global batch.

    torchrun --nproc_per_node=2 examples/ddp_selectivity.py            # CPU, gloo
    torchrun --nproc_per_node=8 examples/ddp_selectivity.py --steps 50 # one GPU per rank, NCCL

Trains a small CNN on synthetic 10-class images (no download). Each rank sees its own slice of
every batch (DistributedSampler); SelectivityRegularizer(sync="global") computes the class
selectivity index of the batch joined over all ranks with one all-reduce of per-class sums and
counts per step. Rank 0 prints the global SI of each hooked layer next to the SI of its own slice
(what a per-rank statistic would have used).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import selkernels


def make_model(num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),  # hooked: index 1
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),  # hooked: index 3
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def synthetic_data(n: int, num_classes: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    prototypes = torch.randn(num_classes, 3, 16, 16, generator=g)
    images = prototypes[labels] + 1.0 * torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-rank", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=-1.0, help="< 0 lowers selectivity, > 0 raises it")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_*
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    try:
        torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
        model = make_model(args.num_classes).to(device)
        ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        data = synthetic_data(args.steps * args.batch_per_rank * world, args.num_classes)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(data, batch_size=args.batch_per_rank, sampler=sampler, drop_last=True)

        # Hook the modules of the wrapped model (model, not ddp): their outputs are this rank's slice.
        reg = selkernels.SelectivityRegularizer([model[1], model[3]], args.alpha, args.num_classes, sync="global")
        # The per-rank statistic of the published scripts, for comparison only (no penalty).
        rank_reg = selkernels.SelectivityRegularizer([model[1], model[3]], 0.0, args.num_classes, sync="local")
        for step, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            logits = ddp(x)
            ce = nn.functional.cross_entropy(logits, y)
            with torch.no_grad():
                local_si = rank_reg.layer_selectivity(y).tolist()
            penalty = reg.penalty(y)  # identical on every rank: SI of the global batch
            opt.zero_grad(set_to_none=True)
            (ce + penalty).backward()  # DDP averages gradients; the penalty's average is exact
            opt.step()
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                global_si = ", ".join(f"{v:.4f}" for v in reg.last_layer_si.tolist())
                rank0_si = ", ".join(f"{v:.4f}" for v in local_si)
                print(
                    f"step {step:3d}  ce {ce.item():.4f}  penalty {penalty.item():+.4f}  "
                    f"global-batch SI [{global_si}]  rank-0-slice SI [{rank0_si}]",
                    flush=True,
                )
        reg.remove()
        rank_reg.remove()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
