import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_UNSPECIFIED: _ClassVar[ExportKind]
    HOST_BLOCK: _ClassVar[ExportKind]
    VHOST_USER_BLK: _ClassVar[ExportKind]
    VFIO_PCI: _ClassVar[ExportKind]
    NBD: _ClassVar[ExportKind]

class FsType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FS_UNSPECIFIED: _ClassVar[FsType]
    EXT4: _ClassVar[FsType]
    EROFS: _ClassVar[FsType]

class PullPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PULL_PHASE_UNSPECIFIED: _ClassVar[PullPhase]
    RESOLVING: _ClassVar[PullPhase]
    DOWNLOADING: _ClassVar[PullPhase]
    BUILDING: _ClassVar[PullPhase]
    DONE: _ClassVar[PullPhase]
    FAILED: _ClassVar[PullPhase]
EXPORT_UNSPECIFIED: ExportKind
HOST_BLOCK: ExportKind
VHOST_USER_BLK: ExportKind
VFIO_PCI: ExportKind
NBD: ExportKind
FS_UNSPECIFIED: FsType
EXT4: FsType
EROFS: FsType
PULL_PHASE_UNSPECIFIED: PullPhase
RESOLVING: PullPhase
DOWNLOADING: PullPhase
BUILDING: PullPhase
DONE: PullPhase
FAILED: PullPhase

class Platform(_message.Message):
    __slots__ = ("os", "architecture", "variant")
    OS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    os: str
    architecture: str
    variant: str
    def __init__(self, os: _Optional[str] = ..., architecture: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("name", "digest", "config_digest", "platform", "size_bytes", "bases", "created_at", "clones", "layers", "diff_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CLONES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DIFF_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    config_digest: str
    platform: Platform
    size_bytes: int
    bases: _containers.RepeatedCompositeFieldContainer[BaseImage]
    created_at: _timestamp_pb2.Timestamp
    clones: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    diff_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., config_digest: _Optional[str] = ..., platform: _Optional[_Union[Platform, _Mapping]] = ..., size_bytes: _Optional[int] = ..., bases: _Optional[_Iterable[_Union[BaseImage, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., clones: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ..., diff_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BaseImage(_message.Message):
    __slots__ = ("id", "fstype", "size_bytes", "allocated_bytes", "built_at", "build_seconds", "layers")
    ID_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUILT_AT_FIELD_NUMBER: _ClassVar[int]
    BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    fstype: FsType
    size_bytes: int
    allocated_bytes: int
    built_at: _timestamp_pb2.Timestamp
    build_seconds: float
    layers: int
    def __init__(self, id: _Optional[str] = ..., fstype: _Optional[_Union[FsType, str]] = ..., size_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., built_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., build_seconds: _Optional[float] = ..., layers: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("image", "platform", "fstype", "skip_build")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    SKIP_BUILD_FIELD_NUMBER: _ClassVar[int]
    image: str
    platform: Platform
    fstype: FsType
    skip_build: bool
    def __init__(self, image: _Optional[str] = ..., platform: _Optional[_Union[Platform, _Mapping]] = ..., fstype: _Optional[_Union[FsType, str]] = ..., skip_build: _Optional[bool] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("filter",)
    FILTER_FIELD_NUMBER: _ClassVar[int]
    filter: str
    def __init__(self, filter: _Optional[str] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class RemoveImageRequest(_message.Message):
    __slots__ = ("image", "force")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    image: str
    force: bool
    def __init__(self, image: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveImageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlobProgress(_message.Message):
    __slots__ = ("digest", "media_type", "offset", "total", "done")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    media_type: str
    offset: int
    total: int
    done: bool
    def __init__(self, digest: _Optional[str] = ..., media_type: _Optional[str] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("image", "digest", "phase", "blobs", "bytes_done", "bytes_total", "error", "started_at")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    image: str
    digest: str
    phase: PullPhase
    blobs: _containers.RepeatedCompositeFieldContainer[BlobProgress]
    bytes_done: int
    bytes_total: int
    error: str
    started_at: _timestamp_pb2.Timestamp
    def __init__(self, image: _Optional[str] = ..., digest: _Optional[str] = ..., phase: _Optional[_Union[PullPhase, str]] = ..., blobs: _Optional[_Iterable[_Union[BlobProgress, _Mapping]]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., error: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PullStatusRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class PullStatusResponse(_message.Message):
    __slots__ = ("pulls",)
    PULLS_FIELD_NUMBER: _ClassVar[int]
    pulls: _containers.RepeatedCompositeFieldContainer[PullProgress]
    def __init__(self, pulls: _Optional[_Iterable[_Union[PullProgress, _Mapping]]] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("kind", "path", "major", "minor", "fstype", "read_only", "serial", "vhost_socket", "pci_address", "size_bytes", "nbd_uri", "mount_options")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    VHOST_SOCKET_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NBD_URI_FIELD_NUMBER: _ClassVar[int]
    MOUNT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    kind: ExportKind
    path: str
    major: int
    minor: int
    fstype: FsType
    read_only: bool
    serial: str
    vhost_socket: str
    pci_address: str
    size_bytes: int
    nbd_uri: str
    mount_options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[ExportKind, str]] = ..., path: _Optional[str] = ..., major: _Optional[int] = ..., minor: _Optional[int] = ..., fstype: _Optional[_Union[FsType, str]] = ..., read_only: _Optional[bool] = ..., serial: _Optional[str] = ..., vhost_socket: _Optional[str] = ..., pci_address: _Optional[str] = ..., size_bytes: _Optional[int] = ..., nbd_uri: _Optional[str] = ..., mount_options: _Optional[_Iterable[str]] = ...) -> None: ...

class PrepareOptions(_message.Message):
    __slots__ = ("fstype", "read_only", "size_bytes", "layers")
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    fstype: FsType
    read_only: bool
    size_bytes: int
    layers: int
    def __init__(self, fstype: _Optional[_Union[FsType, str]] = ..., read_only: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., layers: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("container_id", "image", "export", "options", "platform", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    image: str
    export: ExportKind
    options: PrepareOptions
    platform: Platform
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, container_id: _Optional[str] = ..., image: _Optional[str] = ..., export: _Optional[_Union[ExportKind, str]] = ..., options: _Optional[_Union[PrepareOptions, _Mapping]] = ..., platform: _Optional[_Union[Platform, _Mapping]] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Rootfs(_message.Message):
    __slots__ = ("container_id", "image", "image_digest", "volume_id", "device", "created_at", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    image: str
    image_digest: str
    volume_id: str
    device: Device
    created_at: _timestamp_pb2.Timestamp
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, container_id: _Optional[str] = ..., image: _Optional[str] = ..., image_digest: _Optional[str] = ..., volume_id: _Optional[str] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("rootfs", "cold")
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    COLD_FIELD_NUMBER: _ClassVar[int]
    rootfs: Rootfs
    cold: bool
    def __init__(self, rootfs: _Optional[_Union[Rootfs, _Mapping]] = ..., cold: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRootfsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRootfsResponse(_message.Message):
    __slots__ = ("rootfs",)
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    rootfs: _containers.RepeatedCompositeFieldContainer[Rootfs]
    def __init__(self, rootfs: _Optional[_Iterable[_Union[Rootfs, _Mapping]]] = ...) -> None: ...

class StatRootfsRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class RootfsUsage(_message.Message):
    __slots__ = ("size_bytes", "allocated_bytes")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    allocated_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ...) -> None: ...

class StatRootfsResponse(_message.Message):
    __slots__ = ("rootfs", "usage")
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    rootfs: Rootfs
    usage: RootfsUsage
    def __init__(self, rootfs: _Optional[_Union[Rootfs, _Mapping]] = ..., usage: _Optional[_Union[RootfsUsage, _Mapping]] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckResult(_message.Message):
    __slots__ = ("name", "ok", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CheckResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GcResponse(_message.Message):
    __slots__ = ("bases_removed", "bytes_reclaimed")
    BASES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    bases_removed: int
    bytes_reclaimed: int
    def __init__(self, bases_removed: _Optional[int] = ..., bytes_reclaimed: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "backend", "root", "pool_capacity_bytes", "pool_used_bytes", "images", "volumes", "platform")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    POOL_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    root: str
    pool_capacity_bytes: int
    pool_used_bytes: int
    images: int
    volumes: int
    platform: Platform
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., root: _Optional[str] = ..., pool_capacity_bytes: _Optional[int] = ..., pool_used_bytes: _Optional[int] = ..., images: _Optional[int] = ..., volumes: _Optional[int] = ..., platform: _Optional[_Union[Platform, _Mapping]] = ...) -> None: ...
