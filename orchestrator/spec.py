"""The job spec: one YAML file's schema, validated by pydantic (no Ray, torch or MLflow here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRATEGIES = ("ddp", "fsdp", "deepspeed")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Lightning's own precision names; bare numbers (32, 16, 64) are accepted and normalised.
PRECISIONS = (
    "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
    "transformer-engine", "transformer-engine-float16",
)
_PRECISION_ALIASES = {
    "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true",
}

# Short recipe names: sugar for the class paths of the recipes shipped in jobs/.
RECIPES: dict[str, tuple[str, str]] = {
    "digits": ("jobs.digits.DigitsCNN", "jobs.digits.DigitsDataModule"),
    "resnet": ("jobs.resnet.ResNet", "jobs.images.ImageDataModule"),
    "gpt": ("jobs.gpt.GPT", "jobs.text.TextDataModule"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassSpec(_Section):
    """LightningCLI's convention: an importable class and the keyword arguments it is built with."""

    class_path: str = Field(min_length=1)
    init_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_path")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if "." not in value:
            raise ValueError(
                f"must be a dotted import path such as 'my_package.module.MyModule' "
                f"or one of the recipes {sorted(RECIPES)}; got {value!r}"
            )
        return value


class TrainerSpec(_Section):
    max_epochs: int | None = Field(default=10, ge=1)
    max_steps: int = Field(default=-1, ge=-1)
    precision: str = "32-true"
    accumulate_grad_batches: int = Field(default=1, ge=1)
    gradient_clip_val: float | None = Field(default=None, ge=0)
    val_check_interval: float | int = Field(default=1.0, gt=0)
    check_val_every_n_epoch: int | None = Field(default=1, ge=1)
    log_every_n_steps: int = Field(default=10, ge=1)
    limit_train_batches: float | int | None = Field(default=None, gt=0)
    limit_val_batches: float | int | None = Field(default=None, ge=0)
    seed: int | None = 42
    deterministic: bool = False
    # Recompute each block's activations in backward instead of keeping them: true = the model's repeated
    # blocks (its `block_classes`, else found), or a list of class paths.
    activation_checkpointing: bool | list[str] = False
    compile: bool = False  # torch.compile each block (else the whole module)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str:
        text = str(value)
        text = _PRECISION_ALIASES.get(text, text)
        if text not in PRECISIONS:
            raise ValueError(f"{value!r} is not a precision Lightning knows; allowed: {', '.join(PRECISIONS)}")
        return text

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, value: Any) -> Any:
        if isinstance(value, bool) or isinstance(value, list) and all(isinstance(v, str) and "." in v for v in value):
            return value
        raise ValueError(f"{value!r} is not allowed; allowed: true (the model's repeated blocks), false, or a list "
                         f"of block class paths such as [jobs.gpt.Block]")


class ScalingSpec(_Section):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=1, gt=0)
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Memory each worker may use (GPU memory with use_gpu, else host memory), for the plan's fit check;
    # default: measured on this machine for the local cluster.
    memory_per_worker_gb: float | None = Field(default=None, gt=0)

    @field_validator("placement", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _typed_strategy_options(self) -> ScalingSpec:
        from orchestrator.strategies import check_scaling, parse_options, raise_problems

        options = parse_options(self.strategy, self.strategy_options)
        raise_problems(check_scaling(self.strategy, options, self.use_gpu))
        return self

    @property
    def options(self):
        """The strategy's options, typed (DDPOptions | FSDPOptions | DeepSpeedOptions) with defaults filled in."""
        from orchestrator.strategies import parse_options

        return parse_options(self.strategy, self.strategy_options)


class CheckpointSpec(_Section):
    every_n_epochs: int | None = Field(default=1, ge=1)
    every_n_train_steps: int | None = Field(default=None, ge=1)
    num_to_keep: int | None = Field(default=2, ge=1)
    monitor: str | None = None
    mode: Literal["min", "max"] = "min"
    storage_path: str | None = None
    # Ctrl-C / SIGTERM / `orch stop`: how long the driver waits for the workers to write a checkpoint
    # before it stops them anyway; 0 stops at once and resumes from the last periodic checkpoint.
    stop_timeout_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _some_trigger(self) -> CheckpointSpec:
        if self.every_n_epochs is None and self.every_n_train_steps is None:
            raise ValueError(
                "checkpoint needs every_n_epochs or every_n_train_steps (or both); got neither"
            )
        return self


class FailureSpec(_Section):
    max_failures: int = Field(default=0, ge=-1)
    # A NaN/inf loss or gradient: "stop" fails the job naming the step and rank (it would recur on every
    # retry, so it is never retried); "skip" drops that optimizer step on every rank and goes on.
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = Field(default=10, ge=1)


class TrackingSpec(_Section):
    uri: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    # Seconds between hardware samples on each node; 5 s resolves an epoch's phases at negligible cost.
    system_metrics_interval: float = Field(default=5.0, ge=0.1)
    system_metrics: bool = True  # the per-node hardware sampler (system/<node>/...)
    throughput: bool = True  # step time, samples/s, tokens/s, MFU, the end-of-run summary (perf/, summary/)


class ClusterSpec(_Section):
    address: str | None = None


class JobSpec(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    experiment: str = Field(default="Default", min_length=1)
    model: ClassSpec
    data: ClassSpec
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)

    @model_validator(mode="before")
    @classmethod
    def _expand_recipe_names(cls, raw: Any) -> Any:
        """`model: digits` is sugar for the recipe's class path with no init_args."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for section, index in (("model", 0), ("data", 1)):
            value = raw.get(section)
            if isinstance(value, str) and value in RECIPES:
                raw[section] = {"class_path": RECIPES[value][index]}
            elif isinstance(value, dict) and value.get("class_path") in RECIPES:
                raw[section] = {**value, "class_path": RECIPES[value["class_path"]][index]}
        return raw

    @model_validator(mode="after")
    def _stop_condition(self) -> JobSpec:
        if self.trainer.max_epochs is None and self.trainer.max_steps == -1:
            raise ValueError("trainer needs max_epochs or max_steps to stop; got neither")
        return self

    @property
    def world_size(self) -> int:
        return self.scaling.num_workers


def section_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Field name -> annotation, used to check override paths and suggest spellings."""
    return {name: info.annotation for name, info in model.model_fields.items()}
