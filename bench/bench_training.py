"""Training step time with the paper's patch: 128×128×32, batch 8, forward + backward + AdamW step.

Uses the paper's network (``NetworkConfig()``) and the partial-label loss, bfloat16 autocast on
CUDA as ``segviz train`` does; reports the median of N timed steps after warm-up.

    python bench/bench_training.py [--device cpu|cuda] [--steps N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

__all__ = ["run_training_step_benchmark"]


def run_training_step_benchmark(
    device: str = "cpu",
    steps: int = 5,
    warmup: int = 2,
    patch=(128, 128, 32),
    batch_size: int = 8,
    seed: int = 0,
    retain_memory: bool = True,
) -> dict:
    """Median seconds of one training step (forward, backward, AdamW) after ``warmup`` steps.

    ``retain_memory`` sets the allocator as ``train_site`` does (:func:`SegVizLogic.allocator.retain_freed_memory`);
    ``False`` measures glibc's defaults (run it in a fresh process: the setting is process-wide).

    Returns:
        ``{"median_step_s", "steps_s": [...], "patches_per_s", "peak_gpu_memory_gb" (CUDA), "patch", "batch_size", "device", "amp"}``.
    """
    import torch

    from SegVizLogic.allocator import retain_freed_memory
    from SegVizLogic.losses import PartialLabelLoss
    from SegVizLogic.network import NetworkConfig, build_network

    retained = retain_freed_memory() if retain_memory else False
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = build_network(NetworkConfig()).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    loss_fn = PartialLabelLoss()
    organs = len(model.config.organs)
    image = torch.rand(batch_size, 1, *patch, device=dev)
    target = (torch.rand(batch_size, organs, *patch, device=dev) > 0.9).float()
    annotated = torch.zeros(batch_size, organs, dtype=torch.bool, device=dev)
    annotated[torch.arange(batch_size), torch.arange(batch_size) % organs] = (
        True  # one organ per sample, like single-organ sites
    )
    amp = dev.type == "cuda"

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(image)
        loss = loss_fn(logits.float(), target, annotated)
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    result = {
        "median_step_s": round(median, 4),
        "steps_s": [round(t, 4) for t in times],
        "patches_per_s": round(batch_size / median, 2),
        "patch": list(patch),
        "batch_size": batch_size,
        "device": device,
        "amp": "bfloat16" if amp else None,
        "warmup_steps": warmup,
        "threads": torch.get_num_threads(),
        "allocator": "retain freed memory" if retained else "default",
    }
    if dev.type == "cuda":
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line of this benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--patch", type=int, nargs=3, default=(128, 128, 32))
    parser.add_argument(
        "--default-allocator", action="store_true", help="measure with glibc's default allocator settings"
    )
    args = parser.parse_args(argv)
    result = run_training_step_benchmark(
        args.device, args.steps, args.warmup, patch=tuple(args.patch), retain_memory=not args.default_allocator
    )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
