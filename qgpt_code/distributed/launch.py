"""`torchrun --nproc_per_node N -m qgpt_code complete|chat|serve|lsp ...`: who this process is, and
what each rank does. Imports nothing heavy at module level (the CLI reads `world_size` for every command).

torchrun starts N copies of the same command with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set. Rank 0 runs the command as usual, with its slice of the model behind a `LeaderModel`;
the others (`follower_main`) load their slices and follow rank 0 until it stops them. NCCL on CUDA
(rank r uses cuda:LOCAL_RANK), gloo on the CPU.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
from datetime import timedelta

from qgpt_code.errors import QGPTError

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # an idle leader pings every minute (runner.PING_SECONDS)
_shutdown_leader = None  # set by load_leader: stops the followers and leaves the group (idempotent)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def tensor_parallel() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process: then the model
    runs through the tensor-parallel path, even over one rank (`--nproc_per_node 1`)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_follower() -> bool:
    return tensor_parallel() and rank() != 0


def runs_model(args: argparse.Namespace) -> bool:
    """Whether this command loads a model (lsp --server and `models` do not: rank 0 alone runs those)."""
    return args.command in ("complete", "chat", "serve") or (args.command == "lsp" and not getattr(args, "server", None))


def _init(device_name: str | None):
    """Join the process group; this rank's device (cuda:LOCAL_RANK on a GPU machine)."""
    import torch
    import torch.distributed as dist

    from qgpt_code.device import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    # The first collective sets up the communicators (NCCL's must exist before any graph capture).
    dist.all_reduce(torch.zeros(1, device=device))
    return device


def _load_slice(args: argparse.Namespace, device, progress=None):
    """(this rank's model, ModelInfo) from the model options; every rank learns whether all loaded."""
    import torch.distributed as dist

    from qgpt_code.device import resolve_dtype
    from qgpt_code.distributed.loading import build_rank_model, read_rank_checkpoint
    from qgpt_code.models import resolve_model_path

    error = model = info = None
    try:
        if args.quantize not in (None, "int8"):
            raise QGPTError(f"--quantize {args.quantize} is not supported with tensor parallelism yet (int8 is)")
        path = resolve_model_path(args.model)
        info, layout, pieces = read_rank_checkpoint(path, rank(), world_size())
        model = build_rank_model(layout, pieces, device, resolve_dtype(args.dtype, device), progress)
        if args.quantize == "int8":
            from qgpt_code.distributed.modules import quantize_sharded_int8

            quantize_sharded_int8(model)
    except QGPTError as exc:
        error = str(exc)
    except Exception as exc:  # every rank must hear of it, or the others wait forever
        error = f"{type(exc).__name__}: {exc}"
    errors = [None] * world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise QGPTError(f"rank {r} of {world_size()} could not load the model: {e}")
    return model, info


def load_leader(args: argparse.Namespace, progress=None):
    """Rank 0's `load_from_args`: its slice behind a LeaderModel, the tokenizer, and the followers
    stopped when this process exits (normally, on an error, or after SIGTERM's graceful shutdown)."""
    import torch.distributed as dist

    from qgpt_code.checkpoints.assemble import LoadedModel, check_tokenizer_fits
    from qgpt_code.distributed.runner import Leader, LeaderModel, Link
    from qgpt_code.models import resolve_model_path

    path = resolve_model_path(args.model)
    print(f"qgpt: loading {path}: tensor-parallel rank 0 of {world_size()}", file=sys.stderr, flush=True)
    device = _init(args.device)
    model, info = _load_slice(args, device, progress)
    leader = Leader(model, Link(device))

    def stop() -> None:
        global _shutdown_leader
        if _shutdown_leader is None:
            return
        _shutdown_leader = None
        leader.stop()
        dist.destroy_process_group()

    global _shutdown_leader
    _shutdown_leader = stop
    atexit.register(stop)  # a backstop: the CLI calls shutdown_leader when its command ends
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (torchrun passes it on) ends rank 0 through SystemExit, so that `finally` blocks (the
        # engine's close) and the atexit STOP run; uvicorn restores this handler and re-raises the signal
        # after its graceful shutdown. The followers ignore it and exit on STOP.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tokenizer = _tokenizer(args, info)
    check_tokenizer_fits(tokenizer, info.args, getattr(tokenizer, "source", str(path)))
    return LoadedModel(model=LeaderModel(model, leader), tokenizer=tokenizer, info=info)


def shutdown_leader() -> None:
    """On rank 0, once its command has ended (returned, raised, or was signalled): the other ranks stop.
    Called by the CLI itself, since a one-shot command may end in os._exit, where atexit never runs."""
    if _shutdown_leader is not None:
        _shutdown_leader()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _tokenizer(args: argparse.Namespace, info):
    from qgpt_code.tokenizer import find_tokenizer_file, load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if info.format == "gguf":
        from qgpt_code.checkpoints.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(info.path)
    found = find_tokenizer_file(info.path)
    if found is None:
        raise QGPTError(f"{info.path}: no tokenizer.model beside the weights (pass one with --tokenizer)")
    return load_tokenizer(found)


def follower_main(args: argparse.Namespace) -> int:
    """A rank other than 0: load this rank's slice, then compute what rank 0 announces until it says STOP.
    SIGINT and SIGTERM are left to rank 0 (torchrun signals every rank): a follower exits when rank 0
    stops it or is gone, never in the middle of a step the others are in."""
    import torch.distributed as dist

    from qgpt_code.distributed.runner import Link, follow

    if not runs_model(args):
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = _init(args.device)
    try:
        model, _ = _load_slice(args, device)
    except QGPTError:
        return 1  # rank 0 reports it
    try:
        follow(model, Link(device), rank())
    except Exception as exc:  # rank 0 is gone (its end of the connection closed)
        print(f"qgpt: rank {rank()}: rank 0 went away ({type(exc).__name__}: {str(exc)[:300]}); exiting", file=sys.stderr)
        return 1
    dist.destroy_process_group()
    print(f"qgpt: rank {rank()} of {world_size()}: stopped by rank 0", file=sys.stderr, flush=True)
    return 0
