import jax
import pytest

from retention_jax import config, sharding


def test_mesh_shape_fills_minus_one():
    def shape(sizes):
        return tuple(config.mesh_shape(sizes, 8).values())

    assert shape(dict(data=-1, fsdp=2, tensor=2)) == (2, 2, 2)
    assert shape(dict(data=1, fsdp=-1, tensor=1)) == (1, 8, 1)
    assert shape(dict(data=8, fsdp=1, tensor=1)) == (8, 1, 1)
    assert config.smallest_devices(dict(data=-1, fsdp=8, tensor=1)) == 8


@pytest.mark.parametrize(
    "sizes, match",
    [
        (dict(data=-1, fsdp=-1, tensor=1), "at most one axis of -1"),
        (dict(data=3, fsdp=-1, tensor=1), r"product \(3\) divides the 8 devices"),
        (dict(data=2, fsdp=2, tensor=1), r"product \(4\) is the 8 devices available"),
        (dict(data=0, fsdp=-1, tensor=1), "config key mesh.data=0: a positive size or -1"),
    ],
)
def test_mesh_shape_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        config.mesh_shape(sizes, 8)


def test_make_mesh_is_auto_and_named():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == sharding.AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
