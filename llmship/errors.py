"""Specific errors, each with a message that says what to do.

`PermanentError`s are deterministic (bad input, a failed gate): retrying cannot help, so the
stage tasks' retry condition lets them through at once. Anything else (a dropped connection, a
5xx from S3) is worth a retry.
"""


class LlmshipError(Exception):
    """Base of llmship's own errors."""


class PermanentError(LlmshipError):
    """Retrying will not help: the input or the situation has to change first."""


class SourceNotFound(PermanentError):
    """The model source (repository, revision, bucket, prefix or path) does not exist."""


class CalibrationDataError(PermanentError):
    """A calibration or evaluation file is missing or malformed; the message names file and line."""


class GateFailed(PermanentError):
    """The candidate lost more accuracy than the gate allows; nothing was published."""


class PerfGateFailed(PermanentError):
    """The candidate is slower than the performance gate's policy allows: nothing published."""


class BenchmarkFailed(PermanentError):
    """A server did not answer the performance gate's load: the build cannot serve it."""


class GateConfigError(PermanentError):
    """The gate's policy names a task, metric or threshold that cannot be used as given."""


class IntegrityError(PermanentError):
    """A file does not match the sha256 its manifest records."""


class UnsafeKey(PermanentError, ValueError):
    """A name or file path would put an object or a file outside its prefix or directory."""


class DiskFull(PermanentError):
    """A stage ran out of disk; what it had written is removed. Free space or move the cache."""


class VersionConflict(PermanentError):
    """A published version or alias was changed by someone else (a conditional write failed)."""


class BadAlias(PermanentError):
    """An alias document in the store cannot be read (not JSON, no version, a version that
    cannot be a name): move the alias again, or delete it."""


class UnpublishedVersion(PermanentError):
    """An alias was asked to name a version that is not published (no readable manifest)."""


class BadVersionManifest(IntegrityError):
    """A published version's manifest lacks what serving it needs (its details): the message
    names the version and what is wrong. Publish it again from its build."""


class SignatureRefused(IntegrityError):
    """A version is unsigned, or its signature is not from a trusted key, or its files or
    manifest are not what was signed: llmship did not build and gate what is there."""


class StageFailed(LlmshipError):
    """A stage subprocess failed for a reason it did not classify; its log tail is attached."""


class ServingError(LlmshipError):
    """A model server did not start, or did not become healthy, in time."""


class ServerExited(ServingError, PermanentError):
    """A model server exited while starting: its configuration or its weights need a fix."""


class EngineArgumentRefused(PermanentError):
    """A version's engine arguments hold one llmship does not set (or a value out of its
    range): the manifest was written by something other than build-and-serve."""


class StackError(PermanentError):
    """The local stack is not running, or could not be started."""


class RollbackFailed(LlmshipError):
    """A rollback run did not complete; traffic stays where it was."""


class CanaryFailed(PermanentError):
    """A canary step breached its limits; traffic went back to the version serving before."""

    def __init__(self, message: str, steps: list | None = None) -> None:
        super().__init__(message)
        self.steps = steps or []  # tasks.canary_rule.StepResult, each step so far


class UngatedVersion(PermanentError):
    """A version with no passing gate record was asked to take traffic without an override."""


class UnsupportedConfiguration(PermanentError):
    """The configuration asks for what the chosen engine, quantizer or GPU cannot do."""


class PreflightFailed(PermanentError):
    """The machine cannot run this deployment (GPUs, disk, token, store, environments);
    nothing was downloaded or computed. The message lists every refusal."""


class HubUnreachable(LlmshipError):
    """The Hugging Face hub did not answer and the file is not in the local hub cache: retried;
    the message says how to fill the cache for a worker that cannot reach the hub."""
