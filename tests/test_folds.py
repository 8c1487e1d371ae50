"""K-fold splits and fold runs packed into one ensemble package."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.errors import ConfigError, InputError
from factorizer_cli.families import build
from factorizer_cli.train.folds import Split, fold_of_each, read_strata, split_cases
from factorizer_cli.train.pack import pack_runs
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.package import open_package, save_package
from factorizer_cli.zoo.registry import zoo_card

NAMES = [f"case-{i:03d}" for i in range(23)]


def test_every_case_validates_in_exactly_one_fold_and_sizes_differ_by_at_most_one():
    splits = [split_cases(NAMES, 5, fold, seed=3) for fold in range(5)]
    validated = [n for s in splits for n in s.validation]
    assert sorted(validated) == sorted(NAMES)
    assert max(len(s.validation) for s in splits) - min(len(s.validation) for s in splits) <= 1
    for s in splits:
        assert set(s.training) | set(s.validation) == set(NAMES) and not set(s.training) & set(s.validation)


def test_a_split_depends_on_names_folds_and_seed_only():
    assert split_cases(NAMES, 5, 2, seed=1) == split_cases(list(reversed(NAMES)), 5, 2, seed=1)
    assert split_cases(NAMES, 5, 2, seed=1).validation != split_cases(NAMES, 5, 2, seed=2).validation


def test_strata_are_spread_over_the_folds(tmp_path):
    grades = {n: ("LGG" if i < 5 else "HGG") for i, n in enumerate(NAMES)}  # 5 rare cases, 5 folds
    csv = tmp_path / "grades.csv"
    csv.write_text("case,grade,site\n" + "".join(f"{n},{g},x\n" for n, g in grades.items()))
    strata = read_strata(csv, "grade", NAMES)
    assigned = fold_of_each(NAMES, 5, seed=0, strata=strata)
    assert sorted(assigned[n] for n in NAMES if grades[n] == "LGG") == [0, 1, 2, 3, 4]


def test_bad_requests_get_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="--fold must be 0 .. 4"):
        split_cases(NAMES, 5, 5)
    with pytest.raises(ConfigError, match="at least 2"):
        split_cases(NAMES, 1, 0)
    with pytest.raises(ConfigError, match="cannot fill 30 folds"):
        split_cases(NAMES, 30, 0)
    csv = tmp_path / "grades.csv"
    csv.write_text("case,grade\ncase-000,LGG\n")
    with pytest.raises(InputError, match="no column 'site'"):
        read_strata(csv, "site", NAMES)
    with pytest.raises(InputError, match=r"no row for case\(s\) case-001, case-002, case-003 and 19 more"):
        read_strata(csv, "grade", NAMES)


def test_a_split_round_trips_through_its_file(tmp_path):
    split = split_cases(NAMES, 4, 1, seed=9, stratify=None)
    split.save(tmp_path)
    assert Split.load(tmp_path) == split


def _run(folder, card: ModelCard, seed: int, fold: int | None, dice: float):
    torch.manual_seed(seed)
    network = build(dict(card.architecture))
    trained = ModelCard.from_dict({**card.to_dict(), "metrics": {"training_step": 10,
                                                                  "validation_dice": {"WT": dice, "TC": dice,
                                                                                      "ET": dice}}})
    save_package(folder / "best", trained, [network.state_dict()])
    if fold is not None:
        split_cases(NAMES, 3, fold).save(folder)
    return network


def test_fold_runs_pack_into_an_ensemble_with_their_validation(tmp_path):
    card = zoo_card("demo")
    networks = [_run(tmp_path / f"fold{i}", card, i, i, 0.5 + 0.1 * i) for i in range(3)]
    package = pack_runs([tmp_path / f"fold{i}" for i in range(3)], tmp_path / "ensemble")
    reopened = open_package(tmp_path / "ensemble")
    assert len(reopened.weight_files) == 3
    for network, loaded in zip(networks, reopened.load_networks()):
        assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), loaded.state_dict().values()))
    metrics = package.card.metrics
    assert [f["fold"] for f in metrics["folds"]] == [0, 1, 2]
    assert metrics["mean_validation_dice"]["WT"] == pytest.approx(0.6)
    assert reopened.card.architecture == card.architecture
    with pytest.raises(ConfigError, match="holds a model package already"):
        pack_runs([tmp_path / "fold0"], tmp_path / "ensemble")


def test_runs_of_different_models_or_the_same_fold_twice_are_refused(tmp_path):
    card = zoo_card("demo")
    _run(tmp_path / "a", card, 0, 0, 0.5)
    _run(tmp_path / "b", card, 1, 0, 0.5)
    with pytest.raises(ConfigError, match="fold 0 again"):
        pack_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    other = ModelCard.from_dict({**card.to_dict(), "roi": [32, 32, 32]})
    _run(tmp_path / "c", other, 2, 1, 0.5)
    with pytest.raises(ConfigError, match="differs in roi"):
        pack_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "out")
    result = CliRunner().invoke(app, ["models", "pack", str(tmp_path / "a"), str(tmp_path), "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code != 0 and "no best/ model package" in result.output
    assert not (tmp_path / "out" / "card.json").exists()


def test_models_pack_on_the_command_line(tmp_path):
    card = zoo_card("demo")
    for i in range(2):
        _run(tmp_path / f"fold{i}", card, i, i, 0.8)
    result = CliRunner().invoke(app, ["models", "pack", str(tmp_path / "fold0"), str(tmp_path / "fold1"),
                                      "-o", str(tmp_path / "ensemble")])
    assert result.exit_code == 0, result.output
    assert "2 folds; mean validation Dice WT 0.800" in result.output
    saved = json.loads((tmp_path / "ensemble" / "card.json").read_text())
    assert [w["file"] for w in saved["weights"]] == ["fold0.safetensors", "fold1.safetensors"]


def test_five_fold_runs_pack_into_an_ensemble_that_segment_uses(tmp_path, monkeypatch):
    """The issue's acceptance: a 5-fold phantom cross-validation, packed, segments a case."""
    from tests.test_train import tiny_card, write_dataset

    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    data = write_dataset(tmp_path / "data", cases=6)
    card = tiny_card(tmp_path / "tiny.json")
    runner = CliRunner()
    validated = []
    for fold in range(5):
        result = runner.invoke(app, ["train", str(data), "--card", str(card), "-o", str(tmp_path / f"fold{fold}"),
                                     "--steps", "2", "--validate-every", "2", "--folds", "5", "--fold", str(fold),
                                     "--quiet"])
        assert result.exit_code == 0, result.output
        validated += list(Split.load(tmp_path / f"fold{fold}").validation)
    assert sorted(validated) == sorted(p.name for p in data.iterdir())  # each case validated once
    result = runner.invoke(app, ["models", "pack", *(str(tmp_path / f"fold{i}") for i in range(5)),
                                 "-o", str(tmp_path / "ensemble")])
    assert result.exit_code == 0, result.output
    package = open_package(tmp_path / "ensemble")
    assert len(package.weight_files) == 5 and len(package.card.metrics["folds"]) == 5
    case = next(data.iterdir())
    result = runner.invoke(app, ["segment", str(case), "-o", str(tmp_path / "seg.nii.gz"),
                                 "--model", str(tmp_path / "ensemble"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "seg.nii.gz").is_file()
    # a resumed fold run keeps its saved split even if the folder gains a case
    before = Split.load(tmp_path / "fold0")
    write_dataset(tmp_path / "more", cases=7)
    result = runner.invoke(app, ["train", str(tmp_path / "more"), "--card", str(card), "-o",
                                 str(tmp_path / "fold0"), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert Split.load(tmp_path / "fold0") == before


def test_runs_of_other_cross_validations_or_listed_twice_are_refused(tmp_path):
    card = zoo_card("demo")
    _run(tmp_path / "a", card, 0, 0, 0.5)
    _run(tmp_path / "b", card, 1, 1, 0.5)
    split_cases(NAMES, 3, 1, seed=7).save(tmp_path / "b")  # fold 1 of another shuffle
    with pytest.raises(ConfigError, match="split by other settings or cases"):
        pack_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(ConfigError, match="listed twice"):
        pack_runs([tmp_path / "a", tmp_path / "a"], tmp_path / "out")
    _run(tmp_path / "c", card, 2, None, 0.5)  # trained without --folds
    with pytest.raises(ConfigError, match="some runs were trained with --folds and some without"):
        pack_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "out")
    (tmp_path / "a" / "split.json").write_text("{")
    with pytest.raises(ConfigError, match="not a readable split"):
        pack_runs([tmp_path / "a"], tmp_path / "out")


def test_fold_options_need_folds_and_a_resumed_fold_run_needs_its_split(tmp_path, monkeypatch):
    from tests.test_train import tiny_card, write_dataset

    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    data = write_dataset(tmp_path / "data", cases=4)
    card = tiny_card(tmp_path / "tiny.json")
    runner = CliRunner()
    base = ["train", str(data), "--card", str(card), "--steps", "1", "--quiet", "--validation-cases", "1"]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "r1"), "--fold", "2"])
    assert result.exit_code != 0 and "need --folds K" in result.output
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "r2"), "--folds", "2", "--fold", "1"])
    assert result.exit_code == 0, result.output
    (tmp_path / "r2" / "split.json").unlink()
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "r2"), "--resume"])
    assert result.exit_code != 0 and "split is missing" in result.output


def test_a_short_csv_row_is_an_empty_stratum_not_a_crash(tmp_path):
    csv = tmp_path / "grades.csv"
    csv.write_text("case,grade\n" + "".join(f"{n},{'HGG' if i % 2 else ''}\n" for i, n in enumerate(NAMES[:-1]))
                   + f"{NAMES[-1]}\n")
    strata = read_strata(csv, "grade", NAMES)
    assert strata[NAMES[-1]] == "" and strata[NAMES[1]] == "HGG"


def test_a_resumed_run_without_folds_keeps_its_validation_cases(tmp_path, monkeypatch):
    """A case added to the folder before --resume would otherwise become 'the last case by name'."""
    from tests.test_train import tiny_card, write_dataset

    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    data = write_dataset(tmp_path / "data", cases=4)
    card = tiny_card(tmp_path / "tiny.json")
    runner = CliRunner()
    run = ["train", str(data), "--card", str(card), "-o", str(tmp_path / "run"), "--quiet"]
    result = runner.invoke(app, [*run, "--steps", "1", "--validation-cases", "1"])
    assert result.exit_code == 0, result.output
    before = Split.load(tmp_path / "run")
    assert before.folds == 0 and before.validation == ("BraTS-GLI-00003-000",)
    write_dataset(tmp_path / "data", cases=5)  # BraTS-GLI-00004-000 now sorts last
    result = runner.invoke(app, [*run, "--resume"])
    assert result.exit_code == 0, result.output
    assert Split.load(tmp_path / "run") == before


def test_five_trained_folds_pack_into_an_ensemble_that_segment_averages(tmp_path, monkeypatch):
    """Five real fold runs of `factorizer train` on phantoms, `models pack`, then `segment` with the pack:
    its probabilities are the mean of the five folds' own."""
    import numpy as np

    from factorizer_cli.pipeline.segment import Segmenter
    from tests.test_train import tiny_card, write_dataset

    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    data, card = write_dataset(tmp_path / "data", cases=5), tiny_card(tmp_path / "card.json")
    runner = CliRunner()
    for fold in range(5):
        result = runner.invoke(app, ["train", str(data), "--card", str(card), "-o", str(tmp_path / f"fold{fold}"),
                                     "--folds", "5", "--fold", str(fold), "--steps", "3", "--warmup-steps", "1",
                                     "--validate-every", "3", "--quiet"])
        assert result.exit_code == 0, result.output
    runs = [str(tmp_path / f"fold{fold}") for fold in range(5)]
    packed = runner.invoke(app, ["models", "pack", *runs, "-o", str(tmp_path / "ensemble")])
    assert packed.exit_code == 0, packed.output
    validated = {json.loads((tmp_path / f"fold{f}" / "split.json").read_text())["validation"][0] for f in range(5)}
    assert len(validated) == 5  # each case validated in exactly one fold

    case = sorted((data / "BraTS-GLI-00000-000").glob("*-t*"))
    result = runner.invoke(app, ["segment", str(data / "BraTS-GLI-00000-000"), "-o", str(tmp_path / "seg.nii.gz"),
                                 "--model", str(tmp_path / "ensemble"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "seg.nii.gz").is_file()
    ensemble = Segmenter(open_package(tmp_path / "ensemble"))(case, keep_probabilities=True).probabilities
    folds = [Segmenter(open_package(tmp_path / f"fold{f}" / "best"))(case, keep_probabilities=True).probabilities
             for f in range(5)]
    np.testing.assert_allclose(ensemble, np.mean(folds, axis=0), atol=1e-5)
