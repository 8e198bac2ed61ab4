from streamrec.v1 import recommend_pb2 as _recommend_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExperimentArm(_message.Message):
    __slots__ = ("name", "weight", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    options: _recommend_pb2.RecommendRequest
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., options: _Optional[_Union[_recommend_pb2.RecommendRequest, _Mapping]] = ...) -> None: ...

class ArmResult(_message.Message):
    __slots__ = ("arm", "impressions", "clicks", "purchases", "attributed", "ctr", "ctr_low", "ctr_high", "conversion", "conversion_low", "conversion_high")
    ARM_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    PURCHASES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    CTR_FIELD_NUMBER: _ClassVar[int]
    CTR_LOW_FIELD_NUMBER: _ClassVar[int]
    CTR_HIGH_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_LOW_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_HIGH_FIELD_NUMBER: _ClassVar[int]
    arm: str
    impressions: int
    clicks: int
    purchases: int
    attributed: int
    ctr: float
    ctr_low: float
    ctr_high: float
    conversion: float
    conversion_low: float
    conversion_high: float
    def __init__(self, arm: _Optional[str] = ..., impressions: _Optional[int] = ..., clicks: _Optional[int] = ..., purchases: _Optional[int] = ..., attributed: _Optional[int] = ..., ctr: _Optional[float] = ..., ctr_low: _Optional[float] = ..., ctr_high: _Optional[float] = ..., conversion: _Optional[float] = ..., conversion_low: _Optional[float] = ..., conversion_high: _Optional[float] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("name", "description", "arms", "running", "created_ms", "stopped_ms", "results")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_MS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    arms: _containers.RepeatedCompositeFieldContainer[ExperimentArm]
    running: bool
    created_ms: int
    stopped_ms: int
    results: _containers.RepeatedCompositeFieldContainer[ArmResult]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ExperimentArm, _Mapping]]] = ..., running: _Optional[bool] = ..., created_ms: _Optional[int] = ..., stopped_ms: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ArmResult, _Mapping]]] = ...) -> None: ...

class CreateExperimentRequest(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class StopExperimentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments",)
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ...) -> None: ...
