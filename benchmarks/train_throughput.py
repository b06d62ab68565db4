"""Training throughput (images/s) of the retrieval models against plain ResNet-50 classification.

Rows (``--models``):
  reference     plain torchvision ResNet-50 (``--reference`` names another torchvision model),
                1000-class cross-entropy, SGD with momentum: what a classification step costs
  global_net    configs/viton_global_ce.yaml        (cross_entropy + trihard, AdamW)
  mmfl_net      configs/viton_mmfl_net.yaml         (ID loss per branch, improved trihard,
                                                     branch trihard, center loss, AdamW)
  m3_net        configs/fashion_product_m3_net.yaml (attribute triplet, cluster triplet,
                                                     attribute BCE, Adam)

Each project model is built from its recipe as ``train`` builds it: ``MODELS`` with the recipe's
kwargs (``--backbone`` replaces the backbone, weights are random: the cost does not depend on
their values), the recipe's loss terms through the real objective, and its optimizer with its
parameter groups. The label space is synthetic but sized like the recipe's training data
(4,363 VITON garments; the fashion-product attributes' value counts), and every batch has the
P×K structure the samplers give, so the metric losses mine real positives and negatives.

A timed step is what the training loop does per batch: forward under bf16 autocast (``--amp``,
CUDA only), the objective, the finite-loss check, backward, optimizer step. Inputs are random
tensors already on the device, so the data pipeline is not included (see embed_throughput.py
for that side). Every row uses the same batch, image size and precision. Each model runs in its
own subprocess, so its peak memory (CUDA: max allocated; CPU: peak RSS) is its own
(``--same-process`` saves the start-up for quick checks; CPU peaks then include earlier rows).

    python benchmarks/train_throughput.py --json runs/train_throughput.json
    python benchmarks/train_throughput.py --device cuda --amp --channels-last --compile --cudnn-benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_scaling import GIB, reset_peak_rss, status_bytes  # noqa: E402

REFERENCE = "reference"
RECIPES = {
    "global_net": REPO / "configs" / "viton_global_ce.yaml",
    "mmfl_net": REPO / "configs" / "viton_mmfl_net.yaml",
    "m3_net": REPO / "configs" / "fashion_product_m3_net.yaml",
}
VITON_TRAIN_GARMENTS = 4363
# Value counts of the fashion-product attributes (docs/benchmarks.md, dataset checks).
FASHION_PRODUCT_VALUES = {"gender": 5, "masterCategory": 6, "subCategory": 32, "articleType": 88,
                          "baseColour": 44, "season": 4, "usage": 7}


def synthetic_labels(config, num_items: int):
    """A label space shaped like the recipe's training table: its attributes, ``num_items`` items."""
    from fashion_retrieval.data.labels import LabelSpace

    wanted = config.data.attributes
    if wanted is None:  # the recipe learns every attribute its dataset has
        wanted = list(FASHION_PRODUCT_VALUES) if config.data.format == "fashion_product" else []
    attributes = {name: [f"{name}{v}" for v in range(FASHION_PRODUCT_VALUES[name])] for name in wanted}
    return LabelSpace([f"item{i}" for i in range(num_items)], [], attributes)


def synthetic_batches(labels, batch: int, k: int, conditioned: bool, device) -> list[dict]:
    """Label tensors of P×K batches: ``batch // k`` groups of ``k``. An attribute-conditioned
    model gets one batch per attribute (the attribute sampler's round robin), groups = values."""
    import torch

    groups = torch.arange(batch, device=device) // k
    sizes = labels.attribute_sizes
    attrs = torch.stack([groups % size for size in sizes], dim=1) if sizes else \
        torch.zeros(batch, 0, dtype=torch.long, device=device)
    multi_hot = torch.zeros(batch, labels.total_attribute_values, device=device)
    for a, offset in enumerate(labels.attribute_offsets):
        multi_hot[torch.arange(batch, device=device), offset + attrs[:, a]] = 1.0
    common = {"item": groups % max(labels.num_items, 1), "category": torch.full_like(groups, -1),
              "attrs": attrs, "attr_multi_hot": multi_hot}
    if not conditioned:
        return [common]
    return [{**common, "attribute": torch.full_like(groups, a), "attr_value": attrs[:, a]} for a in range(len(sizes))]


def forward_gmacs(model, size: tuple[int, int], device, conditioned: bool) -> float:
    """Multiply-adds of one image's eval-mode forward pass: the work the rows' ratios come from."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.rand(1, 3, *size, device=device)
    extra = {"attribute": torch.zeros(1, dtype=torch.long, device=device)} if conditioned else {}
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image, **extra)
    model.train()
    return counter.get_total_flops() / 2e9


def build_project_step(name: str, args, device):
    """(module called as ``module(batch) -> (total, terms)``, optimizer, label batches, model, row
    facts, gradient clip)."""
    import torch

    from fashion_retrieval.config import load_config
    from fashion_retrieval.engine.builders import build_model, build_objective_for, build_optimizer
    from fashion_retrieval.engine.train import TrainStep

    recipe = args.recipe.get(name, RECIPES[name])
    overrides = ["model.kwargs.pretrained=false"] + ([f"model.kwargs.backbone={args.backbone}"] if args.backbone else [])
    overrides += args.overrides.get(name, [])
    config = load_config(recipe, overrides)
    labels = synthetic_labels(config, args.num_items)
    model, _ = build_model(config, labels)
    objective = build_objective_for(config, model, labels)
    model.to(device)
    objective.to(device)
    conditioned = model.attribute_conditioned
    gmacs = forward_gmacs(model, args.size, device, conditioned)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model, objective)
    if args.compile:
        model.compile(mode=args.compile_mode)  # the model only: the loss terms sync on purpose (logging)
    batches = synthetic_batches(labels, args.batch, config.data.sampler.k, conditioned, device)
    info = {"recipe": str(Path(recipe).relative_to(REPO)) if Path(recipe).is_relative_to(REPO) else str(recipe),
            "backbone": config.model.build_kwargs().get("backbone", {}).get("name"), "c5_stride": int(model.backbone.strides[-1]),
            "loss_terms": [t.kwargs.get("label") or t.name for t in config.loss.terms],
            "optimizer": config.optim.name, "feat_dim": model.feat_dim,
            "overrides": args.overrides.get(name, []), "forward_gmacs": round(gmacs, 2)}
    return TrainStep(model, objective), optimizer, batches, model, info, config.optim.grad_clip


def build_reference_step(args, device):
    import torch
    import torchvision
    from torch import nn

    model = getattr(torchvision.models, args.reference)(weights=None, num_classes=1000).to(device)
    gmacs = forward_gmacs(model, args.size, device, conditioned=False)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, **fused)
    if args.compile:
        model.compile(mode=args.compile_mode)
    criterion = nn.CrossEntropyLoss()

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            loss = criterion(self.model(batch["image"]), batch["item"])
            return loss, {"cross_entropy": float(loss.detach())}  # logged like the objective's terms

    labels = torch.randint(0, 1000, (args.batch,), device=device)
    info = {"recipe": None, "backbone": f"torchvision {args.reference}", "c5_stride": 32, "loss_terms": ["cross_entropy"],
            "optimizer": "sgd", "feat_dim": None, "overrides": [], "forward_gmacs": round(gmacs, 2)}
    return Step(), optimizer, [{"item": labels}], model, info, None


def run_worker(args, name: str) -> dict:
    import torch

    from fashion_retrieval.engine.distributed import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    on_cuda = device.type == "cuda"
    # Off by default, as in engine/train.py; with fixed shapes cuDNN then times its kernels once.
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    amp = args.amp  # bf16 autocast on any device (training: train.amp, auto = CUDA only)
    if name == REFERENCE:
        step_module, optimizer, label_batches, model, info, grad_clip = build_reference_step(args, device)
    else:
        step_module, optimizer, label_batches, model, info, grad_clip = build_project_step(name, args, device)
    height, width = args.size
    images = torch.rand(args.batch, 3, height, width, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batches = [{**labels, "image": images} for labels in label_batches]
    step_module.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def train_step(batch: dict) -> None:  # the body of the training loop in engine/train.py
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            total, _ = step_module(batch)
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} in {name}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()

    started = time.perf_counter()
    for i in range(args.warmup):
        train_step(batches[i % len(batches)])
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = time.perf_counter() - started
    peak_reset = on_cuda or reset_peak_rss()
    started = time.perf_counter()
    for i in range(args.steps):
        train_step(batches[(args.warmup + i) % len(batches)])
    if on_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if on_cuda:
        peak, memory_kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, memory_kind = (status_bytes("VmHWM") if peak_reset else None), "peak_rss"
    breakdown = profile_steps(train_step, batches, args.profile, device) if args.profile else None
    return {"model": name, **({"profile": breakdown} if breakdown else {}), **info, "amp": amp, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "images_per_s": args.batch * args.steps / seconds, "step_ms": 1e3 * seconds / args.steps,
            "warmup_s": warmup_s, "steps": args.steps, "peak_memory_gb": (peak / GIB) if peak is not None else None,
            "memory_kind": memory_kind}


# Operator kinds of a training step, first match wins (aten names; "backward" ops carry the
# forward's name in their own, e.g. ConvolutionBackward0 -> convolution_backward). Depthwise
# convolutions share the dense ones' operators and are told apart by their weight's shape.
OP_KINDS = (
    ("convolution", ("convolution", "conv2d", "conv_")),
    ("batch norm", ("batch_norm", "native_batch_norm")),
    ("activation", ("relu", "hardtanh", "silu", "sigmoid", "hardswish", "threshold")),
    ("matmul / linear", ("addmm", "mm", "matmul", "linear", "bmm", "cdist")),
    ("optimizer", ("_fused_adam", "_fused_sgd", "_foreach", "adam", "sgd")),
    ("memory format / copies", ("copy_", "contiguous", "clone", "to_dense", "_to_copy", "empty", "zero_", "fill_")),
    ("pooling / interpolation", ("pool", "upsample", "interpolate", "mean")),
)


def op_kind(name: str, input_shapes=()) -> str:
    lowered = name.lower()
    for kind, needles in OP_KINDS:
        if any(needle in lowered for needle in needles):
            if kind == "convolution":
                # a depthwise weight is [C, 1, k, k] with k > 1; activations have more than 1 channel
                depthwise = any(len(shape) == 4 and shape[1] == 1 and shape[2] > 1 for shape in input_shapes or ())
                kernel_1x1 = any(len(shape) == 4 and shape[2:] == [1, 1] for shape in input_shapes or ())
                return "depthwise convolution" if depthwise else ("1x1 convolution" if kernel_1x1 else kind)
            return kind
    return "other"


def profile_steps(train_step, batches: list[dict], steps: int, device) -> dict:
    """Self CPU time per operator kind over ``steps`` steps (torch.profiler), and the top operators:
    where a training step goes on this machine."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            train_step(batches[i % len(batches)])
    # self time of aten operators, so nothing is counted twice
    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.self_cpu_time_total > 0 and e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    kinds: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for event in events:
        kind = op_kind(event.key, event.input_shapes)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total
        time_and_calls = by_name.setdefault(event.key, [0.0, 0])
        time_and_calls[0] += event.self_cpu_time_total
        time_and_calls[1] += event.count
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:12]
    return {"steps": steps, "ms_per_step": total / 1e3 / steps,
            "by_kind": {k: round(100 * v / total, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [(name, round(100 * t / total, 1), calls // steps) for name, (t, calls) in top]}


def print_profiles(rows: list[dict]) -> None:
    for row in rows:
        profile = row.get("profile")
        if not profile:
            continue
        print(f"\n{row['model']}: self CPU time of aten operators, {profile['ms_per_step']:.0f} ms per step "
              f"(profiled, {profile['steps']} steps)")
        for kind, share in profile["by_kind"].items():
            print(f"  {kind:<26} {share:5.1f} %")
        print("  top operators (share %, calls per step): " + "; ".join(
            f"{name} {share} ({calls})" for name, share, calls in profile["top_ops"]))


def run_configuration(name: str) -> dict:
    # The parent's own arguments, plus which model this subprocess measures.
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", name]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:  # e.g. out of memory: a failed row, the others still run
        return {"model": name, "error": f"exit status {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], args) -> None:
    reference = next((r for r in rows if r["model"] == REFERENCE and "error" not in r), None)
    memory = "peak GPU GB" if rows and rows[0].get("memory_kind") == "cuda_max_allocated" else "peak RSS GB"
    header = (f"{'model':<10} {'backbone':<20} {'C5 stride':>9} {'images/s':>10} {'ms/step':>9} {'vs ref':>7} "
              f"{memory:>12} {'params M':>9} {'GMACs':>6}  loss terms")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['model']:<10} failed: {row['error']}")
            continue
        ratio = f"{row['images_per_s'] / reference['images_per_s']:.2f}" if reference else "-"
        peak = f"{row['peak_memory_gb']:.2f}" if row["peak_memory_gb"] is not None else "-"
        print(f"{row['model']:<10} {row['backbone']:<20} {row['c5_stride']:>9} {row['images_per_s']:>10.1f} {row['step_ms']:>9.1f} "
              f"{ratio:>7} {peak:>12} {row['params_m']:>9.1f} {row['forward_gmacs']:>6.2f}  "
              f"{', '.join(row['loss_terms'])}{'  ' + ' '.join(row['overrides']) if row['overrides'] else ''}")
    amp = any(row.get("amp") for row in rows)
    print(f"\nbatch {args.batch}, {args.size[0]}x{args.size[1]}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, amp {'bf16' if amp else 'off'}, channels_last {args.channels_last}, "
          f"compile {args.compile}; load average at the end {os.getloadavg()[0]:.1f}")


def parse_override(value: str) -> tuple[str, str]:
    name, sep, override = value.partition(":")
    if not sep or name not in RECIPES or "=" not in override:
        raise argparse.ArgumentTypeError(f"expected MODEL:key.path=value with MODEL one of {', '.join(RECIPES)}")
    return name, override


def parse_recipe(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or name not in RECIPES:
        raise argparse.ArgumentTypeError(f"expected MODEL=PATH with MODEL one of {', '.join(RECIPES)}")
    return name, Path(path).resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([REFERENCE, *RECIPES]),
                        help=f"comma list of {REFERENCE}, {', '.join(RECIPES)}")
    parser.add_argument("--backbone", default=None, help="replace the recipes' backbone (they use resnet50)")
    parser.add_argument("--reference", default="resnet50", help="torchvision classifier of the reference row")
    parser.add_argument("--recipe", type=parse_recipe, action="append", default=[], metavar="MODEL=PATH",
                        help="another recipe for a model (repeatable)")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                        metavar="MODEL:KEY=VALUE", help="recipe override for one model (repeatable), "
                        "e.g. mmfl_net:model.kwargs.fusion_channels=128")
    parser.add_argument("--num-items", type=int, default=VITON_TRAIN_GARMENTS, help="identities of the ID classifiers")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=64, help="images per step (the recipes' P×K is 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotune, compilation)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (on the CPU too: train.amp: true)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (not the losses)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--same-process", action="store_true", help="no subprocess per model (quick checks)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many steps: self CPU time per operator kind")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.recipe = dict(args.recipe)
    overrides: dict[str, list[str]] = {}
    for name, override in args.overrides:
        overrides.setdefault(name, []).append(override)
    args.overrides = overrides
    if args.worker:
        print(json.dumps(run_worker(args, args.worker)))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {REFERENCE, *RECIPES}
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    rows = [run_worker(args, name) if args.same_process else run_configuration(name) for name in models]
    print_table(rows, args)
    print_profiles(rows)
    if args.json:
        import torch

        from fashion_retrieval.engine.distributed import resolve_device
        from fashion_retrieval.provenance import hardware_description

        report = {"command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                  "hardware": hardware_description(resolve_device(args.device)),
                  "settings": {"batch": args.batch, "size": list(args.size), "steps": args.steps,
                               "warmup": args.warmup, "amp": args.amp, "channels_last": args.channels_last,
                               "compile": args.compile, "cudnn_benchmark": args.cudnn_benchmark,
                               "num_items": args.num_items,
                               "threads": args.threads or torch.get_num_threads()},
                  "load_average": os.getloadavg(), "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
