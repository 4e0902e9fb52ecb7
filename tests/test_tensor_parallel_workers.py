"""What each rank runs in tests/test_tensor_parallel.py (a module of its own: spawned processes import
it, and it holds no tests). Every rank writes what it saw to `out/rank{r}.pt`; the test compares."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

PROMPTS = [[1, 5, 9, 200, 31, 7, 7, 40], [1, 5, 9, 200, 31, 99], [1, 300, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
           14, 15, 16, 17, 18, 19, 20]]
BATCH = torch.tensor([[1, 17, 33, 5, 250, 6, 77], [1, 400, 12, 13, 14, 15, 16]])  # (2, 7) token ids
NEW_TOKENS = 12


def spawn(target, world: int, *args, timeout: float = 90.0) -> None:
    """Run target(rank, world, port, *args) in `world` fresh processes; fail if any fails or hangs."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    procs = [context.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)  # the whole run is bounded: each join waits at most `timeout`
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {timeout} s"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"exit codes {codes}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def _join(rank: int, world: int, port: int, device: str = "cpu") -> torch.device:
    """Join the group: gloo on the CPU, NCCL on cuda:rank. This rank's device."""
    import faulthandler

    faulthandler.enable()  # a crash in native code shows where Python was
    torch.set_num_threads(1)
    where = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if where.type == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group("nccl" if where.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    dist.all_reduce(torch.zeros(1, device=where))  # NCCL's communicator exists before any graph capture
    return where


def _finish() -> None:
    """Leave the group and end the process without interpreter finalization. The results are on disk
    by now; in about 1 run in 10 under pytest, a spawned rank aborted *after* its last line of Python
    ("terminate called without an active exception", no Python frame: a C++ static destructor), which
    would fail a test whose work had all been done and checked."""
    import os

    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)


def _record_opens(opened: list[str]) -> None:
    """Every file this process opens from now on (Python's audit events: torch.load opens through open())."""

    def hook(event: str, args) -> None:
        if event == "open" and isinstance(args[0], (str, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)


def _lead_or_follow(rank: int, model, work) -> dict:
    """Rank 0 runs `work(LeaderModel)` and stops the others; the others follow."""
    from qgpt_code.distributed.runner import Leader, LeaderModel, Link, follow

    link = Link(model.tok_embeddings.weight.device)
    if rank != 0:
        follow(model, link, rank)
        return {}
    leader = Leader(model, link)
    try:
        return work(LeaderModel(model, leader))
    finally:
        leader.stop()


def generate_all(model, tokenizer, prompts=PROMPTS, **kw) -> dict:
    """Logits of BATCH (no cache), greedy tokens of PROMPTS through generate and through an Engine."""
    from qgpt_code.checkpoints.assemble import LoadedModel, ModelInfo
    from qgpt_code.engine import Engine, Request
    from qgpt_code.generation import SamplingParams

    device = model.tok_embeddings.weight.device
    batch = BATCH.to(device)
    out = {"logits": model(batch, torch.arange(batch.shape[1], device=device).expand_as(batch).contiguous()).cpu()}
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    if hasattr(model, "make_decode"):
        from qgpt_code.distributed.runner import generate
    else:
        from qgpt_code.generation import generate
    tokens = [[] for _ in prompts]
    for events in generate(model, tokenizer, prompts, params, **kw):
        for i, event in events:
            tokens[i].append(event.token_id)
    out["generate"] = tokens
    loaded = LoadedModel(model, tokenizer, ModelInfo(Path("."), "meta", model.args, "tiny"))
    from qgpt_code.kv_cache import KVCache

    pool_bytes = 64 * 16 * KVCache.bytes_per_token(model.args, torch.float32)  # 64 blocks of this rank's heads
    with Engine(loaded, max_batch=2, cache_bytes=pool_bytes, **kw) as engine:
        # Three requests sharing a prefix (the second and third reuse the first one's cached blocks,
        # copy-on-write of the partial one), more than max_batch at once.
        handles = [engine.submit(Request(p, params)) for p in prompts + [PROMPTS[0][:5] + [3, 3]]]
        out["engine"] = [h.result().tokens for h in handles]
        out["engine_reused"] = engine.stats().tokens_reused
    return out


def meta_worker(rank: int, world: int, port: int, meta_dir: str, out_dir: str) -> None:
    """Load a Meta checkpoint's slice for this rank (recording the files it opens) and run generate_all."""
    opened: list[str] = []
    _record_opens(opened)
    _join(rank, world, port)
    from qgpt_code.distributed.loading import build_rank_model, read_rank_checkpoint
    from qgpt_code.tokenizer import load_tokenizer

    info, layout, pieces = read_rank_checkpoint(Path(meta_dir), rank, world)
    model = build_rank_model(layout, pieces, torch.device("cpu"), torch.float32)
    weights_opened = [Path(f).name for f in opened if Path(f).suffix == ".pth"]
    tokenizer = load_tokenizer(Path(meta_dir) / "tokenizer.model") if rank == 0 else None
    result = _lead_or_follow(rank, model, lambda m: generate_all(m, tokenizer, eager=True))
    torch.save({"opened": weights_opened, **result}, Path(out_dir) / f"rank{rank}.pt")
    _finish()


def split_worker(rank: int, world: int, port: int, args, state_file: str, out_dir: str, device: str = "cpu") -> None:
    """This rank's slice of a whole model saved in `state_file`, then generate_all (no tokenizer file:
    a stand-in that never ends a sequence). On CUDA: NCCL, and the decode step in CUDA graphs."""
    where = _join(rank, world, port, device)
    from qgpt_code.distributed.layout import TPLayout
    from qgpt_code.distributed.loading import split_model

    model = split_model(whole_model(args, state_file), TPLayout(args, rank, world), device=where)
    eager = where.type == "cpu"
    result = _lead_or_follow(rank, model, lambda m: generate_all(m, CountingTokenizer(args.vocab_size), eager=eager))
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _finish()


def whole_model(args, state_file: str):
    from qgpt_code.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(torch.load(state_file, weights_only=True), assign=True)
    model.init_rope()
    return model.eval().requires_grad_(False)


class CountingTokenizer:
    """The least a scheduler needs: ids to text (each id its own word), no end-of-sequence id."""

    bos_id, eos_id, pad_id = 1, -1, -1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [1] * bos + [int(w) for w in text.split()]

    def decode(self, ids) -> str:
        return "".join(f" {i}" for i in ids)

    def id_to_piece(self, i: int) -> str:
        return f" {i}"



def logits_worker(rank: int, world: int, port: int, paths: list[str], out_dir: str) -> None:
    """For each checkpoint: this rank's slice (recording the weight files it opened), BATCH's logits."""
    opened: list[str] = []
    _record_opens(opened)
    _join(rank, world, port)
    from qgpt_code.distributed.loading import build_rank_model, read_rank_checkpoint

    results = []
    for path in paths:
        del opened[:]
        info, layout, pieces = read_rank_checkpoint(Path(path), rank, world)
        model = build_rank_model(layout, pieces, torch.device("cpu"), torch.float32)
        files = sorted({Path(f).name for f in opened if Path(f).suffix in (".pth", ".safetensors", ".gguf")})
        result = _lead_or_follow(rank, model, lambda m: {"logits": m(BATCH, torch.arange(BATCH.shape[1]).expand_as(BATCH))})
        results.append({"opened": files, **result})
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    _finish()
