"""gs:// paths against a fake bucket: an fsspec filesystem for the `gs`/`gcs` protocols
that keeps objects in a local directory, so the remote code paths (token stores written
and read by byte range, the run lock, atomic JSON) run offline. Orbax's array writes go
through tensorstore's own GCS driver and are not covered here."""

import fsspec
import jax
import ml_collections as mlc
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.local import LocalFileSystem

from configs import base
from retention_jax import config, data, fileio, lock
from retention_jax.data import store

S = 64


class FakeBucket(LocalFileSystem):
    """gs://BUCKET/KEY -> ROOT/BUCKET/KEY on local disk."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                return f"{cls.root}/{path[len(p) :]}"
        return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    monkeypatch.setattr(FakeBucket, "root", str(tmp_path / "bucket-root"))
    # epath prefers tf.io.gfile for gs:// where TensorFlow is installed; fsspec here
    monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)
    for proto in FakeBucket.protocol:
        fsspec.register_implementation(proto, FakeBucket, clobber=True)
    fsspec.filesystem("gs").clear_instance_cache()
    FakeBucket.clear_instance_cache()
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    yield tmp_path / "bucket-root"
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def _data(cache: str) -> config.Data:
    c = base.get_config()
    c.data.update(seq_len=S, val_tokens=4 * S, cache_dir=cache, workers=1)
    return config.parse(mlc.ConfigDict(c.to_dict()), jax.device_count()).data


def test_stores_on_a_bucket_equal_local_ones(bucket, tmp_path):
    needs = {"pre": 2000, "post": 300}
    remote = data.prepare(_data("gs://b/w/data_cache"), "gs://b/w", needs)
    local = data.prepare(_data(str(tmp_path / "local")), str(tmp_path), needs)
    assert remote.fingerprint == local.fingerprint
    st = remote.stores["pre"]
    assert st.path.startswith("gs://b/w/data_cache/pre-")
    assert (bucket / "b" / "w" / "data_cache" / st.path.rsplit("/", 1)[1] / "train").is_dir()
    assert not list(bucket.glob("b/w/data_cache/*/.tmp-*"))  # written aside locally
    idx = np.arange(0, st.num_sequences["train"], 7)
    a, b = st.rows("train", idx), local.stores["pre"].rows("train", idx)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert data.prepare(_data("gs://b/w/data_cache"), "gs://b/w", needs, build=False)
    with pytest.raises(store.StoreError, match="--only=prepare"):
        data.prepare(_data("gs://b/w/data_cache"), "gs://b/w", {"pre": 10**6}, build=False)


def test_lock_and_atomic_json_on_a_bucket(bucket):
    fileio.write_json("gs://b/run/x.json", {"a": 1})
    assert fileio.read_json("gs://b/run/x.json") == {"a": 1}
    held = lock.RunLock("gs://b/run").acquire()
    with pytest.raises(lock.RunLocked, match="is locked by owner"):
        lock.RunLock("gs://b/run").acquire()
    held.release()
    lock.RunLock("gs://b/run").acquire().release()
    assert not (bucket / "b" / "run" / lock.LOCK).exists()
