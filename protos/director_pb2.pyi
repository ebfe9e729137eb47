from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CollaboratorState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLLABORATOR_STATE_UNSPECIFIED: _ClassVar[CollaboratorState]
    COLLABORATOR_APPROVAL_PENDING: _ClassVar[CollaboratorState]
    COLLABORATOR_SITE_APPROVED: _ClassVar[CollaboratorState]
    COLLABORATOR_SITE_REJECTED: _ClassVar[CollaboratorState]
    COLLABORATOR_REFUSED: _ClassVar[CollaboratorState]
    COLLABORATOR_STARTED: _ClassVar[CollaboratorState]
    COLLABORATOR_RUNNING: _ClassVar[CollaboratorState]
    COLLABORATOR_EXITED: _ClassVar[CollaboratorState]
    COLLABORATOR_GAVE_UP: _ClassVar[CollaboratorState]

class ExperimentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_STATE_UNSPECIFIED: _ClassVar[ExperimentState]
    EXPERIMENT_SUBMITTED: _ClassVar[ExperimentState]
    EXPERIMENT_APPROVED: _ClassVar[ExperimentState]
    EXPERIMENT_REJECTED: _ClassVar[ExperimentState]
    EXPERIMENT_WAITING: _ClassVar[ExperimentState]
    EXPERIMENT_RUNNING: _ClassVar[ExperimentState]
    EXPERIMENT_COMPLETED: _ClassVar[ExperimentState]
    EXPERIMENT_FAILED: _ClassVar[ExperimentState]
    EXPERIMENT_CANCELLED: _ClassVar[ExperimentState]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_BEST: _ClassVar[ModelKind]
    MODEL_KIND_LAST: _ClassVar[ModelKind]
COLLABORATOR_STATE_UNSPECIFIED: CollaboratorState
COLLABORATOR_APPROVAL_PENDING: CollaboratorState
COLLABORATOR_SITE_APPROVED: CollaboratorState
COLLABORATOR_SITE_REJECTED: CollaboratorState
COLLABORATOR_REFUSED: CollaboratorState
COLLABORATOR_STARTED: CollaboratorState
COLLABORATOR_RUNNING: CollaboratorState
COLLABORATOR_EXITED: CollaboratorState
COLLABORATOR_GAVE_UP: CollaboratorState
EXPERIMENT_STATE_UNSPECIFIED: ExperimentState
EXPERIMENT_SUBMITTED: ExperimentState
EXPERIMENT_APPROVED: ExperimentState
EXPERIMENT_REJECTED: ExperimentState
EXPERIMENT_WAITING: ExperimentState
EXPERIMENT_RUNNING: ExperimentState
EXPERIMENT_COMPLETED: ExperimentState
EXPERIMENT_FAILED: ExperimentState
EXPERIMENT_CANCELLED: ExperimentState
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_BEST: ModelKind
MODEL_KIND_LAST: ModelKind

class ShardInfo(_message.Message):
    __slots__ = ("description", "train_samples", "valid_samples", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALID_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    description: str
    train_samples: int
    valid_samples: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, description: _Optional[str] = ..., train_samples: _Optional[int] = ..., valid_samples: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterEnvoyRequest(_message.Message):
    __slots__ = ("shard", "version")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    shard: ShardInfo
    version: str
    def __init__(self, shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class RegisterEnvoyResponse(_message.Message):
    __slots__ = ("health_check_seconds",)
    HEALTH_CHECK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    health_check_seconds: float
    def __init__(self, health_check_seconds: _Optional[float] = ...) -> None: ...

class CollaboratorReport(_message.Message):
    __slots__ = ("experiment_id", "state", "exit_code", "reason")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    state: CollaboratorState
    exit_code: int
    reason: str
    def __init__(self, experiment_id: _Optional[str] = ..., state: _Optional[_Union[CollaboratorState, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportCollaboratorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EnvoyHeartbeatRequest(_message.Message):
    __slots__ = ("collaborators",)
    COLLABORATORS_FIELD_NUMBER: _ClassVar[int]
    collaborators: _containers.RepeatedCompositeFieldContainer[CollaboratorReport]
    def __init__(self, collaborators: _Optional[_Iterable[_Union[CollaboratorReport, _Mapping]]] = ...) -> None: ...

class ExperimentToStart(_message.Message):
    __slots__ = ("experiment_id", "name", "owner", "plan_yaml", "collaborator_name")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PLAN_YAML_FIELD_NUMBER: _ClassVar[int]
    COLLABORATOR_NAME_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    name: str
    owner: str
    plan_yaml: str
    collaborator_name: str
    def __init__(self, experiment_id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., plan_yaml: _Optional[str] = ..., collaborator_name: _Optional[str] = ...) -> None: ...

class LogRequestToEnvoy(_message.Message):
    __slots__ = ("request_id", "experiment_id", "offset", "max_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    experiment_id: str
    offset: int
    max_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., offset: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class EnvoyHeartbeatResponse(_message.Message):
    __slots__ = ("register_again", "health_check_seconds", "start", "stop", "log_requests")
    REGISTER_AGAIN_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOG_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    register_again: bool
    health_check_seconds: float
    start: _containers.RepeatedCompositeFieldContainer[ExperimentToStart]
    stop: _containers.RepeatedScalarFieldContainer[str]
    log_requests: _containers.RepeatedCompositeFieldContainer[LogRequestToEnvoy]
    def __init__(self, register_again: _Optional[bool] = ..., health_check_seconds: _Optional[float] = ..., start: _Optional[_Iterable[_Union[ExperimentToStart, _Mapping]]] = ..., stop: _Optional[_Iterable[str]] = ..., log_requests: _Optional[_Iterable[_Union[LogRequestToEnvoy, _Mapping]]] = ...) -> None: ...

class LogUpload(_message.Message):
    __slots__ = ("request_id", "data", "found", "log_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    LOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    data: bytes
    found: bool
    log_size: int
    def __init__(self, request_id: _Optional[str] = ..., data: _Optional[bytes] = ..., found: _Optional[bool] = ..., log_size: _Optional[int] = ...) -> None: ...

class UploadLogResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubmitChunk(_message.Message):
    __slots__ = ("plan_yaml", "name", "has_initial_model", "initial_model_size", "initial_model_data")
    PLAN_YAML_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HAS_INITIAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    INITIAL_MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_MODEL_DATA_FIELD_NUMBER: _ClassVar[int]
    plan_yaml: str
    name: str
    has_initial_model: bool
    initial_model_size: int
    initial_model_data: bytes
    def __init__(self, plan_yaml: _Optional[str] = ..., name: _Optional[str] = ..., has_initial_model: _Optional[bool] = ..., initial_model_size: _Optional[int] = ..., initial_model_data: _Optional[bytes] = ...) -> None: ...

class SiteStatus(_message.Message):
    __slots__ = ("site", "state", "exit_code", "reason", "online", "budget")
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    site: str
    state: CollaboratorState
    exit_code: int
    reason: str
    online: bool
    budget: SiteBudget
    def __init__(self, site: _Optional[str] = ..., state: _Optional[_Union[CollaboratorState, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., online: _Optional[bool] = ..., budget: _Optional[_Union[SiteBudget, _Mapping]] = ...) -> None: ...

class SiteBudget(_message.Message):
    __slots__ = ("epsilon", "delta", "max_epsilon", "round")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    max_epsilon: float
    round: int
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., max_epsilon: _Optional[float] = ..., round: _Optional[int] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("experiment_id", "name", "owner", "state", "reason", "submitted_at", "started_at", "ended_at", "sites", "rounds", "rounds_completed", "queue_position", "has_best_model", "has_last_model", "secure_aggregation", "differential_privacy")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    HAS_BEST_MODEL_FIELD_NUMBER: _ClassVar[int]
    HAS_LAST_MODEL_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIAL_PRIVACY_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    name: str
    owner: str
    state: ExperimentState
    reason: str
    submitted_at: float
    started_at: float
    ended_at: float
    sites: _containers.RepeatedCompositeFieldContainer[SiteStatus]
    rounds: int
    rounds_completed: int
    queue_position: int
    has_best_model: bool
    has_last_model: bool
    secure_aggregation: bool
    differential_privacy: DifferentialPrivacy
    def __init__(self, experiment_id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[_Union[ExperimentState, str]] = ..., reason: _Optional[str] = ..., submitted_at: _Optional[float] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., sites: _Optional[_Iterable[_Union[SiteStatus, _Mapping]]] = ..., rounds: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., queue_position: _Optional[int] = ..., has_best_model: _Optional[bool] = ..., has_last_model: _Optional[bool] = ..., secure_aggregation: _Optional[bool] = ..., differential_privacy: _Optional[_Union[DifferentialPrivacy, _Mapping]] = ...) -> None: ...

class DifferentialPrivacy(_message.Message):
    __slots__ = ("clip", "noise_multiplier", "delta", "max_epsilon", "epsilon")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    clip: float
    noise_multiplier: float
    delta: float
    max_epsilon: float
    epsilon: float
    def __init__(self, clip: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., delta: _Optional[float] = ..., max_epsilon: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class ExperimentRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class ReviewRequest(_message.Message):
    __slots__ = ("experiment_id", "reason")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    reason: str
    def __init__(self, experiment_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments",)
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ...) -> None: ...

class MetricStreamRequest(_message.Message):
    __slots__ = ("experiment_id", "from_row", "follow")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ROW_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    from_row: int
    follow: bool
    def __init__(self, experiment_id: _Optional[str] = ..., from_row: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class MetricRow(_message.Message):
    __slots__ = ("index", "json")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    index: int
    json: str
    def __init__(self, index: _Optional[int] = ..., json: _Optional[str] = ...) -> None: ...

class LogRequestFromUser(_message.Message):
    __slots__ = ("experiment_id", "site", "offset", "follow")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    site: str
    offset: int
    follow: bool
    def __init__(self, experiment_id: _Optional[str] = ..., site: _Optional[str] = ..., offset: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("experiment_id", "kind")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    kind: ModelKind
    def __init__(self, experiment_id: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ...) -> None: ...

class ModelFileChunk(_message.Message):
    __slots__ = ("total_size", "data")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    data: bytes
    def __init__(self, total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RemoveExperimentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnvoysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EnvoyInfo(_message.Message):
    __slots__ = ("name", "shard", "online", "registered_at", "last_seen", "version", "experiments")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shard: ShardInfo
    online: bool
    registered_at: float
    last_seen: float
    version: str
    experiments: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., online: _Optional[bool] = ..., registered_at: _Optional[float] = ..., last_seen: _Optional[float] = ..., version: _Optional[str] = ..., experiments: _Optional[_Iterable[str]] = ...) -> None: ...

class ListEnvoysResponse(_message.Message):
    __slots__ = ("envoys", "health_check_seconds")
    ENVOYS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    envoys: _containers.RepeatedCompositeFieldContainer[EnvoyInfo]
    health_check_seconds: float
    def __init__(self, envoys: _Optional[_Iterable[_Union[EnvoyInfo, _Mapping]]] = ..., health_check_seconds: _Optional[float] = ...) -> None: ...
