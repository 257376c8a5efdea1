"""Machine-code report of the CUDA kernels, no GPU needed: registers, instruction counts, and
for each kernel's main loop the instruction mix and where the wgmma waits sit.

    python benchmarks/sass_report.py                      # every kernel of attend.cu, sm_90a
    python benchmarks/sass_report.py --filter attn_kernel --loop

Needs nvcc and cuobjdump (+ nvdisasm): `make deps` installs the nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels into .venv.  The kernels were issue-bound on the H100 (a few
integer instructions per element cost more than the math), so instruction counts here track
speed there; NOTES_gpu.md round 7 has the cases.  tests/test_cuda_build.py uses the parsers.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, the PATH, or /usr/local/cuda (as setup.py looks)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """cuobjdump beside nvcc, on the PATH, or from the nvidia-cuda-cuobjdump wheel."""
    nvcc = nvcc or find_nvcc()
    if nvcc is not None and os.path.exists(os.path.join(os.path.dirname(nvcc), "cuobjdump")):
        return os.path.join(os.path.dirname(nvcc), "cuobjdump")
    p = shutil.which("cuobjdump")
    if p:
        return p
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec is not None else []:
        hits = sorted(glob.glob(os.path.join(base, "cu*", "bin", "cuobjdump")))
        if hits:
            return hits[-1]
    return None


def compile_cubin(src: str, out: str, arch: str = "90a", defines: tuple[str, ...] = (),
                  nvcc: str | None = None) -> str:
    """nvcc -cubin with setup.py's optimisation flags; returns ptxas's -v log."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    cmd = [nvcc, "-cubin", "-O3", "-std=c++20", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "--expt-relaxed-constexpr", "-Xptxas", "-v", "-I" + os.path.join(ROOT, "csrc", "include"),
           *(["-DQLLM_SM90A=1"] if arch.endswith("a") else []), *defines, src, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{r.stderr[-4000:]}")
    return r.stderr


def dump_sass(cubin: str, cuobjdump: str) -> str:
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))  # nvdisasm
    r = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed:\n{r.stderr[-2000:]}")
    return r.stdout


def sass_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{mangled kernel name: [(address, instruction), ...]} of a cuobjdump --dump-sass listing."""
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    return funcs


def main_loop(ins: list[tuple[int, str]]) -> list[str]:
    """The instructions of the longest loop (the span of the longest backward branch); [] if none."""
    best = None
    for a, t in ins:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and (best is None or a - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), a)
    return [] if best is None else [t for a, t in ins if best[0] <= a <= best[1]]


def opcode(t: str) -> str:
    parts = t.split()
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


INT_OPS = {"IMAD", "ISETP", "IADD3", "LEA", "LOP3", "SHF", "SEL", "VIADD", "IABS", "PRMT", "IMNMX", "I2F", "F2I",
           "UIADD3", "ULOP3", "USHF", "UIMAD", "ULEA", "USEL", "MOV", "S2R", "S2UR", "LDC", "ULDC", "VIMNMX"}
FP_OPS = {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "MUFU", "F2FP", "HFMA2", "HADD2", "HMUL2"}


def mix(instrs: list[str]) -> dict[str, int]:
    c = Counter(opcode(t) for t in instrs)
    return {"total": len(instrs), "int": sum(v for k, v in c.items() if k in INT_OPS),
            "fp": sum(v for k, v in c.items() if k in FP_OPS), "mma": c["HGMMA"] + c["HMMA"],
            "mem": sum(v for k, v in c.items() if k.startswith(("LD", "ST", "LDGSTS"))),
            "branch": c["BRA"], "mufu": c["MUFU"]}


def wait_position(loop: list[str]) -> int | None:
    """Exponentials (MUFU.EX2) of the loop before its first full wgmma wait (gsb0, 0x0)."""
    waits = [i for i, t in enumerate(loop) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in t]
    return None if not waits else sum("MUFU.EX2" in t for t in loop[:waits[0]])


def exps_under_s(loop: list[str]) -> list[int]:
    """For each S = Q K^T group of the loop (the m64n64k16 wgmma that closes a group, gsb0): the
    exponentials (MUFU.EX2) issued before the next wgmma wait, i.e. while that S runs."""
    out, n = [], None
    for t in loop:
        if "HGMMA.64x64x16" in t and "gsb0" in t:
            n = 0
        elif n is not None and "MUFU.EX2" in t:
            n += 1
        elif n is not None and "WARPGROUP.DEPBAR" in t:
            out.append(n)
            n = None
    return out


def generic_accesses(ins: list[str]) -> int:
    """Loads and stores through generic addresses (LD/ST): the compiler could not tell shared
    from global memory, e.g. for a pointer rebuilt from an integer."""
    return sum(opcode(t) in ("LD", "ST") for t in ins)


def local_accesses(ins: list[str]) -> int:
    """Loads and stores of thread-local memory (LDL/STL: spills, or arrays the compiler could not
    keep in registers)."""
    return sum(opcode(t) in ("LDL", "STL") for t in ins)


def registers(ptxas_log: str) -> dict[str, int]:
    regs, cur = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            regs[cur] = int(m.group(1))
    return regs


def short(name: str) -> str:
    """attn_kernel<bf16,128,1,4,1,0>-style name of a mangled qllm kernel."""
    m = re.search(r"\d([a-z][a-z_]*_kernel)(I(.*?)EEv)?", name)
    if not m:
        return name
    if not m.group(3):
        return m.group(1)
    args = m.group(3).replace("13__nv_bfloat16", "bf16,").replace("6__half", "f16,")
    args = re.sub(r"L[ib](\d+)E?", r"\1,", args).replace("E", "").replace(",,", ",").rstrip(",")
    return f"{m.group(1)}<{args}>"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=os.path.join(ROOT, "csrc", "cuda", "attend.cu"))
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--loop", action="store_true", help="main-loop mix and wgmma wait position")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="extra -D for nvcc")
    args = ap.parse_args(argv)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found (make deps installs it into .venv)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        log = compile_cubin(args.src, cubin, args.arch, tuple("-D" + d for d in args.defines))
        funcs = sass_functions(dump_sass(cubin, cuobjdump))
    regs = registers(log)
    print(f"{'kernel':58s} {'regs':>4s} {'instrs':>6s} {'lmem':>4s}" + ("  loop: total int fp mma mem bra  exps<wait exps|S" if args.loop else ""))
    for name in sorted(funcs, key=short):
        if args.filter not in name and args.filter not in short(name):
            continue
        line = (f"{short(name)[:58]:58s} {regs.get(name, 0):4d} {len(funcs[name]):6d}"
                f" {local_accesses([t for _, t in funcs[name]]):4d}")
        if args.loop:
            loop = main_loop(funcs[name])
            m = mix(loop)
            w = wait_position(loop)
            es = exps_under_s(loop)
            line += (f"  {m['total']:5d} {m['int']:4d} {m['fp']:3d} {m['mma']:3d} {m['mem']:3d} {m['branch']:3d}"
                     f"  {'-' if w is None else w:>9} {min(es) if es else '-':>5}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
