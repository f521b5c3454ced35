"""FeatCal hyperparameters. Field names and defaults follow the reference run (docs/algorithm.md s.9)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import FeatCalError
from .sizes import parse_bytes

CROSS_METHODS = ("auto", "cross", "project")
STREAM_PLACEMENTS = ("auto", "device", "cpu", "disk")
DISTRIBUTED_MODES = ("auto", "on", "off")
SEQUENTIAL_MODES = ("off", "sublayer", "group")
# How float32 products run on a GPU's Triton kernels: IEEE fp32 FMAs on the CUDA cores; TF32 on
# the matrix units (10-bit mantissa: about 3 significant digits per product); or tf32x3, three
# TF32 products of the operands' high and low parts (near-fp32 accuracy on the matrix units).
FLOAT32_PRECISIONS = ("ieee", "tf32", "tf32x3")


@dataclass
class FeatCalConfig:
    """Hyperparameters of FeatCal and switches of this implementation.

    lambda_ratio: ridge weight `lam` pulling each parameter toward its anchor (absolute, >= 0).
    anchor_blend_rho: `rho` in anchor = rho * merged + (1 - rho) * base.
    teacher_interp_alpha: `alpha` in the teacher input x_t = alpha * x_expert + (1 - alpha) * x_student.
    covariance_eps: `eps`, floor of the Gram norms, added to the solve diagonal and det floor.
    calibrate_bias: re-solve Linear biases (else they keep their merged value).
    calibrate_layernorm: re-solve LayerNorm / RMSNorm affines (else they keep their merged value).
    cross_method: how the right-hand side sum_t (C_t / n_t) W_t^T is accumulated per module group:
        "cross" forms the d_in x d_in cross moment C_t (as the reference does); "project" multiplies
        the teacher input by W_t^T first, reusing the expert module's own output; "auto" picks the
        one with fewer flops for each group and task. All three give the same result.
    drift_examples: the report's feature drift at each block output, for the merged and the
        calibrated model, is measured on the first `drift_examples` examples of each task's first
        batch (None: the whole first batch; 0: no drift). The merged model's drift costs one
        extra block forward on these examples.
    float32_precision: how the Triton statistics kernels multiply float32 activations on a GPU:
        "ieee" (full float32 products, the CUDA cores), "tf32" (the matrix units, about 10 bits
        of mantissa per product, fastest) or "tf32x3" (the matrix units, three TF32 products per
        product: near-fp32 accuracy). 16-bit activations always multiply exactly.
    stream_placement: where the hidden-state streams between blocks live: "device", "cpu"
        (pinned, the next batch prefetched), "disk" (memory-mapped files in `offload_dir`), or
        "auto": the first of these that fits `max_gpu_memory` / `max_cpu_memory`.
    max_gpu_memory, max_cpu_memory: memory budgets (bytes, or strings such as "12GiB"); a run
        whose plan does not fit is refused before any work. None: no limit.
    offload_dir: directory for disk streams (default: a temporary directory, removed after).
    progress: show progress bars and the memory plan.
    distributed: "auto" spreads the run over the processes of the default torch.distributed
        group when one is initialised with more than one process (every process calls
        `calibrate` with the same arguments); "on" requires such a group; "off" runs alone.
    distributed_timeout: seconds a process waits for the others at a collective before the run
        stops with an error naming the phase that was waiting.
    sequential: where a block's statistics are taken (docs/algorithm.md s.12): "off" (the
        reference) takes every module's from one pass of the uncalibrated merged block; "sublayer"
        solves the attention, then re-takes the MLP's from the block with its attention solved
        (every sub-layer in turn); "group" does the same for every group of modules that read one
        input, in forward order.
    min_expert_tokens: a routed MoE expert that fewer calibration tokens (padding excluded, all
        tasks together) reach than this keeps its merged weights and is listed in the report
        (too few rows to say more than the ridge anchor already does).
    """

    lambda_ratio: float = 0.05
    anchor_blend_rho: float = 2.2
    teacher_interp_alpha: float = 0.25
    covariance_eps: float = 1e-8
    calibrate_bias: bool = True
    calibrate_layernorm: bool = True
    cross_method: str = "auto"
    drift_examples: int | None = 4
    float32_precision: str = "ieee"
    stream_placement: str = "auto"
    max_gpu_memory: int | str | None = None
    max_cpu_memory: int | str | None = None
    offload_dir: str | None = None
    progress: bool = True
    distributed: str = "auto"
    distributed_timeout: float = 1800.0
    sequential: str = "off"
    min_expert_tokens: int = 16

    def __post_init__(self) -> None:
        if self.cross_method not in CROSS_METHODS:
            raise FeatCalError(f"cross_method={self.cross_method!r} is not one of {', '.join(CROSS_METHODS)}")
        if self.covariance_eps < 0:
            raise FeatCalError(f"covariance_eps must be >= 0, got {self.covariance_eps}")
        if self.stream_placement not in STREAM_PLACEMENTS:
            raise FeatCalError(
                f"stream_placement={self.stream_placement!r} is not one of {', '.join(STREAM_PLACEMENTS)}"
            )
        if self.distributed not in DISTRIBUTED_MODES:
            raise FeatCalError(
                f"distributed={self.distributed!r} is not one of {', '.join(DISTRIBUTED_MODES)}"
            )
        if self.float32_precision not in FLOAT32_PRECISIONS:
            raise FeatCalError(
                f"float32_precision={self.float32_precision!r} is not one of {', '.join(FLOAT32_PRECISIONS)}"
            )
        if self.sequential not in SEQUENTIAL_MODES:
            raise FeatCalError(f"sequential={self.sequential!r} is not one of {', '.join(SEQUENTIAL_MODES)}")
        if not self.distributed_timeout > 0:
            raise FeatCalError(f"distributed_timeout must be > 0 seconds, got {self.distributed_timeout}")
        parse_bytes(self.max_gpu_memory)
        parse_bytes(self.max_cpu_memory)
        if self.min_expert_tokens < 1:
            raise FeatCalError(f"min_expert_tokens must be >= 1, got {self.min_expert_tokens}")
        if self.drift_examples is not None and self.drift_examples < 0:
            raise FeatCalError(f"drift_examples must be >= 0 or None, got {self.drift_examples}")

    @property
    def ridge(self) -> float:
        """`lam` clamped at 0, as the reference does."""
        return max(float(self.lambda_ratio), 0.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def upgrade(settings: dict) -> dict:
        """Settings written by an earlier featcal in today's names (allow_tf32 became
        float32_precision)."""
        settings = dict(settings)
        if "allow_tf32" in settings:
            settings["float32_precision"] = "tf32" if settings.pop("allow_tf32") else "ieee"
        return settings
