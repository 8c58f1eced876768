"""Context-parallel training of a tiny transformer on packed documents, on CPU with gloo.

    torchrun --standalone --nproc-per-node 2 examples/context_parallel.py

Every rank holds a head-tail shard of one long packed sequence (``HeadTail``): its tokens, its
targets, its rotary positions. Attention (``MultiheadFlexAttention(..., sharding=...)``) gathers
the keys and values of every rank and attends under ``packed(...) & causal()`` in global
positions. The loss is the mean over all tokens (each rank's sum, all-reduced); gradients are
all-reduced as data parallelism would. Rank 0 also trains an identical model on the whole
sequence in one process, and the script checks that both runs give the same loss at every step.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

import flexmask as fm
from flexmask.distributed import HeadTail

VOCAB, WIDTH, HEADS, LAYERS, STEPS = 64, 64, 4, 2, 5
DOCUMENTS = [200, 312, 128, 384]  # packed into one row of 1024 tokens


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = fm.MultiheadFlexAttention(WIDTH, HEADS, num_kv_heads=2, rope_theta=10000.0)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )

    def forward(self, x: Tensor, mask: fm.MaskMod, **sharded: object) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, **sharded)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: Tensor, mask: fm.MaskMod, **sharded: object) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, mask, **sharded)
        return self.head(x)


def summed_loss(model: TinyLM, tokens: Tensor, targets: Tensor, mask: fm.MaskMod,
                **sharded: object) -> Tensor:  # fmt: skip
    logits = model(tokens, mask, **sharded)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same data and weights on every rank
    seq = sum(DOCUMENTS)
    tokens = torch.randint(VOCAB, (1, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = fm.packed(DOCUMENTS) & fm.causal()
    model = TinyLM()
    whole = copy.deepcopy(model)  # rank 0's single-process reference
    sharding = HeadTail(seq, world)
    local_inputs, local_targets = (sharding.shard(t, 1, rank) for t in (inputs, targets))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.5)
    for step in range(STEPS):
        opt.zero_grad()
        loss = summed_loss(model, local_inputs, local_targets, mask, sharding=sharding) / seq
        loss.backward()
        for p in model.parameters():  # every rank's share of the loss, as data parallelism
            dist.all_reduce(p.grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        opt.step()
        if rank == 0:
            opt_whole.zero_grad()
            reference = summed_loss(whole, inputs, targets, mask) / seq
            reference.backward()
            opt_whole.step()
            reference = reference.detach()
            diff = abs(float(total) - float(reference))
            print(f"step {step}: loss sharded over {world} ranks {float(total):.6f}, "
                  f"whole sequence {float(reference):.6f}, |diff| {diff:.1e}")  # fmt: skip
            assert diff <= 1e-5 * float(reference), "the sharded run left the whole run"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
