"""Training images/second of the registered models: the real step (augmentation on the device,
bf16 autocast where fast, channels_last, optimizer step), on random uint8 data.

    python benchmarks/train_throughput.py --models seed-cnn resnet-mt --batch-sizes 32 128 \
        --threads 2 --steps 20

Prints one JSON line per (model, batch size) and a Markdown table; medians of per-step times
after warm-up, with the step synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from agegender.config import load_config
from agegender.inference import autocast
from agegender.losses import multitask_loss
from agegender.models import create_model, normalize
from agegender.train import augment, resolve_device, use_amp


def bench(name: str, batch: int, steps: int, device: torch.device, amp: bool, size: int) -> dict:
    head = "dldl" if name.startswith("resnet") else "regression"
    kwargs = {"age_head": head} if name.startswith("resnet") else {}
    model = create_model(name, img_size=size, **kwargs).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    aug = load_config(None).aug
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    data = torch.randint(0, 256, (batch * 4, 1, size, size), dtype=torch.uint8, device=device)
    age = torch.randint(1, 90, (batch * 4,), device=device).float()
    gender = torch.randint(0, 2, (batch * 4,), device=device).float()
    times = []
    for step in range(steps + 3):
        idx = torch.randint(0, len(data), (batch,), device=device, generator=gen)
        t0 = time.perf_counter()
        x = augment(normalize(data[idx], model.data_config), aug, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(x)
        loss = multitask_loss(
            {k: v.float() for k, v in out.items()}, age[idx], gender[idx], head=head
        )["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # warm-up: allocator, kernel selection
            times.append(time.perf_counter() - t0)
    return {
        "model": name,
        "batch": batch,
        "img_per_s": round(batch / statistics.median(times), 1),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "amp_bf16": amp,
        "size": size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["seed-cnn", "resnet-mt"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = use_amp(device, args.amp)
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            r = bench(name, batch, args.steps, device, amp, args.size)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("\n| model | batch | img/s | device | threads | bf16 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['img_per_s']:,.0f} | {r['device']} | "
            f"{r['threads']} | {r['amp_bf16']} |"
        )


if __name__ == "__main__":
    main()
