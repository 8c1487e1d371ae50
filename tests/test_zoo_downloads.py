"""Weights from the Hugging Face hub and HTTPS, through the real clients, against a local server.

The server (tests/hub_server.py) speaks the hub's file protocol on 127.0.0.1; ``HF_ENDPOINT`` points
the real ``huggingface_hub`` client at it. Covered: first download, cache hit without network,
revision pinning, a tampered file rejected, a connection cut mid-file then resumed, offline with and
without the cache, and an upstream Lightning checkpoint served by URL, verified and converted.
"""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save

from factorizer_cli.errors import DownloadError
from factorizer_cli.zoo import cache
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.resolve import fetch_zoo_model, resolve_model
from factorizer_cli.zoo.weights import fetch

from .conftest import FIXTURES, fixture_meta
from .oracle import oracle_card, oracle_weights


@pytest.fixture(autouse=True)
def factorizer_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "factorizer_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "factorizer_home"


def _package_files(scale=1.0) -> dict[str, bytes]:
    weights = oracle_weights()
    weights["bias"] = weights["bias"] * scale
    blob = save(weights)
    card = oracle_card().to_dict()
    card["weights"] = [{"file": "model.safetensors", "format": "safetensors",
                        "sha256": hashlib.sha256(blob).hexdigest()}]
    return {"card.json": json.dumps(card).encode(), "model.safetensors": blob}


def _gets(server, name):
    return server.requests_for("GET", name)


def test_first_download_then_cache_hit_without_network(hub_server):
    repo = hub_server.create_repo("org/oracle")
    sha = repo.add_commit(_package_files())
    first = resolve_model(f"hf://org/oracle@{sha}").package
    assert _gets(hub_server, "model.safetensors")
    (network,) = first.load_networks()
    torch.testing.assert_close(network.bias, oracle_weights()["bias"])

    hub_server.reset_log()
    again = resolve_model(f"hf://org/oracle@{sha}").package
    assert hub_server.requests == [], "a pinned revision in the cache needs no network"
    assert again.weight_files == first.weight_files


def test_revision_pinning_keeps_the_old_weights(hub_server):
    repo = hub_server.create_repo("org/oracle")
    old = repo.add_commit(_package_files(scale=1.0))
    new = repo.add_commit(_package_files(scale=2.0))
    (pinned,) = resolve_model(f"hf://org/oracle@{old}").package.load_networks()
    (latest,) = resolve_model("hf://org/oracle").package.load_networks()
    (by_sha,) = resolve_model(f"hf://org/oracle@{new}").package.load_networks()
    torch.testing.assert_close(pinned.bias, oracle_weights()["bias"])
    torch.testing.assert_close(latest.bias, 2 * oracle_weights()["bias"])
    torch.testing.assert_close(by_sha.bias, latest.bias)


def test_tampered_file_is_rejected_and_deleted(hub_server):
    repo = hub_server.create_repo("org/oracle")
    sha = repo.add_commit(_package_files())
    evil = save({k: v + 1 for k, v in oracle_weights().items()})
    hub_server.tamper("org/oracle", "model.safetensors", evil, keep_etag=True)
    with pytest.raises(DownloadError, match="sha256 .* was expected; the corrupt file was deleted"):
        resolve_model(f"hf://org/oracle@{sha}")
    leftovers = [p for p in hub_server.cache_dir.rglob("*") if p.is_file() and p.stat().st_size == len(evil)]
    assert leftovers == []
    hub_server.clear_faults()
    (network,) = resolve_model(f"hf://org/oracle@{sha}").package.load_networks()
    torch.testing.assert_close(network.bias, oracle_weights()["bias"])


def test_hub_download_cut_mid_file_resumes_with_a_range_request(hub_server, no_retry_sleep):
    big = torch.arange(3 * 2**20, dtype=torch.float32)  # 12 MiB: past the client's 10 MiB chunk
    blob = save({"big": big})
    repo = hub_server.create_repo("org/big")
    sha = repo.add_commit({"big.safetensors": blob})
    hub_server.cut_after("org/big", "big.safetensors", 11 * 2**20)
    entry = {"source": "hub", "repo": "org/big", "filename": "big.safetensors", "revision": sha,
             "sha256": hashlib.sha256(blob).hexdigest()}
    fetched = fetch(entry, "big")
    assert fetched.status == "verified"
    ranges = [h.get("Range") for _, _, h in hub_server.requests_for("GET", "big.safetensors")]
    assert ranges[0] is None and ranges[-1] == f"bytes={10 * 2**20}-", ranges
    assert torch.equal(load_file(fetched.path)["big"], big)


def _url_card(server, path, blob, **extra) -> ModelCard:
    card = oracle_card().to_dict()
    card["name"] = "url-oracle"
    card["weights"] = [{"source": "url", "url": f"{server.url}/org/files/resolve/main/{path}",
                        "filename": path, "format": "safetensors",
                        "sha256": hashlib.sha256(blob).hexdigest(), **extra}]
    return ModelCard.from_dict(card)


def test_url_download_cut_then_resumed_on_the_next_run(hub_server, factorizer_home):
    blob = save({"weight": oracle_weights()["weight"], "bias": oracle_weights()["bias"],
                 "padding": torch.zeros(200_000)})
    hub_server.create_repo("org/files").add_commit({"model.safetensors": blob})
    hub_server.cut_after("org/files", "model.safetensors", 300_000)
    card = _url_card(hub_server, "model.safetensors", blob)
    with pytest.raises(DownloadError, match="run the same command again to resume|run again to resume"):
        fetch_zoo_model(card)
    part = factorizer_home / "downloads" / "url-oracle" / "model.safetensors.part"
    assert part.is_file() and 0 < part.stat().st_size < len(blob)
    assert not (factorizer_home / "downloads" / "url-oracle" / "model.safetensors").exists()
    kept = part.stat().st_size
    hub_server.reset_log()
    fetched = fetch(card.weights[0], card.name)
    (_, _, headers), = hub_server.requests_for("GET", "model.safetensors")
    assert headers.get("Range") == f"bytes={kept}-"
    assert fetched.path.read_bytes() == blob and fetched.status == "verified"
    assert not part.exists()


def test_offline_uses_the_cache_and_says_how_to_bring_missing_weights(hub_server, monkeypatch):
    repo = hub_server.create_repo("org/oracle")
    sha = repo.add_commit(_package_files())
    with pytest.raises(DownloadError, match="offline"):
        resolve_model(f"hf://org/oracle@{sha}", offline=True)
    assert hub_server.requests == []
    resolve_model(f"hf://org/oracle@{sha}")
    hub_server.reset_log()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (network,) = resolve_model(f"hf://org/oracle@{sha}").package.load_networks()
    assert hub_server.requests == []
    blob = _package_files()["model.safetensors"]
    hub_server.create_repo("org/files").add_commit({"model.safetensors": blob})
    with pytest.raises(DownloadError, match="models download url-oracle.*models import"):
        fetch_zoo_model(_url_card(hub_server, "model.safetensors", blob))
    assert hub_server.requests == []


def test_upstream_lightning_checkpoint_by_url_is_verified_and_converted_once(hub_server, factorizer_home):
    meta = fixture_meta("v001_small_seed0")
    blob = (FIXTURES / meta["checkpoint"]).read_bytes()
    hub_server.create_repo("org/files").add_commit({"fold0.ckpt": blob})
    card = oracle_card().to_dict()
    card.update(name="isles-like", inputs=[{"name": "dwi"}, {"name": "adc"}, {"name": "flair"}],
                roi=[64, 64, 64], outputs=["lesion"], labels=[{"region": "lesion", "label": 1}],
                label_conventions={}, architecture=meta["config"])
    card["weights"] = [{"source": "url", "url": f"{hub_server.url}/org/files/resolve/main/fold0.ckpt",
                        "filename": "fold0.ckpt", "format": "lightning-ckpt",
                        "sha256": hashlib.sha256(blob).hexdigest()}]
    card = ModelCard.from_dict(card)
    resolved = fetch_zoo_model(card)
    assert resolved.unverified == ()
    converted = list((factorizer_home / "models" / "isles-like").rglob("*.safetensors"))
    assert len(converted) == 1
    (network,) = resolved.package.load_networks()
    io = load_file(FIXTURES / "v001_small_seed0.io.safetensors")
    with torch.no_grad():
        assert (network(io["input"])[0] - io["output0"]).abs().max() <= 1e-4
    hub_server.reset_log()
    assert fetch_zoo_model(card).package.root == resolved.package.root
    assert hub_server.requests == []


def test_unverified_source_is_reported_then_trusted_by_verify(hub_server, factorizer_home):
    blob = _package_files()["model.safetensors"]
    hub_server.create_repo("org/files").add_commit({"model.safetensors": blob})
    card = _url_card(hub_server, "model.safetensors", blob, sha256=None)
    assert fetch_zoo_model(card).unverified == (card.weights[0]["url"],)
    cache.trust(cache.source_key(card.weights[0]), hashlib.sha256(blob).hexdigest())
    assert fetch_zoo_model(card).unverified == ()
    # A later change of the trusted file is caught.
    path = factorizer_home / "downloads" / "url-oracle" / "model.safetensors"
    changed = bytearray(blob)
    changed[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(changed))
    with pytest.raises(DownloadError, match="was expected"):
        fetch_zoo_model(card)
    assert not path.exists()


def test_complete_part_file_from_an_earlier_run_is_accepted(hub_server, factorizer_home):
    blob = _package_files()["model.safetensors"]
    hub_server.create_repo("org/files").add_commit({"model.safetensors": blob})
    card = _url_card(hub_server, "model.safetensors", blob)
    part = factorizer_home / "downloads" / "url-oracle" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob)  # the rename was all that was missing
    fetched = fetch(card.weights[0], card.name)
    assert fetched.status == "verified" and fetched.path.read_bytes() == blob and not part.exists()


def test_card_names_cannot_escape_the_cache():
    card = oracle_card().to_dict()
    for bad in ("../../etc", "a/b", ".hidden"):
        with pytest.raises(Exception, match="name must be"):
            ModelCard.from_dict({**card, "name": bad})
    with pytest.raises(Exception, match="plain file name"):
        ModelCard.from_dict({**card, "weights": [{"source": "url", "url": "https://x", "filename": "../x"}]})


SPIN = FIXTURES.parent / "spin"  # ../shared/fixtures/spin, beside the Factorizer fixtures


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _zipped(server, member: str, sha256: str | None, filename: str = "spin.pth") -> dict:
    """A weight entry for one file inside the served ``pretrained_models.zip``, as upstream SPiN publishes."""
    return {"source": "url", "url": f"{server.url}/org/files/resolve/main/pretrained_models.zip",
            "filename": filename, "member": member, "format": "SPiNModel.save_model", "sha256": sha256}


def _spin_card(server, member: str, sha256: str | None) -> ModelCard:
    """A small SPiN (the fixture's config) whose weights are one file inside a served zip."""
    import inspect

    from factorizer_cli.nn.spin import SPiNModel

    meta = json.loads((SPIN / "spin_small_seed0.json").read_text())
    kwargs = inspect.signature(SPiNModel).parameters
    return ModelCard.from_dict({
        "name": "zipped-spin", "task": "test", "inputs": [{"name": "t1n", "aliases": ["t1"]}],
        "preprocessing": {"spacing": [1.0, 1.0, 1.0], "crop_foreground": None, "slice_context": 2,
                          "normalization": {"kind": "fixed", "mean": 30.20063, "std": 35.221165}},
        "roi": [197, 233, 1], "outputs": ["lesion"], "labels": [{"region": "lesion", "label": 1}],
        "architecture": {k: v for k, v in meta.items() if k == "class" or k in kwargs},
        "weights": [_zipped(server, member, sha256)],
    })


def test_weights_inside_a_zip_are_extracted_verified_and_converted_once(hub_server, factorizer_home):
    if not (SPIN / "spin_small_seed0.pth").is_file():
        pytest.skip(f"SPiN parity fixtures not found at {SPIN} (they sit beside the clone in CI; set "
                    "FACTORIZER_FIXTURES to their sibling 'upstream' folder to run this test)")
    checkpoint = (SPIN / "spin_small_seed0.pth").read_bytes()
    archive = _zip({"pretrained_models/spin/spin_atlas_traintest.pth": checkpoint,
                    "pretrained_models/u-net/unet_atlas_traintest.pth": b"another method's weights"})
    hub_server.create_repo("org/files").add_commit({"pretrained_models.zip": archive})
    # The member named by its tail below the folder the zip adds, as the atlas-spin card does.
    card = _spin_card(hub_server, "spin/spin_atlas_traintest.pth", hashlib.sha256(checkpoint).hexdigest())
    resolved = fetch_zoo_model(card)
    assert resolved.unverified == (), "the card's sha256 is the extracted file's"
    downloads = factorizer_home / "downloads" / "zipped-spin"
    assert sorted(p.name for p in downloads.iterdir()) == ["spin.pth"], "the archive is deleted once extracted"
    assert (downloads / "spin.pth").read_bytes() == checkpoint
    assert cache.source_key(card.weights[0]).endswith("pretrained_models.zip#spin/spin_atlas_traintest.pth")
    (network,) = resolved.package.load_networks()
    io = load_file(SPIN / "spin_small_seed0.io.safetensors")
    with torch.no_grad():
        out2x, out1x = network(io["input"])
    assert (out2x - io["output0"]).abs().max() <= 1e-4 and (out1x - io["output1"]).abs().max() <= 1e-4
    hub_server.reset_log()
    assert fetch_zoo_model(card).package.root == resolved.package.root
    assert hub_server.requests == []


def test_a_zip_without_the_member_is_refused_naming_what_it_holds(hub_server, factorizer_home):
    archive = _zip({"pretrained_models/u-net/unet_atlas_traintest.pth": b"other",
                    "pretrained_models/spin/README.txt": b"readme"})
    hub_server.create_repo("org/files").add_commit({"pretrained_models.zip": archive})
    entry = _zipped(hub_server, "spin/spin_atlas_traintest.pth", None)
    with pytest.raises(DownloadError, match="no file 'spin/spin_atlas_traintest.pth'.*unet_atlas_traintest.pth"):
        fetch(entry, "zipped-spin")
    assert not any((factorizer_home / "downloads" / "zipped-spin").iterdir()), "nothing half-made is kept"


def test_a_download_that_is_not_a_zip_is_refused_and_removed(hub_server, factorizer_home):
    hub_server.create_repo("org/files").add_commit({"pretrained_models.zip": b"\x00 not a zip archive" * 100})
    with pytest.raises(DownloadError, match="not a readable zip archive"):
        fetch(_zipped(hub_server, "spin/spin_atlas_traintest.pth", None), "zipped-spin")
    assert not any((factorizer_home / "downloads" / "zipped-spin").iterdir())
