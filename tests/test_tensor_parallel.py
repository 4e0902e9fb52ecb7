"""Tensor parallelism on the CPU: gloo, 2 real processes spawned here, against the same model on one.

Rank 0 leads (LeaderModel, the engine, the scheduler) and rank 1 follows, exactly as under torchrun;
results come back through files. Every spawned process is bounded in time.
"""

from __future__ import annotations

import pytest
import torch
from builders import meta_params, write_meta_dir
from test_tensor_parallel_workers import (
    BATCH, CountingTokenizer, generate_all, logits_worker, meta_worker, spawn, split_worker, whole_model,
)

from qgpt_code.config import ModelArgs, preset
from qgpt_code.distributed.layout import LayoutError, TPLayout
from qgpt_code.model import Transformer, checkpoint_tensors

TOLERANCE = 1e-5  # fp32 logits, TP=2 against TP=1


def random_model(args: ModelArgs, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args).eval().requires_grad_(False)
    for name, p in model.named_parameters():  # wider projections than the default init, so that logits
        p.mul_(4.0 if p.dim() == 2 and "embeddings" not in name else 1.0)  # spread over a few units
    if args.tie_embeddings:
        model.tok_embeddings.weight.mul_(0.25)  # N(0, 1) rows as the output head: logits of std ~8 otherwise
    return model


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, sp_proto):
    """A tiny GQA model (4 query heads, 2 KV heads) as a 2-shard Meta checkpoint, vocab_size -1 in params.json."""
    args = preset("tiny")
    state = {k: v.clone() for k, v in checkpoint_tensors(random_model(args, 0)).items()}
    return write_meta_dir(state, meta_params(args), tmp_path_factory.mktemp("tp_meta"), sp_proto, n_shards=2)


@pytest.fixture(scope="module")
def meta_run(meta_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_meta_out")
    spawn(meta_worker, 2, str(meta_dir), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def reference(meta_dir):
    """The same checkpoint on one process (shards merged), through the same entry points."""
    from qgpt_code import load_model

    loaded = load_model(meta_dir, device="cpu", dtype="float32")
    return generate_all(loaded.model, loaded.tokenizer, eager=True)


def test_each_rank_reads_only_its_own_meta_shard(meta_run):
    # (twice each: params.json's vocab_size -1 is read off the rank's own embedding first)
    assert set(meta_run[0]["opened"]) == {"consolidated.00.pth"}
    assert set(meta_run[1]["opened"]) == {"consolidated.01.pth"}


def test_tp2_logits_equal_tp1(meta_run, reference):
    tp2, tp1 = meta_run[0]["logits"], reference["logits"]
    assert tp2.shape == tp1.shape == (*BATCH.shape, 512)
    assert tp1.std() > 1.0  # logits that mean something: a difference of 1e-5 is a real test
    assert (tp2 - tp1).abs().max().item() <= TOLERANCE


def test_tp2_greedy_generation_is_identical(meta_run, reference):
    assert meta_run[0]["generate"] == reference["generate"]
    assert len(reference["generate"][0]) == 12
    assert meta_run[0]["engine"] == reference["engine"]
    assert meta_run[0]["engine"][:2] == reference["generate"][:2]
    assert meta_run[0]["engine_reused"] == reference["engine_reused"] > 0  # prefix blocks shared (and copied)


def test_other_shard_counts_hf_and_gguf_split_at_load(meta_dir, tiny_hf, sp_proto, tmp_path):
    """TP=2 over a 4-shard and a 1-shard Meta checkpoint (each rank joins two shards, or narrows the one),
    HF safetensors (rows and columns read through get_slice) and an F32 GGUF (each tensor narrowed after
    reading): the same logits as one process."""
    from gguf_builders import sentencepiece_metadata, write_llama_gguf

    from qgpt_code import load_model

    state = {k: v.clone() for k, v in checkpoint_tensors(random_model(preset("tiny"), 0)).items()}
    four = write_meta_dir(state, meta_params(preset("tiny")), tmp_path / "four", None, n_shards=4)
    one = write_meta_dir(state, meta_params(preset("tiny")), tmp_path / "one", None, n_shards=1)
    gguf = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf, tiny_hf[0], sentencepiece_metadata(sp_proto))
    paths = [four, one, tiny_hf[1], gguf]
    spawn(logits_worker, 2, [str(p) for p in paths], str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [ranks[r][0]["opened"] for r in range(2)] == [["consolidated.00.pth", "consolidated.01.pth"],
                                                       ["consolidated.02.pth", "consolidated.03.pth"]]
    assert [ranks[r][1]["opened"] for r in range(2)] == [["consolidated.00.pth"]] * 2
    for i, path in enumerate(paths):
        model = load_model(path, device="cpu", dtype="float32", tokenizer=CountingTokenizer(512) if i < 2 else None).model
        tp1 = model(BATCH, torch.arange(BATCH.shape[1]).expand_as(BATCH))
        assert (ranks[0][i]["logits"] - tp1).abs().max().item() <= TOLERANCE, path


def test_replicated_kv_heads_and_tied_embeddings(tmp_path):
    """1 KV head over 2 ranks (each keeps a copy), output tied to the embedding, a vocabulary that 2
    does not divide (tied: the embedding is split on its dim, not the vocabulary)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=451, multiple_of=32,
                     max_seq_len=128, tie_embeddings=True)
    model = random_model(args, 1)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    spawn(split_worker, 2, args, str(tmp_path / "state.pt"), str(tmp_path))
    tp2 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    tp1 = generate_all(whole_model(args, str(tmp_path / "state.pt")), CountingTokenizer(args.vocab_size), eager=True)
    assert tp1["logits"].std() > 1.0
    assert (tp2["logits"] - tp1["logits"]).abs().max().item() <= TOLERANCE
    assert tp2["generate"] == tp1["generate"] and tp2["engine"] == tp1["engine"]


@pytest.mark.parametrize("world", [1, 2])
def test_nccl_on_cuda_equals_one_gpu(world, tmp_path):
    """On GPUs: NCCL, each rank's decode step captured in CUDA graphs with its all-reduces inside; fp32
    logits close to one GPU's (different GEMM shapes round differently), greedy tokens identical."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA device(s)")
    args = preset("tiny")
    torch.save(random_model(args, 2).state_dict(), tmp_path / "state.pt")
    spawn(split_worker, world, args, str(tmp_path / "state.pt"), str(tmp_path), "cuda", timeout=300)
    tp = torch.load(tmp_path / "rank0.pt", weights_only=False)
    one = whole_model(args, str(tmp_path / "state.pt")).to("cuda")
    one.init_rope()
    ref = generate_all(one, CountingTokenizer(args.vocab_size))
    assert (tp["logits"] - ref["logits"]).abs().max().item() <= 1e-4
    assert tp["generate"] == ref["generate"] and tp["engine"] == ref["engine"]


def test_layout_slices_match_fairscale_and_refuse_what_does_not_divide():
    from qgpt_code.checkpoints.meta import shard_dim
    from qgpt_code.model import checkpoint_layout

    args = preset("llama-2-70b")
    for world in (2, 4, 8):
        layouts = [TPLayout(args, r, world) for r in range(world)]
        for name, slot in checkpoint_layout(args).items():
            pieces = [lay.piece(name) for lay in layouts]
            if pieces[0] is None:
                assert shard_dim(name) is None
                continue
            assert {p.dim for p in pieces} == {shard_dim(name)}  # fairscale's split dim
            assert [p.start for p in pieces] == [r * slot.shape[pieces[0].dim] // world for r in range(world)]
        assert layouts[1].local_args.n_kv_heads == 8 // world and layouts[1].local_args.n_heads == 64 // world
    replicated = [TPLayout(preset("tiny"), r, 4) for r in range(4)]  # 2 KV heads, 4 ranks
    assert [lay.kv_heads for lay in replicated] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    with pytest.raises(LayoutError, match="n_heads=32 to be a multiple of 3"):
        TPLayout(preset("llama-2-7b"), 0, 3)
    with pytest.raises(LayoutError, match="n_kv_heads=3"):
        TPLayout(ModelArgs(dim=96, n_heads=6, n_kv_heads=3, multiple_of=32), 0, 2)


# -- torchrun: the CLI and the HTTP server, rank 0 leading a real second process ---------------------------

PROMPT = "def fibonacci(n):"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*command: str, nproc: int = 2, **popen) -> "subprocess.Popen":
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                             "-m", "qgpt_code", *command], env=env, start_new_session=True, **popen)


@pytest.fixture(scope="module")
def expected_text(meta_dir):
    """What one process generates for PROMPT, greedy, 12 tokens."""
    from qgpt_code import load_model
    from qgpt_code.generation import SamplingParams, generate_text

    loaded = load_model(meta_dir, device="cpu", dtype="float32")
    tokens = loaded.tokenizer.encode(PROMPT, bos=True)
    return generate_text(loaded, tokens, SamplingParams(max_new_tokens=12, temperature=0)).text


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_complete_prints_what_one_process_prints(meta_dir, expected_text, nproc):
    import subprocess

    proc = torchrun("complete", "--model", str(meta_dir), "--device", "cpu", "--temperature", "0",
                    "--max-tokens", "12", PROMPT, nproc=nproc, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err.decode()[-6000:]
    assert out.decode() == expected_text + ("" if expected_text.endswith("\n") else "\n")
    assert f"tensor-parallel rank 0 of {nproc}" in err.decode()  # the tensor-parallel path, even over one rank
    assert ("rank 1 of 2: stopped by rank 0" in err.decode()) == (nproc == 2)


def test_torchrun_nccl_tp1_complete_on_a_gpu(meta_dir):
    """The NCCL path once, at TP=1 under torchrun (CUDA graphs included), against one plain process."""
    import subprocess

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from qgpt_code import load_model
    from qgpt_code.generation import SamplingParams, generate_text

    loaded = load_model(meta_dir, device="cuda", dtype="float32")
    expected = generate_text(loaded, loaded.tokenizer.encode(PROMPT, bos=True),
                             SamplingParams(max_new_tokens=12, temperature=0)).text
    proc = torchrun("complete", "--model", str(meta_dir), "--device", "cuda", "--dtype", "float32",
                    "--temperature", "0", "--max-tokens", "12", PROMPT, nproc=1,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err.decode()[-6000:]
    assert out.decode() == expected + ("" if expected.endswith("\n") else "\n")


def test_torchrun_serve_answers_the_openai_client_and_all_ranks_exit_on_sigterm(meta_dir, expected_text, tmp_path):
    import signal
    import subprocess
    import time

    import httpx
    import psutil
    from openai import OpenAI

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = torchrun("serve", "--model", str(meta_dir), "--device", "cpu", "--port", str(port),
                        "--cache-bytes", "16M", "--log-level", "warning", stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no /health within 120 s:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        assert reply.choices[0].text == expected_text
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Sort a list."}],
                                              max_tokens=6, temperature=0)
        assert chat.usage.completion_tokens == 6
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True) if chunk.choices)
        assert streamed == expected_text

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"ranks still running: {alive}"
        text = log.read_text()
        assert "rank 1 of 2: stopped by rank 0" in text, text[-3000:]  # told by rank 0, not orphaned
        assert "went away" not in text
    finally:
        _kill_group(proc)


def _kill_group(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_torchrun_a_rank_that_cannot_load_stops_every_rank_with_one_line(meta_dir, tmp_path):
    """Rank 1's shard is damaged: rank 0 (which read only its own) says which rank failed and why, exit 1."""
    import shutil
    import subprocess

    broken = shutil.copytree(meta_dir, tmp_path / "broken")
    (broken / "consolidated.01.pth").write_bytes(b"not a checkpoint")
    proc = torchrun("complete", "--model", str(broken), "--device", "cpu", "--max-tokens", "4", PROMPT,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode != 0 and out == b""
    assert "qgpt: error: rank 1 of 2 could not load the model: " in err.decode()
    assert "consolidated.01.pth: cannot read checkpoint shard" in err.decode()
