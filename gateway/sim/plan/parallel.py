"""``parallel_map``: the search's simulations over a process pool or a Ray cluster."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from gateway.sim.plan.request import PlanError

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(
    fn: Callable[[T], R], items: Sequence[T], jobs: int, ray_address: str | None, progress: bool
) -> list[R]:
    """``[fn(x) for x in items]``, in order, over a process pool or a Ray cluster, with a
    progress bar on a terminal."""
    bar = _bar(len(items), progress)
    try:
        if ray_address is not None:
            return _ray_map(fn, items, ray_address, bar)
        if jobs <= 1 or len(items) <= 1:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        results: dict[int, R] = {}
        with ProcessPoolExecutor(max_workers=min(jobs, len(items))) as pool:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                bar.update()
        return [results[i] for i in range(len(items))]
    finally:
        bar.close()


def _ray_map(fn: Callable[[T], R], items: Sequence[T], address: str, bar: Any) -> list[R]:
    try:
        import ray  # type: ignore[import-not-found]  # optional: pip install ray
    except ImportError:
        raise PlanError(
            "--ray needs the Ray package here and on the cluster: pip install 'pdgate[ray]'"
        ) from None
    ray.init(address=address, ignore_reinit_error=True)
    remote = ray.remote(fn)
    refs = [remote.remote(x) for x in items]
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        bar.update(len(done))
    return list(ray.get(refs))


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def _bar(total: int, enabled: bool) -> Any:
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="plan", file=sys.stderr, leave=False)
    return _NoBar()
