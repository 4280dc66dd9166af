"""One epoch of a shard-split loader on every rank, with a collective per batch (which would hang if one
rank had fewer batches than another); each rank saves its batch count, indices and opened shards.

Arguments: DATA OUT NUM_WORKERS. Launched by torchrun (2 gloo ranks) from tests/test_shard_split.py.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

import sslcli.data.streams as streams
from sslcli import distributed as dist
from sslcli.data import StreamOptions, build_loader, resolve_source


def to_tensor(image):  # noqa: ANN001, ANN201 - a picklable transform
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def main(data: str, out: Path, workers: int) -> None:
    dist.init_from_env(torch.device("cpu"))
    opened: list[str] = []
    real = streams.iter_tar_samples

    def counting(path):  # noqa: ANN001, ANN202
        opened.append(Path(path).name)
        return real(path)

    streams.iter_tar_samples = counting
    loader = build_loader(resolve_source(data), to_tensor, batch_size=4, shuffle=True, seed=2, epoch=1,
                          num_workers=workers, rank=dist.rank(), world_size=dist.world_size(),
                          options=StreamOptions(split_by="shard", shuffle_buffer=8))
    steps, indices = 0, []
    for batch in loader:
        total = dist.all_reduce_sum_(torch.ones(()))  # every rank must arrive for every batch
        assert int(total) == dist.world_size()
        steps += 1
        indices.extend(batch["index"].tolist())
    dist.barrier()
    result = {"mode": loader.mode, "len": len(loader), "steps": steps, "indices": indices, "opened": opened}
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(result))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
