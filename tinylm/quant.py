"""Weight quantization for inference: int8 per output channel, int4 in groups.

    q = quantize_tensor(w, "int4", group_size=32)   w (in, out) float -> packed codes + scales
    q.dequantize()                                   -> float32 (in, out), q.nbytes: storage
    quantize_model(model, "int8")                    every Linear -> QuantizedLinear, in place

Both schemes are symmetric absmax quantization: a block of weights shares one scale
s = max|w| / qmax, each weight is stored as the integer code round(w / s) and read back
as code * s. Zero stays exactly zero and, since no weight is clipped, every weight is
off by at most s / 2.

    int8   one scale per output channel (a column of the (in, out) weight), codes in
           [-127, 127], one byte each. -128 is never used: symmetric, so +-max|w| both fit.
    int4   one scale per group of `group_size` consecutive weights along the input
           dimension, within one output column (rows g*G .. g*G+G-1 of column j), codes
           in [-7, 7] (symmetric as int8; -8 is never used, which keeps the s / 2 bound:
           with [-8, 7] and s = max|w| / 8, +max|w| would be clipped to 7 s, an error of s).
           Two codes per byte: code + 8 (0..15) as a nibble, the even input row in the low
           nibble and the odd row in the high one: packed (ceil(in/2), out) uint8. The last
           group may be partial (in not a multiple of group_size): its scale covers the
           rows there are, and no padding is stored.

Smaller groups follow the local size of the weights more closely (a single outlier
inflates the scale of its group only), at the cost of one float32 scale per group:
int4 g32 stores 4 + 32/32 = 5 bits per weight, g128 4.25; int8 8 plus 32/in.

What `quantize_model` quantizes: every Linear layer (attention's qkv and proj, the
MLP's, a MoE's router and experts, and the untied `head` when a model has one). The
token and position embeddings and the norms stay float32: the tied GPT-2 head reads
the embedding table as a plain array (GPT._head), so it cannot dequantize on the fly.
A QuantizedLinear dequantizes its weight at every forward; it is for inference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm.backend import to_device, to_numpy, xp_of
from tinylm.nn.linear import Linear
from tinylm.nn.module import Module

__all__ = ["SCHEMES", "QuantizedLinear", "QuantizedTensor", "check_quantization", "model_nbytes",
           "quantize_model", "quantize_tensor", "quantized_state", "restore_quantized",
           "stored_shapes"]

SCHEMES = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}  # the largest code; codes are in [-QMAX, QMAX]


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized 2-D weight (in, out): integer codes and float32 scales.

    int8: codes (in, out) int8, scales (out,) float32.
    int4: codes (ceil(in/2), out) uint8 (two codes a byte), scales (ceil(in/G), out).
    Arrays stay on the device they were made on (NumPy or CuPy)."""

    scheme: str  # "int8" or "int4"
    shape: tuple  # (in, out) of the float weight
    group_size: int | None  # int4: weights per scale along the input dimension; int8: None
    codes: object
    scales: object

    @property
    def nbytes(self) -> int:
        """Bytes of storage: the packed codes and the scales."""
        return int(self.codes.nbytes) + int(self.scales.nbytes)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def int_codes(self):
        """The codes as int8 (in, out), unpacked (a copy for int4)."""
        if self.scheme == "int8":
            return self.codes
        xp = xp_of(self.codes)
        n_in, n_out = self.shape
        low = (self.codes & xp.uint8(0x0F)).astype(xp.int8) - xp.int8(8)  # even rows
        high = (self.codes >> xp.uint8(4)).astype(xp.int8) - xp.int8(8)  # odd rows
        out = xp.empty((2 * self.codes.shape[0], n_out), dtype=xp.int8)  # (in rounded to even, out)
        out[0::2], out[1::2] = low, high
        return out[:n_in]

    def dequantize(self, dtype=np.float32):
        """The float weight (in, out) the codes stand for: code * scale."""
        xp = xp_of(self.codes)
        codes = self.int_codes()  # (in, out) int8
        if self.scheme == "int8":
            return codes.astype(dtype) * self.scales.astype(dtype)  # (in, out) * (out,)
        n_in, n_out = self.shape
        G = self.group_size
        n_groups = self.scales.shape[0]
        padded = xp.zeros((n_groups * G, n_out), dtype=dtype)  # whole groups, in memory only
        padded[:n_in] = codes
        grouped = padded.reshape(n_groups, G, n_out) * self.scales.astype(dtype)[:, None, :]
        return grouped.reshape(n_groups * G, n_out)[:n_in]

    def to_xp(self, xp) -> QuantizedTensor:
        """The same tensor with its arrays on `xp`'s device (self when already there)."""
        if xp_of(self.codes) is xp:
            return self
        return QuantizedTensor(self.scheme, self.shape, self.group_size,
                               to_device(to_numpy(self.codes), xp),
                               to_device(to_numpy(self.scales), xp))

    def arrays(self) -> dict:
        """Host copies, for saving: {"codes", "scales"}."""
        return {"codes": to_numpy(self.codes).copy(), "scales": to_numpy(self.scales).copy()}


def quantize_tensor(w, scheme: str = "int8", group_size: int = 32) -> QuantizedTensor:
    """Quantize a 2-D weight `w` (in, out) (NumPy or CuPy) as `scheme` says (module
    docstring); `group_size` applies to int4 only and must be even. Computed in float64,
    scales stored as float32."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"quantize_tensor expects a 2-D (in, out) weight, got shape "
                         f"{getattr(w, 'shape', None)}")
    xp = xp_of(w)
    w64 = w.astype(xp.float64)
    if not bool(xp.isfinite(w64).all()):
        raise ValueError("cannot quantize a weight with inf or NaN entries")
    n_in, n_out = w.shape
    qmax = QMAX[scheme]
    if scheme == "int8":
        scales = (xp.abs(w64).max(axis=0) / qmax).astype(xp.float32)  # (out,)
        codes = _codes(w64, scales.astype(xp.float64), qmax).astype(xp.int8)  # (in, out)
        return QuantizedTensor("int8", (n_in, n_out), None, codes, scales)

    if not (isinstance(group_size, int) and group_size >= 2 and group_size % 2 == 0):
        raise ValueError(f"int4 group_size must be an even int >= 2, got {group_size!r}")
    G = group_size
    n_groups = -(-n_in // G)  # ceil: a last, partial group is padded with zeros
    padded = xp.zeros((n_groups * G, n_out), dtype=xp.float64)  # (in_padded, out)
    padded[:n_in] = w64
    grouped = padded.reshape(n_groups, G, n_out)  # (groups, G, out)
    scales = (xp.abs(grouped).max(axis=1) / qmax).astype(xp.float32)  # (groups, out)
    codes = _codes(grouped, scales.astype(xp.float64)[:, None, :], qmax)  # (groups, G, out)
    n_even = n_in + n_in % 2  # rows stored: an odd last row pairs with a zero code
    nibbles = (codes.reshape(n_groups * G, n_out)[:n_even] + 8).astype(xp.uint8)  # 1..15
    packed = nibbles[0::2] | (nibbles[1::2] << xp.uint8(4))  # (ceil(in/2), out)
    return QuantizedTensor("int4", (n_in, n_out), G, packed, scales)


def _codes(w64, scales64, qmax: int):
    """round(w / s), clipped to [-qmax, qmax]; a block of zeros (s = 0) gets code 0."""
    xp = xp_of(w64)
    safe = xp.where(scales64 > 0, scales64, 1.0)
    # s was rounded to float32, so |w| / s can exceed qmax by a hair: the clip keeps the
    # code in range and the error below s / 2
    return xp.clip(xp.rint(w64 / safe), -qmax, qmax)


# ---------------------------------------------------------------------------
# Quantized layers and models
# ---------------------------------------------------------------------------


class QuantizedLinear(Module):
    """A Linear whose weight is stored quantized: y = x @ dequantize(codes, scales) + bias.

    The weight is rebuilt in the input's dtype at every forward (dequantized on the
    fly), so only the packed form stays in memory; the bias stays float. Inference
    only: `backward` raises. The codes are not a parameter (they have no gradient);
    they move to the layer's device at the first forward after `to`.
    """

    def __init__(self, qweight: QuantizedTensor, bias=None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape
        self.qweight = qweight
        if bias is not None:
            self.add_param("bias", to_numpy(bias))
        self.training = False

    @classmethod
    def from_linear(cls, lin: Linear, scheme: str, group_size: int = 32) -> QuantizedLinear:
        q = cls(quantize_tensor(lin.params["weight"], scheme, group_size),
                lin.params.get("bias"))
        return q.to("cpu" if lin.xp is np else "cuda", lin.dtype)  # the bias: where lin's was

    @property
    def scheme(self) -> str:
        return self.qweight.scheme

    def extra_repr(self) -> str:
        group = f", group_size={self.qweight.group_size}" if self.scheme == "int4" else ""
        return (f"in={self.in_features}, out={self.out_features}, bias={'bias' in self.params}, "
                f"{self.scheme}{group}")

    def weight(self):
        """The dequantized weight (in, out) on the layer's device, in its dtype."""
        self.qweight = self.qweight.to_xp(self.xp)
        return self.qweight.dequantize(self.dtype)

    def forward(self, x):
        # x (..., in) -> y (..., out)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects inputs with last dimension "
                             f"{self.in_features}, got shape {x.shape}")
        y = x.reshape(-1, self.in_features) @ self.weight()  # (N, out)
        if "bias" in self.params:
            y += self.params["bias"]
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def backward(self, dout):
        raise RuntimeError(
            "QuantizedLinear is for inference only: a quantized model cannot be trained "
            "(train the float checkpoint, then quantize it again)")


def quantize_model(model, scheme: str, group_size: int = 32):
    """Replace every Linear in `model` by a QuantizedLinear (in place) and return `model`.

    Embeddings and norms stay float (see the module docstring); `model.quantization`
    records {"scheme", "group_size"} for saving."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    _replace_linears(model, lambda name, lin: QuantizedLinear.from_linear(lin, scheme, group_size))
    model.quantization = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None}
    model.eval()
    return model


def _replace_linears(module: Module, make, prefix: str = "") -> None:
    """Replace each Linear below `module` by make(qualified name, linear), in place; the
    names are those of `Module.parameters` ("blocks.0.attn.qkv")."""
    for attr, value in list(vars(module).items()):
        if isinstance(value, Linear):
            setattr(module, attr, make(prefix + attr, value))
        elif isinstance(value, Module):
            _replace_linears(value, make, f"{prefix}{attr}.")
        elif isinstance(value, list) and value and all(isinstance(v, Module) for v in value):
            for i, v in enumerate(value):
                if isinstance(v, Linear):
                    value[i] = make(f"{prefix}{attr}.{i}", v)
                else:
                    _replace_linears(v, make, f"{prefix}{attr}.{i}.")


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------


EMBEDDINGS = ("tok_emb.weight", "pos_emb.weight")  # 2-D parameters that are not Linear weights


def check_quantization(q, where="quantization") -> dict:
    """`q` as {"scheme", "group_size"} once it is valid (int8: group_size None; int4: an
    even int in [2, 65536]); ValueError naming `where` otherwise."""
    scheme = q.get("scheme") if isinstance(q, dict) else None
    group = q.get("group_size") if isinstance(q, dict) else None
    ok = scheme == "int8" or (scheme == "int4" and isinstance(group, int)
                              and not isinstance(group, bool) and 2 <= group <= 2**16
                              and group % 2 == 0)
    if not ok:
        raise ValueError(f'{where}: must be {{"scheme": "int8"}} or {{"scheme": "int4", '
                         f'"group_size": an even int}}, got {q!r}'[:300])
    return {"scheme": scheme, "group_size": group if scheme == "int4" else None}


def stored_shapes(shapes: dict, quantization: dict) -> dict[str, tuple[tuple, object]]:
    """{array name: (shape, dtype)} that a quantized model's `quantized_state` holds, from
    the float model's parameter shapes {name: shape}: each 2-D weight but the embeddings
    becomes "<name>.codes" (int8, or uint8 for int4) and "<name>.scales" (float32); the
    other parameters keep their shape, dtype None (any float). Nothing is allocated."""
    q = check_quantization(quantization)
    out = {}
    for name, shape in shapes.items():
        if len(shape) != 2 or name in EMBEDDINGS:
            out[name] = (tuple(shape), None)
            continue
        n_in, n_out = shape
        if q["scheme"] == "int8":
            out[f"{name}.codes"] = ((n_in, n_out), np.dtype(np.int8))
            out[f"{name}.scales"] = ((n_out,), np.dtype(np.float32))
        else:
            groups = -(-n_in // q["group_size"])
            out[f"{name}.codes"] = (((n_in + 1) // 2, n_out), np.dtype(np.uint8))
            out[f"{name}.scales"] = ((groups, n_out), np.dtype(np.float32))
    return out


def quantized_state(model) -> dict[str, np.ndarray]:
    """What a checkpoint's model.npz holds for a quantized model: the float parameters
    (`model.state_dict()`: embeddings, norms, biases) and, for each QuantizedLinear, its
    packed codes and scales as "<name>.weight.codes" and "<name>.weight.scales"."""
    state = model.state_dict()
    for name, layer in quantized_layers(model).items():
        for key, array in layer.qweight.arrays().items():
            state[f"{name}.weight.{key}"] = array
    return state


def restore_quantized(model, arrays: dict, quantization: dict) -> dict:
    """Make `model` (a float GPT of the checkpoint's shape) the quantized model whose
    codes and scales are in `arrays` (as `quantized_state` wrote them), without
    quantizing anything; returns the other arrays, for `model.load_state_dict`.
    A missing array or one of the wrong shape or dtype raises ValueError."""
    q = check_quantization(quantization)
    scheme, group = q["scheme"], q["group_size"]
    rest = dict(arrays)

    def make(name, lin):
        try:
            codes, scales = rest.pop(f"{name}.weight.codes"), rest.pop(f"{name}.weight.scales")
        except KeyError as exc:
            raise ValueError(f"the quantized weight {exc.args[0]} is missing") from None
        n_in, n_out = lin.in_features, lin.out_features
        if scheme == "int8":
            want = ((n_in, n_out), np.int8, (n_out,))
        else:
            groups = -(-n_in // group)
            want = (((n_in + 1) // 2, n_out), np.uint8, (groups, n_out))
        if (codes.shape, codes.dtype, scales.shape) != want or scales.dtype != np.float32:
            raise ValueError(f"{name}.weight: stored codes {codes.shape} {codes.dtype} and scales "
                             f"{scales.shape} {scales.dtype} do not fit a {scheme} ({n_in}, "
                             f"{n_out}) weight")
        q = QuantizedTensor(scheme, (n_in, n_out), group if scheme == "int4" else None,
                            np.ascontiguousarray(codes), np.ascontiguousarray(scales))
        layer = QuantizedLinear(q, lin.params.get("bias"))
        return layer.to("cpu" if lin.xp is np else "cuda", lin.dtype)

    _replace_linears(model, make)
    leftover = sorted(k for k in rest if k.endswith((".weight.codes", ".weight.scales")))
    if leftover:
        raise ValueError(f"quantized weights for layers the model does not have: {leftover}")
    model.quantization = {"scheme": scheme, "group_size": group if scheme == "int4" else None}
    model.eval()
    return rest


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    """{qualified name: layer} of the QuantizedLinear layers, as parameter names go."""
    found = {}

    def walk(module, prefix):
        for name, child in module.children():
            if isinstance(child, QuantizedLinear):
                found[prefix + name] = child
            walk(child, prefix + name + ".")

    walk(model, "")
    return found


def model_nbytes(model) -> int:
    """Bytes of the weights as stored: float parameters plus packed codes and scales."""
    floats = sum(int(p.nbytes) for _, p, _ in model.parameters())
    return floats + sum(q.qweight.nbytes for q in quantized_layers(model).values())
