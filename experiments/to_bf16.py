"""Write a safetensors file with its floating-point tensors in bf16 (half the bytes; used to move
weights to and from a GPU machine, and the KD step holds a teacher in bf16 anyway).

    python experiments/to_bf16.py SRC.safetensors DST.safetensors
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def to_bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors in bf16, the others as they are."""
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}


if __name__ == "__main__":
    save_file(to_bf16(load_file(sys.argv[1])), sys.argv[2], metadata={"format": "pt"})
