import jax
import pytest

from retention_jax import sharding


def test_mesh_shape_fills_minus_one():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    assert sharding.mesh_shape(dict(data=8, fsdp=1, tensor=1), 8) == (8, 1, 1)


@pytest.mark.parametrize(
    "sizes, match",
    [
        (dict(data=-1, fsdp=-1, tensor=1), "at most one axis"),
        (dict(data=3, fsdp=-1, tensor=1), "not divisible"),
        (dict(data=2, fsdp=2, tensor=1), "needs 4 devices, 8 are available"),
        (dict(data=0, fsdp=-1, tensor=1), "mesh.data=0"),
    ],
)
def test_mesh_shape_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.mesh_shape(sizes, 8)


def test_make_mesh_is_auto_and_named():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == sharding.AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
