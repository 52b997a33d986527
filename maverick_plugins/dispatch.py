"""Which kernel runs, and how it launches: the one place that decides.

Two inputs decide it:
- `KernelOptions`, an explicit settings object (kernels on or off, programmatic dependent launch, the
  split-K reduction). Whoever runs a forward makes one current around it (`with use(options):`, the model
  runner does); kernels read the current one when they launch, so one process can switch between them.
- `DeviceTable`: how many tokens each min-latency kernel takes and each kernel's measured configs, one
  table per device family. Tuning is offline; how each entry was measured, with the figures, is in
  benchmarks/TUNING.md.

The ops (fp8.py, moe.py, attention.py, norm.py, ...) call the choice functions at the end of this file
and do what they say; no op or kernel decides on its own.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import torch
import triton

# --- settings -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How kernels run. enabled False: the pure-torch reference everywhere (A/B runs, debugging).
    pdl: programmatic dependent launch on Hopper and newer: a kernel may start while its predecessor
    finishes and waits for its results in-kernel (griddepcontrol); each kernel releases the next once
    every program passed its main loop (releasing at entry was slower: the next kernel's early programs
    took SMs this one's later waves needed). splitk_serial: the split-K GEMM's last split reduces the
    partials (an arrival counter per column block) instead of a second launch."""

    enabled: bool = True
    pdl: bool = True
    splitk_serial: bool = True

    def pdl_on(self, device: torch.device) -> bool:
        return self.pdl and device.type == "cuda" and _capability(_index(device))[0] >= 9


_CURRENT: contextvars.ContextVar[KernelOptions] = contextvars.ContextVar("maverick_kernel_options",
                                                                         default=KernelOptions())


def options() -> KernelOptions:
    """The options in effect (the default KernelOptions() outside any `use`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(opts: KernelOptions):
    """Run the enclosed forwards (and CUDA graph captures) with opts."""
    token = _CURRENT.set(opts)
    try:
        yield opts
    finally:
        _CURRENT.reset(token)


def active(x: torch.Tensor) -> bool:
    """Whether an op on x may run a GPU kernel at all (a CUDA tensor, kernels on)."""
    return x.is_cuda and _CURRENT.get().enabled


# --- per-device tables ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionTuning:
    """Split-KV decode attention. Splits per (sequence, kv head): about programs_per_sm programs an SM,
    between min_splits and max_splits; one (sequence, kv head) alone (batch 1 at TP8) leaves each SM a
    program or two, each bound by memory latency: there alone_splits, more stages and warps. The merge
    takes at least merge_min_programs programs (narrower head_dim slices when few pairs)."""

    min_splits: int = 32
    max_splits: int = 128
    programs_per_sm: int = 4
    alone_splits: int = 256
    alone_warps: int = 8
    alone_stages: int = 5
    split_warps: int = 4
    split_stages: int = 3
    merge_min_programs: int = 16

    def splits(self, batch: int, kv_heads: int, table_blocks: int, sms: int) -> int:
        """From the table width (max_seq_len) and the SM count: the context is unknown on the host (graphs),
        and the kernel spreads whatever context there is over the splits."""
        per_seq = max(self.min_splits, triton.cdiv(self.programs_per_sm * sms, batch * kv_heads))
        alone = batch * kv_heads == 1
        return max(1, min(table_blocks, self.alone_splits if alone else self.max_splits, per_seq))


@dataclasses.dataclass(frozen=True)
class DeviceTable:
    """Thresholds (the most tokens each min-latency kernel takes; more go to cuBLAS, grouped GEMMs and
    the prefill kernels) and per-kernel configs for one device family."""

    name: str
    tuned: bool  # False: borrowed from a tuned device of the same architecture, not measured on this one
    gemm_max_tokens: int  # the split-K FP8 GEMM (and the GEMV below it)
    gemv_max_tokens: int  # the register-resident FP8 GEMV
    moe_max_tokens: int  # the selected-experts MoE kernels
    router_max_tokens: int  # the one-launch router (GEMV + top-k)
    moe_block_max_tokens: int  # router logits in one launch, both MoE passes picking top-1 from them
    attention_max_new_tokens: int  # split-KV decode attention, per sequence
    allreduce_max_tokens: int  # the fused one-shot all-reduce + add + RMSNorm
    gemv: dict  # (N, K) -> (BLOCK_N, num_warps), one token
    gemv_2: dict  # (N, K) -> (BLOCK_N, num_warps), two tokens; only where the GEMV beat the GEMM
    gemm: dict  # (N, K) -> (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, SWAP_AB)
    moe: dict  # most tokens -> (pass 1, pass 2) configs of kernels/moe_gemv.py
    attention: AttentionTuning = AttentionTuning()

    def gemv_config(self, n: int, k: int, tokens: int, swiglu: bool) -> tuple[int, int] | None:
        """The GEMV's config for `tokens` tokens of weight [n, k], or None where the split-K GEMM is the
        faster (measured) or the rows do not fit: one token any shape, two tokens the shapes of gemv_2."""
        if k > GEMV_MAX_K or tokens > 2:
            return None
        if tokens == 2:
            return self.gemv_2.get((n, k))
        return self.gemv.get((n, k)) or gemv_default(n // 2 if swiglu else n, k, swiglu)

    def gemm_config(self, n: int, k: int, sms: int) -> tuple:
        return self.gemm.get((n, k)) or gemm_default(n, k, sms)

    def moe_config(self, tokens: int) -> tuple:
        return next(cfg for most, cfg in sorted(self.moe.items()) if tokens <= most or most == max(self.moe))


GEMV_MAX_K = 32768  # a GEMV program holds BLOCK_N x K weight bytes in registers; longer rows take the GEMM


def gemv_default(n_out: int, k: int, swiglu: bool) -> tuple[int, int]:
    """Untuned shapes: about 32 KB of weights a program (the tuned shapes' best are 20-40 KB), 4 warps."""
    per_row = k * (2 if swiglu else 1)
    return max(1, min(32, 1 << max(0, (32768 // per_row).bit_length() - 1))), 4


def gemm_default(n: int, k: int, sms: int) -> tuple:
    """Untuned shapes (other tp sizes, the tiny test models): x W^T on mma.sync, K split until about 2
    programs an SM, at most 8 ways. Swap-AB only where it is tuned and checked on a GPU: on the tiny fp32
    test model it moved the logits by 0.16 relative against 0.05 allowed (the TP8 shapes agree with
    mma.sync to 2e-4, tests/test_gpu.py)."""
    programs = -(-n // 64)
    return (64, 256, max(1, min(8, 2 * sms // programs, k // 1024)), 4, 3)


# H200, one-rank TP8 and TP4 per-rank Maverick shapes (benchmarks/TUNING.md: how, and each entry's figures)
H200 = DeviceTable(
    name="NVIDIA H200", tuned=True,
    # one token: the GEMV beats the split-K GEMM at every shape (qkv 3.02 against 5.71 us); two tokens only
    # at the shapes of gemv_2; the router's one launch wins at one token only (8 tokens: 22.4 us against 6.9)
    gemm_max_tokens=16, gemv_max_tokens=2, moe_max_tokens=16, router_max_tokens=1, moe_block_max_tokens=1,
    attention_max_new_tokens=8,
    allreduce_max_tokens=16,
    gemv={
        (896, 5120): (4, 8), (5120, 640): (32, 4), (4096, 5120): (4, 2), (5120, 2048): (16, 2),  # TP8 qkv, o, fc13, fc2
        (2048, 5120): (4, 4), (5120, 1024): (16, 8),  # TP8 shared expert fc13 + SwiGLU, fc2
        (1792, 5120): (4, 4), (5120, 1280): (16, 4), (8192, 5120): (2, 2), (5120, 4096): (16, 4),  # TP4
    },
    gemv_2={(896, 5120): (4, 4), (5120, 640): (16, 4), (5120, 2048): (4, 4), (5120, 1024): (8, 2)},
    gemm={
        (896, 5120): (64, 128, 8, 4, 4, True), (5120, 640): (64, 128, 1, 4, 4, True),
        (4096, 5120): (64, 256, 4, 4, 4, True), (5120, 2048): (64, 512, 1, 4, 3, True),
        (2048, 5120): (64, 128, 8, 4, 4, True), (5120, 1024): (64, 256, 1, 4, 4, True),
    },
    # one or two tokens: pass 1 split 8 ways over H on wgmma, pass 2 on CUDA cores; three (an EAGLE-3 verify at
    # K=2): split 2 ways, four (K=3): mma.sync, pass 2 on CUDA cores in both (27.0 and 31.2 us the pair); more:
    # wgmma in both
    moe={2: ((64, 256, 4, 3, 2, 8), (8, 1024, 8, 3, 0)), 3: ((64, 256, 4, 3, 2, 2), (8, 512, 2, 3, 0)),
         4: ((32, 512, 2, 3, 1), (8, 256, 2, 3, 0)), 16: ((64, 256, 4, 3, 2), (64, 256, 4, 2, 2))},
)
# H100 SXM: the same sm90 chip family and 132 SMs as H200 with less bandwidth (3.35 against 4.8 TB/s);
# B200 (sm100, 148 SMs): no tuning run yet. Both borrow H200's entries; the SM count comes from the device.
TABLES = {
    "NVIDIA H200": H200,
    "NVIDIA H100": dataclasses.replace(H200, name="NVIDIA H100", tuned=False),
    "NVIDIA B200": dataclasses.replace(H200, name="NVIDIA B200", tuned=False),
}
DEFAULT = H200  # any other device, and the Triton interpreter on CPU


def override_tables(assignments: list[str]) -> dict:
    """Set threshold fields of every device's table for this process, from "field=value" strings (an A/B of
    one entry in one run: `maverick-bench --table moe_block_max_tokens=4 spec ...`). The integer fields (the
    thresholds) only; the values set, by field."""
    global DEFAULT
    fields = sorted(f.name for f in dataclasses.fields(DeviceTable) if f.type in ("int", int))
    values = {}
    for item in assignments:
        name, eq, raw = item.partition("=")
        if not eq or name not in fields:
            raise ValueError(f"--table {item!r}: expected FIELD=VALUE with FIELD one of {fields}")
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"--table {item!r}: expected an integer value") from None
        if values[name] < 0:
            raise ValueError(f"--table {item!r}: expected a value >= 0")
    for prefix, t in TABLES.items():
        TABLES[prefix] = dataclasses.replace(t, **values)
    DEFAULT = dataclasses.replace(DEFAULT, **values)
    _table.cache_clear()
    return values


def table(device: torch.device) -> DeviceTable:
    """The table of `device` (by name prefix), looked up once per device."""
    return _table(_index(device)) if device.type == "cuda" else DEFAULT


# SMs assumed where there is no CUDA device (the Triton interpreter on CPU): an H100 / H200 SXM's
CPU_SM_COUNT = 132


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 on H100/H200 SXM, 148 on B200)."""
    return _sm_count(_index(device)) if device.type == "cuda" else CPU_SM_COUNT


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _table(index: int) -> DeviceTable:
    name = torch.cuda.get_device_name(index)
    return next((t for prefix, t in TABLES.items() if name.startswith(prefix)), DEFAULT)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# --- choices ----------------------------------------------------------------------------------------

REFERENCE = ("reference", None)


def linear(x: torch.Tensor, weight: torch.Tensor, swiglu: bool, static_input: bool) -> tuple[str, tuple | None]:
    """An FP8 linear of x [M, K] by weight [N, K]: ("gemv", config) for a token or two where the GEMV wins,
    ("gemm", config) for the split-K GEMM up to gemm_max_tokens (static input scales only), ("cublas",
    None) for more tokens (torch._scaled_mm, 16-aligned shapes), else REFERENCE."""
    if not active(x) or x.dim() != 2:
        return REFERENCE
    t = table(x.device)
    m, (n, k) = x.shape[0], weight.shape
    if m <= t.gemm_max_tokens:
        cfg = t.gemv_config(n, k, m, swiglu) if m <= t.gemv_max_tokens else None
        if cfg is not None:
            return "gemv", cfg
        if static_input:
            return "gemm", t.gemm_config(n, k, sm_count(x.device))
    if not swiglu and n % 16 == 0 and k % 16 == 0:
        return "cublas", None
    return REFERENCE


def router(x: torch.Tensor) -> str:
    """"gemv_topk" (logits and top-k in one launch), "topk" (a GEMM, then top-k + sigmoid in one launch)
    or "reference"."""
    if not active(x):
        return "reference"
    return "gemv_topk" if x.shape[0] <= table(x.device).router_max_tokens else "topk"


def moe_block_fused(x: torch.Tensor, top_k: int, fp8: bool) -> bool:
    """Router logits + both MoE passes picking the expert themselves: FP8 experts, top-1, a few tokens."""
    if not (active(x) and fp8 and top_k == 1):
        return False
    t = table(x.device)
    return x.shape[0] <= min(t.moe_block_max_tokens, t.moe_max_tokens)


def moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> str:
    """Routed experts: "gemv" (only the selected experts' FP8 rows, a few tokens), "grouped_mm" (two grouped
    FP8 GEMMs, no host sync: capturable), "grouped" (one GEMM pair per expert with tokens; the counts come
    to the host: eager only), or "reference"."""
    if not active(x):
        return "reference"
    fp8 = gate_up.dtype == torch.float8_e4m3fn
    if x.shape[0] <= table(x.device).moe_max_tokens:
        return "gemv" if fp8 else "reference"
    if (fp8 and x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")
            and gate_up.shape[-1] % 16 == 0 and down.shape[-1] % 16 == 0 and gate_up.shape[1] % 32 == 0
            and _capability(_index(x.device)) == (9, 0)):
        # torch._scaled_grouped_mm: FP8 on sm90 with a bf16 output only, every FP8 row a multiple of 16 bytes
        return "grouped_mm"
    if not torch.cuda.is_current_stream_capturing():
        return "grouped"
    return "reference"


def attention(q: torch.Tensor, k_cache: torch.Tensor, new_tokens: int) -> str | None:
    """"decode" (split-KV, a few new tokens a sequence), "prefill" (FlashAttention-style) or None (the
    reference: CPU, kernels off, blocks or heads under 16 wide)."""
    if not (active(q) and k_cache.shape[1] >= 16 and q.shape[-1] >= 16):
        return None
    return "decode" if new_tokens <= table(q.device).attention_max_new_tokens else "prefill"
