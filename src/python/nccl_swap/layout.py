"""Where a weight set's tensors lie in a region: names, dtypes, shapes, byte offsets (the hello's "tensors")."""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

PACKED_ALIGNMENT = 256

# Bits per value of every safetensors dtype the agent knows (src/NcclSwap.WeightSets/Safetensors/Dtype.cs).
DTYPE_BITS: Dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


class LayoutError(ValueError):
    """A layout that breaks a rule; the message names the tensor."""


@dataclass(frozen=True)
class Tensor:
    """One tensor placed in a region."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


def byte_length(name: str, dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor, every rule checked (known dtype, non-negative dimensions, whole bytes)."""
    if dtype not in DTYPE_BITS:
        raise LayoutError(f"tensor '{name}': unknown dtype '{dtype}'")
    elements = 1
    for dimension in shape:
        if not isinstance(dimension, int) or dimension < 0:
            raise LayoutError(f"tensor '{name}': shape {list(shape)} must hold non-negative whole numbers")
        elements *= dimension
    bits = elements * DTYPE_BITS[dtype]
    if bits % 8:
        raise LayoutError(f"tensor '{name}': {elements} values of {dtype} do not fill whole bytes")
    return bits // 8


class Layout:
    """Tensors in a region, kept in name order like the agent's manifests."""

    def __init__(self, tensors: Iterable[Tensor]):
        ordered = sorted(tensors, key=lambda t: t.name.encode())
        names = set()
        for t in ordered:
            if not t.name:
                raise LayoutError("a tensor has an empty name")
            if t.name in names:
                raise LayoutError(f"tensor '{t.name}' appears twice")
            names.add(t.name)
        placed = sorted((t for t in ordered if t.nbytes), key=lambda t: t.offset)
        for before, after in zip(placed, placed[1:]):
            if after.offset < before.offset + before.nbytes:
                raise LayoutError(f"tensor '{after.name}' at offset {after.offset} overlaps tensor '{before.name}'")
        self.tensors: List[Tensor] = ordered
        self._by_name = {t.name: t for t in ordered}
        self.length = max((t.offset + t.nbytes for t in ordered), default=0)

    @classmethod
    def packed(cls, tensors: Iterable[Tuple[str, str, Sequence[int]]], alignment: int = PACKED_ALIGNMENT) -> "Layout":
        """The tensors one after another in name order, each at a multiple of ``alignment`` (as the agent stages them)."""
        placed, offset = [], 0
        for name, dtype, shape in sorted(tensors, key=lambda t: t[0].encode()):
            nbytes = byte_length(name, dtype, shape)
            placed.append(Tensor(name, dtype, tuple(shape), offset, nbytes))
            offset = (offset + nbytes + alignment - 1) // alignment * alignment
        return cls(placed)

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor '{name}' in this layout") from None

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def to_json(self) -> List[dict]:
        """The hello's "tensors" array."""
        return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset} for t in self.tensors]
