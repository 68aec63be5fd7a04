"""Keypoints and thumbnails in an S3-compatible bucket (MinIO in deployments, AWS S3 too).

Objects live under ``<s3_prefix>/<key>`` with the same keys as the local store. The bucket is
created on first use when missing. Retries and timeouts are botocore's (``standard`` retry mode,
``s3_max_attempts`` attempts in all), so transient 5xx, throttling and dropped connections are
retried without any loop here; when they outlast those attempts, a read or write raises
:class:`~memetrace.errors.DependencyDown` ("s3"), which the consume loop backs off from like a
Milvus outage. Errors that a person must fix (wrong endpoint, wrong credentials,
no access to the bucket) are raised as :class:`S3FeatureStoreError` naming the setting to change.

boto3 is an optional dependency: ``pip install 'memetrace[s3]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "feature_store='s3' needs boto3, which is not installed: pip install 'memetrace[s3]'"
    ) from exc

from memetrace.errors import DependencyDown
from memetrace.feature_store import FeatureStore

if TYPE_CHECKING:
    from memetrace.settings import Settings

ENV = "MEMETRACE_"
CREDENTIAL_SETTINGS = f"{ENV}S3_ACCESS_KEY_ID / {ENV}S3_SECRET_ACCESS_KEY"
_MISSING = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "InvalidClientTokenId", "AllAccessDisabled"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
              "RequestTimeout", "ServiceUnavailable", "InternalError"}


class S3FeatureStoreError(RuntimeError):
    """The bucket cannot be used as configured; the message names the setting to check."""


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _transient(err: Exception) -> bool:
    """Unreachable, timed out, overloaded or failing server-side: it may pass."""
    if isinstance(err, _UNREACHABLE):
        return True
    return isinstance(err, ClientError) and (_code(err) in _THROTTLED or _status(err) == 429 or _status(err) >= 500)


class S3FeatureStore(FeatureStore):
    """A :class:`FeatureStore` backend over one bucket of an S3-compatible server.

    ``client`` is a boto3 S3 client (thread-safe; share it between threads). Use
    :meth:`from_settings` to build one from ``MEMETRACE_S3_*`` settings.
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, region: str | None = None,
                 endpoint: str | None = None, create_bucket: bool = True) -> None:
        if not bucket:
            raise S3FeatureStoreError(f"no bucket name: set {ENV}S3_BUCKET")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region or getattr(getattr(client, "meta", None), "region_name", None) or "us-east-1"
        self.endpoint = endpoint or getattr(getattr(client, "meta", None), "endpoint_url", None) or "AWS S3"
        if create_bucket:
            self.ensure_bucket()

    @classmethod
    def from_settings(cls, settings: Settings, client: Any | None = None) -> S3FeatureStore:
        """The store described by ``settings``; builds the boto3 client unless one is given."""
        s = settings
        if client is None:
            client = make_client(s)
        return cls(client, s.s3_bucket, s.s3_prefix, region=s.s3_region,
                   endpoint=s.s3_endpoint_url or None)

    # --- keys and errors -------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, err: Exception) -> S3FeatureStoreError:
        """An S3FeatureStoreError telling which setting to check for ``err``."""
        where = f"bucket {self.bucket!r} at {self.endpoint}"
        if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
            return S3FeatureStoreError(
                f"cannot reach the S3 endpoint {self.endpoint} to {action} ({err}); "
                f"check {ENV}S3_ENDPOINT_URL and that the server is running")
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return S3FeatureStoreError(
                f"no S3 credentials to {action} {where}; set {CREDENTIAL_SETTINGS}")
        if isinstance(err, ClientError):
            code = _code(err)
            if code in _DENIED or _status(err) == 403:
                return S3FeatureStoreError(
                    f"S3 refused to {action} {where} ({code or 'HTTP 403'}): the credentials are "
                    f"wrong or may not use this bucket; check {CREDENTIAL_SETTINGS} and {ENV}S3_BUCKET")
            if code == "NoSuchBucket":
                return S3FeatureStoreError(
                    f"{where} does not exist (deleted after start-up?); check {ENV}S3_BUCKET")
            return S3FeatureStoreError(f"S3 error while trying to {action} {where}: {code}: {err}")
        return S3FeatureStoreError(f"S3 error while trying to {action} {where}: {err}")

    def _io_error(self, action: str, err: Exception) -> Exception:
        """A read or write failure: :class:`DependencyDown` when it may pass, else as :meth:`_fail`."""
        if _transient(err):
            return DependencyDown("s3", f"cannot {action} bucket {self.bucket!r} at {self.endpoint}: "
                                        f"{type(err).__name__}: {err}")
        return self._fail(action, err)

    # --- bucket ------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist; raise S3FeatureStoreError if unusable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as err:
            if _code(err) == "403":
                # HEAD answers carry no body; a listing tells InvalidAccessKeyId, SignatureDoesNotMatch
                # and AccessDenied apart for the message.
                try:
                    self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                    return  # listing allowed: the bucket is usable
                except ClientError as detail:
                    raise self._fail("open", detail) from err
                except BotoCoreError:
                    pass
                raise self._fail("open", err) from err
            if _code(err) not in {"404", "NoSuchBucket", "NotFound"}:
                raise self._fail("open", err) from err
        except BotoCoreError as err:
            raise self._fail("open", err) from err
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as err:
            if _code(err) in {"BucketAlreadyOwnedByYou"}:
                return  # created meanwhile by another worker
            if _code(err) == "BucketAlreadyExists":
                raise S3FeatureStoreError(
                    f"bucket {self.bucket!r} belongs to another account; choose another {ENV}S3_BUCKET"
                ) from err
            raise self._fail("create", err) from err
        except BotoCoreError as err:
            raise self._fail("create", err) from err

    # --- the three backend methods ---------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=bytes(data))
        except (ClientError, BotoCoreError) as err:
            raise self._io_error(f"write {key!r} to", err) from err

    def get_bytes(self, key: str) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as err:
            if _code(err) in _MISSING:
                return None
            raise self._io_error(f"read {key!r} from", err) from err
        except BotoCoreError as err:
            raise self._io_error(f"read {key!r} from", err) from err
        body = resp["Body"]
        try:
            return body.read()
        except BotoCoreError as err:
            raise self._io_error(f"read {key!r} from", err) from err
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
            return True
        except ClientError as err:
            if _code(err) in _MISSING:
                return False
            raise self._io_error(f"look up {key!r} in", err) from err
        except BotoCoreError as err:
            raise self._io_error(f"look up {key!r} in", err) from err

    def delete(self, key: str) -> None:
        try:  # S3 answers a missing key with success
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except (ClientError, BotoCoreError) as err:
            raise self._io_error(f"delete {key!r} from", err) from err


def make_client(settings: Settings) -> Any:
    """A boto3 S3 client for ``settings``: endpoint, region, credentials, retries, timeouts.

    Empty credentials fall back to boto3's own chain (AWS_* variables, ~/.aws, instance role).
    """
    s = settings
    secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else ""
    if bool(s.s3_access_key_id) != bool(secret):
        raise S3FeatureStoreError(f"set both or neither of {CREDENTIAL_SETTINGS}")
    config = Config(
        region_name=s.s3_region,
        connect_timeout=s.s3_connect_timeout,
        read_timeout=s.s3_read_timeout,
        retries={"mode": "standard", "total_max_attempts": s.s3_max_attempts},
        # MinIO and most S3-compatible servers want path-style URLs (no bucket.host DNS names).
        s3={"addressing_style": "path" if s.s3_endpoint_url else "auto"},
        # Only checksum when S3 requires it: several S3-compatible servers reject the default
        # CRC32 trailers of boto3 >= 1.36.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max(10, 2 * s.prepare_threads),
    )
    session = boto3.session.Session()  # one per client: sessions are not thread-safe
    return session.client(
        "s3",
        endpoint_url=s.s3_endpoint_url or None,
        aws_access_key_id=s.s3_access_key_id or None,
        aws_secret_access_key=secret or None,
        config=config,
    )
