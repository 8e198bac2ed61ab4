"""First start: fill an empty data dir with a dataset and a model trained on it (iALS by default, see
offline/training.py), atomically (built in a side folder and renamed), so a crash mid-seed never leaves a
half-seeded store."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from streamrec.engine.api import ItemSpec
from streamrec.engine.config import STORE_FOLDER, EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.observer import EngineObserver
from streamrec.engine.offline import datasets
from streamrec.engine.offline.datasets import Dataset

log = logging.getLogger(__name__)


def seed_engine(engine: Engine, dataset: Dataset, seed: int = 0, method: str = "ials", progress: bool = False,
                **train_options) -> str:
    """Train on the dataset (`training.train`; method ials or svd) and load items, events and user vectors
    into an empty engine. Returns the model version."""
    from streamrec.engine.offline.training import train

    started = time.perf_counter()
    catalog_ids = list(dataset.item_categories)
    result = train(dataset.interactions, method=method, dim=engine.dim, seed=seed, item_ids=catalog_ids,
                   progress=progress, fold_alpha=engine.config.online_alpha, fold_reg=engine.config.online_reg,
                   **train_options)
    model_version = result.model_version(dataset.name)
    seed_trained(engine, dataset, result.factors.item_ids, result.factors.item_vectors, result.factors.user_ids,
                 result.user_raw, model_version)
    log.info("seeded %s: %d items, %d users, %d events, model %s in %.1f s", dataset.name, len(catalog_ids),
             len(result.factors.user_ids), len(dataset.interactions), model_version, time.perf_counter() - started)
    return model_version


def seed_trained(engine: Engine, dataset: Dataset, item_ids: list[str], item_vectors: np.ndarray,
                 user_ids: list[str], user_vectors: np.ndarray, model_version: str) -> None:
    """Load a trained model with its dataset's catalog and events into an empty engine."""
    vectors = dict(zip(item_ids, item_vectors))
    specs = []
    for item_id in dataset.item_categories:
        vector = vectors.get(item_id)
        specs.append(ItemSpec(
            item_id, list(dataset.item_categories[item_id]), dict(dataset.item_attributes.get(item_id, {})),
            vector if vector is not None and np.any(vector) else None,  # no interactions: derive from categories
        ))
    events = list(dataset.interactions.events(f"{dataset.name}-"))
    engine.seed(specs, events, user_ids, user_vectors, model_version)


def open_engine(data_dir: str | Path, config: EngineConfig, dataset: str = "none", seed: int = 0,
                observer: EngineObserver | None = None) -> Engine:
    """Open <data_dir>/lmdb, seeding it with `dataset` first if it does not exist yet."""
    data_dir = Path(data_dir)
    store_dir = data_dir / STORE_FOLDER
    if not Engine.holds_store(store_dir) and dataset != "none":
        data = datasets.load(dataset, seed)
        staging = data_dir / f"{STORE_FOLDER}.seeding"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        log.info("empty data dir: seeding it with %s", dataset)
        with Engine(staging, config) as engine:
            seed_engine(engine, data, seed)
        staging.rename(store_dir)
    log.info("opening %s", store_dir)
    return Engine(store_dir, config, observer)
