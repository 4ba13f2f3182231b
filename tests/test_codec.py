import pytest
import torch

from moemesh.codec import DTYPES, from_pb, parse_dtype, to_pb
from moemesh.errors import InvalidArgument
from moemesh.v1 import tensor_pb2

SHAPES = [(), (0,), (0, 64), (3, 64), (2, 3, 5), (1, 1024)]


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact_in_same_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    msg = to_pb(x)
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == x.numel() * dtype.itemsize
    y = from_pb(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, y)


def test_wire_dtype_casts_and_dtype_casts_back() -> None:
    x = torch.randn(4, 8)
    msg = to_pb(x, wire_dtype=torch.bfloat16)
    assert msg.dtype == tensor_pb2.DTYPE_BFLOAT16
    y = from_pb(msg, torch.float32)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.to(torch.bfloat16).float())


def test_non_contiguous_and_grad_inputs() -> None:
    x = torch.randn(8, 6, requires_grad=True)
    view = x.t()[:, ::2]
    assert not view.is_contiguous()
    assert torch.equal(from_pb(to_pb(view)), view.detach())


def test_bytes_are_little_endian_row_major() -> None:
    msg = to_pb(torch.tensor([[1.0, 2.0]]))
    assert msg.data == b"\x00\x00\x80\x3f\x00\x00\x00\x40"


def test_decoded_tensor_is_writable() -> None:
    y = from_pb(to_pb(torch.ones(2, 2)))
    y.add_(1)
    assert torch.equal(y, torch.full((2, 2), 2.0))


def test_byte_size_mismatch_names_field() -> None:
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=[3, 64], data=bytes(1000))
    expected = r"^hidden: 1000 bytes .* bfloat16 and shape \[3, 64\] \(needs 384\)$"
    with pytest.raises(InvalidArgument, match=expected):
        from_pb(msg, field="hidden")


def test_unspecified_dtype_raises() -> None:
    msg = tensor_pb2.Tensor(shape=[2], data=bytes(8))
    with pytest.raises(InvalidArgument, match="^tensor: dtype"):
        from_pb(msg)


def test_negative_dimension_raises() -> None:
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1, 2], data=b"")
    with pytest.raises(InvalidArgument, match="^x: shape"):
        from_pb(msg, field="x")


def test_unsupported_source_dtype_raises() -> None:
    with pytest.raises(ValueError, match="int64"):
        to_pb(torch.arange(3))


def test_parse_dtype() -> None:
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        parse_dtype("float64")
