"""Tensor parallelism over torch.distributed: one model split over N processes (docs/scale.md).

layout.py   which slice of every weight rank r holds (fairscale's layout), as arithmetic
modules.py  the collectives added to model.py's Transformer (all-reduce, parallel embedding and head)
loading.py  each rank reads only its part (Meta shards, HF safetensors slices, GGUF narrowed)
runner.py   rank 0 leads (LeaderModel broadcasts each call), the others follow
launch.py   torchrun integration for the CLI (no torch at import)
"""
