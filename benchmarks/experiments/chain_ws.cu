// Experiment (not part of the package): the persistent GEMV chain with warp specialization. One producer warp
// streams each tile's contiguous FP8 weight block into a ring of shared-memory slots (bulk async copies
// completing on mbarriers), independent of the stage waits; consumer warps wait on the stage counters,
// quantize the stage input once, and multiply from shared memory. Plain stages only (no SwiGLU, norm,
// residual, router, experts). Same tiles, desc and tile table as GemvChain (the column numbers below are
// maverick_plugins/kernels/persistent_chain.py's). Run by chain_ws_bench.py.
//
// The version of commit 0a42365, measured on H100 (48 layers 5120->2048->5120, benchmarks/HISTORY.md part 19):
// 1.35 ms (no waits 1.04), against 1.07 for the Triton chain and 0.46 for the launches; a ring of 2 slots as
// fast as 4, so the stream is not the limit. Likely each consumer tile's latency (not yet profiled):
// dependent global loads before any math (its stage, the stage's desc row, scales), and one accumulator a
// lane chaining 16 FMAs an iteration. Its output was 0.25 relative from the Triton chain's after 96 stages
// whose values decay to 0.007 (e4m3's coarse small values), not yet checked stage by stage.
//
// This revision, not yet run: the producer writes each tile's header (stage, rows, offsets, the counts its
// stage waits for) beside the weights, so a consumer reads no global memory before its math but the row
// scale, loaded before the row's math; four accumulators a lane.
#include <cuda_fp8.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef NBUF
#define NBUF 4
#endif
#ifndef NC
#define NC 8
#endif
#ifndef SLOT
#define SLOT 40960  // bytes: the largest tile (8 rows of K=5120)
#endif
#define KMAX 5120
#define COLS 18
#define C_W_OFF 0
#define C_N 1
#define C_K 2
#define C_X_OFF 3
#define C_SC_OFF 4
#define C_FIRST 5
#define C_OUT_OFF 7
#define C_DEP0 10
#define C_TILES 16
#define C_WIDE 17

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
  }
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void consumers_sync() {  // the NC consumer warps only (barrier 1)
  asm volatile("bar.sync 1, %0;" :: "r"(NC * 32) : "memory");
}

struct alignas(16) TileHdr {  // what a consumer needs of its tile, written by the producer beside the weights
  long long row0, cnt, stride, k, out_off, sc_off, x_off;
  long long dep[3];
  int need[3];
  int s, last;  // last: this program's last tile of stage s (it signals the stage)
  float xscale;
};
static_assert(sizeof(TileHdr) == 112, "the bench sizes shared memory for 112-byte headers");

extern "C" __global__ void __launch_bounds__(32 * (NC + 1), 1)
chain_ws(const unsigned char* __restrict__ w, const float* __restrict__ row_scales,
         const float* __restrict__ x_scales, __nv_bfloat16* act, const long long* __restrict__ desc,
         const int* __restrict__ tile_stage, int* ctr, int S, int TOTAL, int NPROG, int ROWS, int WAITS) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + NBUF * SLOT);
  unsigned long long* empty = full + NBUF;
  TileHdr* hdr = reinterpret_cast<TileHdr*>(empty + NBUF);
  float* xq = reinterpret_cast<float*>(hdr + NBUF);  // the stage input, quantized, as float [KMAX]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int b = 0; b < NBUF; ++b) {
      mbar_init(&full[b], 1);
      mbar_init(&empty[b], NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == NC) {  // producer: every tile's weights and header, in order, as far ahead as the ring allows
    if (lane == 0) {
      int i = 0;
      int s = tile_stage[blockIdx.x < TOTAL ? blockIdx.x : TOTAL - 1];
      for (int t = blockIdx.x; t < TOTAL; t += NPROG, ++i) {
        const int slot = i % NBUF, use = i / NBUF;
        const int tn = t + NPROG;
        const int sn = tile_stage[tn < TOTAL ? tn : TOTAL - 1];  // read ahead: the next tile's stage
        const long long* d = desc + (long long)s * COLS;
        const long long n = d[C_N], k = d[C_K], first = d[C_FIRST], wide = d[C_WIDE];
        const long long stride = (k + 15) / 16 * 16, rows_t = (long long)ROWS << wide;
        const long long row0 = (t - first) * rows_t;
        const long long cnt = n - row0 < rows_t ? n - row0 : rows_t;
        const unsigned bytes = (unsigned)(cnt * stride);
        if (use > 0) mbar_wait(&empty[slot], (use - 1) & 1);
        TileHdr& h = hdr[slot];
        h.row0 = row0; h.cnt = cnt; h.stride = stride; h.k = k; h.out_off = d[C_OUT_OFF]; h.sc_off = d[C_SC_OFF];
        h.x_off = d[C_X_OFF];
        for (int j = 0; j < 3; ++j) {
          const long long dep = d[C_DEP0 + j];
          h.dep[j] = dep;
          h.need[j] = dep >= 0 ? (int)desc[dep * COLS + C_TILES] : 0;
        }
        h.s = s; h.last = sn != s || tn >= TOTAL; h.xscale = x_scales[s];
        mbar_expect_tx(&full[slot], bytes);  // release: the header before the phase completes
        bulk_copy(smem + slot * SLOT, w + d[C_W_OFF] + row0 * stride, bytes, &full[slot]);
        s = sn;
      }
    }
    return;
  }
  // consumers
  const int tid = threadIdx.x;
  int i = 0, x_stage = -1, done = 0;
  for (int t = blockIdx.x; t < TOTAL; t += NPROG, ++i) {
    const int slot = i % NBUF, use = i / NBUF;
    mbar_wait(&full[slot], use & 1);
    const TileHdr& h = hdr[slot];
    const int s = h.s, last = h.last, stride = (int)h.stride;
    const long long row0 = h.row0, cnt = h.cnt, k = h.k, out_off = h.out_off, sc_off = h.sc_off;
    const float xscale = h.xscale;
    if (s != x_stage) {
      if (tid == 0 && WAITS) {
        for (int j = 0; j < 3; ++j) {
          if (h.dep[j] >= 0) {
            while (ld_acquire(ctr + 1 + h.dep[j]) < h.need[j]) {}
          }
        }
      }
      consumers_sync();
      const __nv_bfloat16* x = act + h.x_off;
      constexpr int PER = (KMAX + NC * 32 - 1) / (NC * 32);
      float vals[PER];
#pragma unroll
      for (int q = 0; q < PER; ++q) {  // every load in flight at once
        const int c = tid + q * NC * 32;
        vals[q] = c < k ? __bfloat162float(__ldcg(x + c)) : 0.f;
      }
#pragma unroll
      for (int q = 0; q < PER; ++q) {
        const int c = tid + q * NC * 32;
        if (c < stride) xq[c] = float(__nv_fp8_e4m3(fminf(fmaxf(vals[q] / xscale, -448.f), 448.f)));
      }
      consumers_sync();
      x_stage = s;
    }
    const unsigned char* tile = smem + slot * SLOT;
    for (int r = warp; r < cnt; r += NC) {
      const float rs = row_scales[sc_off + row0 + r];  // in flight while the row multiplies
      const unsigned char* row = tile + r * stride;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int c = lane * 16; c < stride; c += 32 * 16) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + c);
        const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(words[q] & 0xffff), __NV_E4M3);
          const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(words[q] >> 16), __NV_E4M3);
          const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
          const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
          const float4 xx = *reinterpret_cast<const float4*>(xq + c + q * 4);
          acc[q] = fmaf(a.x, xx.x, acc[q]);
          acc[q] = fmaf(a.y, xx.y, acc[q]);
          acc[q] = fmaf(b.x, xx.z, acc[q]);
          acc[q] = fmaf(b.y, xx.w, acc[q]);
        }
      }
      float sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) act[out_off + row0 + r] = __float2bfloat16(sum * xscale * rs);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[slot]);
    ++done;
    if (last) {
      consumers_sync();  // every consumer's stores of this stage before the release
      if (tid == 0) red_release(ctr + 1 + s, done);
      done = 0;
    }
  }
  consumers_sync();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(ctr, 1) == NPROG - 1) {  // the last program out: counters back to zero
      for (int j = 0; j < S; ++j) ctr[1 + j] = 0;
      __threadfence();
      ctr[0] = 0;
    }
  }
}
