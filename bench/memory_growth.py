"""Resident memory of the process over KD training steps (the CPU student of configs/student-cpu.yaml
from a teacher dir, bf16 autocast, AdamW, batches in the training order), and seconds per step:

    python bench/memory_growth.py DATADIR TEACHER_DIR STEPS

Run it under different allocator settings (MALLOC_*, ONEDNN_PRIMITIVE_CACHE_CAPACITY) to see what
holds memory; prints the RSS every 20 steps and the mean step time after the first 10.
"""
import sys, torch, resource
sys.path.insert(0, "bench")
from distill_step import train_step
from combinekd.config import load_config
from combinekd.data import collate, load_split, load_tokenizer, token_batches
from combinekd.distill import build_objective
data, teacher = sys.argv[1], sys.argv[2]
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
tok = load_tokenizer(data)
cfg = load_config("configs/student-cpu.yaml", [f"data_dir={data}", "output_dir=/tmp/x", f"distill.teacher={teacher}"])
split = load_split(data, "train", 256)
order = token_batches([len(s) for s in split.src], [len(t) for t in split.tgt], 4096, seed=0)
torch.manual_seed(0)
obj = build_objective(cfg, tok)
obj.collect_stats = False
step = train_step(obj, torch.optim.AdamW(obj.parameters(), lr=1e-4), lambda: torch.autocast("cpu", torch.bfloat16))
import time
t0 = None
for i, idx in enumerate(order[:int(sys.argv[3])]):
    if i == 10: t0 = time.perf_counter()
    step(collate(split, idx, tok.pad_token_id))
    if i % 20 == 0:
        print(i, rss(), "MB", flush=True)
print(f"{(time.perf_counter() - t0) / (i - 9):.3f} s/step after 10", flush=True)
