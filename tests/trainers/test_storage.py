"""trainers/common/storage.py: one way to read and write a folder or object storage, checked on both: a local
folder and a real S3-compatible server (moto's, on 127.0.0.1, reached through pyarrow as Ray does)."""

import uuid

import pytest
import torch

from trainers.common import storage


@pytest.fixture(params=["folder", "s3"])
def root(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3')}/{uuid.uuid4().hex[:8]}"


def test_files_written_whole_are_read_listed_globbed_copied_and_deleted(root, tmp_path):
    assert not storage.exists(root) and storage.listdir(root) == [] and storage.glob(root, "trials/*/m.json") == []
    for trial, step in (("t1", 2), ("t1", 4), ("t2", 2)):
        storage.write_text(storage.join(root, "trials", trial, f"step_{step:06d}", "m.json"), f'{{"step": {step}}}')
    storage.write_bytes(storage.join(root, "trials", "t1", "other.txt"), b"x")
    found = storage.glob(root, "trials/*/step_*/m.json")
    assert [storage.name(storage.parent(f)) for f in found] == ["step_000002", "step_000004", "step_000002"]
    assert storage.read_text(found[1]) == '{"step": 4}' and storage.is_file(found[1]) and storage.mtime(found[1]) > 0
    assert storage.listdir(storage.join(root, "trials")) == ["t1", "t2"]
    assert not storage.is_file(storage.join(root, "trials", "t1"))  # a folder (a prefix) is not a file
    with storage.local_copy(storage.join(root, "trials", "t1")) as local:
        assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["m.json", "m.json", "other.txt"]
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        storage.read_text(storage.join(root, "nothing.json"))
    storage.move(storage.join(root, "trials", "t1", "other.txt"), storage.join(root, "trials", "t1", "other.txt.aside"))
    assert storage.listdir(storage.join(root, "trials", "t1")) == ["other.txt.aside", "step_000002", "step_000004"]
    storage.delete(storage.join(root, "trials", "t2"))
    assert storage.listdir(storage.join(root, "trials")) == ["t1"]
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f.bin").write_bytes(b"\0\1")
    storage.upload(folder, storage.join(root, "up"))
    assert storage.read_bytes(storage.join(root, "up", "sub", "f.bin")) == b"\0\1"


def test_the_reference_feature_cache_lives_in_object_storage(s3, digits_assets, monkeypatch):
    from eval import fidelity
    from eval.digits_fid import FEATURE_EXTRACTOR_NAME

    calls = []
    extract = fidelity.extract_features
    monkeypatch.setattr(fidelity, "extract_features", lambda *a, **k: calls.append(1) or extract(*a, **k))
    reference = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cache = f"{s3}/{uuid.uuid4().hex[:8]}/fidelity"
    weights = str(digits_assets / "classifier.safetensors")
    first = fidelity.reference_features(reference, FEATURE_EXTRACTOR_NAME, weights, cache_dir=cache)
    assert len(calls) == 1 and [n.endswith(".safetensors") for n in storage.listdir(cache)] == [True]
    second = fidelity.reference_features(reference, FEATURE_EXTRACTOR_NAME, weights, cache_dir=cache)
    assert len(calls) == 1 and torch.equal(first, second)  # read back from the object, not computed again
    fidelity.reference_features(reference.flip(0).roll(1, 2), FEATURE_EXTRACTOR_NAME, weights, cache_dir=cache)
    assert len(calls) == 2 and len(storage.listdir(cache)) == 2  # other images, another key


def test_an_unusable_bucket_is_one_line_naming_the_field(s3):
    from sweeps.preflight import check_object_storage
    from trainers.common.errors import ConfigError

    check_object_storage(f"{s3}/fine", "sweep.storage_dir")
    with pytest.raises(ConfigError, match=r"^sweep.storage_dir: cannot write to s3://no-such-bucket/x \(.*bucket does not exist"):
        check_object_storage("s3://no-such-bucket/x", "sweep.storage_dir")
