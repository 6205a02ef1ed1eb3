// Hopper's (sm_90a) asynchronous machinery, emulated from the PTX ISA's definitions: what
// kernels/sm90.cuh's wrappers call when the kernels are built as C++. Design and limits:
// docs/gpu-emulation.md, "Hopper primitives".
//
//   shared addresses   __cvta_generic_to_shared: dynamic shared memory starts at shared
//                      address kSharedBase (1152: 128-byte aligned, deliberately not 1024-byte
//                      aligned, so a kernel must align its swizzled buffers itself, as on a
//                      GPU where the start of dynamic shared memory is not promised either).
//   mbarrier           init / arrive / expect_tx / complete_tx / wait on a phase's parity,
//                      with the ISA's phase rule (try_wait.parity P succeeds once the phase of
//                      parity P has completed, i.e. while the current phase's parity is not P).
//                      A waiting thread is parked like one at a barrier; a wait that can never
//                      complete is a reported deadlock.
//   bulk tensor copy   cp.async.bulk.tensor.2d global → shared from a tensor map (ours: see
//                      TensorMapEmu), box rows × columns, out-of-bounds elements zero, 128-byte
//                      swizzle, completing on an mbarrier's transaction count. Even blocks
//                      land a copy as late as possible (when some thread waits on its
//                      mbarrier, in issue order, and only until the awaited phase completes:
//                      bytes the phase did not expect stay in flight), odd blocks at once: a consumer that reads before waiting sees
//                      stale data in one, a producer that overwrites a stage still being read
//                      shows in the other.
//   gathered copies    cp.async (16 bytes, non-bulk, zero fill) whose completion an mbarrier
//                      tracks (cp.async.mbarrier.arrive.noinc): the thread's copies since
//                      its last such arrive land together, then count as one arrival. Even
//                      blocks land them as late as the bulk copies, odd blocks at the arrive.
//   landing when stuck when no thread can run, the oldest copy not landed yet lands (on a GPU
//                      every copy completes eventually), so a wait issued before its copies
//                      is no deadlock.
//   wgmma              mma_async m64nNk16, f16 × f16 → f32, A and B K-major from shared
//                      memory matrix descriptors (no swizzle or 128-byte swizzle), the
//                      accumulator fragment layout of the ISA; a warpgroup collective. An
//                      operation is carried out at the wait_group that retires its commit
//                      group, reading shared memory then and writing the registers then: a
//                      kernel that reads its accumulators or reuses a stage before the wait
//                      gets wrong data.
//   elect.sync         one lane (the lowest) of a full warp returns true.
//   bar.sync id, 128   a named barrier over one warpgroup: a rendezvous of its 128 threads.
//   fence.proxy.async, wgmma.fence, setmaxnreg: ordering and register-file hints with no
//                      effect on a CPU (accepted, not modelled).
#pragma once

namespace icdit_emu {

// Shared address of the start of dynamic shared memory.
constexpr uint32_t kSharedBase = 1152;

// A tensor map as the emulation encodes it (src/gpu/emu.rs, Device::tensor_map_2d): the same
// 128 bytes, 64-byte aligned, that CUtensorMap is on a GPU, holding our own fields.
struct alignas(64) TensorMapEmu {
    uint64_t magic;         // kTensorMapMagic
    uint64_t global;        // address of element (0, 0)
    uint64_t dims[2];       // elements: dims[0] the contiguous (inner) one
    uint64_t stride;        // bytes between consecutive dims[1] indices
    uint32_t box[2];        // box elements, inner first
    uint32_t elem_bytes;
    uint32_t swizzle;       // CUtensorMapSwizzle: 0 none, 3 128-byte
    uint64_t unused[9];
};
static_assert(sizeof(TensorMapEmu) == 128, "a tensor map is 128 bytes");
constexpr uint64_t kTensorMapMagic = 0x414d54544944434full;  // "OCDITTMA"

// One thread's part in a warpgroup-collective operation (wgmma.*): every thread of the
// warpgroup passes one with the same name; the last to arrive completes them all.
struct GroupOp {
    const char* name;
    void (*complete)(GroupOp* const* threads, unsigned first_thread);
};
void group_collective(GroupOp* op);
// bar.sync over the calling thread's warpgroup (a named barrier of 128 threads): every thread
// waits until all 128 have arrived.
void warpgroup_barrier();

uint32_t shared_addr(const void* p);
void* shared_ptr(uint32_t addr, size_t bytes, const char* what);

void mbar_init(uint32_t addr, unsigned count);
void mbar_expect_tx(uint32_t addr, unsigned bytes);
void mbar_arrive(uint32_t addr);
void mbar_wait(uint32_t addr, unsigned parity);

void bulk_tensor_load_2d(uint32_t dst, const TensorMapEmu* map, int c0, int c1, uint32_t mbar);

// cp.async.cg 16 bytes from global `src` (16-byte aligned) to shared `dst`, zeros when
// !valid; it lands with the thread's next gather_arrive_noinc.
void gather_16(uint32_t dst, const void* src, bool valid);
// cp.async.mbarrier.arrive.noinc: once the calling thread's gathered copies have landed, one
// arrival on `mbar` (counted in its expected arrivals).
void gather_arrive_noinc(uint32_t mbar);

// Issues one m64nNk16 operation of the calling thread's warpgroup; `d` is this thread's N/2
// accumulators.
void wgmma_issue(float* d, int n, uint64_t desc_a, uint64_t desc_b, int scale_d);
void wgmma_commit();
void wgmma_wait(int pending);

}  // namespace icdit_emu

inline uint32_t __cvta_generic_to_shared(const void* p) { return icdit_emu::shared_addr(p); }
#define __grid_constant__
