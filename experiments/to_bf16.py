"""Write a safetensors file with its floating-point tensors in bf16 (half the bytes; used to move
weights to and from a GPU machine, and the KD step holds a teacher in bf16 anyway).

    python experiments/to_bf16.py SRC.safetensors DST.safetensors
"""

import sys

import torch
from safetensors.torch import load_file, save_file

if __name__ == "__main__":
    tensors = load_file(sys.argv[1])
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, sys.argv[2],
              metadata={"format": "pt"})
