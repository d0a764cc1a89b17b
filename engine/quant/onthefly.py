"""Quantize a dense fused weight at load time: bitsandbytes nf4/fp4/int8, torchao int8/int4,
fp8 (W8A8 through torch._scaled_mm).

Each builder returns a base op (an ``nn.Module`` mapping x [T, in] to x W^T + b [T, out]) with
the same settings transformers' ``BitsAndBytesConfig``/``TorchAoConfig`` use by default, so
a PEFT model on a transformers-quantized base sees the same weights.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

INSTALL_HINT = "pip install 'lorry[quant]'"
BNB_BLOCKSIZE = 64            # transformers' default 4-bit block size
BNB_INT8_THRESHOLD = 6.0      # transformers' default llm_int8_threshold (outlier columns in fp16)
TORCHAO_INT4_GROUP = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0               # e4m3's largest finite value


def torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def require(package: str, method: str):
    """Import ``package`` or say which package ``quantization=method`` needs."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"EngineConfig.quantization={method!r} needs the {package!r} package, "
                          f"which is not installed here: {INSTALL_HINT}") from e


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes held by ``t``, looking inside tensor subclasses (torchao) and bnb quant states."""
    if t is None:
        return 0
    if hasattr(type(t), "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


class _Bnb4bit(nn.Module):
    def __init__(self, bnb, weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str):
        super().__init__()
        self._bnb = bnb
        self.kernel = f"bitsandbytes-{quant_type}"
        # weight: [out, in] -> packed uint8 [out*in/2, 1] + state (absmax per block of 64)
        packed, self.state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=BNB_BLOCKSIZE, compress_statistics=False,
            quant_type=quant_type)
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bnb.matmul_4bit(x, self.packed.t(), quant_state=self.state, bias=self.bias)

    def resident_bytes(self) -> int:
        s = self.state
        return sum(map(tensor_bytes, (self.packed, self.bias, s.absmax, s.code)))


class _Bnb8bit(nn.Module):
    def __init__(self, bnb, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out, inp = weight.shape
        self.kernel = "bitsandbytes-int8"
        # like bitsandbytes' Int8Params: row-wise absmax int8 from the fp16 weight
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        self.lin = bnb.nn.Linear8bitLt(inp, out, bias=bias is not None, has_fp16_weights=False,
                                       threshold=BNB_INT8_THRESHOLD, device="meta")
        p = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        p.CB, p.SCB = cb, scb
        self.lin.weight = p
        self.lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_dtype = weight.dtype
        self.train(False)

    def train(self, mode: bool = True):
        # bitsandbytes picks its int8 inference matmul only in eval mode; this op never trains
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).to(self.out_dtype)

    def resident_bytes(self) -> int:
        w = self.lin.weight
        scb = w.SCB if w.SCB is not None else self.lin.state.SCB
        return tensor_bytes(self.lin.state.CB if w.numel() == 0 else w.data) + \
            tensor_bytes(scb) + tensor_bytes(self.lin.bias)


class _TorchAo(nn.Module):
    def __init__(self, torchao_q, weight: torch.Tensor, bias: torch.Tensor | None, config):
        super().__init__()
        out, inp = weight.shape
        self.kernel = f"torchao-{type(config).__name__}"
        self.lin = nn.Linear(inp, out, bias=bias is not None, device="meta")
        self.lin.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.lin.bias = nn.Parameter(bias, requires_grad=False)
        torchao_q.quantize_(self.lin, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def resident_bytes(self) -> int:
        return tensor_bytes(self.lin.weight) + tensor_bytes(self.lin.bias)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] -> (e4m3 [T, N], fp32 scales [T, 1]): row r is x[r] / s[r] with s[r] its
    absmax / 448 (at least 1e-12 / 448: a zero row stays zero)."""
    xf = x.float()
    amax = xf.abs().amax(1, keepdim=True).clamp(min=1e-12)
    # divided by a tensor, not a Python number: torch's CUDA division by a host scalar
    # multiplies by its rounded reciprocal (a bit off IEEE division at times), which the
    # quantizing kernels (kernels.fused_ops, IEEE div_rn) and the CPU would not match
    s = amax / torch.full_like(amax, FP8_MAX)
    return (xf / s).to(FP8), s


class Fp8Linear(nn.Module):
    """W8A8 in float8 e4m3 (vLLM's ``quantization="fp8"`` on an unquantized checkpoint): the
    weight quantized once per output channel (absmax / 448), each token's activations per row
    at every call, one ``torch._scaled_mm`` with both scales; the output in the model dtype.
    Half a bf16 weight's bytes, and Hopper's fp8 tensor cores (twice bf16's FLOP/s)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out, inp = weight.shape
        if out % 16 or inp % 16:
            raise ValueError(f"EngineConfig.quantization='fp8' needs linear layers whose sizes "
                             f"are multiples of 16 (torch._scaled_mm); this base has {out} x "
                             f"{inp}")
        self.kernel = "fp8-scaled-mm"
        w = weight.float()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / FP8_MAX       # [out, 1]
        self.register_buffer("qweight", (w / scale).to(FP8))                    # [out, in]
        self.register_buffer("scale", scale.t().contiguous())                    # [1, out]
        self.register_buffer("bias", bias)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, in] -> (e4m3 [T, in], fp32 per-row scales [T, 1]): one Triton pass on CUDA
        (kernels.fused_ops.quant_fp8_rows), torch elsewhere or without Triton
        (``quantize_rows``)."""
        if x.is_cuda and x.stride(-1) == 1:
            from lorry.engine.model.attention import triton_ops

            ops = triton_ops()
            if ops is not None:
                return ops[0].quant_fp8_rows(x)
        return quantize_rows(x)

    # the CUDA GEMM: "scaled_mm" (torch._scaled_mm's row-wise kernel), "triton"
    # (kernels.fp8_matmul), or "auto": triton up to TRITON_MAX_ROWS rows, where it took 13-19%
    # less GPU time than row-wise on an H100 (docs/BENCHMARKS.md, seventeenth session; not yet
    # A/B'd in the engine, so not the default); benchmarks set it for A/B runs
    GEMM = "scaled_mm"
    TRITON_MAX_ROWS = 64

    @classmethod
    def gemm_for(cls, x: torch.Tensor):
        """kernels.fp8_matmul.fp8_matmul when it runs x's product, else None."""
        if not (x.is_cuda and cls.triton_rows(x.shape[0])):
            return None
        try:
            from lorry.kernels.fp8_matmul import fp8_matmul
        except ImportError:
            return None
        return fp8_matmul

    @classmethod
    def triton_rows(cls, rows: int) -> bool:
        """Whether GEMM has kernels.fp8_matmul take a product of ``rows`` rows."""
        return cls.GEMM == "triton" or (cls.GEMM == "auto" and rows <= cls.TRITON_MAX_ROWS)

    takes_fp8_rows = True   # forward's xq: the input already quantized (fused kernels)

    def forward(self, x: torch.Tensor, xq=None) -> torch.Tensor:
        """x [T, in] -> [T, out]; ``xq``: x as quantize_input makes it, (e4m3 [T, in], fp32
        [T, 1]), when a fused kernel already made it."""
        if x.shape[0] == 0:
            return x.new_zeros(0, self.qweight.shape[0])
        xq, s = self.quantize_input(x) if xq is None else xq
        gemm = self.gemm_for(x)
        if gemm is not None:
            y = gemm(xq, s, self.qweight, self.scale, x.dtype)
        elif x.is_cuda:   # row-wise scales take a bf16 output
            y = torch._scaled_mm(xq, self.qweight.t(), s, self.scale, out_dtype=torch.bfloat16)
        else:             # the same product in fp32 (CPU _scaled_mm's scales vary by torch)
            y = (xq.float() @ self.qweight.float().t()) * (s * self.scale)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def resident_bytes(self) -> int:
        return sum(map(tensor_bytes, (self.qweight, self.scale, self.bias)))


def check_fp8_sizes(config) -> None:
    """Refuse quantization="fp8" on a base whose fused linears are not multiples of 16 wide
    (torch._scaled_mm), from its config, before any weight is read."""
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    sizes = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
             "heads x head_dim": heads * d, "kv heads x head_dim": kv * d}
    bad = {k: v for k, v in sizes.items() if v % 16}
    if bad:
        raise ValueError(f"EngineConfig.quantization='fp8' needs linear layers whose sizes are "
                         f"multiples of 16 (torch._scaled_mm); this base has {bad}")


def fp8_shortfall(device: torch.device) -> str | None:
    """The compute capability ("8.0") of a CUDA ``device`` below 8.9, which has no fp8
    conversions or matmuls; None for newer GPUs and the CPU."""
    if device.type != "cuda":
        return None
    cap = torch.cuda.get_device_capability(device)
    return ".".join(map(str, cap)) if cap < (8, 9) else None


def check_device(method: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a method that cannot run on ``device``/``dtype``, before any weight is touched."""
    if method == "torchao-int4" and (device.type != "cuda" or dtype != torch.bfloat16):
        raise ValueError(f"EngineConfig.quantization='torchao-int4' needs a CUDA device with "
                         f"dtype bfloat16 (got device {device.type}, dtype "
                         f"{str(dtype).split('.')[-1]}): torchao's int4 weight-only kernel is "
                         "CUDA-only; on CPU use 'torchao-int8', 'bnb-nf4', 'bnb-fp4' or 'bnb-int8'")
    if method == "fp8" and torch_version() < (2, 8):
        raise ValueError(f"EngineConfig.quantization='fp8' needs torch 2.8 or newer (row-wise "
                         f"scaled fp8 matmuls on CPU and CUDA); this is {torch.__version__}")
    if method == "fp8" and (cap := fp8_shortfall(device)):
        raise ValueError(f"EngineConfig.quantization='fp8' needs a GPU of compute capability "
                         f"8.9 or newer (Ada, Hopper) for fp8 matmuls; this one is {cap}: use "
                         "'bnb-int8', 'torchao-int8' or 'torchao-int4'")


def load_backend(method: str):
    """Import the package ``method`` needs (clear ImportError otherwise); return a builder."""
    if method == "fp8":                                 # torch alone
        return Fp8Linear
    if method.startswith("bnb-"):
        bnb = require("bitsandbytes", method)
        if method == "bnb-int8":
            return lambda w, b: _Bnb8bit(bnb, w, b)
        return lambda w, b: _Bnb4bit(bnb, w, b, method.removeprefix("bnb-"))
    require("torchao", method)
    tq = importlib.import_module("torchao.quantization")
    if method == "torchao-int8":
        return lambda w, b: _TorchAo(tq, w, b, tq.Int8WeightOnlyConfig())
    return lambda w, b: _TorchAo(tq, w, b, tq.Int4WeightOnlyConfig(
        group_size=TORCHAO_INT4_GROUP, int4_packing_format="tile_packed_to_4d"))
