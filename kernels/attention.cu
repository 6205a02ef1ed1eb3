// Multi-head self-attention, flash style (DiT, reference doc A.6):
//   out[b, n, h·D + d] = Σ_j softmax_j(q_n · k_j / √D) · v[j, d]
// with q, k, v the three C-wide column blocks of the qkv GEMM's output for head h:
//   qkv: (B, N, 3C) f16 row-major, q[b, n, h, d] = qkv[b, n, h·D + d], k at + C, v at + 2C;
//   out: (B, N, C) f16 row-major, heads concatenated (index h·D + d): the proj GEMM's input.
// C = heads · D. Built for D = 72 (DiT-XL/2: C = 1152, 16 heads; the small test configs use
// 72 too), D = 64 (DiT-S/B/L) and D = 128: one body templated on the head dim (Head<D> below
// holds every size that depends on it), one exported kernel per D; the launcher rejects any
// other head dim. The description below is of D = 72; for 64 and 128 there is no padding
// (D is a multiple of 16), the tiles are D + 8 halves wide and the scratch rows D + 4 floats,
// and D = 128 is built for 1 or 2 key splits only (4 would not fit the shared memory). N is any
// token count ≥ 1 (256 at 256 px,
// 1024 at 512 px), B any batch.
//
// Launch: grid (⌈N/64⌉, heads, B), KS·128 threads = KS key splits × 4 warps, KS ∈ {1, 2, 4}
// chosen by the launcher (blockDim.x / 128 here): a block owns 64 queries of one
// (batch, head); warp w takes the 16 queries of row block w % 4 (one WMMA row block) against
// key split w / 4. The keys are walked in rounds of KS tiles of 64 tokens: in round r, split s
// takes tile r·KS + s (none when past the last tile: that warp idles through the round). Each
// warp runs the flash loop over its own tiles:
//   S = Q·Kᵀ        WMMA m16n16k16, f16 in, f32 out: per warp 16×64 = 4 accumulators, 5 k steps
//   online softmax  f32, per query row: running max m and sum l (two lanes per row)
//   O += P·V        P rounded to f16; WMMA, 16×80 = 5 accumulators, 4 k steps
// and at the end the KS partial results (m, l, O) of a row block are merged in f32 through
// shared memory (exactly the rescaling the online softmax does between tiles).
// Why splits: DiT-XL/2 at batch 1 with guidance (B = 2, N = 256) is only 128 blocks of
// 64 queries; with KS = 4 every warp has one key tile instead of four in series, and the
// whole K and V of the (batch, head) are fetched at once. At larger grids (batch 16,
// 512 px) KS = 1 keeps small blocks, four per SM (the old kernel, at 135 registers, had
// three). The launcher picks KS (≤ the key tile count); the result does not depend on KS
// beyond the f32 rounding of the merge.
// WMMA's fragment layout is opaque, so S goes through shared memory (f32) for the row-wise
// softmax, which writes P (f16) in place over it; P·V of each tile is stored there too, and
// the running output O lives in registers with a known layout: lane l holds row l/2, columns
// (l%2)·40 .. +40, which it rescales by exp(m_old − m_new) and adds the tile's P·V to.
// Head dim padding: D = 72 is not a multiple of 16, so the Q, K and V tiles are 80 columns
// wide, columns 72..79 zeroed in shared memory (once for K and V: the tile loads never write
// them), which adds exact zeros to q·k and gives output columns 72..79 that are never written.
//
// Ragged N: keys past N load as zeros and get score −∞ (weight exactly 0; zero V rows keep
// 0·V finite); queries past N load as zeros and are not written. Every key tile a warp
// processes holds at least one key < N, so its running max is finite after its first tile;
// KS ≤ ⌈N/64⌉ (launcher), so every split has a tile in round 0 and every partial m is finite.
//
// Pipeline and barriers (R = ⌈⌈N/64⌉ / KS⌉ rounds; the K and V buffers hold one round each):
//   prologue  all threads copy the block's 64 Q rows and K of round 0 (cp.async group 1),
//             then V of round 0 (group 2). Q is read (by WMMA, per tile) only after B1.
//   round r   wait(all but newest) + B1: K of round r landed for every thread.
//             S = Q·Kᵀ.
//             B2, only if a round r + 1 follows: every warp is done reading K → refill K.
//             softmax (each warp in its own scratch; no block barrier).
//             wait(all but newest) + B3: V of round r landed for every thread.
//             O += P·V.
//             B4, only if a round r + 1 follows: every warp is done reading V → refill V.
//   merge     each warp writes (m, l, O) into its own scratch; B5: every partial written;
//             then the warps of a row block each finish 16/KS of its rows.
// A group is committed at each of the two refill points in every round, empty when nothing
// is copied, so "all but the newest group" is always the buffer about to be read. Every
// refill is preceded by a barrier after the last read of the buffer it overwrites; every
// read of a buffer filled by other threads (Q, K, V) follows a wait plus a barrier; Q is
// never overwritten; the scratch is only ever touched by its own warp except in the merge,
// which B5 separates from its writes (and nothing writes the scratch after B5).
// With R = 1 (N ≤ 256 at KS = 4, or N ≤ 64) a block passes 3 barriers in all.
//
// Shared memory (dynamic, 11,264 + KS · 44,032 B: 55,296 B at KS = 1, 99,328 B at KS = 2,
// 187,392 B at KS = 4; above 48 KiB the launch needs the opt-in, ≤ 227 KiB on sm_90; D = 64:
// 9,216 + KS · 35,840 B, D = 128: 17,408 + KS · 68,608 B, 154,624 B at its KS = 2):
//   Q        64 × 88 halves        11,264 B  row stride 176 B: 80 columns + 8 so that the
//   K round  KS · 64 × 88 halves  KS · 11,264 B  rows of an 8×16 B wmma load fall in distinct
//   V round  KS · 64 × 88 halves  KS · 11,264 B  banks
//   scratch  4·KS warps × 16 × 84 f32  KS · 21,504 B  per warp and tile: S (f32, 16×64), then
//            P (f16, same rows, stride 336 B), then P·V (f32, 16×80); at the end the warp's
//            O (16×80 f32) with m and l in columns 80 and 81.
// Q's fragments are reloaded from shared memory for every tile rather than held in registers
// (20 registers): 512 threads allow 128 registers each, which the kernel uses without spills.
// Occupancy at KS = 1: 4 blocks per SM (shared memory and registers both allow 4).
//
// Precision: q·k accumulated in f32 on tensor cores; scale 1/√D and log2 e applied in f32 as
// one constant, exponentials by exp2f (so exp2(s·scale·log2 e − m) = exp(s·scale − m·ln 2));
// the weights P rounded once to f16 for the P·V product (relative error ≤ 2^-11 each, the
// largest error term: ≤ 2^-11 · Σ_j w_j |v_j| per output); the sum l over the unrounded f32
// weights; O accumulated in f32; the KS partials merged in f32 (factors exp2(m_s − max m), 1
// exactly for the split holding the max), the sum multiplied by 1/l, rounded to f16 once.
//
// Cost per call, DiT-XL/2 at B = 2, N = 256 (16 heads, D = 72): 128 blocks of 512 threads
// (KS = 4), one per SM, 3 barriers each (KS = 1 had 16 in series over 4 tiles per warp);
//   FLOPs: QKᵀ and P·V 2·(2·B·H·N²·D) = 604 MFLOP (671 M executed with the padding to 80),
//          B·H·N² = 2.1 M exponentials;
//   bytes: qkv read 3.54 MB (each block re-reads its head's K and V: 9.4 MB of K/V reads in
//          all, mostly from L2), out written 1.18 MB: 4.7 MB to and from DRAM. At N = 1024
//          the FLOPs grow 16×, the bytes 4×.
// Exported: attention_f16 (D = 72), attention_d64_f16 (D = 64), attention_d128_f16 (D = 128).

#include "device.cuh"

using namespace nvcuda;

namespace {

constexpr int BM = 64, BN = 64;          // queries per block, keys per tile
constexpr int ROW_BLOCKS = BM / 16;      // warps per key split: one 16-row WMMA block each
constexpr int SPLIT_THREADS = ROW_BLOCKS * 32;
constexpr float NEG_INF = -INFINITY;

// Everything that depends on the head dim D (72, 64 or 128), for the one kernel body below.
template <int D_>
struct Head {
    static constexpr int D = D_;
    static constexpr int DP = (D + 15) / 16 * 16;  // D padded to the WMMA k step 16: 80, 64, 128
    // Key splits the launcher may pass: 4 (512 threads) where 4 splits' buffers fit sm_90's
    // opted-in shared memory, else 2.
    static constexpr int MAX_SPLITS = D <= 80 ? 4 : 2;
    static constexpr int LDH = DP + 8;  // f16 tile row stride (halves): 176, 144, 272 B
    // f32 scratch row stride (floats): a row of S (BN) or of P·V (DP), m and l beside O; a
    // multiple of 4 (wmma's ldm for f32).
    static constexpr int LDF = ((DP + 2 > BN ? DP + 2 : BN) + 3) / 4 * 4;  // 84, 68, 132
    static constexpr int LDP = 2 * LDF;            // P row stride (halves): P row r over S row r
    static constexpr int M_COL = DP, L_COL = DP + 1;  // scratch columns of m and l in the merge
    static constexpr int CHUNKS = D / 8;          // 16-byte chunks of a row of q, k or v
    static constexpr int HALF_COLS = DP / 2;      // output columns per lane (two lanes per row)
    static constexpr int PAIRS = D / 2;           // half2 outputs per row in the merge
    static constexpr int TILE_HALVES = BN * LDH;
    static constexpr int Q_HALVES = BM * LDH;
    static constexpr int Q_SMEM = Q_HALVES * 2;
    static constexpr int SCRATCH_FLOATS = 16 * LDF;  // per warp
    static constexpr int SPLIT_SMEM = 2 * TILE_HALVES * 2 + ROW_BLOCKS * SCRATCH_FLOATS * 4;
    // 1/√D · log2(e), rounded once to f32: scores are scaled into base-2 exponents.
    static constexpr float SCALE_LOG2E =
        float((D == 72 ? 0.11785113019775792 : D == 64 ? 0.125 : 0.08838834764831845) *
              1.4426950408889634);

    static_assert(D == 72 || D == 64 || D == 128, "a head dim the launcher knows");
    static_assert(Q_SMEM + MAX_SPLITS * SPLIT_SMEM <= 227 * 1024, "fits sm_90's opted-in smem");
    static_assert(16 % MAX_SPLITS == 0, "the merge gives each split's warp 16/KS rows");
    static_assert(D % 8 == 0 && DP % 16 == 0 && DP >= D && DP - D <= 8, "at most one zero chunk");
    static_assert(BN == 64 && HALF_COLS % 8 == 0, "the softmax gives each lane half a row of 32");
    static_assert(DP <= LDF && BN <= LDF, "a scratch row holds a row of S and of P·V");
    static_assert(L_COL < LDF, "m and l fit beside a row of O");
    static_assert((16 * LDH * 2) % 32 == 0 && (SCRATCH_FLOATS * 4) % 32 == 0 && LDF % 4 == 0 &&
                      (TILE_HALVES * 2) % 32 == 0 && Q_SMEM % 32 == 0,
                  "wmma pointers 256-bit aligned, ldm a multiple of 16 bytes");
};
// The launcher passes Q_SMEM + splits · SPLIT_SMEM as the dynamic shared memory
// (attention_smem in src/gpu/launch.rs).
static_assert(Head<72>::Q_SMEM == 11264 && Head<72>::SPLIT_SMEM == 44032 &&
                  Head<64>::Q_SMEM == 9216 && Head<64>::SPLIT_SMEM == 35840 &&
                  Head<128>::Q_SMEM == 17408 && Head<128>::SPLIT_SMEM == 68608,
              "update attention_smem in src/gpu/launch.rs");

// Tokens [tok0, tok0 + rows) of one q, k or v column block (pointer `g` at token 0 of this
// batch item and head; tokens 3C apart) into a `rows` × LDH tile, columns 0..D−1; tokens at
// or past N are zero-filled. Threads `first`, `first` + `stride`, … share the copies.
template <class H>
__device__ __forceinline__ void load_rows(half* s, const half* g, size_t row_stride, int tok0,
                                          int rows, int N, int first, int stride) {
    for (int c = first; c < rows * H::CHUNKS; c += stride) {
        const int r = c / H::CHUNKS, col = (c % H::CHUNKS) * 8;
        const bool valid = tok0 + r < N;
        cp_async_16(s + r * H::LDH + col, valid ? g + (tok0 + r) * row_stride + col : g, valid);
    }
}

// Columns D..DP−1 (one 16-byte chunk per row) of `rows` tile rows to zero; nothing when D is
// a multiple of 16.
template <class H>
__device__ __forceinline__ void zero_padding(half* s, const half* g, int rows, int first,
                                             int stride) {
    if (H::DP == H::D) return;
    for (int r = first; r < rows; r += stride) cp_async_16(s + r * H::LDH + H::D, g, false);
}

__device__ __forceinline__ float4 load4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}

// The kernel body for head dim H::D (the exported kernels below are its instances).
template <class H>
__device__ __forceinline__ void attention(half* __restrict__ out, const half* __restrict__ qkv,
                                          int tokens, int heads) {
    constexpr int D = H::D, DP = H::DP, LDH = H::LDH, LDF = H::LDF, LDP = H::LDP;
    constexpr int HALF_COLS = H::HALF_COLS, PAIRS = H::PAIRS;
    constexpr int TILE_HALVES = H::TILE_HALVES, SCRATCH_FLOATS = H::SCRATCH_FLOATS;
    constexpr int M_COL = H::M_COL, L_COL = H::L_COL;
    constexpr float SCALE_LOG2E = H::SCALE_LOG2E;
    const int N = tokens;
    const int splits = blockDim.x / SPLIT_THREADS;  // 1, 2 or 4 (the launcher's choice)
    const int threads = blockDim.x, tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int rb = warp % ROW_BLOCKS, split = warp / ROW_BLOCKS;
    unsigned char* smem = dynamic_shared<unsigned char>();
    half* qs = reinterpret_cast<half*>(smem);  // the block's BM query rows
    half* ks = qs + H::Q_HALVES;               // K of a round: `splits` tiles of BN rows
    half* vs = ks + splits * TILE_HALVES;      // V of a round
    float* scr0 = reinterpret_cast<float*>(vs + splits * TILE_HALVES);
    float* scr = scr0 + warp * SCRATCH_FLOATS;
    const half* qw = qs + rb * 16 * LDH;        // this warp's 16 query rows
    const half* kt = ks + split * TILE_HALVES;  // this warp's tile within a round
    const half* vt = vs + split * TILE_HALVES;

    const int C = heads * D, head = blockIdx.y, m0 = blockIdx.x * BM, q0 = m0 + rb * 16;
    const size_t row_stride = 3 * (size_t)C;
    const half* q = qkv + (size_t)blockIdx.z * N * row_stride + head * D;  // token 0 of item b
    const half* k = q + C;
    const half* v = q + 2 * C;
    const int round_keys = splits * BN;

    // Prologue: the block's query rows and K of round 0 (group 1), V of round 0 (group 2),
    // the padding columns with them. Q is never written again.
    zero_padding<H>(qs, q, BM, tid, threads);
    load_rows<H>(qs, q, row_stride, m0, BM, N, tid, threads);
    zero_padding<H>(ks, q, round_keys, tid, threads);
    load_rows<H>(ks, k, row_stride, 0, round_keys, N, tid, threads);
    cp_async_commit();
    zero_padding<H>(vs, q, round_keys, tid, threads);
    load_rows<H>(vs, v, row_stride, 0, round_keys, N, tid, threads);
    cp_async_commit();

    // Lane l: softmax row r = l/2 (of the warp's 16), half hc of the keys and of the output
    // columns; m and l of that row (both lanes of a row hold the same m; l is per lane, for
    // its half of the keys, and summed at the end).
    const int r = lane / 2, hc = lane % 2;
    float m_run = NEG_INF, l_run = 0.f;
    float o[HALF_COLS];
    for (int i = 0; i < HALF_COLS; ++i) o[i] = 0.f;

    const int tiles = (N + BN - 1) / BN;
    const int rounds = (tiles + splits - 1) / splits;
    for (int round = 0; round < rounds; ++round) {
        const int t = round * splits + split;  // this warp's key tile
        const bool active = t < tiles;         // warp-uniform: WMMA inside is legal
        const bool more = round + 1 < rounds;  // block-uniform: the barriers below are legal

        cp_async_wait<1>();  // all but the newest group (V of this round): K (and Q) landed
        __syncthreads();     // B1: … for every thread

        // S = Q·Kᵀ for the warp's 16 queries × 64 keys; K row-major is Kᵀ column-major.
        if (active) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s[BN / 16];
            for (int j = 0; j < BN / 16; ++j) wmma::fill_fragment(s[j], 0.f);
            for (int kd = 0; kd < DP / 16; ++kd) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> qa;
                wmma::load_matrix_sync(qa, qw + kd * 16, LDH);
                for (int j = 0; j < BN / 16; ++j) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> kb;
                    wmma::load_matrix_sync(kb, kt + j * 16 * LDH + kd * 16, LDH);
                    wmma::mma_sync(s[j], qa, kb, s[j]);
                }
            }
            for (int j = 0; j < BN / 16; ++j)
                wmma::store_matrix_sync(scr + j * 16, s[j], LDF, wmma::mem_row_major);
        }
        if (more) {
            __syncthreads();  // B2: every warp is done with K of this round: refill it
            load_rows<H>(ks, k, row_stride, (round + 1) * round_keys, round_keys, N, tid, threads);
        }
        cp_async_commit();  // (an empty group on the last round keeps the counting uniform)

        float alpha = 0.f;  // exp(m_old − m_new) of this tile (set when active)
        if (active) {
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
            const float m_new = fmaxf(m_run, tile_max);  // finite: the tile has a key < N
            alpha = exp2f(m_run - m_new);                 // 0 on the warp's first tile
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
        }

        cp_async_wait<1>();  // all but K of the next round: V of this round has landed
        __syncthreads();     // B3: … for every thread

        // O = alpha·O + P·V: P (16×64) to registers, then the 5 column blocks of P·V into
        // the scratch (over P), then each lane takes its half row.
        if (active) {
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
                        wmma::load_matrix_sync(vb, vt + kc * 16 * LDH + j * 16, LDH);
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
        }
        if (more) {
            __syncthreads();  // B4: every warp is done with V of this round: refill it
            load_rows<H>(vs, v, row_stride, (round + 1) * round_keys, round_keys, N, tid, threads);
        }
        cp_async_commit();
    }
    cp_async_wait<0>();  // (only empty groups remain)

    // Merge. Each warp publishes its partial (m, l, O) of its 16 rows in its own scratch:
    // O row r columns hc·DP/2 .. +DP/2 (the places this lane last read P·V from), m and the
    // row's whole l in columns DP and DP + 1 (80 and 81 at D = 72).
    const float l_row = l_run + __shfl_xor_sync(0xffffffffu, l_run, 1);
    __syncwarp();  // every lane is done with the scratch's P·V before it is overwritten
    for (int i = 0; i < HALF_COLS; i += 4)
        *reinterpret_cast<float4*>(scr + r * LDF + hc * HALF_COLS + i) =
            make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
    if (hc == 0) {
        scr[r * LDF + M_COL] = m_run;
        scr[r * LDF + L_COL] = l_row;
    }
    __syncthreads();  // B5: every split's partial is written (the scratch is not written again)

    // Warp (row block rb, split s) finishes rows s·16/KS .. +16/KS of row block rb: with
    // M = max_s m_s, O = Σ_s exp2(m_s − M)·O_s and l = Σ_s exp2(m_s − M)·l_s (each m_s
    // finite: every split had a tile), out = O·(1/l), one half2 of a row per lane and step.
    const float* part = scr0 + rb * SCRATCH_FLOATS;  // split s's warp at + s·ROW_BLOCKS·…
    const int rows = 16 / splits;
    for (int idx = lane; idx < rows * PAIRS; idx += 32) {
        const int row = split * rows + idx / PAIRS, c = 2 * (idx % PAIRS);
        const int n = q0 + row;
        if (n >= N) continue;
        float mx = NEG_INF;
        for (int s = 0; s < splits; ++s)
            mx = fmaxf(mx, part[s * ROW_BLOCKS * SCRATCH_FLOATS + row * LDF + M_COL]);
        float l = 0.f, a0 = 0.f, a1 = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float* p = part + s * ROW_BLOCKS * SCRATCH_FLOATS + row * LDF;
            const float w = p[M_COL] == mx ? 1.f : exp2f(p[M_COL] - mx);
            const float2 o2 = *reinterpret_cast<const float2*>(p + c);
            l += w * p[L_COL];
            a0 += w * o2.x;
            a1 += w * o2.y;
        }
        const float inv = 1.f / l;
        *reinterpret_cast<half2*>(out + ((size_t)blockIdx.z * N + n) * C + head * D + c) =
            __floats2half2_rn(a0 * inv, a1 * inv);
    }
}

}  // namespace

// One instance per head dim; the launcher picks by head dim (attention_f16 for 72, the DiT-XL/2
// kernel whose name and code predate the others).
extern "C" __global__ void __launch_bounds__(Head<72>::MAX_SPLITS * SPLIT_THREADS)
    attention_f16(half* __restrict__ out, const half* __restrict__ qkv, int tokens, int heads) {
    attention<Head<72>>(out, qkv, tokens, heads);
}

extern "C" __global__ void __launch_bounds__(Head<64>::MAX_SPLITS * SPLIT_THREADS)
    attention_d64_f16(half* __restrict__ out, const half* __restrict__ qkv, int tokens, int heads) {
    attention<Head<64>>(out, qkv, tokens, heads);
}

extern "C" __global__ void __launch_bounds__(Head<128>::MAX_SPLITS * SPLIT_THREADS)
    attention_d128_f16(half* __restrict__ out, const half* __restrict__ qkv, int tokens, int heads) {
    attention<Head<128>>(out, qkv, tokens, heads);
}
