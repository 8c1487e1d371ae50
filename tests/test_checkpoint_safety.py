"""Loading checkpoints never runs code from them, and mismatches are explained."""

import collections
import os
import pickle
import zipfile

import pytest
import torch

from factorizer_cli.errors import CheckpointError, UnsafeCheckpointError
from factorizer_cli.safe_pickle import load_checkpoint
from factorizer_cli.zoo import load_upstream

from .conftest import FIXTURES, fixture_meta


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Innocent:  # pickled by reference: instantiated through NEWOBJ/REDUCE on load
    def __init__(self):
        self.payload = 1


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _save({"state_dict": {"w": torch.zeros(2)}, "evil": _RunsShell(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"would call (posix|os|nt)\.system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_pickled_object_of_a_foreign_class_is_refused(tmp_path):
    path = _save({"model": {"w": torch.zeros(2)}, "extra": _Innocent()}, tmp_path / "obj.pt")
    with pytest.raises(UnsafeCheckpointError, match="_Innocent"):
        load_checkpoint(path)


def test_class_references_as_plain_values_are_kept_inert(tmp_path):
    path = _save({"hyper_parameters": {"network": [_Innocent, {"a": 1}]},
                  "state_dict": collections.OrderedDict(w=torch.ones(3))}, tmp_path / "ref.ckpt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    ref = loaded["hyper_parameters"]["network"][0]
    assert ref.__name__ == "_Innocent" and ref is not _Innocent
    with pytest.raises(UnsafeCheckpointError):
        ref()


def test_v001_lightning_checkpoint_loads_without_upstream_installed():
    meta = fixture_meta("v001_small_seed0")
    with zipfile.ZipFile(FIXTURES / meta["checkpoint"]) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"factorizer.factorizer" in pickled  # it does reference upstream classes
    with pytest.raises(ImportError):
        __import__("factorizer")
    checkpoint = load_checkpoint(FIXTURES / meta["checkpoint"])
    assert any(k.startswith("net.") for k in checkpoint["state_dict"])


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_keys_and_shapes_that_do_not_fit_are_named(tmp_path):
    meta = fixture_meta("v002_small_seed0")
    state = torch.load(FIXTURES / meta["checkpoint"], weights_only=True)
    state["stem.weight"] = torch.zeros(8, 3, 3, 3, 3)
    del state["heads.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = _save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_upstream(path, meta["config"])
    message = str(err.value)
    assert "stem.weight: network has (8, 4, 3, 3, 3), checkpoint has (8, 3, 3, 3, 3)" in message
    assert "heads.0.bias" in message and "extra.weight" in message


def test_wrong_config_for_a_checkpoint(tmp_path):
    meta = fixture_meta("head_small_seed0")
    with pytest.raises(CheckpointError, match="does not fit the SegmentationFactorizer"):
        load_upstream(FIXTURES / meta["checkpoint"], fixture_meta("v002_small_seed0")["config"])


def test_plain_pickle_file_is_read_with_the_same_restrictions(tmp_path):
    path = tmp_path / "legacy.pkl"
    path.write_bytes(pickle.dumps({"evil": _RunsShell(tmp_path / "x")}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "x").exists()


def _build_on_global(module: bytes, name: bytes, attribute: bytes) -> bytes:
    """A pickle that fetches a global and sets an attribute on it (BUILD with slot state)."""
    key = b"X" + len(attribute).to_bytes(4, "little") + attribute
    return b"\x80\x02c" + module + b"\n" + name + b"\n" + b"N}" + key + b"\x88s\x86b."


def test_pickle_cannot_modify_the_stand_ins_or_torch():
    import io

    from factorizer_cli.safe_pickle import Unpickler

    with pytest.raises(UnsafeCheckpointError, match="would modify os.system|would modify posix.system"):
        Unpickler(io.BytesIO(_build_on_global(b"os", b"system", b"dump_patches"))).load()
    before = dict(vars(torch._utils._rebuild_tensor_v2))
    Unpickler(io.BytesIO(_build_on_global(b"torch._utils", b"_rebuild_tensor_v2", b"poisoned"))).load()
    assert dict(vars(torch._utils._rebuild_tensor_v2)) == before


def test_legacy_torch_files_are_refused_before_torch_parses_them(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="only the zip format"):
        load_checkpoint(path)


def test_damaged_zip_gives_a_checkpoint_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    with zipfile.ZipFile(good) as archive, zipfile.ZipFile(tmp_path / "bad.pt", "w") as bad:
        for item in archive.infolist():
            data = archive.read(item)
            bad.writestr(item, data[: len(data) // 2] if item.filename.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
