"""What the trials of a sweep would all compute alike, computed once: each distinct data config's
prepared splits (the source's listing and index, the validation selection read into the object
store, a small decoded train set kept in memory).

Before, every trial did it again in its own driver: an architecture sweep of `tiny-vision`
re-rendered its 25,520 training glyphs (~23 s on 2 cores) per trial. Now one `SharedData` actor
per sweep session (on the sweep driver's node, named after the sweep so a trial finds it) prepares
a data config on its first trial's request and hands later trials the same object refs: the
samples are read and decoded once, and each trial's workers read them from the object store.

The key is what the data depends on: the data section, the storage settings (not the run's own
path), `trainer.eval_samples` (the validation selection), and the model fields the built-in
sources read (`num_classes`, `in_channels`, `alphabet`); a plug-in source may read any model
field, so for it the whole model section counts. A sweep over `data.max_bytes` (the data
ablation) thus prepares each size once; an architecture sweep prepares its data once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from e2e_dist.config import RunConfig
from e2e_dist.errors import UserError

log = logging.getLogger("e2e_dist.sweep")

KEEP = 4
"""Data configs whose prepared splits the actor holds at once (oldest dropped first: trials still
using them keep their refs alive, Ray frees them after)."""
MODEL_FIELDS_BUILT_INS_READ = ("num_classes", "in_channels", "alphabet")


def actor_name(sweep_uri: str) -> str:
    import hashlib

    return "e2e-dist-shared-data-" + hashlib.sha256(sweep_uri.encode()).hexdigest()[:16]


def data_key(cfg: RunConfig) -> str:
    """What a run's prepared data depends on, as one string (equal strings: the same data)."""
    from e2e_dist.data.registry import SOURCES

    model = cfg.model.model_dump(mode="json")
    builder = SOURCES.get(cfg.data.source)
    built_in = getattr(builder, "__module__", "").startswith("e2e_dist.")
    if built_in:
        model = {k: model[k] for k in MODEL_FIELDS_BUILT_INS_READ if k in model}
    storage = {k: v for k, v in cfg.storage.model_dump(mode="json").items() if k != "path"}
    return json.dumps({"data": cfg.data.model_dump(mode="json"), "model": model, "storage": storage,
                       "eval_samples": cfg.trainer.eval_samples}, sort_keys=True, default=str)


class SharedData:
    """The actor (threaded: trials of different data configs prepare at once, those of one config
    wait for its first)."""

    def __init__(self) -> None:
        self._prepared: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = self.misses = 0

    def get(self, run: dict[str, Any]) -> tuple[Any, bool]:
        """(the run's PreparedData, whether an earlier trial prepared it)."""
        from e2e_dist.train.launcher import prepare_data

        cfg = RunConfig.model_validate(run)
        key = data_key(cfg)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._prepared:
                    self._prepared.move_to_end(key)
                    self.hits += 1
                    return self._prepared[key], True
            prepared = prepare_data(cfg)
            with self._lock:
                self._prepared[key] = prepared
                self.misses += 1
                while len(self._prepared) > KEEP:
                    self._prepared.popitem(last=False)
            return prepared, False

    def counts(self) -> dict[str, int]:
        return {"prepared": self.misses, "reused": self.hits}


def start(sweep_uri: str):
    """The sweep's actor, on this (the sweep driver's) node; it lives as long as the driver holds it."""
    import ray

    from e2e_dist.train.ray_env import on_this_node

    return (ray.remote(num_cpus=0, max_concurrency=8)(SharedData)
            .options(name=actor_name(sweep_uri), **on_this_node()).remote())


def lookup(sweep_uri: str):
    """In a trial: the sweep's actor, or None (a sweep driver of an older version, or gone)."""
    import ray

    try:
        return ray.get_actor(actor_name(sweep_uri))
    except ValueError:
        return None


def prepared_for(actor: Any, cfg: RunConfig):
    """The trial's PreparedData from the sweep's actor (prepared now if it is the first of its config)."""
    import ray

    try:
        prepared, reused = ray.get(actor.get.remote(cfg.model_dump(mode="json")))
    except ray.exceptions.RayTaskError as e:  # bad data is the trial's one-line error, as without the actor
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise
    if reused:
        from e2e_dist.console import FILE_ONLY

        log.info("data: %s reuses the data an earlier trial of the sweep prepared", cfg.name, extra=FILE_ONLY)
    return prepared
