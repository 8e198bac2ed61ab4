"""ExperimentService: A/B experiments over gRPC (the engine side: engine/feedback/experiments.py). Servicer and
protobuf conversion in one place; a replica forwards the writes to its primary."""
from __future__ import annotations

from streamrec.engine.errors import InvalidArgument
from streamrec.engine.api import ARM_OPTIONS, Arm, Experiment
from streamrec.server import convert
from streamrec.server.errors import unary
from streamrec.v1 import experiments_pb2, experiments_pb2_grpc, recommend_pb2

# A RecommendRequest's own fields, which an arm's options must leave unset.
_REQUEST_FIELDS = ("request_id", "user_id", "k", "exclude_seen", "exclude_item_ids", "include_categories",
                   "exclude_categories", "min_seq", "log_id")


def arm_options(index: int, options: recommend_pb2.RecommendRequest) -> dict:
    """The options an arm's RecommendRequest template sets, as RecommendQuery fields."""
    for name in _REQUEST_FIELDS:
        field = options.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            continue
        set_here = options.HasField(name) if field.has_presence else bool(getattr(options, name))
        if set_here:
            raise InvalidArgument(f"arms[{index}].options.{name}", "belongs to the request, not to an arm: leave it unset")
    defaults = convert.query_fields(recommend_pb2.RecommendRequest())
    chosen = convert.query_fields(options)
    return {k: v for k, v in chosen.items() if k in ARM_OPTIONS and v != defaults.get(k)}


def experiment_from(message: experiments_pb2.Experiment) -> tuple[str, list[Arm], str]:
    arms = [Arm(arm.name, arm.weight, arm_options(i, arm.options)) for i, arm in enumerate(message.arms)]
    return message.name, arms, message.description


def _options_message(options: dict) -> recommend_pb2.RecommendRequest:
    from streamrec.clients.client import StreamrecClient  # the request builder clients use

    return StreamrecClient.recommend_request("", **options)


def experiment_message(experiment: Experiment, results: dict | None = None) -> experiments_pb2.Experiment:
    message = experiments_pb2.Experiment(
        name=experiment.name, description=experiment.description, running=experiment.running,
        created_ms=experiment.created_ms, stopped_ms=experiment.stopped_ms,
        arms=[experiments_pb2.ExperimentArm(name=a.name, weight=a.weight, options=_options_message(a.options))
              for a in experiment.arms])
    for arm, outcome in (results or {}).items():
        message.results.add(arm=arm, **outcome)
    return message


class ExperimentServicer(experiments_pb2_grpc.ExperimentServiceServicer):
    def __init__(self, holder):
        self.holder = holder

    @unary
    def CreateExperiment(self, request, context):
        if primary := self.holder.primary:
            return primary.unary(primary.experiments.CreateExperiment, request, context)
        return experiment_message(self.holder.get().create_experiment(*experiment_from(request.experiment)))

    @unary
    def StopExperiment(self, request, context):
        if primary := self.holder.primary:
            return primary.unary(primary.experiments.StopExperiment, request, context)
        engine = self.holder.get()
        engine.stop_experiment(request.name)
        report = engine.experiment_report(request.name)
        return experiment_message(report["experiment"], report["arms"])

    @unary
    def GetExperiment(self, request, context):
        report = self.holder.get().experiment_report(request.name)
        return experiment_message(report["experiment"], report["arms"])

    @unary
    def ListExperiments(self, request, context):
        return experiments_pb2.ListExperimentsResponse(
            experiments=[experiment_message(e) for e in self.holder.get().list_experiments()])
