"""Integer weight codes packed into bytes, for the exported file (``edadm.deploy.export``).

Codes are the unsigned grid [0, 2^b - 1] of ``QuantLayer.weight_int`` (uint8). At b <= 4 two
codes share a byte: the flattened codes in order, element 2i in the low nibble and 2i + 1 in
the high nibble, an odd count padded with a zero nibble. At 5..8 bits a code fills its byte
(nibbles would not hold it, and 5- to 7-bit bit streams save too little to pay for the
unaligned unpacking).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_BITS, MAX_BITS = 2, 8
NIBBLE_BITS = 4  # at this many bits or fewer, two codes per byte


def codes_per_byte(bits: int) -> int:
    """2 for ``bits`` <= 4, else 1."""
    _check_bits(bits)
    return 2 if bits <= NIBBLE_BITS else 1


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    per_byte = codes_per_byte(bits)
    return (numel + per_byte - 1) // per_byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, values in [0, 2^bits - 1]) into a flat uint8 tensor.

    Returns [ceil(numel / 2)] for bits <= 4, else [numel] (a contiguous copy), on the device
    of ``codes``. Raises ValueError for another dtype or a code outside the ``bits`` grid.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_codes takes uint8 codes (QuantLayer.weight_int), got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    if flat.numel() and int(flat.max()) > (1 << bits) - 1:
        raise ValueError(
            f"pack_codes: code {int(flat.max())} is outside the {bits}-bit grid [0, {(1 << bits) - 1}]; "
            "pack with the layer's own w_bits"
        )
    if bits > NIBBLE_BITS:
        return flat.clone().contiguous()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """The uint8 codes of ``shape`` that ``pack_codes(codes, bits)`` turned into ``packed``.

    Raises ValueError when ``packed`` is not a flat uint8 tensor of ``packed_size`` bytes for
    ``shape``, or (bits <= 4) its padding nibble is not zero.
    """
    _check_bits(bits)
    shape = torch.Size(shape)
    numel = shape.numel()
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(
            f"unpack_codes takes a flat uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    expected = packed_size(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"unpack_codes: {packed.numel()} packed bytes do not hold a {tuple(shape)} tensor at {bits} bits "
            f"({expected} bytes); the packed tensor belongs to another layer or bit-width"
        )
    if bits > NIBBLE_BITS:
        codes = packed.clone()
    else:
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
        if numel % 2 and int(codes[-1]) != 0:
            raise ValueError(
                "unpack_codes: the padding nibble of an odd code count is not zero (damaged data)"
            )
        codes = codes[:numel]
    if numel and int(codes.max()) > (1 << bits) - 1:
        raise ValueError(
            f"unpack_codes: code {int(codes.max())} is outside the {bits}-bit grid (damaged data)"
        )
    return codes.reshape(shape)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r}: packed codes are {MIN_BITS} to {MAX_BITS} bits")
