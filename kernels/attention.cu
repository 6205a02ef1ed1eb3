// Multi-head self-attention, flash style (DiT, reference doc A.6):
//   out[b, n, h·D + d] = Σ_j softmax_j(q_n · k_j / √D) · v[j, d]
// with q, k, v the three C-wide column blocks of the qkv GEMM's output for head h:
//   qkv: (B, N, 3C) f16 row-major, q[b, n, h, d] = qkv[b, n, h·D + d], k at + C, v at + 2C;
//   out: (B, N, C) f16 row-major, heads concatenated (index h·D + d): the proj GEMM's input.
// C = heads · D. Built for D = 72 (DiT-XL/2: C = 1152, 16 heads; the small test configs use
// 72 too); the launcher rejects any other head dim. N is any token count ≥ 1 (256 at 256 px,
// 1024 at 512 px), B any batch.
//
// Launch: grid (⌈N/64⌉, heads, B), 128 threads = 4 warps; a block owns 64 queries of one
// (batch, head), each warp 16 of them (one WMMA row block), and streams the keys and values
// of its (batch, head) through shared memory in tiles of 64 tokens:
//   S = Q·Kᵀ        WMMA m16n16k16, f16 in, f32 out: per warp 16×64 = 4 accumulators, 5 k steps
//   online softmax  f32, per query row: running max m and sum l (two lanes per row)
//   O += P·V        P rounded to f16; WMMA, 16×80 = 5 accumulators, 4 k steps
// WMMA's fragment layout is opaque, so S goes through shared memory (f32) for the row-wise
// softmax, which writes P (f16) in place over it; P·V of each tile is stored there too, and
// the running output O lives in registers with a known layout: lane l holds row l/2, columns
// (l%2)·40 .. +40, which it rescales by exp(m_old − m_new) and adds the tile's P·V to.
// Head dim padding: D = 72 is not a multiple of 16, so the Q, K and V tiles are 80 columns
// wide, columns 72..79 zeroed in shared memory (once for K and V: the tile loads never write
// them), which adds exact zeros to q·k and gives output columns 72..79 that are never written.
//
// Ragged N: keys past N load as zeros and get score −∞ (weight exactly 0; zero V rows keep
// 0·V finite); queries past N load as zeros and are not written. Every key tile holds at least
// one key < N, so the running max is finite after the first tile.
//
// Pipeline: one K and one V buffer (double buffering both would exceed 48 KiB); K of tile t+1
// is copied (cp.async) while the softmax and P·V of tile t run, V of tile t+1 while S of
// tile t+1 is computed. Four barriers per tile.
//
// Shared memory (dynamic, 44,032 B; fits the 48 KiB a launch gets without opting in):
//   K tile   64 × 88 halves   11,264 B   row stride 176 B: 80 columns + 8 so that the rows of
//   V tile   64 × 88 halves   11,264 B   an 8×16 B wmma load fall in distinct banks
//   scratch  4 warps × 16 × 84 f32  21,504 B   per warp: S (f32, 16×64), then P (f16, same
//            rows, stride 336 B), then P·V (f32, 16×80); first the warp's Q rows (16×88 f16)
//            before they move into registers (5 matrix_a fragments per warp, kept all along).
//
// Precision: q·k accumulated in f32 on tensor cores; scale 1/√D and log2 e applied in f32 as
// one constant, exponentials by exp2f (so exp2(s·scale·log2 e − m) = exp(s·scale − m·ln 2));
// the weights P rounded once to f16 for the P·V product (relative error ≤ 2^-11 each, the
// largest error term: ≤ 2^-11 · Σ_j w_j |v_j| per output); the sum l over the unrounded f32
// weights; O accumulated in f32 and multiplied by 1/l, rounded to f16 once.
//
// Cost per call, DiT-XL/2 at B = 2, N = 256 (16 heads, D = 72), 128 blocks:
//   FLOPs: QKᵀ and P·V 2·(2·B·H·N²·D) = 604 MFLOP (671 M executed with the padding to 80),
//          B·H·N² = 2.1 M exponentials;
//   bytes: qkv read 3.54 MB (each block re-reads its head's K and V: 9.4 MB of K/V reads in
//          all, mostly from L2), out written 1.18 MB: 4.7 MB to and from DRAM, about
//          128 FLOP per DRAM byte. At N = 1024 the FLOPs grow 16×, the bytes 4×.
// Exported: attention_f16.

#include "device.cuh"

using namespace nvcuda;

namespace {

constexpr int D = 72;                    // head dim
constexpr int DP = 80;                   // D padded to a multiple of the WMMA k step 16
constexpr int BM = 64, BN = 64;          // queries per block, keys per tile
constexpr int WARPS = BM / 16;           // one 16-row WMMA block of queries per warp
constexpr int THREADS = WARPS * 32;
constexpr int LDH = DP + 8;              // f16 tile row stride (halves): 176 B
constexpr int LDF = 84;                  // f32 scratch row stride (floats): 336 B
constexpr int LDP = 2 * LDF;             // P row stride (halves): P row r over S row r
constexpr int CHUNKS = D / 8;            // 16-byte chunks of a row of q, k or v: 9
constexpr int HALF_COLS = DP / 2;        // output columns per lane (two lanes per row): 40
constexpr int TILE_HALVES = BN * LDH;
constexpr int SCRATCH_FLOATS = 16 * LDF;  // per warp
constexpr int SMEM_BYTES = 2 * TILE_HALVES * 2 + WARPS * SCRATCH_FLOATS * 4;
// The launcher passes this as the dynamic shared memory (ATTENTION_SMEM, src/gpu/launch.rs).
static_assert(SMEM_BYTES == 44032, "update ATTENTION_SMEM in src/gpu/launch.rs");
static_assert(D % 8 == 0 && DP % 16 == 0 && DP >= D && DP - D <= 8, "one zero chunk of padding");
static_assert(BN == 64 && HALF_COLS % 8 == 0, "the softmax gives each lane half a row of 32");
static_assert(DP <= LDF && BN <= LDF && 16 * LDH * 2 <= SCRATCH_FLOATS * 4, "scratch holds all");
static_assert((16 * LDH * 2) % 32 == 0 && (SCRATCH_FLOATS * 4) % 32 == 0 && LDF % 4 == 0,
              "wmma pointers 256-bit aligned, ldm a multiple of 16 bytes");

// 1/√72 · log2(e), rounded once to f32: scores are scaled into base-2 exponents.
constexpr float SCALE_LOG2E = float(0.11785113019775792 * 1.4426950408889634);
constexpr float NEG_INF = -INFINITY;

// Tokens [tok0, tok0 + rows) of one q, k or v column block (pointer `g` at token 0 of this
// batch item and head; tokens 3C apart) into a `rows` × LDH tile, columns 0..D−1; tokens at
// or past N are zero-filled. Threads `first`, `first` + `stride`, … share the copies.
__device__ __forceinline__ void load_rows(half* s, const half* g, size_t row_stride, int tok0,
                                          int rows, int N, int first, int stride) {
    for (int c = first; c < rows * CHUNKS; c += stride) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const bool valid = tok0 + r < N;
        cp_async_16(s + r * LDH + col, valid ? g + (tok0 + r) * row_stride + col : g, valid);
    }
}

// Columns D..DP−1 (one 16-byte chunk per row) of `rows` tile rows to zero.
__device__ __forceinline__ void zero_padding(half* s, const half* g, int rows, int first,
                                             int stride) {
    for (int r = first; r < rows; r += stride) cp_async_16(s + r * LDH + D, g, false);
}

__device__ __forceinline__ float4 load4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    attention_f16(half* __restrict__ out, const half* __restrict__ qkv, int tokens, int heads) {
    const int N = tokens;
    unsigned char* smem = dynamic_shared<unsigned char>();
    half* ks = reinterpret_cast<half*>(smem);
    half* vs = ks + TILE_HALVES;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* scr = reinterpret_cast<float*>(vs + TILE_HALVES) + warp * SCRATCH_FLOATS;

    const int C = heads * D, head = blockIdx.y, m0 = blockIdx.x * BM;
    const size_t row_stride = 3 * (size_t)C;
    const half* q = qkv + (size_t)blockIdx.z * N * row_stride + head * D;  // token 0 of item b
    const half* k = q + C;
    const half* v = q + 2 * C;

    // Prologue: this warp's 16 query rows into its scratch (group 1), K tile 0 (group 2),
    // V tile 0 (group 3), the K and V padding columns with them.
    half* qs = reinterpret_cast<half*>(scr);
    load_rows(qs, q, row_stride, m0 + warp * 16, 16, N, lane, 32);
    zero_padding(qs, q, 16, lane, 32);
    cp_async_commit();
    zero_padding(ks, q, BN, threadIdx.x, THREADS);
    load_rows(ks, k, row_stride, 0, BN, N, threadIdx.x, THREADS);
    cp_async_commit();
    zero_padding(vs, q, BN, threadIdx.x, THREADS);
    load_rows(vs, v, row_stride, 0, BN, N, threadIdx.x, THREADS);
    cp_async_commit();
    cp_async_wait<2>();  // this thread's Q copies have landed
    __syncwarp();        // … and every lane's
    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> qa[DP / 16];
    for (int kd = 0; kd < DP / 16; ++kd) wmma::load_matrix_sync(qa[kd], qs + kd * 16, LDH);
    __syncwarp();  // Q is in registers before S overwrites the scratch

    // Lane l: softmax row r = l/2 (of the warp's 16), half hc of the keys and of the output
    // columns; m and l of that row (both lanes of a row hold the same m; l is per lane, for
    // its half of the keys, and summed at the end).
    const int r = lane / 2, hc = lane % 2;
    float m_run = NEG_INF, l_run = 0.f;
    float o[HALF_COLS];
    for (int i = 0; i < HALF_COLS; ++i) o[i] = 0.f;

    const int tiles = (N + BN - 1) / BN;
    for (int t = 0; t < tiles; ++t) {
        cp_async_wait<1>();  // all but the newest group (V of tile t): K of tile t has landed
        __syncthreads();     // … for every thread

        // S = Q·Kᵀ for the warp's 16 queries × 64 keys; K row-major is Kᵀ column-major.
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s[BN / 16];
            for (int j = 0; j < BN / 16; ++j) wmma::fill_fragment(s[j], 0.f);
            for (int kd = 0; kd < DP / 16; ++kd)
                for (int j = 0; j < BN / 16; ++j) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> kb;
                    wmma::load_matrix_sync(kb, ks + j * 16 * LDH + kd * 16, LDH);
                    wmma::mma_sync(s[j], qa[kd], kb, s[j]);
                }
            for (int j = 0; j < BN / 16; ++j)
                wmma::store_matrix_sync(scr + j * 16, s[j], LDF, wmma::mem_row_major);
        }
        __syncthreads();  // every warp is done with K of tile t: refill it with tile t + 1
        if (t + 1 < tiles) load_rows(ks, k, row_stride, (t + 1) * BN, BN, N, threadIdx.x, THREADS);
        cp_async_commit();  // (an empty group on the last tile keeps the counting uniform)

        // Online softmax of row r, keys hc·32 .. +32 of the tile (those ≥ N masked to −∞).
        const int valid = min(BN, N - t * BN) - hc * 32;
        float x[32];
        float tile_max = NEG_INF;
        for (int i = 0; i < 32; i += 4) {
            const float4 s4 = load4(scr + r * LDF + hc * 32 + i);
            x[i] = i < valid ? s4.x * SCALE_LOG2E : NEG_INF;
            x[i + 1] = i + 1 < valid ? s4.y * SCALE_LOG2E : NEG_INF;
            x[i + 2] = i + 2 < valid ? s4.z * SCALE_LOG2E : NEG_INF;
            x[i + 3] = i + 3 < valid ? s4.w * SCALE_LOG2E : NEG_INF;
            tile_max = fmaxf(fmaxf(tile_max, fmaxf(x[i], x[i + 1])), fmaxf(x[i + 2], x[i + 3]));
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m_run, tile_max);       // finite: the tile has a key < N
        const float alpha = exp2f(m_run - m_new);          // 0 on the first tile
        m_run = m_new;
        __syncwarp();  // every lane has read its scores before P overwrites them
        half2* p2 = reinterpret_cast<half2*>(reinterpret_cast<half*>(scr) + r * LDP + hc * 32);
        float sum = 0.f;
        for (int i = 0; i < 32; i += 2) {
            const float p0 = exp2f(x[i] - m_new), p1 = exp2f(x[i + 1] - m_new);
            sum += p0 + p1;
            p2[i / 2] = __floats2half2_rn(p0, p1);
        }
        l_run = l_run * alpha + sum;
        __syncwarp();  // P complete before the warp loads it

        cp_async_wait<1>();  // all but K of tile t + 1: V of tile t has landed
        __syncthreads();

        // O = alpha·O + P·V: P (16×64) to registers, then the 5 column blocks of P·V into
        // the scratch (over P), then each lane takes its half row.
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> pa[BN / 16];
            for (int kc = 0; kc < BN / 16; ++kc)
                wmma::load_matrix_sync(pa[kc], reinterpret_cast<half*>(scr) + kc * 16, LDP);
            __syncwarp();  // P is in registers before the products overwrite it
            for (int j = 0; j < DP / 16; ++j) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.f);
                for (int kc = 0; kc < BN / 16; ++kc) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> vb;
                    wmma::load_matrix_sync(vb, vs + kc * 16 * LDH + j * 16, LDH);
                    wmma::mma_sync(acc, pa[kc], vb, acc);
                }
                wmma::store_matrix_sync(scr + j * 16, acc, LDF, wmma::mem_row_major);
            }
        }
        __syncwarp();  // the warp's P·V is complete
        for (int i = 0; i < HALF_COLS; i += 4) {
            const float4 pv = load4(scr + r * LDF + hc * HALF_COLS + i);
            o[i] = o[i] * alpha + pv.x;
            o[i + 1] = o[i + 1] * alpha + pv.y;
            o[i + 2] = o[i + 2] * alpha + pv.z;
            o[i + 3] = o[i + 3] * alpha + pv.w;
        }
        __syncthreads();  // every warp is done with V of tile t (and with its scratch)
        if (t + 1 < tiles) load_rows(vs, v, row_stride, (t + 1) * BN, BN, N, threadIdx.x, THREADS);
        cp_async_commit();
    }
    cp_async_wait<0>();  // (only empty groups remain)

    // Normalise and write row r's columns hc·40 .. (of which 72..79 are padding), as f16.
    const float inv = 1.f / (l_run + __shfl_xor_sync(0xffffffffu, l_run, 1));
    const int n = m0 + warp * 16 + r;
    if (n < N) {
        half2* dst = reinterpret_cast<half2*>(out + ((size_t)blockIdx.z * N + n) * C + head * D +
                                              hc * HALF_COLS);
        const int cols = hc == 0 ? HALF_COLS : D - HALF_COLS;
        for (int i = 0; i < HALF_COLS; i += 2)
            if (i < cols) dst[i / 2] = __floats2half2_rn(o[i] * inv, o[i + 1] * inv);
    }
}
