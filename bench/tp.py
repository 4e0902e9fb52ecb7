"""Tensor-parallel decode speed: the same model at TP=1 and TP=N, in one run.

A random-weight model of a named preset (default `tiny-100m`, ~125M parameters) is built from one seed
in every process. Three sides, each a greedy generation of --new-tokens after a --prompt-tokens prompt
at batch --batch, through the same scheduler the engine uses:
- `plain`: the model in this process, no torch.distributed at all (eager decode on the CPU, the same
  decode path the tensor-parallel ranks take; CUDA graphs on a GPU);
- `tp=1`: one rank under torch.distributed, through the leader machinery (what `torchrun
  --nproc_per_node 1` runs: the broadcast of each step and the collectives over a group of one);
- `tp=N` for each N in --tp: N processes spawned here, rank 0 leading.
Each side runs a warm-up generation, then --repeats timed ones; the best counts. The greedy tokens of
every side must equal plain's (checked, printed). Prints tokens/s and the ratio to plain.

On the CPU the ranks use gloo and share this machine's cores and memory bandwidth: the TP=2 figure
there says the machinery works and what the collectives cost, not what two GPUs would give (both
ranks read their half of the weights from the same memory). On a machine with N GPUs (--device cuda)
rank r uses cuda:r and NCCL; that is the number that matters.

    python bench/tp.py [--preset tiny-100m] [--tp 2] [--device cpu|cuda] [--dtype float32|bfloat16]
                       [--prompt-tokens 128] [--new-tokens 64] [--batch 1] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from counting_tokenizer import CountingTokenizer  # noqa: E402


def build_model(preset_name: str, device: str, dtype: str):
    """Random weights from one seed (identical in every process), placed as a loaded checkpoint's are
    (assemble.build_model: on the CPU, projections column-major, as the loaders store them)."""
    from qgpt_code.checkpoints.assemble import build_model as assemble
    from qgpt_code.config import preset
    from qgpt_code.model import Transformer, checkpoint_tensors

    torch.manual_seed(0)
    whole = Transformer(preset(preset_name))
    tensors = ((name, t, "random") for name, t in checkpoint_tensors(whole).items())
    return assemble(whole.args, tensors, torch.device(device), getattr(torch, dtype))


def prompts(cfg: dict) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(2, 1000, (cfg["prompt_tokens"] - 1,), generator=g).tolist() for _ in range(cfg["batch"])]


def timed_generations(generate, model, cfg: dict) -> tuple[float, list[list[int]]]:
    """(best seconds over the repeats, the greedy tokens) of generate(model, ...) after one warm-up."""
    from qgpt_code.generation import SamplingParams

    params = SamplingParams(max_new_tokens=cfg["new_tokens"], temperature=0, ignore_eos=True)
    best, tokens = float("inf"), None
    for round_ in range(cfg["repeats"] + 1):
        out = [[] for _ in range(cfg["batch"])]
        start = time.perf_counter()
        for events in generate(model, CountingTokenizer(model.args.vocab_size), prompts(cfg), params):
            for i, event in events:
                out[i].append(event.token_id)
        if model.tok_embeddings.weight.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if round_ and elapsed < best:
            best, tokens = elapsed, out
    return best, tokens


def rank_main(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    import torch.distributed as dist

    from qgpt_code.distributed.layout import TPLayout
    from qgpt_code.distributed.loading import split_model
    from qgpt_code.distributed.runner import Leader, LeaderModel, Link, follow, generate

    device = f"cuda:{rank}" if cfg["device"] == "cuda" else "cpu"
    if cfg["device"] == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg["threads"])
    dist.init_process_group("nccl" if cfg["device"] == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    dist.all_reduce(torch.zeros(1, device=device))
    whole = build_model(cfg["preset"], "cpu", "float32")
    model = split_model(whole, TPLayout(whole.args, rank, world), torch.device(device), getattr(torch, cfg["dtype"]))
    del whole
    link = Link(torch.device(device))
    if rank == 0:
        leader = Leader(model, link)
        seconds, tokens = timed_generations(lambda m, *a: generate(m, *a, eager=cfg["eager"]),
                                            LeaderModel(model, leader), cfg)
        leader.stop()
        Path(out).write_text(json.dumps({"seconds": seconds, "tokens": tokens}))
    else:
        follow(model, link, rank)
    dist.destroy_process_group()


def run_tp(world: int, cfg: dict, timeout: float) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        context = mp.get_context("spawn")
        procs = [context.Process(target=rank_main, args=(r, world, port, cfg, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"tp={world}: ranks exited with {[p.exitcode for p in procs]}")
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-100m")
    parser.add_argument("--tp", default="2", help="comma-separated rank counts besides 1 (default: 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs on a GPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process, every side alike (default 1: on a shared machine, several "
                             "OpenMP threads per process spin against the neighbours and swing the figures 5x)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each multi-process side may take")
    args = parser.parse_args()
    cfg = {"preset": args.preset, "device": args.device, "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": args.batch,
           "repeats": args.repeats, "eager": args.eager, "threads": args.threads}
    torch.set_num_threads(args.threads)
    worlds = [int(n) for n in args.tp.split(",") if n.strip()]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"--tp {max(worlds)} needs {max(worlds)} GPUs; this machine has {torch.cuda.device_count()}")
    print(f"{args.preset}, {cfg['dtype']} on {args.device}, batch {args.batch}, {args.prompt_tokens}-token prompt + "
          f"{args.new_tokens} new tokens, best of {args.repeats}"
          + ("; CPU: gloo ranks share this machine's cores, a correctness run, not a speed-up test" if args.device == "cpu" else ""))

    from qgpt_code.generation import generate

    device = "cuda:0" if args.device == "cuda" else "cpu"
    plain_model = build_model(args.preset, device, cfg["dtype"])
    seconds, plain_tokens = timed_generations(lambda m, *a: generate(m, *a, eager=args.eager or args.device == "cpu"),
                                              plain_model, cfg)
    del plain_model
    new = args.new_tokens * args.batch
    results = [("plain", seconds, plain_tokens)]
    for world in [1, *worlds]:
        r = run_tp(world, cfg, args.timeout)
        results.append((f"tp={world}", r["seconds"], r["tokens"]))
    for name, seconds, tokens in results:
        same = "same tokens" if tokens == plain_tokens else "TOKENS DIFFER from plain"
        print(f"{name:>6}: {new / seconds:8.1f} tok/s  ({seconds * 1000:.0f} ms, {results[0][1] / seconds:.2f}x plain, {same})")


if __name__ == "__main__":
    main()
