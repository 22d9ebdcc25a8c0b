"""`LiveBytes`: tensor bytes alive on the CPU, counted as operations create storages and as they are freed."""

import torch

from vlmtune.engine.memtrack import LiveBytes


def test_live_bytes_counts_each_new_storage_once_and_forgets_it_when_freed():
    weight = torch.ones(1000)  # made before tracking: never counted, not even through a view
    live = LiveBytes(torch.device("cpu"), base=100)
    peaks = []
    live.on_peak = lambda: peaks.append(live.live)
    with live:
        x = weight * 2  # a new storage: 4,000 bytes
        y = x.view(10, 100)  # a view: nothing new
        x.add_(1)  # in place: nothing new
        first = weight[:10].clone()  # a view of the weight is free, its clone is 40 bytes
        assert live.live == 100 + 4000 + 40
        del x, y
        assert live.live == 100 + 40  # x's storage is gone once its last view is
        z = torch.cat([weight, weight])  # 8,000 bytes
        assert live.live == 100 + 40 + 8000
        del z, first
    assert live.live == 100
    assert live.max_live == 100 + 40 + 8000 and peaks[-1] == live.max_live
