"""``dashboards/study_report.py`` writes into the study's folder unless ``--out`` says otherwise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import semiseg.report

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("dashboard_study_report", REPO / "dashboards" / "study_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeStore:
    """Stands in for :class:`semiseg.report.ReportStore`: the studies of a store, no MLflow."""

    names: list[str] = []
    opened: list[str] = []

    def __init__(self, tracking_uri: str) -> None:
        FakeStore.opened.append(tracking_uri)

    def study_names(self) -> list[str]:
        """The configured names."""
        return list(FakeStore.names)


@pytest.fixture
def written(monkeypatch) -> list[tuple[str, list[str], Path]]:
    """Calls of ``write_report`` (uri, studies, out), with the store replaced by :class:`FakeStore`."""
    calls = []

    def write_report(uri, studies, out):
        calls.append((uri, list(studies), Path(out)))
        return Path(out).resolve()

    FakeStore.opened = []
    monkeypatch.setattr(semiseg.report, "write_report", write_report)
    monkeypatch.setattr(semiseg.report, "ReportStore", FakeStore)
    return calls


def test_one_named_study_goes_into_its_folder(tmp_path: Path, written, capsys):
    assert _script().main(["--storage-path", str(tmp_path), "--study", "ema_sweep"]) == 0
    assert written == [(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}", ["ema_sweep"],
                        tmp_path / "ema_sweep" / "report.html")]
    assert capsys.readouterr().out.strip() == str((tmp_path / "ema_sweep" / "report.html").resolve())
    assert FakeStore.opened == [], "a named study needs no listing of the store"


def test_the_only_study_of_the_store_goes_into_its_folder(tmp_path: Path, written):
    FakeStore.names = ["ema_sweep"]
    assert _script().main(["--storage-path", str(tmp_path)]) == 0
    assert written[0][1:] == (["ema_sweep"], tmp_path / "ema_sweep" / "report.html")


def test_several_studies_go_into_the_storage_path(tmp_path: Path, written):
    FakeStore.names = ["ema_sweep", "methods"]
    assert _script().main(["--storage-path", str(tmp_path)]) == 0
    assert written[0][1:] == (["ema_sweep", "methods"], tmp_path / "report.html")
    assert _script().main(["--storage-path", str(tmp_path), "--study", "a", "--study", "b"]) == 0
    assert written[1][1:] == (["a", "b"], tmp_path / "report.html")


def test_a_local_tracking_uri_gives_the_folder_and_out_overrides_it(tmp_path: Path, written):
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    assert _script().main(["--tracking-uri", uri, "--study", "ema_sweep"]) == 0
    assert written[0] == (uri, ["ema_sweep"], tmp_path / "shared" / "ema_sweep" / "report.html")
    assert _script().main(["--tracking-uri", uri, "--study", "ema_sweep", "--out", str(tmp_path / "r.html")]) == 0
    assert written[1] == (uri, ["ema_sweep"], tmp_path / "r.html")


def test_a_server_store_writes_into_the_given_storage_path_or_runs(tmp_path: Path, written, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = "http://127.0.0.1:5999"
    assert _script().main(["--tracking-uri", server, "--study", "ema_sweep"]) == 0
    assert _script().main(["--tracking-uri", server, "--storage-path", "/shared/runs", "--study", "ema_sweep"]) == 0
    assert [call[2] for call in written] == [Path("runs") / "ema_sweep" / "report.html",
                                             Path("/shared/runs/ema_sweep/report.html")]
    assert {call[0] for call in written} == {server}


def test_a_missing_default_store_is_one_line_and_writes_nothing(tmp_path: Path, capsys):
    assert _script().main(["--storage-path", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no MLflow store" in err
    assert not (tmp_path / "none").exists()
