"""Training throughput per method: model step alone (synthetic tensors) and end to end (shards).

    python -m benchmarks.train_throughput --data demo/data --steps 20 --out benchmarks/results/throughput.json

Uses each method's `small` recipe (the one `make demo` trains), so the figures describe that job.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sslcli.augment import MultiView, eval_transform
from sslcli.config import build_config
from sslcli.data.reader import build_loader, resolve_source
from sslcli.engine.optim import build_optimizer
from sslcli.evaluation import extract_features
from sslcli.methods import METHODS, Method, build_method, get_method
from sslcli.runs import run_encoder


def _step(method, optimizer, views, batch) -> None:  # noqa: ANN001
    out = method(views, batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    method.after_step(0.5)


def _before_epoch_seconds(method, source, cfg) -> float:  # noqa: ANN001
    """Time of the method's per-epoch hook (DeepCluster: features of every image + PCA + k-means)."""
    transform = eval_transform(cfg.augment.eval_size, cfg.augment.eval_crop_pct, cfg.augment.mean, cfg.augment.std)
    start = time.perf_counter()
    method.before_epoch(0, lambda module: extract_features(module, source, transform, batch_size=2 * cfg.batch_size,
                                                           device=torch.device("cpu"),
                                                           num_workers=cfg.num_workers)[0])
    return time.perf_counter() - start


def small_tokenizer(directory: Path) -> Path:
    """An untrained tokenizer of the dvae small recipe's layout (beit's step costs the same with a trained one)."""
    from sslcli.models.dvae import DiscreteVAE, save_tokenizer

    cfg = build_config("dvae", "small", {})
    args = {k: v for k, v in cfg.method_args.items() if k in ("vocab", "code_dim", "widths")}
    tokenizer = DiscreteVAE(args["vocab"], args["code_dim"], tuple(args["widths"]))
    meta = {"image_size": str(cfg.augment.eval_size), "mean": json.dumps(list(cfg.augment.mean)),
            "std": json.dumps(list(cfg.augment.std))}
    return save_tokenizer(tokenizer, directory / "tokenizer.safetensors", meta)


def measure(name: str, data: str, steps: int, warmup: int = 3, sets: list[str] | None = None) -> dict:
    cfg = build_config(name, "small", {"data": data}, sets or [])  # a recipe such as seer names the method it runs
    torch.manual_seed(0)
    source = resolve_source(data)
    method = build_method(cfg.method, run_encoder(cfg), cfg.method_args, num_samples=source.num_samples,
                          augment=cfg.augment, epochs=cfg.epochs)
    method = method.to(memory_format=torch.channels_last).train()
    hook_s = _before_epoch_seconds(method, source, cfg) if type(method).before_epoch is not Method.before_epoch else 0
    method.train()
    optimizer = build_optimizer(method.param_groups(), cfg.optim, cfg.optim.scaled_lr(cfg.batch_size))
    bs, sizes = cfg.batch_size, [v.size for v in cfg.augment.views for _ in range(v.count)]

    views = [torch.randn(bs, 3, s, s).to(memory_format=torch.channels_last) for s in sizes]
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        _step(method, optimizer, views, {"index": torch.arange(bs)})  # memory banks key on the index
    model_ips = bs * steps / (time.perf_counter() - start)

    loader = build_loader(source, MultiView(cfg.augment, method.extra_fields()), batch_size=bs, shuffle=True,
                          num_workers=cfg.num_workers)
    start = time.perf_counter()
    n = 0
    for n, _ in enumerate(loader, 1):
        if n == steps:
            break
    data_ips = bs * n / (time.perf_counter() - start)

    seen = 0
    for i, batch in enumerate(loader):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        _step(method, optimizer, [v.to(memory_format=torch.channels_last) for v in batch["views"]], batch)
        seen += bs
        if i == warmup + steps - 1:
            break
    e2e_ips = seen / (time.perf_counter() - start)
    return {"method": name, "arch": cfg.arch if get_method(cfg.method).has_backbone else "own networks", "batch_size": bs, "image_size": sizes[0], "views": len(sizes),
            "num_workers": cfg.num_workers, "model_img_per_s": round(model_ips, 1),
            "data_img_per_s": round(data_ips, 1), "end_to_end_img_per_s": round(e2e_ips, 1),
            "before_epoch_s": round(hook_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="beit's tokenizer (a dvae run); default: an untrained one of the small layout")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    get_method("simclr")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer or small_tokenizer(Path(tmp))
        sets = {"beit": [f"method_args.tokenizer={tokenizer}"]}
        rows = [measure(m, args.data, args.steps, sets=sets.get(m)) for m in (args.methods or sorted(METHODS))]
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "device": "cpu"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print("| method | arch | batch | model img/s | data img/s | end-to-end img/s | per-epoch hook (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['arch']} @ {r['image_size']} px | {r['batch_size']} | {r['model_img_per_s']} | "
              f"{r['data_img_per_s']} | {r['end_to_end_img_per_s']} | {r['before_epoch_s'] or ''} |")


if __name__ == "__main__":
    main()
