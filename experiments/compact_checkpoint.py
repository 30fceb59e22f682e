"""Carry a run's last checkpoint to or from a rented machine within its transfer limits (64 MiB).

    python experiments/compact_checkpoint.py pack RUN_DIR OUT.tgz [--no-best]  # checkpoints/last, compacted
    python experiments/compact_checkpoint.py unpack IN.tgz RUN_DIR    # a checkpoint --resume continues

Compaction loses a little, on purpose (an experiment's continuation, not the exact resume that
`combinekd train --resume` gives on one machine): the weights and Adam's second moments are rounded
to bf16, Adam's first moments are dropped (they restart from zero, ~10 updates at beta1 0.9, a
gentle warm-up of their own). Everything else (update count, learning-rate schedule, data position,
random generators, logs, early-stopping state) travels unchanged. The run's own files (config,
train_log.jsonl, best model.safetensors as bf16) travel along."""
import io
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from to_bf16 import to_bf16


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(run: Path, out: Path, best: bool = True) -> None:
    last = run / "checkpoints" / "last"
    weights = to_bf16(load_file(str(last / "objective.safetensors")))
    moments = {k: (v.to(torch.bfloat16) if k.endswith("exp_avg_sq") else v)
               for k, v in load_file(str(last / "optimizer.safetensors")).items() if not k.endswith(".exp_avg")}
    with tarfile.open(out, "w:gz", compresslevel=6) as tar:
        _add(tar, "last/objective.bf16.safetensors", save(weights))
        _add(tar, "last/optimizer.compact.safetensors", save(moments))
        for f in last.iterdir():
            if f.suffix != ".safetensors" or f.name.startswith("rng."):
                tar.add(f, f"last/{f.name}")
        for f in run.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                tar.add(f, f.name)
        if best and (run / "model.safetensors").is_file():
            _add(tar, "model.bf16.safetensors", save(to_bf16(load_file(str(run / "model.safetensors")))))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")


def unpack(archive: Path, run: Path) -> None:
    staging = run / "checkpoints" / "last"
    staging.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            name = member.name
            if name == "last/objective.bf16.safetensors":
                save_file({k: v.float() for k, v in load(data).items()}, str(staging / "objective.safetensors"))
            elif name == "last/optimizer.compact.safetensors":
                state = {}
                for k, v in load(data).items():
                    state[k] = v.float() if k.endswith("exp_avg_sq") else v
                    if k.endswith("exp_avg_sq"):
                        state[k[:-3]] = torch.zeros_like(state[k])  # exp_avg: restarts from zero
                save_file(state, str(staging / "optimizer.safetensors"))
            elif name == "model.bf16.safetensors":
                save_file({k: v.float() for k, v in load(data).items()}, str(run / "model.safetensors"))
            else:
                target = run / "checkpoints" / name if name.startswith("last/") else run / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    print(f"{run}: checkpoint at update", __import__("json").loads(
        (staging / "trainer_state.json").read_text())["progress"]["step"])


if __name__ == "__main__":
    verb, a, b = sys.argv[1:4]
    if verb == "pack":
        pack(Path(a), Path(b), best="--no-best" not in sys.argv[4:])
    else:
        unpack(Path(a), Path(b))
