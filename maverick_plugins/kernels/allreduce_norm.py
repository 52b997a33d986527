"""One-shot all-reduce fused with the residual add and RMSNorm, over peer buffers (symmetric memory).

One program per token row, one launch per all-reduce (instead of NCCL + an add+norm kernel):
1. copy this rank's partial row into its own peer-visible buffer (call site `site`);
2. barrier with every peer on this row's signal slots: send with CAS 0 -> 1 (release, system scope)
   into the peer's pad, wait with CAS 1 -> 0 (acquire) on our own pad, all peers in parallel (one
   lane each: with one thread signalling peers in turn, 4 GPUs took 13.9 us against 8.5 us for
   PyTorch's one-shot). Sending waits for the slot to be free, so a fast rank can never overwrite a
   signal its peer has not consumed yet;
3. read every rank's row in rank order (the same order on all ranks: identical results everywhere),
   sum in fp32, round to the activation dtype (what the all-reduce returns), add the residual,
   RMSNorm.
There is no closing barrier: each call site (2 per layer) has its own buffer, and a rank can only
reach the same site again after every peer has signalled a later site, i.e. finished reading this
one. At one token a row is 10 KB (hidden 5120, bf16): the cost is the two signal round trips.
Why it cannot deadlock: to start call k + 1 a rank has passed call k's barrier, so every rank has
started call k; a rank therefore leads any other by at most one call, and a sender blocked on a slot
(its call-k signal not consumed yet) waits for a peer that is in call k and consumes it at once.
A barrier never waits forever: after max_spin retries (seconds) it records the site and the silent
peers in an error buffer that the runtime checks after every step (PeerWorkspace.check), so a peer
that is gone or out of step becomes a clear error instead of a hang; after a failure, later calls stop
waiting (one attempt each), so a step with 96 all-reduces still ends quickly and raises.
"""
import torch
import triton
import triton.language as tl

from .small_ops import add_rms_norm_row


@triton.jit
def _cas_all(ptrs, spare, max_spin, cmp: tl.constexpr, val: tl.constexpr, SEM: tl.constexpr, WORLD: tl.constexpr):
    """CAS cmp -> val on every slot of `ptrs` at once (one lane per peer, in parallel), retrying the
    lanes that found the slot not yet at cmp. Finished lanes retry on a spare word whose result is
    ignored (tl.atomic_cas takes no mask), so a slot is never written twice. Gives up after max_spin
    retries: returns the bit mask of the peers still pending (0 when every lane succeeded)."""
    lanes = tl.arange(0, WORLD)
    cmps = tl.full((WORLD,), cmp, tl.int32)
    vals = tl.full((WORLD,), val, tl.int32)
    old = tl.atomic_cas(ptrs, cmps, vals, sem=SEM, scope="sys")
    pending = old != cmp
    spins = 0
    while (tl.max(pending.to(tl.int32), axis=0) != 0) & (spins < max_spin):
        old = tl.atomic_cas(tl.where(pending, ptrs, spare), cmps, vals, sem=SEM, scope="sys")
        pending = pending & (old != cmp)
        spins += 1
    return tl.sum(tl.where(pending, 1 << lanes, 0), axis=0)


@triton.jit
def _allreduce_add_rms_norm_kernel(
    d_ptr, x_ptr, w_ptr, h_ptr, y_ptr, buf_ptrs, pad_ptrs,
    err_ptr, rank, site, site_offset, N, eps, max_spin,
    WORLD: tl.constexpr, SPARE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    elem = site_offset + row.to(tl.int64) * N + offs
    mine = tl.load(buf_ptrs + rank).to(d_ptr.dtype)
    tl.store(mine + elem, tl.load(d_ptr + row * N + offs, mask=mask, other=0.0), mask=mask)
    tl.debug_barrier()  # every thread's store precedes the release below
    peers = tl.arange(0, WORLD)
    my_pad = tl.load(pad_ptrs + rank).to(tl.pointer_type(tl.int32))
    spare = my_pad + SPARE + peers  # past the rows x world signal slots
    # once a barrier has failed the buffers are out of step: later calls try once and move on (fail fast)
    max_spin = tl.where(tl.load(err_ptr, volatile=True) == 0, max_spin, 0)
    # signal: our slot in every peer's pad (0 -> 1, release) ...
    unsent = _cas_all(tl.load(pad_ptrs + peers).to(tl.pointer_type(tl.int32)) + row * WORLD + rank, spare,
                      max_spin, 0, 1, "release", WORLD)
    # ... then consume every peer's slot in ours (1 -> 0, acquire)
    unseen = _cas_all(my_pad + row * WORLD + peers, spare + WORLD, max_spin, 1, 0, "acquire", WORLD)
    if (unsent | unseen) != 0:  # a peer never answered: record it for the host instead of hanging
        tl.atomic_add(err_ptr, 1)
        tl.atomic_xchg(err_ptr + 1, site)
        tl.atomic_or(err_ptr + 2, unseen | (unsent << 8))
    tl.debug_barrier()
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        buf = tl.load(buf_ptrs + peer).to(d_ptr.dtype)
        acc += tl.load(buf + elem, mask=mask, other=0.0, volatile=True).to(tl.float32)
    delta = acc.to(x_ptr.dtype.element_ty)  # what an all-reduce in the activation dtype returns
    add_rms_norm_row(x_ptr, delta, w_ptr, h_ptr, y_ptr, row, N, eps, offs, mask)


def allreduce_add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                                  buf_ptrs: torch.Tensor, pad_ptrs: torch.Tensor, rank: int, world: int,
                                  site: int, site_offset: int, spare_slot: int, errors: torch.Tensor,
                                  max_spin: int = 1 << 23) -> tuple[torch.Tensor, torch.Tensor]:
    """buf_ptrs / pad_ptrs: int64 [world] device tensors of every rank's buffer and signal pad; each pad
    holds rows x world signal slots, then 2 x world spare words from spare_slot on. errors: int32 [3]
    (timed-out barriers, last site, peers: bits 0-7 not heard from, bits 8-15 not signalled); a barrier
    gives up after max_spin retries (about 1 us each, so seconds), leaving a wrong result and the record."""
    x, delta = x.contiguous(), delta.contiguous()
    h, y = torch.empty_like(x), torch.empty_like(x)
    N = x.shape[-1]
    block = triton.next_power_of_2(N)
    _allreduce_add_rms_norm_kernel[(x.numel() // N,)](
        delta, x, weight, h, y, buf_ptrs, pad_ptrs, errors, rank, site, site_offset, N, eps, max_spin,
        WORLD=world, SPARE=spare_slot, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return h, y
