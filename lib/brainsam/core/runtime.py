"""How the networks run on a device: compiled or eager, float32 or bfloat16, chosen at run time.

`Runtime.for_device(device)` looks at the machine once per process and logs one line saying
what it chose:

- compiled (`torch.compile`, inductor) wherever inductor can build code: a C++ compiler on a
  CPU, Triton on a GPU. On the 2-core AVX2 CPU here the LiteMedSAM encoder runs 2.0-2.2x
  faster compiled than eager, the same to 2e-6 (docs/speed.md);
- bfloat16 autocast for the image encoder and the training step where the device computes in
  bfloat16 natively (a GPU with bf16, a CPU with AMX or AVX512-BF16): 4x over eager on a
  Sapphire Rapids CPU, embeddings within 3 %, fs-aseg Dice within the 0.005 the project allows
  (docs/speed.md). Elsewhere bf16 is emulated and 13x slower than float32, so float32 stays.
  The segmenter's decoding (brainsam.inference.segmenter) follows the same choice: 1.25-1.3x
  on an AVX512-BF16 CPU, Dice within 0.001 of float32 (docs/speed.md). The clicks-only
  predictor's compiled decoder stays float32 on a CPU.

The setting `auto` (engine config `runtime`) takes that choice; `eager`, `compiled`,
`eager+bf16` and `compiled+bf16` force one. The environment variable BRAINSAM_RUNTIME, when
set, stands in for `auto` in every process started with it (the tests run eager with it).

Compiled code is kept on disk (inductor's FX graph and AOT autograd caches in `cache_dir`), so
the server, the scoring and the training processes compile a network once between them, and a
later process only traces it (seconds). An interactive runtime never compiles on a call: a
call whose shapes no compiled code covers yet runs eagerly (`torch.compiler.set_stance`
"eager_on_recompile"), and compiling happens inside `warming()` only, where the server's
warm-up puts it. Background processes compile on their first call.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

SETTINGS = ("auto", "eager", "compiled", "eager+bf16", "compiled+bf16")
ENVIRONMENT = "BRAINSAM_RUNTIME"
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""CPU flags (/proc/cpuinfo) of instructions that compute in bfloat16; without them oneDNN
emulates it (measured 13x slower than float32 on AVX2)."""


@dataclass(frozen=True)
class Choice:
    """What runs how. compiled: torch.compile. bf16: bfloat16 autocast for the image encoder,
    the training step and the segmenter's decoding (the predictor's decoder too on a GPU)."""

    compiled: bool
    bf16: bool

    def __str__(self) -> str:
        return ("compiled" if self.compiled else "eager") + ("+bf16" if self.bf16 else "+fp32")


def choose(device: torch.device, setting: str = "auto") -> Choice:
    """The choice for `device` under `setting` (one of SETTINGS): `auto` compiles where a
    compiler is present and uses bf16 where the device computes it natively, unless
    BRAINSAM_RUNTIME names another setting."""
    if setting == "auto":
        setting = os.environ.get(ENVIRONMENT) or setting
    if setting not in SETTINGS:
        raise ValueError(f"runtime must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return Choice(setting.startswith("compiled"), setting.endswith("+bf16"))
    return Choice(can_compile(device), native_bf16(device))


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (faster than float32, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool(cpu_flags() & NATIVE_BF16_FLAGS)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them; empty where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def can_compile(device: torch.device) -> bool:
    """Whether inductor can build code for `device`: a C++ compiler for the CPU, Triton for a GPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    if device.type != "cpu":
        return False
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # inductor raises its own error types when it finds no compiler
        return False
    return True


class Runtime:
    """Wraps a device's network functions so they run the chosen way (see module doc).

    interactive: never compile on a call (the server's click path); compile in `warming()`.
    """

    _made: dict[tuple, "Runtime"] = {}

    def __init__(self, device: torch.device, choice: Choice, interactive: bool = False):
        self.device = device
        self.choice = choice
        self.interactive = interactive
        self._warming = False

    @classmethod
    def for_device(
        cls,
        device: str | torch.device = "cpu",
        setting: str = "auto",
        cache_dir: str | Path | None = None,
        interactive: bool = False,
    ) -> "Runtime":
        """The process's runtime for `device`, made (and logged) once per setting.

        cache_dir: where compiled code persists, shared by every process that names it (None:
        torch's default, a folder in the system's temporary directory).
        """
        device = torch.device(device)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())  # inductor reads it at every compile
        key = (device, setting, interactive)
        if key not in cls._made:
            choice = choose(device, setting)
            cls._made[key] = cls(device, choice, interactive)
            logger.info("runtime on %s: %s (setting %s; native bf16 %s; compiled code in %s)", device, choice, setting,
                        native_bf16(device), os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default folder"))  # fmt: skip
        return cls._made[key]

    def encoder(self, fn: Callable[..., Any]) -> "Accelerated":
        """An image encoder (module or function: a batch of slices first, (B, ...) -> (B, ...)),
        run the chosen way; outputs float32. Batches of 2 and more share one compiled graph."""
        return Accelerated(self, fn, self.choice.bf16, dynamic=None, batched=True)

    def decoder(self, fn: Callable[..., Any]) -> "Accelerated":
        """A prompt encoder + mask decoder function, compiled for any prompt count, batch and
        crop size; bf16 on a GPU only; outputs float32."""
        return Accelerated(self, fn, self.choice.bf16 and self.device.type == "cuda", dynamic=True, batched=False)

    def train_step(self, fn: Callable[..., Any]) -> "Accelerated":
        """A differentiable function of a training step (e.g. the adapted encoder stages, or the
        decoder), run the chosen way; gradients flow through it; outputs float32. Shapes that
        change between calls get a dynamic graph at their second value."""
        return Accelerated(self, fn, self.choice.bf16, dynamic=None, batched=False)

    @contextmanager
    def warming(self) -> Iterator[None]:
        """Within: calls of an interactive runtime compile what they need."""
        self._warming, before = True, self._warming
        try:
            yield
        finally:
            self._warming = before

    def stance(self):
        """The compile stance of a call: eager wherever no compiled code fits, when interactive
        outside `warming()`; torch's default otherwise."""
        if self.choice.compiled and self.interactive and not self._warming:
            return torch.compiler.set_stance("eager_on_recompile")
        return nullcontext()


class Accelerated:
    """A function run as its runtime chose. fn: the function as given, compiled: what runs."""

    def __init__(self, runtime: Runtime, fn: Callable[..., Any], bf16: bool, dynamic: bool | None, batched: bool):
        self.runtime, self.fn, self.bf16, self.batched = runtime, fn, bf16, batched
        self.compiled = torch.compile(fn, dynamic=dynamic) if runtime.choice.compiled else fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.batched and self.runtime.choice.compiled:
            for value in args:
                # batch sizes 2, 3, 4... share one graph; a single slice keeps its own
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] > 1:
                    torch._dynamo.maybe_mark_dynamic(value, 0)
        with self.runtime.stance(), torch.autocast(self.runtime.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.compiled(*args, **kwargs)
        return as_float32(out) if self.bf16 else out


def as_float32(value: Any) -> Any:
    """`value` with every bfloat16 tensor in it (also inside tuples and lists) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype == torch.bfloat16 else value
    if isinstance(value, (tuple, list)):
        return type(value)(as_float32(v) for v in value)
    return value
