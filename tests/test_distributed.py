"""Context parallelism on CPU with gloo: 2 and 4 spawned processes, every mask family of the issue,
both shardings; each rank's output and its gradients of q, k, v equal a float64 single-process
softmax over the whole sequence (from dense oracles), sliced to the rank."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexmask as fm
from flexmask.distributed import Contiguous, HeadTail, PerDocumentHeadTail
from tests import reference as ref

S, H, H_KV, D, BLOCK = 512, 4, 2, 16, 64
DOCS = [100, 156, 128, 128]  # 4 documents, boundaries off the blocks
SPLITTABLE = [128, 128, 256]  # documents PerDocumentHeadTail splits into 2W chunks of 16k


def cases():
    """(name, mask, dense oracle [B, 1, S, S], batch)."""
    lengths = [S, 300]
    return [
        ("causal", fm.causal(), ref.causal(S, S)[None], 1),
        ("4 documents & causal", fm.packed(DOCS) & fm.causal(),
         (ref.packed(S, S, DOCS) & ref.causal(S, S))[None], 1),
        ("sliding_window(64)", fm.sliding_window(64), ref.sliding_window(S, S, 64)[None], 1),
        ("prefix_lm(S/4)", fm.prefix_lm(S // 4), ref.prefix_lm(S, S, S // 4)[None], 1),
        ("causal & padding", fm.causal() & fm.padding(lengths),
         (ref.causal(S, S) & ref.padding(S, S, lengths))[:, None], 2),
    ]  # fmt: skip


def _run(rank: int, world: int, path: str, check: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        globals()[check](rank, world)
    finally:
        dist.destroy_process_group()


def spawn(check: str, world: int) -> None:
    """Run ``check(rank, world)`` in ``world`` gloo processes; a failing rank fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(world, os.path.join(tmp, "rendezvous"), check), nprocs=world)


def check_attention(rank: int, world: int) -> None:
    for name, mask, dense, batch in cases():
        gen = torch.Generator().manual_seed(len(name))
        q = torch.randn(batch, H, S, D, generator=gen)
        k, v = (torch.randn(batch, H_KV, S, D, generator=gen) for _ in range(2))
        seed = torch.randn(batch, H, S, D, generator=gen)
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        want = ref.attention(*leaves, dense)
        wants = torch.autograd.grad((want * seed.double()).sum(), leaves)
        for sharding, backend in ((Contiguous(S, world), "sparse"), (HeadTail(S, world), "sparse"),
                                  (HeadTail(S, world), "sdpa")):  # fmt: skip
            local = [sharding.shard(t, 2, rank).requires_grad_() for t in (q, k, v)]
            out = fm.distributed.attention(*local, mask, sharding=sharding, block_size=BLOCK,
                                           backend=backend)  # fmt: skip
            grads = torch.autograd.grad((out * sharding.shard(seed, 2, rank)).sum(), local)
            for got, full in zip((out, *grads), (want, *wants), strict=True):
                assert (got.double() - sharding.shard(full, 2, rank)).abs().max() <= 1e-5, (
                    f"{name}, {sharding!r}, {backend}, rank {rank}"
                )


def check_per_document(rank: int, world: int) -> None:
    """PerDocumentHeadTail: each rank's output and gradients equal the whole sequence's slice."""
    mask = fm.packed(SPLITTABLE) & fm.causal()
    dense = (ref.packed(S, S, SPLITTABLE) & ref.causal(S, S))[None]
    gen = torch.Generator().manual_seed(7)
    q, k, v, seed = (torch.randn(1, H_KV, S, D, generator=gen) for _ in range(4))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = ref.attention(*leaves, dense)
    wants = torch.autograd.grad((want * seed.double()).sum(), leaves)
    sharding = PerDocumentHeadTail(SPLITTABLE, world)
    local = [sharding.shard(t, 2, rank).requires_grad_() for t in (q, k, v)]
    out = fm.distributed.attention(*local, mask, sharding=sharding, block_size=16)
    grads = torch.autograd.grad((out * sharding.shard(seed, 2, rank)).sum(), local)
    for got, full in zip((out, *grads), (want, *wants), strict=True):
        assert (got.double() - sharding.shard(full, 2, rank)).abs().max() <= 1e-5, rank


def check_module(rank: int, world: int) -> None:
    """The module with rotary positions: each rank's output is the whole run's slice, and the
    weights' gradients summed over the ranks are the whole run's."""
    torch.manual_seed(0)
    attn = fm.MultiheadFlexAttention(32, 4, num_kv_heads=2, rope_theta=10000.0, block_size=BLOCK)
    x = torch.randn(1, S, 32)
    mask = fm.packed(DOCS) & fm.causal()
    whole = attn(x, mask=mask)
    whole.square().sum().backward()
    want = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    sharding = HeadTail(S, world)
    out = attn(sharding.shard(x, 1, rank), mask=mask, sharding=sharding)
    torch.testing.assert_close(out, sharding.shard(whole, 1, rank), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for n, p in attn.named_parameters():
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5, msg=n)


def check_unshard(rank: int, world: int) -> None:
    t = torch.arange(2 * S, dtype=torch.float64).view(2, S)
    for sharding in (
        Contiguous(S, world),
        HeadTail(S, world),
        PerDocumentHeadTail(SPLITTABLE, world),
    ):
        local = sharding.shard(t, 1, rank).requires_grad_()
        whole = sharding.unshard(local, 1)
        assert torch.equal(whole, t)
        (whole * (rank + 1)).sum().backward()  # every rank's loss reaches every slice
        assert torch.equal(local.grad, torch.full_like(local, world * (world + 1) / 2))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_attention_equals_the_whole_sequence(world):
    spawn("check_attention", world)


@pytest.mark.parametrize("world", [2, 4])
def test_per_document_sharding_equals_the_whole_sequence(world):
    spawn("check_per_document", world)


def test_the_module_runs_sharded():
    spawn("check_module", 2)


def test_unshard_restores_the_order_and_returns_gradients():
    spawn("check_unshard", 4)


def test_positions_and_shards():
    assert HeadTail(16, 4).positions(1).tolist() == [2, 3, 12, 13]
    assert Contiguous(16, 4).positions(3).tolist() == [12, 13, 14, 15]
    t = torch.arange(16)
    for sharding in (Contiguous(16, 4), HeadTail(16, 4), PerDocumentHeadTail([8, 8], 4)):
        held = torch.cat([sharding.shard(t, 0, r) for r in range(4)])
        assert sorted(held.tolist()) == list(range(16))  # every position once
        assert all(torch.equal(sharding.shard(t, 0, r), sharding.positions(r)) for r in range(4))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_head_tail_balances_causal_and_contiguous_does_not(world):
    head_tail = HeadTail(4096, world).load(fm.causal()).double()
    contiguous = Contiguous(4096, world).load(fm.causal()).double()
    assert float(head_tail.max() / head_tail.mean()) <= 1.05
    assert float(contiguous.max() / contiguous.mean()) > 1.4
    total = 4096 * 4097 // 2  # the causal pairs, counted independently
    assert int(head_tail.sum()) == int(contiguous.sum()) == total


def test_per_document_head_tail_balances_unequal_documents():
    lengths = [6144, 5120, 3072, 2048]
    mask = fm.packed(lengths) & fm.causal()
    for world in (2, 4, 8):
        per_doc = PerDocumentHeadTail(lengths, world).load(mask).double()
        head_tail = HeadTail(sum(lengths), world).load(mask).double()
        assert float(per_doc.max() / per_doc.mean()) <= 1.05
        assert int(per_doc.sum()) == int(head_tail.sum()) == sum(n * (n + 1) // 2 for n in lengths)
    assert float(head_tail.max() / head_tail.mean()) > 1.4  # what it fixes (8 ranks)


def test_load_counts_pairs_per_rank_from_the_oracle():
    lengths = [S, 300]
    mask = fm.causal() & fm.padding(lengths)
    dense = ref.causal(S, S) & ref.padding(S, S, lengths)  # [2, S, S]
    for sharding in (Contiguous(S, 4), HeadTail(S, 4), PerDocumentHeadTail(SPLITTABLE, 4)):
        want = [int(dense[:, sharding.positions(r)].sum()) for r in range(4)]
        assert sharding.load(mask).tolist() == want


@pytest.mark.parametrize("name", [c[0] for c in cases()])
def test_rank_block_masks_are_the_oracle_rows(name):
    _, mask, dense, batch = next(c for c in cases() if c[0] == name)
    for sharding in (Contiguous(S, 4), HeadTail(S, 4), PerDocumentHeadTail(SPLITTABLE, 4)):
        for rank in range(4):
            bm = sharding.block_mask(mask, rank, batch=batch if batch > 1 else None,
                                     block_size=16, device="cpu")  # fmt: skip
            got = fm.block_mask_to_dense(bm)
            assert torch.equal(got, dense[:, :, sharding.positions(rank)].expand_as(got))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: HeadTail(100, 4), ValueError, r"not a multiple of 8"),
        (lambda: PerDocumentHeadTail([64, 62], 2), ValueError,
         r"a document of 62 tokens into 4 equal chunks"),
        (lambda: PerDocumentHeadTail(64, 2), TypeError, r"list of document lengths"),
        (lambda: Contiguous(64, 0), ValueError, r"world_size"),
        (lambda: HeadTail(512, 4).block_mask(fm.causal(), 0, block_size=128), ValueError,
         r"chunks of 64 positions must be whole query blocks"),
        (lambda: HeadTail(512, 4).positions(4), ValueError, r"rank must be in 0..3"),
        (lambda: HeadTail(512, 4).shard(torch.zeros(3, 500), 1, 0), ValueError,
         r"500 positions along dim 1, not 512"),
        (lambda: fm.distributed.attention(*(torch.zeros(1, 2, 128, 8),) * 3, fm.causal(),
                                          sharding=HeadTail(512, 4)), ValueError,
         r"torch.distributed is not initialized"),
        (lambda: fm.distributed.attention(*(torch.zeros(1, 2, 100, 8),) * 3, fm.causal(),
                                          sharding=HeadTail(512, 4)), ValueError,
         r"q holds 100 positions, but HeadTail\(seq_len=512, world_size=4\) gives each rank 128"),
        (lambda: fm.distributed.attention(*(torch.zeros(1, 2, 128, 8),) * 3, fm.causal(),
                                          sharding="head-tail"), TypeError, r"sharding=\.\.\."),
    ],
)  # fmt: skip
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()


def check_torch_context_parallel(rank: int, world: int) -> None:
    """Torch's experimental context-parallel path rebuilds each rank's BlockMask from a flexmask
    mask (its ``mask_mod``, index-pure) with compiled ``create_block_mask``, over keys in its
    head-tail order; ours, over keys in global order, is the same mask with the keys permuted."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._context_parallel import _attention, _load_balancer

    mesh = init_device_mesh("cpu", (world,))
    balancer = _load_balancer._HeadTailLoadBalancer(S, world, "cpu")
    order = balancer._generate_indices(restore=False)[0]  # the keys as torch's ranks hold them
    sharding = HeadTail(S, world)
    assert torch.equal(order, torch.cat([sharding.positions(r) for r in range(world)]))
    for name, mask, _, batch in cases():
        if batch > 1:
            continue
        theirs = _attention._create_cp_block_mask(mask, 1, 1, S, S, mesh, balancer)
        ours = sharding.block_mask(mask, rank, device="cpu")
        assert torch.equal(
            fm.block_mask_to_dense(theirs), fm.block_mask_to_dense(ours)[..., order]
        ), name


@pytest.mark.slow
def test_torch_context_parallel_takes_flexmask_masks():
    spawn("check_torch_context_parallel", 2)


def test_left_padding_counts_from_the_end_of_the_whole_sequence():
    """padding(side="left") counts from the end of the sequence: each rank's chunk is bound to
    the whole sequence's frame, not to the chunk's."""
    lengths = [S, 300]
    mask = fm.causal() & fm.padding(lengths, side="left")
    dense = (ref.causal(S, S) & ref.padding(S, S, lengths, side="left"))[:, None]
    for sharding in (Contiguous(S, 4), HeadTail(S, 4)):
        for rank in range(4):
            bm = sharding.block_mask(mask, rank, block_size=BLOCK, device="cpu")
            assert torch.equal(fm.block_mask_to_dense(bm), dense[:, :, sharding.positions(rank)])
