// The emulator's runtime: CUDA threads as fibers, one block at a time per OS thread, blocks
// spread over a few OS threads; barriers, warp collectives, deadlock and divergence reports.
// Entry point for Rust: icdit_emu_launch (src/gpu/emu.rs). Design: docs/gpu-emulation.md.

#include "emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread dim3 blockDim;
__thread dim3 gridDim;

// ---- context switch -----------------------------------------------------------------------
// x86-64: a 20-instruction switch of the callee-saved registers and stack pointer. A lane
// arriving at a warp collective and switching away costs about 40 ns with it, 150 ns with
// glibc's swapcontext (which also saves the signal mask with a system call); the 512×1152×1152
// GEMM takes 0.7–1.6 s against 4.5–5.5 s. Elsewhere, or with ICDIT_EMU_UCONTEXT defined,
// ucontext.

extern "C" void icdit_fiber_main();

#if defined(__x86_64__) && !defined(ICDIT_EMU_UCONTEXT)
#define ICDIT_EMU_ASM_SWITCH 1
extern "C" void icdit_fiber_switch(void** save_sp, void* to_sp);
extern "C" void icdit_fiber_start();
// Saves rbp, rbx, r12–r15, MXCSR and the x87 control word on the old stack, stores the stack
// pointer in *save_sp, loads to_sp and restores the same from there. A new fiber's stack is
// prepared (fiber_init) so that the first switch "returns" into icdit_fiber_start.
asm(R"(
    .pushsection .text
    .globl icdit_fiber_switch
    .hidden icdit_fiber_switch
    .type icdit_fiber_switch, @function
icdit_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size icdit_fiber_switch, .-icdit_fiber_switch

    .globl icdit_fiber_start
    .hidden icdit_fiber_start
    .type icdit_fiber_start, @function
icdit_fiber_start:
    call icdit_fiber_main
    ud2
    .size icdit_fiber_start, .-icdit_fiber_start
    .popsection
)");
struct Ctx {
    void* sp;
};
#else
#include <ucontext.h>
struct Ctx {
    ucontext_t uc;
};
#endif

namespace icdit_emu {
namespace {

// Each fiber's stack: 64 KiB (kernels keep fragments and a few scalars; the C library's
// printf needs a few KiB) above a PROT_NONE guard page, so an overflow faults instead of
// corrupting a neighbour. Stacks are pooled across launches.
constexpr size_t kStackBytes = 64 * 1024;
std::mutex g_pool_mu;
std::vector<char*> g_pool;

size_t page_bytes() {
    static const size_t p = size_t(sysconf(_SC_PAGESIZE));
    return p;
}

char* stack_acquire() {
    {
        std::lock_guard<std::mutex> lock(g_pool_mu);
        if (!g_pool.empty()) {
            char* s = g_pool.back();
            g_pool.pop_back();
            return s;
        }
    }
    const size_t guard = page_bytes();
    void* p = mmap(nullptr, kStackBytes + guard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    if (mprotect(p, guard, PROT_NONE) != 0) {
        munmap(p, kStackBytes + guard);
        return nullptr;
    }
    return static_cast<char*>(p) + guard;
}

void stack_release(std::vector<char*>& stacks) {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    for (char* s : stacks) g_pool.push_back(s);
    stacks.clear();
}

enum State : uint8_t { READY, RUNNING, AT_BARRIER, IN_WARP_OP, IN_GROUP_OP, AT_MBARRIER, DONE };

struct Fiber {
    Ctx ctx;
    char* stack;
    uint3 tid;
    unsigned linear;
    State state;
    uint32_t wait_mbar;  // AT_MBARRIER: the mbarrier's shared address
};

// Lanes of one warp waiting in one collective (disjoint masks may wait side by side).
struct Pending {
    uint32_t mask, arrived;
    const char* name;
    WarpOp* lanes[32];
};

struct Warp {
    uint32_t present;  // lanes that exist (a last partial warp has fewer)
    uint32_t ready;    // lanes that can run
    uint32_t exited;
    int npending;
    Pending pending[32];
};

// An mbarrier (sm90.h): the arrivals a phase expects, those still missing, the transaction
// bytes still expected (may go negative: a copy may land before its expect_tx), the phase.
struct Mbarrier {
    uint32_t addr;
    int expected, pending;
    int64_t tx;
    unsigned phase;
};

// A bulk tensor copy issued and not landed yet, with the tensor map as it was passed.
struct TensorCopy {
    uint32_t dst, mbar;
    TensorMapEmu map;
    int c0, c1;
};

// A thread's gathered 16-byte copies (cp.async tracked by an mbarrier): issued ones wait in
// the thread's list; its arrive turns them into a batch that lands, then arrives, at once in
// odd blocks and as late as possible in even ones.
struct Chunk {
    uint32_t dst;
    unsigned char bytes[16];
};
struct GatherBatch {
    uint32_t mbar;
    std::vector<Chunk> chunks;
};

// One warpgroup (4 consecutive warps, first warp index divisible by 4): threads meeting in a
// warpgroup-collective instruction, and wgmma operations issued but not carried out yet —
// the open group (since the last commit) and the committed groups, oldest first.
struct WgmmaOp {
    uint64_t desc_a, desc_b;
    int n, scale_d;
    float* d[128];
};
struct Warpgroup {
    const char* name = nullptr;
    unsigned arrived = 0;
    GroupOp* ops[128] = {};
    std::vector<WgmmaOp> open;
    std::vector<std::vector<WgmmaOp>> committed;
};

// One OS thread's emulation state: the block it runs now.
struct Worker {
    void (*entry)(void* const*);
    void* const* args;
    unsigned nthreads;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<char*> stacks;
    unsigned cur_warp = 0;  // the warp the scheduler keeps running while it can
    unsigned live = 0, at_barrier = 0, exited = 0;
    bool reverse = false;
    bool failed = false;
    std::string error;
    Ctx sched;
    unsigned char* dyn = nullptr;  // dynamic shared memory, at shared address kSharedBase
    unsigned char* window = nullptr;  // shared address 0 (the allocation)
    size_t dyn_bytes = 0;
    // Hopper's asynchronous machinery (sm90.h): mbarriers, bulk tensor copies not landed yet,
    // and per warpgroup the rendezvous and the wgmma operations not carried out yet.
    std::vector<Mbarrier> mbars;
    std::vector<TensorCopy> copies;
    std::vector<std::vector<Chunk>> gathering;  // per thread: issued, not arrived on yet
    std::vector<GatherBatch> gathers;           // arrived on, not landed yet
    std::vector<Warpgroup> groups;
};

__thread Worker* g_worker;
__thread Fiber* g_cur;

void push_ready(Worker& w, unsigned i) {
    w.fibers[i].state = READY;
    w.warps[i / 32].ready |= 1u << (i % 32);
}

// Scheduling order: the warp that ran last keeps running while any of its lanes can (lanes
// in index order), then the next warp with a runnable lane. One warp thus runs as far ahead
// of the others as the barriers allow, which is what exposes a missing __syncthreads in
// either direction (a warp reading what others have not written yet, or overwriting what
// they have not read yet). Odd blocks go in reverse order (last warp, last lane first).
Fiber* pop_ready(Worker& w) {
    const unsigned nwarps = unsigned(w.warps.size());
    for (unsigned k = 0; k < nwarps; ++k) {
        const unsigned wi = w.reverse ? (w.cur_warp + nwarps - k) % nwarps : (w.cur_warp + k) % nwarps;
        uint32_t& r = w.warps[wi].ready;
        if (!r) continue;
        const unsigned lane = w.reverse ? 31 - unsigned(__builtin_clz(r)) : unsigned(__builtin_ctz(r));
        r &= ~(1u << lane);
        w.cur_warp = wi;
        return &w.fibers[wi * 32 + lane];
    }
    return nullptr;
}

inline void switch_ctx(Ctx* from, Ctx* to) {
#ifdef ICDIT_EMU_ASM_SWITCH
    icdit_fiber_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

void fiber_init(Fiber& f) {
#ifdef ICDIT_EMU_ASM_SWITCH
    // Stack, from the top: the address the first switch returns to (icdit_fiber_start, at a
    // 16-byte boundary so the call it makes sees the ABI's alignment), rbp, rbx, r12–r15
    // (zero) and the control/status words of the thread creating it.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes - 16) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = reinterpret_cast<uint64_t>(&icdit_fiber_start);
    for (int r = 0; r < 6; ++r) *--sp = 0;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, icdit_fiber_main, 0);
#endif
}

// Runs `to` in place of `from`; returns when something switches back to `from`.
inline void run(Fiber* from, Fiber* to) {
    g_cur = to;
    to->state = RUNNING;
    threadIdx = to->tid;
    switch_ctx(&from->ctx, &to->ctx);
}

inline void to_scheduler(Fiber* from) {
    g_cur = nullptr;
    switch_ctx(&from->ctx, &g_worker->sched);
}

// The fiber running now cannot go on: run the next runnable one, or give control back to the
// scheduler, which then finds the block finished or stuck.
bool land_oldest(Worker& w);

void park(Fiber* self) {
    Worker& w = *g_worker;
    Fiber* next = pop_ready(w);
    while (!next && land_oldest(w)) next = pop_ready(w);
    if (next)
        run(self, next);
    else
        to_scheduler(self);
}

std::string where(const Worker& w, const Fiber* f) {
    char buf[96];
    if (f)
        snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u): ", blockIdx.x, blockIdx.y,
                 blockIdx.z, f->tid.x, f->tid.y, f->tid.z);
    else
        snprintf(buf, sizeof buf, "block (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
    (void)w;
    return buf;
}

[[noreturn]] void thread_exit() {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    Warp& warp = w.warps[f->linear / 32];
    const uint32_t bit = 1u << (f->linear % 32);
    f->state = DONE;
    --w.live;
    ++w.exited;
    warp.exited |= bit;
    for (int p = 0; p < warp.npending; ++p)
        if (warp.pending[p].mask & bit)
            fail("returned while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)",
                 warp.pending[p].arrived, warp.pending[p].name, warp.pending[p].mask);
    if (w.at_barrier > 0)
        fail("returned while %u thread(s) of the block wait at __syncthreads(): a barrier "
             "must be reached by every thread of the block",
             w.at_barrier);
    if (!w.groups.empty()) {
        const Warpgroup& g = w.groups[f->linear / 128];
        if (g.arrived)
            fail("returned while %u thread(s) of its warpgroup wait for it in %s", g.arrived, g.name);
    }
    park(f);
    __builtin_unreachable();
}

std::string describe_stuck(const Worker& w) {
    std::string s = "deadlock: " + std::to_string(w.at_barrier) +
                    " thread(s) wait at __syncthreads(), " + std::to_string(w.exited) +
                    " returned";
    for (size_t i = 0; i < w.warps.size(); ++i)
        for (int p = 0; p < w.warps[i].npending; ++p) {
            const Pending& pd = w.warps[i].pending[p];
            char buf[160];
            snprintf(buf, sizeof buf, "; warp %zu: lanes 0x%08x wait in %s for mask 0x%08x", i,
                     pd.arrived, pd.name, pd.mask);
            s += buf;
        }
    unsigned at_mbar = 0, in_group = 0;
    for (const Fiber& f : w.fibers) {
        at_mbar += f.state == AT_MBARRIER;
        in_group += f.state == IN_GROUP_OP;
    }
    if (at_mbar) s += "; " + std::to_string(at_mbar) + " thread(s) wait on an mbarrier phase that never completes";
    for (size_t g = 0; g < w.groups.size(); ++g)
        if (w.groups[g].arrived)
            s += "; warpgroup " + std::to_string(g) + ": " + std::to_string(w.groups[g].arrived) +
                 " of 128 threads wait in " + w.groups[g].name;
    (void)in_group;
    return s;
}

bool run_block(Worker& w, uint64_t linear_block) {
    const uint64_t gx = gridDim.x, gy = gridDim.y;
    blockIdx = uint3{unsigned(linear_block % gx), unsigned((linear_block / gx) % gy),
                     unsigned(linear_block / (gx * gy))};
    w.reverse = linear_block & 1;
    w.cur_warp = w.reverse ? unsigned(w.warps.size()) - 1 : 0;
    for (size_t i = 0; i < w.warps.size(); ++i) {
        const unsigned lanes = std::min(32u, w.nthreads - unsigned(i) * 32);
        w.warps[i].present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
        w.warps[i].ready = 0;
        w.warps[i].exited = 0;
        w.warps[i].npending = 0;
    }
    for (unsigned i = 0; i < w.nthreads; ++i) {
        fiber_init(w.fibers[i]);
        push_ready(w, i);
    }
    w.live = w.nthreads;
    w.at_barrier = w.exited = 0;
    w.failed = false;
    if (w.dyn_bytes) std::memset(w.dyn, 0xff, w.dyn_bytes);
    w.mbars.clear();
    w.copies.clear();
    w.gathering.assign(w.nthreads, {});
    w.gathers.clear();
    w.groups.assign(w.nthreads / 128, Warpgroup{});

    Fiber* first = pop_ready(w);
    g_cur = first;
    first->state = RUNNING;
    threadIdx = first->tid;
    switch_ctx(&w.sched, &first->ctx);
    g_cur = nullptr;
    if (w.failed) return false;
    if (w.live > 0) {
        w.error = where(w, nullptr) + describe_stuck(w);
        return false;
    }
    // Asynchronous work the block started and never waited for is a bug on a GPU too.
    if (!w.copies.empty()) {
        w.error = where(w, nullptr) + std::to_string(w.copies.size()) +
                  " bulk tensor copy(ies) issued and never waited for on their mbarrier";
        return false;
    }
    for (unsigned i = 0; i < w.nthreads; ++i)
        if (!w.gathering[i].empty()) {
            w.error = where(w, nullptr) + "thread " + std::to_string(i) + " issued " +
                      std::to_string(w.gathering[i].size()) +
                      " cp.async copy(ies) and no cp.async.mbarrier.arrive to complete them";
            return false;
        }
    if (!w.gathers.empty()) {
        w.error = where(w, nullptr) + std::to_string(w.gathers.size()) +
                  " cp.async.mbarrier.arrive(s) whose copies no thread waited for";
        return false;
    }
    for (size_t g = 0; g < w.groups.size(); ++g)
        if (!w.groups[g].open.empty() || !w.groups[g].committed.empty()) {
            w.error = where(w, nullptr) + "warpgroup " + std::to_string(g) +
                      " returned with wgmma operations not retired by wgmma.wait_group";
            return false;
        }
    return true;
}

}  // namespace

// ---- the interface emu.h declares -----------------------------------------------------------

void fail(const char* fmt, ...) {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!w.failed) {
        w.failed = true;
        w.error = where(w, f) + msg;
    }
    f->state = DONE;
    to_scheduler(f);
    __builtin_unreachable();
}

void syncthreads() {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    if (w.exited > 0)
        fail("__syncthreads() after %u thread(s) of the block returned: a barrier must be "
             "reached by every thread of the block",
             w.exited);
    if (++w.at_barrier == w.live) {
        // Last to arrive: release the others and go on.
        for (unsigned i = 0; i < w.nthreads; ++i)
            if (w.fibers[i].state == AT_BARRIER) push_ready(w, i);
        w.at_barrier = 0;
        return;
    }
    f->state = AT_BARRIER;
    park(f);
}

unsigned lane_id() { return g_cur->linear % 32; }

void* dynamic_shared() { return g_worker->dyn; }

void warp_collective(WarpOp* op) {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    const unsigned lane = f->linear % 32;
    const uint32_t bit = 1u << lane;
    Warp& warp = w.warps[f->linear / 32];
    if (!(op->mask & bit))
        fail("%s: mask 0x%08x does not include the calling lane %u", op->name, op->mask, lane);
    if (op->mask & ~warp.present)
        fail("%s: mask 0x%08x names lanes that do not exist (the block has %u threads)",
             op->name, op->mask, w.nthreads);
    if (op->mask & warp.exited)
        fail("%s: mask 0x%08x names lanes 0x%08x that already returned", op->name, op->mask,
             op->mask & warp.exited);
    Pending* p = nullptr;
    for (int i = 0; i < warp.npending; ++i) {
        Pending& q = warp.pending[i];
        if (!(q.mask & op->mask)) continue;
        if (q.mask != op->mask || (q.name != op->name && std::strcmp(q.name, op->name) != 0))
            fail("lane %u calls %s with mask 0x%08x while lanes 0x%08x of its warp wait in %s "
                 "with mask 0x%08x",
                 lane, op->name, op->mask, q.arrived, q.name, q.mask);
        p = &q;
        break;
    }
    if (!p) {
        p = &warp.pending[warp.npending++];
        p->mask = op->mask;
        p->arrived = 0;
        p->name = op->name;
        for (auto& l : p->lanes) l = nullptr;
    }
    p->lanes[lane] = op;
    p->arrived |= bit;
    if (p->arrived != p->mask) {
        f->state = IN_WARP_OP;
        park(f);
        return;  // the last lane has completed the operation for us
    }
    // Last to arrive: take the group off the warp's list, complete it, wake the others.
    WarpOp* lanes[32];
    std::memcpy(lanes, p->lanes, sizeof lanes);
    const uint32_t mask = p->mask;
    *p = warp.pending[--warp.npending];
    op->complete(lanes);
    const unsigned base = f->linear - lane;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1) && l != lane) push_ready(w, base + l);
}


// ---- Hopper: shared addresses, mbarriers, bulk tensor copies, wgmma (sm90.h) ---------------

namespace {

size_t window_bytes(const Worker& w) { return kSharedBase + w.dyn_bytes; }

Mbarrier* find_mbar(Worker& w, uint32_t addr, const char* what) {
    for (auto& m : w.mbars)
        if (m.addr == addr) return &m;
    fail("%s: no mbarrier was initialised at shared address %u", what, addr);
}

// Completes the current phase if nothing more is expected, waking its waiters.
void mbar_settle(Worker& w, Mbarrier& m) {
    if (m.pending > 0 || m.tx != 0) return;
    m.phase ^= 1;
    m.pending = m.expected;
    for (unsigned i = 0; i < w.nthreads; ++i)
        if (w.fibers[i].state == AT_MBARRIER && w.fibers[i].wait_mbar == m.addr) push_ready(w, i);
}

// The shared address of box element (row, col) of a copy into dst: row-major rows of
// box[0] elements, the 16-byte chunk index XORed with the row index mod 8 under the 128-byte
// swizzle (the pattern is a function of address bits 4–6 and 7–9, hence the 1024-byte
// alignment the ISA requires of such a destination).
uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

void land(Worker& w, const TensorCopy& c) {
    const TensorMapEmu& m = c.map;
    const uint32_t eb = m.elem_bytes, row_bytes = m.box[0] * eb;
    const uint32_t bytes = row_bytes * m.box[1];
    auto* g = reinterpret_cast<const unsigned char*>(m.global);
    for (uint32_t r = 0; r < m.box[1]; ++r) {
        const int64_t gr = int64_t(c.c1) + r;
        for (uint32_t col = 0; col < m.box[0]; ++col) {
            const int64_t gc = int64_t(c.c0) + col;
            uint32_t at = c.dst + r * row_bytes + col * eb;
            if (m.swizzle == 3) at = swizzle128(at);
            unsigned char* dst = w.window + at;
            if (gr >= 0 && gc >= 0 && uint64_t(gr) < m.dims[1] && uint64_t(gc) < m.dims[0])
                std::memcpy(dst, g + uint64_t(gr) * m.stride + uint64_t(gc) * eb, eb);
            else
                std::memset(dst, 0, eb);
        }
    }
    Mbarrier* mb = find_mbar(w, c.mbar, "cp.async.bulk.tensor (landing)");
    mb->tx -= bytes;
    mbar_settle(w, *mb);
}

// Lands the copies not landed yet that complete on `mbar`, in issue order, until the phase of
// parity `parity` has completed: as late as possible, so a copy the waiter does not need (one
// whose bytes the phase did not expect) stays in flight, and a kernel that reads it stale
// shows.
void land_gathers(Worker& w, const GatherBatch& b) {
    for (const Chunk& c : b.chunks) std::memcpy(w.window + c.dst, c.bytes, 16);
    Mbarrier* m = find_mbar(w, b.mbar, "cp.async.mbarrier.arrive (landing)");
    if (m->pending <= 0)
        fail("cp.async.mbarrier.arrive.noinc at %u: more arrivals than the %d its phase expects",
             b.mbar, m->expected);
    --m->pending;
    mbar_settle(w, *m);
}

void land_for(Worker& w, uint32_t mbar, unsigned parity) {
    auto done = [&] { return (find_mbar(w, mbar, "mbarrier.try_wait.parity")->phase & 1) != (parity & 1); };
    for (size_t i = 0; i < w.copies.size();) {
        if (done()) return;
        if (w.copies[i].mbar == mbar) {
            const TensorCopy c = w.copies[i];
            w.copies.erase(w.copies.begin() + long(i));
            land(w, c);
        } else {
            ++i;
        }
    }
    for (size_t i = 0; i < w.gathers.size();) {
        if (done()) return;
        if (w.gathers[i].mbar == mbar) {
            const GatherBatch b = std::move(w.gathers[i]);
            w.gathers.erase(w.gathers.begin() + long(i));
            land_gathers(w, b);
        } else {
            ++i;
        }
    }
}

// No thread can run: the oldest bulk copy, else the oldest gathered batch, lands (false: none).
bool land_oldest(Worker& w) {
    if (!w.copies.empty()) {
        const TensorCopy c = w.copies.front();
        w.copies.erase(w.copies.begin());
        land(w, c);
        return true;
    }
    if (!w.gathers.empty()) {
        const GatherBatch b = std::move(w.gathers.front());
        w.gathers.erase(w.gathers.begin());
        land_gathers(w, b);
        return true;
    }
    return false;
}

Warpgroup& my_group(Worker& w, const char* what) {
    if (w.nthreads % 128)
        fail("%s: a warpgroup needs 4 full warps, and the block has %u threads", what, w.nthreads);
    return w.groups[g_cur->linear / 128];
}

// Element (row, k) of a K-major operand described by `desc` (PTX ISA, "Matrix Descriptor
// Format" and "Shared Memory Matrix Layout"), as f32.
float operand(const Worker& w, uint64_t desc, unsigned row, unsigned k) {
    const uint32_t start = uint32_t(desc & 0x3fff) << 4;
    const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
    const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
    const unsigned mode = unsigned(desc >> 62);
    uint32_t at;
    if (mode == 1) {
        // 128-byte swizzle: 8-row atoms of 128-byte rows, SBO between atoms along M/N, the
        // k16 slice inside one 128-byte row; LBO unused.
        at = swizzle128(start + (row / 8) * sbo + (row % 8) * 128 + k * 2);
    } else {
        // No swizzle: 8 × 16-byte core matrices, LBO between neighbours along K, SBO along M/N.
        at = start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
    }
    if (size_t(at) + 2 > window_bytes(w) || at < kSharedBase)
        fail("wgmma: descriptor 0x%016llx reads shared address %u, outside dynamic shared memory "
             "[%u, %zu)",
             (unsigned long long)desc, at, kSharedBase, window_bytes(w));
    half h;
    std::memcpy(&h, w.window + at, 2);
    return __half2float(h);
}

void check_desc(uint64_t desc) {
    const unsigned mode = unsigned(desc >> 62);
    if (mode != 0 && mode != 1)
        fail("wgmma: descriptor 0x%016llx has swizzle mode %u; the emulation models none (0) and "
             "128-byte (1)",
             (unsigned long long)desc, mode);
    if ((desc >> 49) & 7)
        fail("wgmma: descriptor 0x%016llx has a matrix base offset; the emulation models 0",
             (unsigned long long)desc);
}

// D (64 × n) = A (64 × 16) · B (16 × n) (+ D), into the 128 threads' fragments: thread t of
// the warpgroup (warp t/32, lane l = t%32) holds, for j = 0 .. n/8−1, d[4j + i] =
// D[16·(t/32) + l/4 + 8·(i/2)][8j + 2·(l%4) + i%2].
void wgmma_execute(const Worker& w, const WgmmaOp& op) {
    float a[64][16];
    for (unsigned r = 0; r < 64; ++r)
        for (unsigned k = 0; k < 16; ++k) a[r][k] = operand(w, op.desc_a, r, k);
    std::vector<float> b(size_t(op.n) * 16);
    for (int c = 0; c < op.n; ++c)
        for (unsigned k = 0; k < 16; ++k) b[size_t(c) * 16 + k] = operand(w, op.desc_b, c, k);
    for (unsigned t = 0; t < 128; ++t) {
        const unsigned warp = t / 32, lane = t % 32;
        for (int j = 0; j < op.n / 8; ++j)
            for (unsigned i = 0; i < 4; ++i) {
                const unsigned row = 16 * warp + lane / 4 + 8 * (i / 2);
                const unsigned col = 8 * unsigned(j) + 2 * (lane % 4) + i % 2;
                float acc = 0.f;
                for (unsigned k = 0; k < 16; ++k) acc += a[row][k] * b[size_t(col) * 16 + k];
                float& d = op.d[t][4 * j + i];
                d = op.scale_d ? d + acc : acc;
            }
    }
}

struct WgmmaIssue : GroupOp {
    float* d;
    int n, scale_d;
    uint64_t desc_a, desc_b;
};
struct WgmmaWait : GroupOp {
    int pending;
};

void complete_issue(GroupOp* const* threads, unsigned first) {
    Worker& w = *g_worker;
    auto* t0 = static_cast<WgmmaIssue*>(threads[0]);
    WgmmaOp op;
    op.desc_a = t0->desc_a;
    op.desc_b = t0->desc_b;
    op.n = t0->n;
    op.scale_d = t0->scale_d;
    for (unsigned t = 0; t < 128; ++t) {
        auto* x = static_cast<WgmmaIssue*>(threads[t]);
        if (x->desc_a != op.desc_a || x->desc_b != op.desc_b || x->n != op.n ||
            x->scale_d != op.scale_d)
            fail("wgmma.mma_async: thread %u of the warpgroup passes other operands than thread "
                 "%u (descriptors, n or scale-d must be the same in every thread)",
                 first + t, first);
        op.d[t] = x->d;
    }
    check_desc(op.desc_a);
    check_desc(op.desc_b);
    w.groups[first / 128].open.push_back(op);
}

void complete_commit(GroupOp* const*, unsigned first) {
    Warpgroup& g = g_worker->groups[first / 128];
    g.committed.push_back(std::move(g.open));
    g.open.clear();
}

void complete_wait(GroupOp* const* threads, unsigned first) {
    Worker& w = *g_worker;
    Warpgroup& g = w.groups[first / 128];
    const int keep = static_cast<WgmmaWait*>(threads[0])->pending;
    while (int(g.committed.size()) > keep) {
        for (const WgmmaOp& op : g.committed.front()) wgmma_execute(w, op);
        g.committed.erase(g.committed.begin());
    }
}

}  // namespace

void group_collective(GroupOp* op) {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    Warpgroup& g = my_group(w, op->name);
    const unsigned first = f->linear / 128 * 128;
    for (unsigned i = first; i < first + 128; ++i)
        if (w.fibers[i].state == DONE)
            fail("%s: thread %u of the warpgroup has returned; a warpgroup instruction needs all "
                 "128 threads",
                 op->name, i);
    if (g.arrived && g.name != op->name && std::strcmp(g.name, op->name) != 0)
        fail("%s while %u thread(s) of the warpgroup wait in %s", op->name, g.arrived, g.name);
    g.name = op->name;
    g.ops[f->linear - first] = op;
    if (++g.arrived < 128) {
        f->state = IN_GROUP_OP;
        park(f);
        return;  // completed by the last thread
    }
    GroupOp* ops[128];
    std::memcpy(ops, g.ops, sizeof ops);
    g.arrived = 0;
    g.name = nullptr;
    op->complete(ops, first);
    for (unsigned i = first; i < first + 128; ++i)
        if (i != f->linear) push_ready(w, i);
}

uint32_t shared_addr(const void* p) {
    const Worker& w = *g_worker;
    const auto* b = static_cast<const unsigned char*>(p);
    if (!w.dyn || b < w.dyn || b >= w.dyn + w.dyn_bytes)
        fail("__cvta_generic_to_shared: %p is not in this block's dynamic shared memory", p);
    return uint32_t(b - w.window);
}

void* shared_ptr(uint32_t addr, size_t bytes, const char* what) {
    const Worker& w = *g_worker;
    if (addr < kSharedBase || size_t(addr) + bytes > window_bytes(w))
        fail("%s: shared address %u (+%zu bytes) is outside dynamic shared memory [%u, %zu)", what,
             addr, bytes, kSharedBase, window_bytes(w));
    return w.window + addr;
}

void warpgroup_barrier() {
    GroupOp op{"bar.sync (warpgroup)", [](GroupOp* const*, unsigned) {}};
    group_collective(&op);
}

void mbar_init(uint32_t addr, unsigned count) {
    Worker& w = *g_worker;
    shared_ptr(addr, 8, "mbarrier.init");
    if (addr % 8) fail("mbarrier.init: shared address %u is not 8-byte aligned", addr);
    if (count == 0 || count >= (1u << 20))
        fail("mbarrier.init: count %u outside [1, 2^20)", count);
    for (auto& m : w.mbars)
        if (m.addr == addr) {
            m = Mbarrier{addr, int(count), int(count), 0, 0};
            return;
        }
    w.mbars.push_back(Mbarrier{addr, int(count), int(count), 0, 0});
}

void mbar_expect_tx(uint32_t addr, unsigned bytes) {
    Worker& w = *g_worker;
    find_mbar(w, addr, "mbarrier.expect_tx")->tx += bytes;
}

void mbar_arrive(uint32_t addr) {
    Worker& w = *g_worker;
    Mbarrier* m = find_mbar(w, addr, "mbarrier.arrive");
    if (m->pending <= 0)
        fail("mbarrier.arrive at %u: more arrivals than the %d its phase expects", addr,
             m->expected);
    --m->pending;
    mbar_settle(w, *m);
}

void mbar_wait(uint32_t addr, unsigned parity) {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    land_for(w, addr, parity);
    for (;;) {
        const Mbarrier* m = find_mbar(w, addr, "mbarrier.try_wait.parity");
        if ((m->phase & 1) != (parity & 1)) return;
        f->state = AT_MBARRIER;
        f->wait_mbar = addr;
        park(f);
    }
}

void bulk_tensor_load_2d(uint32_t dst, const TensorMapEmu* map, int c0, int c1, uint32_t mbar) {
    Worker& w = *g_worker;
    const char* what = "cp.async.bulk.tensor.2d";
    if (map->magic != kTensorMapMagic)
        fail("%s: the tensor map was not made by Device::tensor_map_2d", what);
    if (map->swizzle != 0 && map->swizzle != 3)
        fail("%s: swizzle %u is not emulated (none or 128-byte)", what, map->swizzle);
    const size_t bytes = size_t(map->box[0]) * map->box[1] * map->elem_bytes;
    shared_ptr(dst, bytes, what);
    const uint32_t align = map->swizzle == 3 ? 1024 : 128;
    if (dst % align)
        fail("%s: destination shared address %u is not %u-byte aligned", what, dst, align);
    find_mbar(w, mbar, what);
    TensorCopy c{dst, mbar, *map, c0, c1};
    if (w.reverse)
        land(w, c);
    else
        w.copies.push_back(c);
}

void gather_16(uint32_t dst, const void* src, bool valid) {
    Worker& w = *g_worker;
    const char* what = "cp.async (gathered)";
    shared_ptr(dst, 16, what);
    if (dst % 16 || (valid && reinterpret_cast<uintptr_t>(src) % 16))
        fail("%s: shared address %u <- %p is not 16-byte aligned", what, dst, src);
    Chunk c;
    c.dst = dst;
    if (valid)
        std::memcpy(c.bytes, src, 16);
    else
        std::memset(c.bytes, 0, 16);
    w.gathering[g_cur->linear].push_back(c);
}

void gather_arrive_noinc(uint32_t mbar) {
    Worker& w = *g_worker;
    find_mbar(w, mbar, "cp.async.mbarrier.arrive.noinc");
    GatherBatch b{mbar, std::move(w.gathering[g_cur->linear])};
    w.gathering[g_cur->linear].clear();
    if (w.reverse)
        land_gathers(w, b);
    else
        w.gathers.push_back(std::move(b));
}

void wgmma_issue(float* d, int n, uint64_t desc_a, uint64_t desc_b, int scale_d) {
    if (n < 8 || n > 256 || n % 8) fail("wgmma.mma_async: n = %d is not a multiple of 8 in [8, 256]", n);
    WgmmaIssue op;
    op.name = "wgmma.mma_async";
    op.complete = complete_issue;
    op.d = d;
    op.n = n;
    op.scale_d = scale_d;
    op.desc_a = desc_a;
    op.desc_b = desc_b;
    group_collective(&op);
}

void wgmma_commit() {
    GroupOp op{"wgmma.commit_group", complete_commit};
    group_collective(&op);
}

void wgmma_wait(int pending) {
    WgmmaWait op;
    op.name = "wgmma.wait_group";
    op.complete = complete_wait;
    op.pending = pending;
    group_collective(&op);
}

}  // namespace icdit_emu

extern "C" void icdit_fiber_main() {
    using namespace icdit_emu;
    g_worker->entry(g_worker->args);
    thread_exit();
}

// ---- launch -------------------------------------------------------------------------------

namespace {

struct Launch {
    void (*entry)(void* const*);
    void* const* args;
    uint64_t nblocks;
    unsigned nthreads;
    size_t dyn_bytes;
    dim3 grid, block;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string error;

    void report(const std::string& e) {
        std::lock_guard<std::mutex> lock(mu);
        if (error.empty()) error = e;
        failed = true;
    }
};

void run_worker(Launch& L) {
    using namespace icdit_emu;
    Worker w;
    w.entry = L.entry;
    w.args = L.args;
    w.nthreads = L.nthreads;
    w.fibers.resize(L.nthreads);
    w.warps.resize((L.nthreads + 31) / 32);
    for (unsigned i = 0; i < L.nthreads; ++i) {
        char* s = stack_acquire();
        if (!s) {
            stack_release(w.stacks);
            L.report("cannot map fiber stacks for " + std::to_string(L.nthreads) + " threads");
            return;
        }
        w.stacks.push_back(s);
        Fiber& f = w.fibers[i];
        f.stack = s;
        f.linear = i;
        f.tid = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    }
    if (L.dyn_bytes) {
        // The shared window: dynamic shared memory at kSharedBase, and a host address with the
        // same residue mod 4096 as its shared address, so that aligning either aligns both.
        w.dyn_bytes = L.dyn_bytes;
        const size_t total = (kSharedBase + L.dyn_bytes + 4095) & ~size_t(4095);
        w.window = static_cast<unsigned char*>(std::aligned_alloc(4096, total));
        w.dyn = w.window + kSharedBase;
    }
    gridDim = L.grid;
    blockDim = L.block;
    g_worker = &w;
    for (;;) {
        if (L.failed.load(std::memory_order_relaxed)) break;
        const uint64_t b = L.next.fetch_add(1, std::memory_order_relaxed);
        if (b >= L.nblocks) break;
        if (!run_block(w, b)) {
            L.report(w.error);
            break;
        }
    }
    g_worker = nullptr;
    std::free(w.window);
    stack_release(w.stacks);
}

int fail_launch(char* err, size_t cap, const std::string& msg) {
    if (cap) snprintf(err, cap, "%s", msg.c_str());
    return 1;
}

}  // namespace

// Runs `entry(args)` as every thread of every block of a grid. Returns 0, or 1 with a message
// in err (the first error of any block; the other blocks stop soon after).
extern "C" int icdit_emu_launch(void (*entry)(void* const*), void* const* args,
                                const uint32_t grid[3], const uint32_t block[3],
                                uint32_t dyn_smem_bytes, uint32_t workers, char* err,
                                size_t err_cap) {
    const uint64_t nthreads = uint64_t(block[0]) * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64)
        return fail_launch(err, err_cap,
                           "invalid block (" + std::to_string(block[0]) + "," +
                               std::to_string(block[1]) + "," + std::to_string(block[2]) +
                               "): at most 1024 threads, z ≤ 64");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu ||
        grid[1] > 65535 || grid[2] > 65535)
        return fail_launch(err, err_cap,
                           "invalid grid (" + std::to_string(grid[0]) + "," +
                               std::to_string(grid[1]) + "," + std::to_string(grid[2]) + ")");
    Launch L;
    L.entry = entry;
    L.args = args;
    L.nblocks = uint64_t(grid[0]) * grid[1] * grid[2];
    L.nthreads = unsigned(nthreads);
    L.dyn_bytes = dyn_smem_bytes;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    const uint64_t n = std::max<uint64_t>(1, std::min<uint64_t>(workers, L.nblocks));
    std::vector<std::thread> helpers;
    for (uint64_t i = 1; i < n; ++i) helpers.emplace_back([&L] { run_worker(L); });
    run_worker(L);
    for (auto& t : helpers) t.join();
    if (!L.error.empty()) return fail_launch(err, err_cap, L.error);
    return 0;
}
