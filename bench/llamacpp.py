"""llama.cpp as a benchmark side: build `llama-server`, convert a checkpoint to GGUF, run the fixed workload.

llama.cpp is the reference CPU engine to beat, so `bench.compare` runs it next to moemesh on the same
checkpoint, dtype and requests. Three steps, each cached so that only the first run pays for it:

1. **Build.** The source comes from the `llama-cpp-python` sdist on PyPI (it vendors llama.cpp under
   `vendor/llama.cpp`): a pinned, pip-verifiable release with no git clone. Only `llama-server` is built,
   with cmake in Release, CPU only, `-DGGML_NATIVE=ON` (the kernels for this CPU's AVX-512/BF16), into
   `~/.cache/moemesh/llama.cpp/<version>/` (7-10 minutes on 2 cores, skipped when the binary is there).
2. **Convert.** The vendored `convert_hf_to_gguf.py` writes the checkpoint as GGUF, f16 for a bf16 or
   fp16 checkpoint (bf16 where the CPU has `avx512_bf16`, so the weights are bit-identical to moemesh's)
   and f32 for fp32, cached next to the checkpoint's own cache, keyed by its files' sizes and mtimes.
   The converter refuses a BPE tokenizer whose pre-tokenizer hash it does not know; since the bench
   sends token ids and never text, `convert_main` patches `get_vocab_base_pre` to answer "gpt-2" for an
   unknown hash (the pre-tokenizer regex only matters for tokenizing text).
3. **Run.** `llama-server --parallel c` (one slot per client stream, `-c` = c x the per-slot context)
   serves `/completion` requests whose prompt is the workload's token-id list, greedy, `n_predict` =
   max new tokens with `ignore_eos` so every request generates exactly as many tokens as on moemesh,
   `cache_prompt: false` so no request reuses another's KV, streamed so that TTFT and the gaps between
   tokens are measured in the client, as for the moemesh sides (tokens the server holds back in the stream
   are counted from its `tokens_predicted`: see `stream_token_ids`).

`bench.compare` runs it (`--sides llama.cpp` for this side alone).
"""

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from bench.common import ServiceProcess
from bench.throughput import REQUEST_TIMEOUT_S, Client, LevelResult, RequestResult, collect, run_level
from bench.workloads import WARMUP_INDEX, Request, warmup_request
from moemesh.hardware import cpu_flags

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
CACHE = Path.home() / ".cache" / "moemesh" / "llama.cpp"
GGUF_CACHE = Path.home() / ".cache" / "moemesh" / "gguf"
SERVER = "llama-server"
QUANTIZE = "llama-quantize"  # writes Q4_0, Q4_K_M, Q8_0 GGUFs from the converted 16-bit one
QUANT_TYPES = ("native", "Q8_0", "Q4_0", "Q4_K_M")  # native: the converter's 16-bit (or fp32) GGUF
SAME_BITS = {
    "none": "native",
    "int8": "Q8_0",
    "int4": "Q4_0",
    "w8a8": "Q8_0",
}  # llama.cpp's type at moemesh's --quantize bits
SIDE = "llama.cpp"
HELD_BACK = -1  # id of a token llama-server generated but did not stream (see stream_token_ids)
REPO = Path(__file__).resolve().parents[1]
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no web UI, and no download of one at build time
    "-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",
    # ggml's AMX kernels (which `-march=native` turns on where the CPU has AMX) segfault in the first matmul of a
    # quantized model on the VMs this bench runs on (ggml_backend_amx_mul_mat); the AVX-512 kernels run instead.
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 1. Build


def source_dir(version: str = VERSION) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist, downloaded and unpacked on first use."""
    root = CACHE / version
    src = root / "src"
    if (src / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--dest", str(sdist),
         f"llama-cpp-python=={version}"],
        check=True,
    )  # fmt: skip
    (archive,) = sdist.glob("*.tar.gz")
    prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    tmp = root / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for member in members:
            member.name = member.name.removeprefix(prefix)
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(src)
    shutil.rmtree(sdist)
    return src


def build(version: str = VERSION) -> Path:
    """Path of the `llama-server` binary (and `llama-quantize` beside it), built (Release, CPU only, native)
    unless already cached."""
    src = source_dir(version)
    out = CACHE / version / "build-noamx"
    binary = out / "bin" / SERVER
    if binary.exists() and (out / "bin" / QUANTIZE).exists():
        return binary
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    started = time.monotonic()
    print(f"building llama.cpp (llama-cpp-python {version}) into {out}; takes minutes, once", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *generator, *CMAKE_FLAGS], check=True)
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", str(out), "--target", SERVER, QUANTIZE, "-j", jobs], check=True)
    print(f"built {binary} in {time.monotonic() - started:.0f} s", flush=True)
    return binary


# ---------------------------------------------------------------------------------------------------
# 2. Convert


def gguf_outtype(checkpoint_dtype: str, flags: set[str]) -> str:
    """The converter's --outtype for a checkpoint of torch dtype name `checkpoint_dtype` ("bfloat16", ...):
    the same 16-bit weights where the CPU computes on them natively, so both sides read the same bytes."""
    if checkpoint_dtype == "bfloat16":
        return "bf16" if "avx512_bf16" in flags else "f16"  # bf16 without avx512_bf16 is emulated in llama.cpp
    return {"float16": "f16", "float32": "f32"}[checkpoint_dtype]


def checkpoint_key(model: Path) -> str:
    """Identifies the checkpoint's content cheaply: names, sizes and mtimes of its files."""
    digest = hashlib.sha256(VERSION.encode())
    for path in sorted(p for p in model.iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def convert(model: Path, outtype: str, version: str = VERSION) -> Path:
    """The checkpoint as GGUF, converted once and cached in ~/.cache/moemesh/gguf/ (not in `model`, which may
    be read-only or, for the demo model, rebuilt)."""
    out = GGUF_CACHE / f"{model.name}-{checkpoint_key(model)}.{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    print(f"converting {model} to GGUF ({outtype}) -> {out}", flush=True)
    code = "import sys; from bench.llamacpp import convert_main; convert_main(sys.argv[1:])"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-c", code, str(source_dir(version)), str(model), str(tmp), outtype]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit code {done.returncode}):\n{tail}")
    tmp.rename(out)
    return out


def convert_main(argv: list[str]) -> None:
    """Runs the vendored convert_hf_to_gguf.py (in a child process: it puts llama.cpp's `conversion` and
    `gguf` packages on sys.path). An unknown BPE pre-tokenizer hash, which makes the converter refuse the
    checkpoint, is mapped to "gpt-2": the bench only sends token ids, so the pre-tokenizer never runs."""
    src, model, out, outtype = argv
    sys.path[:0] = [src, str(Path(src) / "gguf-py")]
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
    runpy.run_path(str(Path(src) / "convert_hf_to_gguf.py"), run_name="__main__")


# ---------------------------------------------------------------------------------------------------
# 3. Run


def stream_token_ids(lines: Iterable[bytes]) -> Iterator[list[int]]:
    """The token ids of each event of a streamed `/completion` response (server-sent events, one
    `data: {json}` line each), up to the one with `stop: true`. An `error` event raises.

    llama-server holds back a token whose text ends in an incomplete UTF-8 character (common with random
    ids over a byte-level BPE vocabulary) and streams only the id of the token that completes it. Every
    event carries `tokens_predicted`, the tokens generated so far, so the held-back ones are counted, as
    HELD_BACK ids arriving with the event that released them: token counts stay exactly `n_predict`, and
    such a request never counts as the same output as moemesh's."""
    predicted = 0
    for line in lines:
        if not line.startswith(b"data:"):
            continue  # the blank lines between events
        event = json.loads(line[len(b"data:") :])
        if "error" in event:
            raise RuntimeError(f"llama-server: {event['error']}")
        ids = event.get("tokens") or []
        now = event.get("tokens_predicted", predicted + len(ids))
        yield [HELD_BACK] * (now - predicted - len(ids)) + ids
        predicted = now
        if event.get("stop"):
            return


def slot_context(requests: Sequence[Request]) -> int:
    """Context tokens one slot needs: the longest prompt plus its generated tokens, rounded up to 256."""
    longest = max(len(r.prompt) + r.max_new for r in requests)
    return -(-longest // 256) * 256


def completion_client(url: str) -> Client:
    """One streamed, greedy `/completion` of exactly the request's `max_new` tokens per call, timed as the
    moemesh sides."""

    def one(index: int, request: Request) -> RequestResult:
        body = {
            "prompt": request.prompt, "n_predict": request.max_new, "temperature": 0.0, "ignore_eos": True,
            "cache_prompt": False, "stream": True, "return_tokens": True,
        }  # fmt: skip
        request = urllib.request.Request(
            f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return collect(index, t0, stream_token_ids(response))

    return one


def start_server(binary: Path, gguf: Path, slots: int, ctx_per_slot: int, threads: int) -> tuple[ServiceProcess, str]:
    """`llama-server` with `slots` parallel sequences on an ephemeral port; returns it and its URL once
    /health answers 200 (it answers 503 while the model loads)."""
    argv = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", "0", "--parallel", str(slots),
        "-c", str(slots * ctx_per_slot), "--threads", str(threads), "--threads-batch", str(threads), "--no-webui",
    ]  # fmt: skip
    server = ServiceProcess(SERVER, argv)
    url = server.wait_for(r"listening on (http://\S+)").group(1)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return server, url
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                server.stop()
                raise RuntimeError(f"{SERVER} never became healthy ({exc}):\n" + "\n".join(server.lines[-40:])) from exc
            time.sleep(0.2)


def run_llamacpp(binary: Path, gguf: Path, levels: list[int], requests: Sequence[Request],
                 vocab_size: int) -> list[LevelResult]:  # fmt: skip
    """The requests against a fresh `llama-server --parallel c` for each concurrency c (slots = client
    streams, as moemesh batches up to its stream count), with one warm-up request each."""
    threads = os.cpu_count() or 1
    warmup = warmup_request(vocab_size)
    ctx = slot_context([warmup, *requests])
    results = []
    for concurrency in levels:
        server, url = start_server(binary, gguf, concurrency, ctx, threads)
        try:
            one = completion_client(url)
            one(WARMUP_INDEX, warmup)
            results.append(run_level(SIDE, concurrency, requests, one, lambda: (0.0, 0.0)))
        finally:
            print(f"  {server.stop_line()}", flush=True)
    return results


def quantized(gguf: Path, qtype: str, binary: Path) -> Path:
    """`gguf` requantized by `llama-quantize` to `qtype` (Q4_0, Q4_K_M, Q8_0), cached beside it."""
    out = gguf.with_name(f"{gguf.name.removesuffix('.gguf')}.{qtype}.gguf")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        threads = str(os.cpu_count() or 1)
        subprocess.run([str(binary.with_name(QUANTIZE)), str(gguf), str(tmp), qtype, threads], check=True)
        tmp.rename(out)
    return out


def prepare(model: Path, checkpoint_dtype: str, qtype: str = "native") -> tuple[Path, Path]:
    """(llama-server binary, GGUF of `model`: its 16-bit conversion, or `qtype`), built and converted unless
    cached."""
    binary = build()
    gguf = convert(model, gguf_outtype(checkpoint_dtype, cpu_flags()))
    return binary, gguf if qtype == "native" else quantized(gguf, qtype, binary)
