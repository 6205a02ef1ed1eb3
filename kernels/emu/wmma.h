// nvcuda::wmma for the emulation: m16n16k16 fragments, f16 inputs, f32 accumulators, with the
// API's tile-level semantics. Every *_sync call is a warp collective (all 32 lanes, same
// arguments); the last lane to arrive loads, multiplies or stores the whole 16×16 tile.
//
// Element ownership is opaque in the API, and deliberately scrambled here: element e of lane
// l's fragment is tile element (e·32 + l) in row-major order, so a kernel that indexes
// fragment elements as if it knew their positions gets wrong answers in the emulation too.
// The products of two f16 values are exact in f32; each k step adds them to the f32
// accumulator in order k = 0..15 (the GPU's tensor cores sum in an unspecified order).
#pragma once

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulation implements m16n16k16 only");
    static_assert(!__is_same(Use, accumulator) || __is_same(T, float),
                  "the emulation implements f32 accumulators only");
    static_assert(__is_same(Use, accumulator) || __is_same(T, __half),
                  "the emulation implements f16 matrix_a / matrix_b only");

public:
    static constexpr int num_elements = 8;
    T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, T v) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

}  // namespace wmma
}  // namespace nvcuda

namespace icdit_emu {

struct WmmaMemOp : WarpOp {
    void* frag;  // this lane's fragment: 8 elements of `elem` bytes
    int elem;    // 2 (f16) or 4 (f32)
    char* mem;
    unsigned ldm;
    bool col_major;
};

// Tile element (r, c) in memory: row-major at r·ldm + c, column-major at c·ldm + r.
inline size_t tile_offset(const WmmaMemOp* op, int r, int c) {
    return op->col_major ? size_t(c) * op->ldm + r : size_t(r) * op->ldm + c;
}

inline void check_same_args(WarpOp* const* lanes) {
    const auto* first = static_cast<WmmaMemOp*>(lanes[0]);
    if (size_t(first->mem) % 32)
        fail("%s: pointer %p is not 256-bit aligned", first->name, (void*)first->mem);
    if (first->ldm % (16 / first->elem))
        fail("%s: ldm %u is not a multiple of %d elements (16 bytes)", first->name, first->ldm,
             16 / first->elem);
    for (int l = 1; l < 32; ++l) {
        const auto* op = static_cast<WmmaMemOp*>(lanes[l]);
        if (op->mem != first->mem || op->ldm != first->ldm || op->col_major != first->col_major)
            fail("%s: lane %d passes (%p, ldm %u) but lane 0 passes (%p, ldm %u)", op->name, l,
                 (void*)op->mem, op->ldm, (void*)first->mem, first->ldm);
    }
}

template <class T>
inline void complete_wmma_load(WarpOp* const* lanes) {
    check_same_args(lanes);
    for (int l = 0; l < 32; ++l) {
        const auto* op = static_cast<WmmaMemOp*>(lanes[l]);
        const T* mem = reinterpret_cast<const T*>(op->mem);
        T* frag = static_cast<T*>(op->frag);
        for (int e = 0; e < 8; ++e) {
            const int idx = e * 32 + l;
            frag[e] = mem[tile_offset(op, idx / 16, idx % 16)];
        }
    }
}

template <class T>
inline void complete_wmma_store(WarpOp* const* lanes) {
    check_same_args(lanes);
    for (int l = 0; l < 32; ++l) {
        const auto* op = static_cast<WmmaMemOp*>(lanes[l]);
        T* mem = reinterpret_cast<T*>(op->mem);
        const T* frag = static_cast<const T*>(op->frag);
        for (int e = 0; e < 8; ++e) {
            const int idx = e * 32 + l;
            mem[tile_offset(op, idx / 16, idx % 16)] = frag[e];
        }
    }
}

inline void wmma_mem(const char* name, void* frag, int elem, const void* mem, unsigned ldm,
                     bool col_major, void (*complete)(WarpOp* const*)) {
    WmmaMemOp op;
    op.name = name;
    op.mask = 0xffffffffu;
    op.complete = complete;
    op.frag = frag;
    op.elem = elem;
    op.mem = static_cast<char*>(const_cast<void*>(mem));
    op.ldm = ldm;
    op.col_major = col_major;
    warp_collective(&op);
}

struct WmmaMmaOp : WarpOp {
    float* d;
    const __half* a;
    const __half* b;
    const float* c;
};

inline void complete_wmma_mma(WarpOp* const* lanes) {
    // Gather the 32 lanes' fragments into whole tiles, multiply, scatter the result.
    float A[16][16], B[16][16], D[16][16];
    for (int l = 0; l < 32; ++l) {
        const auto* op = static_cast<WmmaMmaOp*>(lanes[l]);
        for (int e = 0; e < 8; ++e) {
            const int idx = e * 32 + l;
            A[idx / 16][idx % 16] = float(op->a[e]);
            B[idx / 16][idx % 16] = float(op->b[e]);
            D[idx / 16][idx % 16] = op->c[e];
        }
    }
    for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 16; ++k) {
            const float a = A[i][k];
            for (int j = 0; j < 16; ++j) D[i][j] += a * B[k][j];
        }
    for (int l = 0; l < 32; ++l) {
        const auto* op = static_cast<WmmaMmaOp*>(lanes[l]);
        for (int e = 0; e < 8; ++e) {
            const int idx = e * 32 + l;
            op->d[e] = D[idx / 16][idx % 16];
        }
    }
}

}  // namespace icdit_emu

namespace nvcuda {
namespace wmma {

template <class Use, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __half, L>& f, const __half* p,
                             unsigned ldm) {
    static_assert(__is_same(L, row_major) || __is_same(L, col_major),
                  "matrix_a / matrix_b fragments name their layout");
    icdit_emu::wmma_mem("wmma::load_matrix_sync", f.x, 2, p, ldm, __is_same(L, col_major),
                        icdit_emu::complete_wmma_load<__half>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
    icdit_emu::wmma_mem("wmma::load_matrix_sync", f.x, 4, p, ldm, layout == mem_col_major,
                        icdit_emu::complete_wmma_load<float>);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
    icdit_emu::wmma_mem("wmma::store_matrix_sync", const_cast<float*>(f.x), 4, p, ldm,
                        layout == mem_col_major, icdit_emu::complete_wmma_store<float>);
}

template <class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __half, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, __half, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    icdit_emu::WmmaMmaOp op;
    op.name = "wmma::mma_sync";
    op.mask = 0xffffffffu;
    op.complete = icdit_emu::complete_wmma_mma;
    op.d = d.x;
    op.a = a.x;
    op.b = b.x;
    op.c = c.x;
    icdit_emu::warp_collective(&op);
}

}  // namespace wmma
}  // namespace nvcuda
