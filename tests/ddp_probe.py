"""Run under torchrun by test_distributed: one DDP training step with cnnlab's pieces, then
each rank saves its parameters, the parameters before the step, and the images it trained on.

    torchrun --standalone --nproc-per-node 2 tests/ddp_probe.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from cnnlab.data.batches import BatchLoader, Normalize
from cnnlab.data.split import Split
from cnnlab.models.registry import create_model
from cnnlab.training import distributed


def main(out: Path) -> None:
    ctx, device = distributed.setup(torch.device("cpu"), timeout_s=60)
    torch.manual_seed(1000 + ctx.rank)  # different initial weights per rank: DDP must make them one
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (512,), generator=gen))
    loader = BatchLoader(split, 64, Normalize([0.5], [0.25], device, True), shuffle=True, translate=1, flip=True,
                         seed=0, drop_last=True, rank=ctx.rank, world=ctx.world)
    model = create_model("fastnet", 1, 10, widths=[8, 16, 32]).to(memory_format=torch.channels_last)
    own_init = {f"own_init.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    net = distributed.wrap(model, ctx, device, sync_bn=False)
    start = {f"start.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = next(iter(loader))
    loss = nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.step()
    after = {f"after.{k}": v.detach().contiguous().clone() for k, v in model.named_parameters()}
    save_file({**own_init, **start, **after, "images": images.contiguous(), "labels": labels},
              str(out / f"rank{ctx.rank}.safetensors"))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
