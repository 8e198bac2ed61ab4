"""A/B experiments: named arms, each a set of request options (rerank, user model, candidates, diversity...),
assigned by a hash of (experiment, user id), and their live outcomes from the impression log (issue 20).

- Assignment is a pure function of the experiment's name and arms and the user id, so every process and every
  restart puts a user in the same arm, and arms stay balanced by their weights.
- At most one experiment runs at a time: its arm's options fill the options a request leaves unset (a request
  that sets an option keeps it). Stopped experiments stay listed with their outcomes; a name is never reused,
  and arms cannot change: a different test is a new experiment.
- Definitions live in the impression log's environment (`experiments` database), shared by a machine's
  processes; each process rereads them at most every REFRESH_S, so a replica follows a start or stop within it.
- Outcomes: impressions per arm and attributed events by type (impressions.py). CTR = the share of impressions
  with at least one attributed click, conversion = with at least one attributed purchase, each with a Wilson 95%
  interval; clicks and purchases (all of them) are reported beside.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from dataclasses import asdict, fields

from streamrec.engine.api import ARM_OPTIONS, Arm, Experiment, RecommendQuery
from streamrec.engine.errors import FailedPrecondition, InvalidArgument, NotFound

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_ARMS = 16
REFRESH_S = 1.0
_Z95 = 1.959963984540054
_QUERY_DEFAULTS = {f.name: f.default for f in fields(RecommendQuery)}  # what a request leaves unset


class AlreadyExists(FailedPrecondition):
    """A second experiment of a name (a name is never reused)."""


def assign(experiment: Experiment, user_id: str) -> Arm:
    """The user's arm: a uniform draw from a hash of (experiment, user), cut by the arms' weights."""
    digest = hashlib.blake2b(f"{experiment.name}\0{user_id}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2.0**64 * sum(arm.weight for arm in experiment.arms)
    for arm in experiment.arms:
        point -= arm.weight
        if point < 0:
            return arm
    return experiment.arms[-1]


def _decode(raw: bytes) -> Experiment:
    data = json.loads(raw)
    data["arms"] = [Arm(**arm) for arm in data["arms"]]
    return Experiment(**data)


def check_experiment(experiment: Experiment, check_options) -> None:
    """INVALID_ARGUMENT naming the field for a bad name, arm list, weight or option. `check_options(options)`
    validates an arm's options as a request would (raising InvalidArgument/FailedPrecondition with the field)."""
    if not NAME.match(experiment.name or ""):
        raise InvalidArgument("name", "must be 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter "
                                      f"or digit, got {experiment.name!r}")
    if not 2 <= len(experiment.arms) <= MAX_ARMS:
        raise InvalidArgument("arms", f"an experiment needs 2 to {MAX_ARMS} arms, got {len(experiment.arms)}")
    seen = set()
    for i, arm in enumerate(experiment.arms):
        if not NAME.match(arm.name or "") or arm.name in seen:
            raise InvalidArgument(f"arms[{i}].name", f"must be a distinct name of a-z, 0-9, '_', '.', '-', got {arm.name!r}")
        seen.add(arm.name)
        if not (math.isfinite(arm.weight) and 0 < arm.weight <= 1e6):
            raise InvalidArgument(f"arms[{i}].weight", f"must be a positive number, got {arm.weight}")
        unknown = sorted(set(arm.options) - set(ARM_OPTIONS))
        if unknown:
            raise InvalidArgument(f"arms[{i}].options", f"an arm may set only {', '.join(ARM_OPTIONS)}; not {unknown}")
        try:
            check_options(arm.options)
        except (InvalidArgument, FailedPrecondition) as error:
            raise type(error)(f"arms[{i}].{error.field}" if error.field else f"arms[{i}]", error.message) from None


def options_checker(build_query, has_sequence_model: bool):
    """check_experiment's `check_options` for an engine: an arm's options must make a valid request there."""
    def check(options: dict) -> None:
        if options.get("user_model") == "sequence" and not has_sequence_model:
            raise FailedPrecondition("user_model", "this server has no sequence model")
        try:
            build_query("arm", None, **options)
        except TypeError as error:
            raise InvalidArgument("options", f"not an option of this server: {error}") from None
    return check


def wilson(successes: int, trials: int) -> tuple[float, float, float]:
    """(rate, low, high): the Wilson score 95% interval of a proportion."""
    if trials <= 0:
        return 0.0, 0.0, 0.0
    p = successes / trials
    z2 = _Z95 * _Z95
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = _Z95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def arm_report(counts: dict) -> dict:
    impressions = int(counts.get("impressions", 0))
    clicks, purchases = int(counts.get("click", 0)), int(counts.get("purchase", 0))
    ctr, ctr_low, ctr_high = wilson(int(counts.get("clicked", 0)), impressions)
    conversion, conv_low, conv_high = wilson(int(counts.get("converted", 0)), impressions)
    return {"impressions": impressions, "clicks": clicks, "purchases": purchases,
            "attributed": int(counts.get("attributed", 0)), "ctr": ctr, "ctr_low": ctr_low, "ctr_high": ctr_high,
            "conversion": conversion, "conversion_low": conv_low, "conversion_high": conv_high}


class Experiments:
    """The experiments of an impression log's environment."""

    def __init__(self, log):
        self.log = log
        self.db = log.dbs["experiments"]
        self._lock = threading.Lock()
        self._running: Experiment | None = None
        self._read_at = -1.0

    def list(self) -> list[Experiment]:
        with self.log.env.begin() as txn:
            return sorted((_decode(raw) for _, raw in txn.cursor(db=self.db)), key=lambda e: e.created_ms)

    def get(self, name: str) -> Experiment:
        with self.log.env.begin() as txn:
            raw = txn.get(name.encode(), db=self.db)
        if raw is None:
            raise NotFound("name", f"no experiment named {name!r}")
        return _decode(raw)

    def create(self, experiment: Experiment) -> Experiment:
        experiment.created_ms, experiment.stopped_ms = int(time.time() * 1000), 0
        with self.log.env.begin(write=True) as txn:
            if txn.get(experiment.name.encode(), db=self.db) is not None:
                raise AlreadyExists("name", f"an experiment named {experiment.name!r} exists; a name is never "
                                            "reused (a changed test is a new experiment)")
            for _, raw in txn.cursor(db=self.db):
                other = _decode(raw)
                if other.running:
                    raise FailedPrecondition("name", f"experiment {other.name!r} is running; stop it first "
                                                     "(one experiment runs at a time)")
            txn.put(experiment.name.encode(), json.dumps(asdict(experiment)).encode(), db=self.db)
        self._read_at = -1.0
        return experiment

    def stop(self, name: str) -> Experiment:
        with self.log.env.begin(write=True) as txn:
            raw = txn.get(name.encode(), db=self.db)
            if raw is None:
                raise NotFound("name", f"no experiment named {name!r}")
            experiment = _decode(raw)
            if experiment.running:
                experiment.stopped_ms = int(time.time() * 1000)
                txn.put(name.encode(), json.dumps(asdict(experiment)).encode(), db=self.db)
        self._read_at = -1.0
        return experiment

    def running(self) -> Experiment | None:
        """The running experiment, reread from the environment at most every REFRESH_S."""
        now = time.monotonic()
        if now - self._read_at >= REFRESH_S:
            with self._lock:
                if now - self._read_at >= REFRESH_S:
                    self._running = next((e for e in self.list() if e.running), None)
                    self._read_at = now
        return self._running

    def apply(self, query: RecommendQuery) -> None:
        """The running experiment's arm for the query's user fills the options the request left unset."""
        experiment = self.running()
        if experiment is None or not query.user_id:
            return
        arm = assign(experiment, query.user_id)
        for option, value in arm.options.items():
            if getattr(query, option, None) == _QUERY_DEFAULTS.get(option):
                setattr(query, option, value)
        query.experiment, query.arm = experiment.name, arm.name

    def report(self, name: str) -> dict:
        """The experiment and its arms' live outcomes."""
        experiment = self.get(name)
        totals = self.log.totals()
        arms = {arm.name: arm_report(totals.get(f"{name}/{arm.name}", {})) for arm in experiment.arms}
        return {"experiment": experiment, "arms": arms}
