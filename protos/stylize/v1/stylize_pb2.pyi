import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
    POOLING_AVG: _ClassVar[Pooling]

class Init(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INIT_UNSPECIFIED: _ClassVar[Init]
    INIT_NOISE: _ClassVar[Init]
    INIT_CONTENT: _ClassVar[Init]
    INIT_IMAGE: _ClassVar[Init]

class ColorMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLOR_MODE_UNSPECIFIED: _ClassVar[ColorMode]
    COLOR_MODE_STYLE: _ClassVar[ColorMode]
    COLOR_MODE_LUMINANCE: _ClassVar[ColorMode]
    COLOR_MODE_HISTOGRAM: _ClassVar[ColorMode]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
POOLING_UNSPECIFIED: Pooling
POOLING_MAX: Pooling
POOLING_AVG: Pooling
INIT_UNSPECIFIED: Init
INIT_NOISE: Init
INIT_CONTENT: Init
INIT_IMAGE: Init
COLOR_MODE_UNSPECIFIED: ColorMode
COLOR_MODE_STYLE: ColorMode
COLOR_MODE_LUMINANCE: ColorMode
COLOR_MODE_HISTOGRAM: ColorMode
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState

class StylizeRequest(_message.Message):
    __slots__ = ("content_image", "styles", "options")
    CONTENT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STYLES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    content_image: bytes
    styles: _containers.RepeatedCompositeFieldContainer[StyleImage]
    options: StylizeOptions
    def __init__(self, content_image: _Optional[bytes] = ..., styles: _Optional[_Iterable[_Union[StyleImage, _Mapping]]] = ..., options: _Optional[_Union[StylizeOptions, _Mapping]] = ...) -> None: ...

class StyleImage(_message.Message):
    __slots__ = ("image", "blend_weight", "mask", "style_mask")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BLEND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    STYLE_MASK_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    blend_weight: float
    mask: bytes
    style_mask: bytes
    def __init__(self, image: _Optional[bytes] = ..., blend_weight: _Optional[float] = ..., mask: _Optional[bytes] = ..., style_mask: _Optional[bytes] = ...) -> None: ...

class LayerWeight(_message.Message):
    __slots__ = ("layer", "weight")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    layer: str
    weight: float
    def __init__(self, layer: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class StylizeOptions(_message.Message):
    __slots__ = ("max_size", "min_size", "iterations", "content_weight", "style_weight", "tv_weight", "content_layers", "style_layers", "pooling", "init", "init_image", "seed", "style_scale", "color_mode", "preserve_colors", "frame_every", "frame_format", "frame_max_size", "output_format", "tolerance")
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STYLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STYLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STYLE_SCALE_FIELD_NUMBER: _ClassVar[int]
    COLOR_MODE_FIELD_NUMBER: _ClassVar[int]
    PRESERVE_COLORS_FIELD_NUMBER: _ClassVar[int]
    FRAME_EVERY_FIELD_NUMBER: _ClassVar[int]
    FRAME_FORMAT_FIELD_NUMBER: _ClassVar[int]
    FRAME_MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    max_size: int
    min_size: int
    iterations: int
    content_weight: float
    style_weight: float
    tv_weight: float
    content_layers: _containers.RepeatedCompositeFieldContainer[LayerWeight]
    style_layers: _containers.RepeatedCompositeFieldContainer[LayerWeight]
    pooling: Pooling
    init: Init
    init_image: bytes
    seed: int
    style_scale: float
    color_mode: ColorMode
    preserve_colors: bool
    frame_every: int
    frame_format: ImageFormat
    frame_max_size: int
    output_format: ImageFormat
    tolerance: float
    def __init__(self, max_size: _Optional[int] = ..., min_size: _Optional[int] = ..., iterations: _Optional[int] = ..., content_weight: _Optional[float] = ..., style_weight: _Optional[float] = ..., tv_weight: _Optional[float] = ..., content_layers: _Optional[_Iterable[_Union[LayerWeight, _Mapping]]] = ..., style_layers: _Optional[_Iterable[_Union[LayerWeight, _Mapping]]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., init: _Optional[_Union[Init, str]] = ..., init_image: _Optional[bytes] = ..., seed: _Optional[int] = ..., style_scale: _Optional[float] = ..., color_mode: _Optional[_Union[ColorMode, str]] = ..., preserve_colors: _Optional[bool] = ..., frame_every: _Optional[int] = ..., frame_format: _Optional[_Union[ImageFormat, str]] = ..., frame_max_size: _Optional[int] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., tolerance: _Optional[float] = ...) -> None: ...

class StylizeResponse(_message.Message):
    __slots__ = ("queued", "progress", "frame", "result", "sequence")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    progress: Progress
    frame: Frame
    result: Result
    sequence: int
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Losses(_message.Message):
    __slots__ = ("total", "content", "style", "tv", "content_per_layer", "style_per_layer", "terms", "per_layer")
    class ContentPerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class StylePerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LayerLosses
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LayerLosses, _Mapping]] = ...) -> None: ...
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    TV_FIELD_NUMBER: _ClassVar[int]
    CONTENT_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    STYLE_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    total: float
    content: float
    style: float
    tv: float
    content_per_layer: _containers.ScalarMap[str, float]
    style_per_layer: _containers.ScalarMap[str, float]
    terms: _containers.ScalarMap[str, float]
    per_layer: _containers.MessageMap[str, LayerLosses]
    def __init__(self, total: _Optional[float] = ..., content: _Optional[float] = ..., style: _Optional[float] = ..., tv: _Optional[float] = ..., content_per_layer: _Optional[_Mapping[str, float]] = ..., style_per_layer: _Optional[_Mapping[str, float]] = ..., terms: _Optional[_Mapping[str, float]] = ..., per_layer: _Optional[_Mapping[str, LayerLosses]] = ...) -> None: ...

class LayerLosses(_message.Message):
    __slots__ = ("layers",)
    class LayersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.ScalarMap[str, float]
    def __init__(self, layers: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("iteration", "evaluations", "losses", "elapsed_seconds", "eta_seconds", "stage", "stages", "width", "height", "tile_size", "tiles", "correction_pairs")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_PAIRS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    evaluations: int
    losses: Losses
    elapsed_seconds: float
    eta_seconds: float
    stage: int
    stages: int
    width: int
    height: int
    tile_size: int
    tiles: int
    correction_pairs: int
    def __init__(self, iteration: _Optional[int] = ..., evaluations: _Optional[int] = ..., losses: _Optional[_Union[Losses, _Mapping]] = ..., elapsed_seconds: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., stage: _Optional[int] = ..., stages: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., tile_size: _Optional[int] = ..., tiles: _Optional[int] = ..., correction_pairs: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("iteration", "image", "mime_type", "width", "height")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    image: bytes
    mime_type: str
    width: int
    height: int
    def __init__(self, iteration: _Optional[int] = ..., image: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("image", "mime_type", "width", "height", "iterations", "evaluations", "final_losses", "elapsed_seconds")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSSES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    mime_type: str
    width: int
    height: int
    iterations: int
    evaluations: int
    final_losses: Losses
    elapsed_seconds: float
    def __init__(self, image: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., iterations: _Optional[int] = ..., evaluations: _Optional[int] = ..., final_losses: _Optional[_Union[Losses, _Mapping]] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "queue_position", "progress", "error", "create_time", "start_time", "end_time", "result", "last_sequence", "resumes")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    queue_position: int
    progress: Progress
    error: JobError
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    result: Result
    last_sequence: int
    resumes: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., queue_position: _Optional[int] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., last_sequence: _Optional[int] = ..., resumes: _Optional[int] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "after_sequence")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    after_sequence: int
    def __init__(self, id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id", "omit_result_image")
    ID_FIELD_NUMBER: _ClassVar[int]
    OMIT_RESULT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    omit_result_image: bool
    def __init__(self, id: _Optional[str] = ..., omit_result_image: _Optional[bool] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model", "defaults", "limits", "server_version", "graph_cache", "load", "job_store", "features")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CACHE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    JOB_STORE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    defaults: StylizeOptions
    limits: Limits
    server_version: str
    graph_cache: GraphCache
    load: Load
    job_store: JobStoreInfo
    features: Features
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., defaults: _Optional[_Union[StylizeOptions, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., graph_cache: _Optional[_Union[GraphCache, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., job_store: _Optional[_Union[JobStoreInfo, _Mapping]] = ..., features: _Optional[_Union[Features, _Mapping]] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("style_masks",)
    STYLE_MASKS_FIELD_NUMBER: _ClassVar[int]
    style_masks: bool
    def __init__(self, style_masks: _Optional[bool] = ...) -> None: ...

class JobStoreInfo(_message.Message):
    __slots__ = ("kind", "jobs", "used_bytes", "capacity_bytes", "result_ttl_seconds", "checkpoint_interval_seconds", "checkpoints_written", "checkpoint_seconds", "jobs_resumed", "frames_retained_per_job", "frame_bytes_retained_per_job")
    class JobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESULT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JOBS_RESUMED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RETAINED_PER_JOB_FIELD_NUMBER: _ClassVar[int]
    FRAME_BYTES_RETAINED_PER_JOB_FIELD_NUMBER: _ClassVar[int]
    kind: str
    jobs: _containers.ScalarMap[str, int]
    used_bytes: int
    capacity_bytes: int
    result_ttl_seconds: int
    checkpoint_interval_seconds: float
    checkpoints_written: int
    checkpoint_seconds: float
    jobs_resumed: int
    frames_retained_per_job: int
    frame_bytes_retained_per_job: int
    def __init__(self, kind: _Optional[str] = ..., jobs: _Optional[_Mapping[str, int]] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., result_ttl_seconds: _Optional[int] = ..., checkpoint_interval_seconds: _Optional[float] = ..., checkpoints_written: _Optional[int] = ..., checkpoint_seconds: _Optional[float] = ..., jobs_resumed: _Optional[int] = ..., frames_retained_per_job: _Optional[int] = ..., frame_bytes_retained_per_job: _Optional[int] = ...) -> None: ...

class GraphCache(_message.Message):
    __slots__ = ("budget_bytes", "used_bytes", "entries", "evictions")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    used_bytes: int
    entries: int
    evictions: int
    def __init__(self, budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("running_jobs", "queued_jobs")
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    running_jobs: int
    queued_jobs: int
    def __init__(self, running_jobs: _Optional[int] = ..., queued_jobs: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "weights_source", "layers", "preprocessing", "providers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights_source: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    preprocessing: Preprocessing
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., weights_source: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("channel_order", "mean", "std", "input_scale")
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    channel_order: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    input_scale: float
    def __init__(self, channel_order: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., input_scale: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_pixels", "max_message_bytes", "concurrency", "queue_size", "max_size", "max_iterations", "max_styles", "memory_budget_bytes", "memory_for_jobs_bytes", "max_weight", "max_jobs_per_client")
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STYLES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FOR_JOBS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    max_pixels: int
    max_message_bytes: int
    concurrency: int
    queue_size: int
    max_size: int
    max_iterations: int
    max_styles: int
    memory_budget_bytes: int
    memory_for_jobs_bytes: int
    max_weight: float
    max_jobs_per_client: int
    def __init__(self, max_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., concurrency: _Optional[int] = ..., queue_size: _Optional[int] = ..., max_size: _Optional[int] = ..., max_iterations: _Optional[int] = ..., max_styles: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., memory_for_jobs_bytes: _Optional[int] = ..., max_weight: _Optional[float] = ..., max_jobs_per_client: _Optional[int] = ...) -> None: ...
