"""What the run is on: one frozen, serialisable record that the policy takes as its only input.

`probe_environment()` reads the real machine; `Environment.assume(...)` builds one by hand, so every
branch of the policy can be exercised on a CPU (tests, ``lightning-te-moe plan --assume-*``).
Transformer Engine is never imported when it is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from packaging.version import InvalidVersion, Version

#: TE's own availability checks, by the recipe family they gate.
TE_CHECKS = {
    "fp8": "is_fp8_available",
    "mxfp8": "is_mxfp8_available",
    "fp8_block": "is_fp8_block_scaling_available",
    "nvfp4": "is_nvfp4_available",
}


#: Compute capabilities of NVIDIA GPUs (developer.nvidia.com/cuda-gpus; CUDA 13 renamed Thor's 10.1 to 11.0, both
#: are listed). An assumed GPU must have one of these: a typo like 99.9 would otherwise plan for a GPU that
#: does not exist. (A real device's capability is read from it and never checked against this list.)
KNOWN_COMPUTE_CAPABILITIES: tuple[tuple[int, int], ...] = (
    (5, 0), (5, 2), (5, 3), (6, 0), (6, 1), (6, 2), (7, 0), (7, 2), (7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0),
    (10, 0), (10, 1), (10, 3), (11, 0), (12, 0), (12, 1),
)


def parse_version(text: Optional[str]) -> Optional[Version]:
    """A comparable version, or None for a missing one. Local tags (``+cu130``) are dropped."""
    if text is None:
        return None
    try:
        return Version(str(text).split("+")[0])
    except InvalidVersion as err:
        raise ValueError(f"not a version number: {text!r} (expected something like '2.20.2')") from err


@dataclass(frozen=True)
class TECheck:
    """One of TE's ``is_*_available(return_reason=True)`` answers."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class Environment:
    """The device and software versions a precision plan is made for."""

    device_type: str = "cpu"
    device_name: str = "cpu"
    compute_capability: Optional[tuple[int, int]] = None
    multiprocessors: Optional[int] = None
    memory_gib: Optional[float] = None
    cpu_bf16: bool = False
    torch_version: str = str(torch.__version__)
    torch_cuda: Optional[str] = None
    te_version: Optional[str] = None
    te_checks: dict[str, TECheck] = field(default_factory=dict)
    cudnn_version: Optional[str] = None
    cublaslt_version: Optional[str] = None
    driver_version: Optional[str] = None
    assumed: bool = False

    # -- derived facts the rules ask about ---------------------------------------------------------
    @property
    def cc(self) -> Optional[float]:
        """Compute capability as a number (9.0, 12.1); None off-GPU."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return major + minor / 10

    @property
    def te(self) -> Optional[Version]:
        return parse_version(self.te_version)

    @property
    def has_te(self) -> bool:
        return self.te_version is not None

    def summary(self) -> str:
        """One line for logs and decision records."""
        where = self.device_name if self.device_type == "cpu" else f"{self.device_name} (sm_{self._sm()})"
        te = f"TE {self.te_version}" if self.has_te else "no TE"
        parts = [where, f"torch {self.torch_version}", te]
        if self.torch_cuda:
            parts.append(f"CUDA {self.torch_cuda}")
        if self.cudnn_version:
            parts.append(f"cuDNN {self.cudnn_version}")
        if self.assumed:
            parts.append("assumed")
        return ", ".join(parts)

    def _sm(self) -> str:
        major, minor = self.compute_capability or (0, 0)
        return f"{major}{minor}"

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Environment:
        data = dict(data)
        if data.get("compute_capability") is not None:
            data["compute_capability"] = tuple(data["compute_capability"])
        data["te_checks"] = {k: TECheck(**v) for k, v in (data.get("te_checks") or {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def assume(
        cls,
        cc: Optional[str | float | tuple[int, int]] = None,
        te: Optional[str] = None,
        cudnn: Optional[str] = None,
        torch_cuda: Optional[str] = None,
        cublaslt: Optional[str] = None,
        device_name: Optional[str] = None,
        cpu_bf16: bool = False,
    ) -> Environment:
        """A hand-built environment: ``cc=None`` means a CPU machine.

        On an assumed GPU, CUDA, cuBLASLt and cuDNN default to CUDA 13.0's (13.0, 13.0, 9.14) unless given.
        cuBLASLt decides TE's GEMM path for the experts (13.0: one GEMM per expert; TE's native grouped GEMM from
        13.4 on Hopper, 13.3 on Blackwell), and with it the experts' measured recipe: name it for a current stack.
        """
        capability = _parse_cc(cc)
        for label, text in (("te", te), ("cudnn", cudnn), ("torch_cuda", torch_cuda), ("cublaslt", cublaslt)):
            parse_version(text)  # fail early, naming the bad flag's value
        if capability is None:
            return cls(device_name=device_name or "cpu", cpu_bf16=cpu_bf16, te_version=te, assumed=True)
        return cls(
            device_type="cuda",
            device_name=device_name or "assumed GPU",
            compute_capability=capability,
            torch_cuda=torch_cuda or "13.0",
            te_version=te,
            cudnn_version=cudnn or "9.14.0",
            cublaslt_version=cublaslt or "13.0.0",
            assumed=True,
        )


def _parse_cc(cc: Optional[str | float | tuple[int, int]]) -> Optional[tuple[int, int]]:
    if cc is None or (isinstance(cc, str) and cc.lower() == "cpu"):
        return None
    if isinstance(cc, tuple):
        capability = int(cc[0]), int(cc[1])
    else:
        major, _, minor = str(cc).partition(".")
        if not (major.isdigit() and (minor.isdigit() or minor == "")) or len(minor) > 1:
            raise ValueError(f"compute capability must look like '9.0' or '12.1' (or 'cpu'), got {cc!r}")
        capability = int(major), int(minor or 0)
    if capability not in KNOWN_COMPUTE_CAPABILITIES:
        known = ", ".join(f"{a}.{b}" for a, b in KNOWN_COMPUTE_CAPABILITIES)
        raise ValueError(f"compute capability {capability[0]}.{capability[1]} is not one of an NVIDIA GPU;"
                         f" known: {known} (or 'cpu')")
    return capability


def te_installed_version() -> Optional[str]:
    """TE's version from package metadata; never imports TE."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for dist in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import transformer_engine  # installed without metadata (e.g. unpacked): ask the package itself

    return str(transformer_engine.__version__)


def probe_environment(device: Optional[torch.device] = None) -> Environment:
    """Read the machine this process runs on. Imports TE only when it is installed and a GPU is present."""
    te_version = te_installed_version()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        return Environment(te_version=te_version, cpu_bf16=_cpu_has_native_bf16(), device_name=_cpu_name())
    props = torch.cuda.get_device_properties(device)
    te_checks, cublaslt, te_cudnn = _te_facts() if te_version else ({}, None, None)
    cudnn = te_cudnn or _torch_cudnn_version()
    return Environment(
        device_type="cuda",
        device_name=props.name,
        compute_capability=(props.major, props.minor),
        multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        torch_cuda=torch.version.cuda,
        te_version=te_version,
        te_checks=te_checks,
        cudnn_version=cudnn,
        cublaslt_version=cublaslt,
        driver_version=_driver_version(),
    )


def _te_facts() -> tuple[dict[str, TECheck], Optional[str], Optional[str]]:
    import transformer_engine.pytorch as te

    from .te_features import te_has

    checks = {}
    for family, fn_name in TE_CHECKS.items():
        fn = getattr(te, fn_name, None)
        if fn is None or not te_has("availability_reasons"):  # TE < 2.9: no return_reason (the plan ignores TE)
            continue
        answer = fn(return_reason=True)
        ok, reason = answer if isinstance(answer, tuple) else (bool(answer), "")
        checks[family] = TECheck(bool(ok), str(reason or ""))
    cublaslt = None
    try:
        import transformer_engine_torch as tex

        cublaslt = _int_version(int(tex.get_cublasLt_version()))
    except (ImportError, AttributeError):
        pass
    cudnn = None
    if hasattr(te, "get_cudnn_version"):
        cudnn = ".".join(str(x) for x in te.get_cudnn_version())
    return checks, cublaslt, cudnn


def _int_version(value: int) -> str:
    """cuBLASLt-style integer (130100) as '13.1.0'."""
    return f"{value // 10000}.{value % 10000 // 100}.{value % 100}"


def _torch_cudnn_version() -> Optional[str]:
    value = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not value:
        return None
    if value >= 90000:  # cuDNN 9 encodes major*10000 + minor*100 + patch
        return _int_version(value)
    return f"{value // 1000}.{value % 1000 // 100}.{value % 100}"


def _driver_version() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - the driver version is informational; NVML may be absent
        return None


def _cpu_has_native_bf16() -> bool:
    """Whether the CPU runs BF16 matmuls natively (AVX512-BF16/AMX); emulated BF16 is slower than FP32."""
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(checker()) if checker is not None else False


def _cpu_name() -> str:
    import platform

    return f"cpu ({platform.machine() or 'unknown'})"
