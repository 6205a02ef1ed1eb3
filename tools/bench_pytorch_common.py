"""The measuring machinery of the PyTorch GPU baselines (tools/bench_pytorch_gpu.py for DiT,
tools/bench_pytorch_pixart_gpu.py for PixArt-α): timing with CUDA events, the records every
measurement writes (same JSON fields in both), the run's time budget, the torch.compile variant in
a child process that can be stopped when its compile or the budget runs out, and the result file.
The models, their inputs, MAC counts and tables stay in each baseline.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch


# ---- options ------------------------------------------------------------------------------------

def add_timing_args(ap):
    """The run's budget and how many untimed and timed calls each measurement makes."""
    ap.add_argument("--budget", type=float, default=0.0, help="seconds for the whole run (0: no limit)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed forwards")
    ap.add_argument("--runs", type=int, default=20, help="timed forwards (median)")
    ap.add_argument("--sample-warmup", type=int, default=1)
    ap.add_argument("--sample-runs", type=int, default=3)


def add_output_args(ap):
    """--json, and the compile child's own options (hidden)."""
    ap.add_argument("--json", help="write everything here")
    ap.add_argument("--child-compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)


def apply_quick(args):
    """--quick's counts: 4 steps, 1 untimed and 2 timed forwards, 1 timed sampling run, the
    first compile cut to 120 s."""
    args.steps, args.warmup, args.runs, args.sample_warmup, args.sample_runs = 4, 1, 2, 0, 1
    args.compile_timeout = min(args.compile_timeout, 120.0)


# ---- timing -------------------------------------------------------------------------------------

class Clock:
    """Times a callable: CUDA events around each run (synchronised once per run), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn, warmup: int, runs: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(runs):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b))
            else:
                s = time.perf_counter()
                fn()
                out.append((time.perf_counter() - s) * 1e3)
        return out

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self):
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


def record(variant, what, images, rows, runs_ms, mac_total, clock, **extra):
    med = statistics.median(runs_ms)
    rec = {"variant": variant, "what": what, "images": images, "rows": rows, "median_ms": med,
           "min_ms": min(runs_ms), "max_ms": max(runs_ms), "runs_ms": runs_ms,
           "ms_per_image": med / images if images else None,
           "tflops": 2 * mac_total / (med * 1e-3) / 1e12 if mac_total else None,
           "macs": mac_total, "peak_mib": clock.peak_mib(), "status": "ok"}
    rec.update(extra)
    return rec


class Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return float("inf") if self.seconds <= 0 else self.seconds - (time.monotonic() - self.start)

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).norm() / ref.norm())


def set_tf32(on: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


# ---- the compile variant: the child process -----------------------------------------------------

def progress_writer(path):
    """The child's event channel: one JSON line per event appended to `path` (--progress), read
    by the parent's `run_compile_child`; writes the "start" event."""
    progress = open(path, "a", buffering=1)
    emit_raw = lambda obj: progress.write(json.dumps(obj) + "\n")
    emit_raw({"event": "start", "t": time.time()})
    return emit_raw


def compiled_caller(compiled, clock):
    """Calls `compiled`, first marking a new CUDA-graph step where torch has the mark."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)

    def call(*a):
        if mark is not None and clock.cuda:
            mark()
        return compiled(*a)

    return call


def first_call(emit_raw, clock, call, ref):
    """Times the first call of the compiled model (the compile) between the "compiling" and
    "compiled" events; the latter carries its error against `ref` and whether it is finite.
    Returns the compile seconds."""
    emit_raw({"event": "compiling", "t": time.time()})
    s = time.perf_counter()
    out = call().float()
    clock.sync()
    compile_s = time.perf_counter() - s
    emit_raw({"event": "compiled", "t": time.time(), "compile_s": compile_s, "rel_err": rel_err(out, ref),
              "finite": bool(torch.isfinite(out).all())})
    return compile_s


def _child_setup():
    """In the compile child before exec: its own process group (so that it and its compile workers
    can be stopped together; not a new session, which would outlive the device call), and SIGKILL
    when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    os.setpgid(0, 0)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
    except ProcessLookupError:
        pass
    proc.wait()


def read_events(path):
    """The child's complete JSON lines (a line being written is left for the next read)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


# ---- the compile variant: the parent ------------------------------------------------------------

def run_compile_child(script, child_args, head, rest, budget, compile_timeout, emit, prefix):
    """Runs `script --child-compile --progress FILE child_args...` and stops it (with its compile
    workers) when its first compile runs past `compile_timeout` seconds or the budget ends. Emits
    `head` (the compile row) with wall_s and status, compile_s, rel_err_vs_fp32 and finite when
    it compiled; then the child's records; then a "(rest)" row (`rest`'s fields) when it was
    stopped or failed after compiling. Returns the child's "compiled" event, or None."""
    fd, progress = tempfile.mkstemp(prefix=prefix, suffix=".jsonl")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(script), "--child-compile", "--progress", progress, *child_args,
           "--budget", str(max(1.0, budget.left() - 5))]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, preexec_fn=_child_setup)

    def stop(signum, frame):  # gpu-check's timeout (SIGTERM): stop the child's group first
        _kill_group(proc)
        sys.exit(128 + signum)

    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    compiling_since = None  # the compile limit counts from the first call, not from the imports
    end_deadline = started + max(1.0, budget.left() - 2)
    why = None
    while proc.poll() is None:
        time.sleep(0.5)
        names = {e["event"] for e in read_events(progress)}
        now = time.monotonic()
        if compiling_since is None and "compiling" in names:
            compiling_since = now
        if "compiled" not in names and compiling_since is not None and now > compiling_since + compile_timeout:
            why = f"compile exceeded --compile-timeout {compile_timeout:.0f} s"
        elif now > end_deadline:
            why = "budget exhausted: stopped"
        if why:
            _kill_group(proc)
            break
    for sig, handler in old_handlers.items():
        signal.signal(sig, handler)
    events = read_events(progress)
    os.unlink(progress)
    compiled = next((e for e in events if e["event"] == "compiled"), None)
    head["wall_s"] = time.monotonic() - started
    if compiled:
        head.update(status="ok", compile_s=compiled["compile_s"], rel_err_vs_fp32=compiled["rel_err"],
                    finite=compiled["finite"])
    elif why:
        head.update(status=why)
    else:
        head.update(status=f"error: child exited with {proc.returncode} before compiling (see the log)")
    emit(head)
    for e in events:
        if e["event"] == "record":
            emit(e["record"])
    if compiled and why:
        emit({**rest, "status": why})
    elif compiled and proc.returncode not in (0, None):
        emit({**rest, "status": f"error: child exited with {proc.returncode}"})
    return compiled


# ---- the result ---------------------------------------------------------------------------------

def device_info(device):
    info = {"type": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def run_info(tool, device):
    """The result's first fields: the tool, when, where and with which torch and CUDA."""
    return {"tool": tool, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "host": platform.node(), "device": device_info(device), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def finish(result, json_path, print_table):
    """Writes `result` to `json_path` (if given), prints the table; the exit status is 1 when an
    icc check mismatched or an output was not finite."""
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)
    bad = [r for r in result["results"] if r["status"] == "MISMATCH" or r.get("finite") is False]
    return 1 if bad else 0
