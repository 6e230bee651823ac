"""A real study's report, rendered by dashboards/study_report.py and opened in headless Chromium.

Needs Chromium (``/usr/bin/chromium``, Debian package ``chromium``), installed by the test
set-up (``scripts/setup.sh --test``). Without it the test fails and says so: a report
that was never opened in a browser is not a tested report.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]
SCREENSHOT = REPO / "test-artifacts" / "report.png"
TINY = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=14",
        "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4",
        "--set", "train.max_epochs=2"]
STUDY = Study(
    name="report_browser",
    description="Mean Teacher (2-trial search) against supervised, 2 seeds each, for the report test",
    methods={"mean_teacher": ["ema_decay"], "supervised": []},
    final_seeds=2,
    grace_period=1,
    reduction_factor=2,
    startup_trials=1,
    smoke={**SMOKE, "train.max_epochs": 2},
    smoke_num_samples=2,
    smoke_final_seeds=2,
)
METHODS = {"mean_teacher", "supervised"}


def chromium() -> str:
    """The Chromium binary (``$SEMISEG_CHROMIUM``, else ``chromium`` on PATH, else /usr/bin/chromium).

    Fails the test (never skips) when none is installed.
    """
    path = os.environ.get("SEMISEG_CHROMIUM") or shutil.which("chromium") or \
        (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        pytest.fail("Chromium is not installed (expected /usr/bin/chromium): run the test set-up, "
                    "`scripts/setup.sh --test`, which installs it with `apt-get install -y chromium`", pytrace=False)
    return path


def browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``page`` with a fresh profile (pytest-timeout bounds a hang)."""
    command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, check=False)


class PageParser(HTMLParser):
    """The method table's rows and the page's images and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.method_rows: list[str] = []
        self.external: list[str] = []
        self.tags: list[str] = []
        self._table_depth = 0
        self._in_body = False
        self._cell = -1
        self._text = ""

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        self.tags.append(tag)
        self.external += [v for v in values.values() if v and re.match(r"\s*(https?:)?//", v)]
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag == "table" and "methods" in (values.get("class") or "").split():
            self._table_depth = 1
        elif self._table_depth and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self._cell = -1
        elif self._in_body and tag == "td":
            self._cell += 1
            self._text = ""

    def handle_data(self, data):
        if self._in_body and self._cell == 0:
            self._text += data

    def handle_endtag(self, tag):
        if self._in_body and tag == "td" and self._cell == 0:
            self.method_rows.append(self._text.strip())
        if tag == "table" and self._table_depth:
            self._table_depth = 0
            self._in_body = False


def non_blank(data: bytes) -> bool:
    """Whether PNG/JPEG bytes decode to an image whose pixels are not all equal."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    return pixels.size > 0 and float(pixels.std()) > 0


@pytest.fixture(scope="module")
def report_store(tmp_path_factory) -> str:
    """The MLflow store of this module's study (shared by its tests, not by other modules)."""
    return f"sqlite:///{tmp_path_factory.mktemp('report-mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def report(ray_local, report_store, tmp_path_factory) -> Path:
    """A small study (2-trial Mean Teacher search, 2 seeds each) and its rendered report."""
    folder = tmp_path_factory.mktemp("report")
    outcome = run_study(STUDY, ["--storage-path", str(folder / "runs"), "--tracking-uri", report_store, *TINY])
    assert {row.method for row in outcome.rows if row.phase == "final"} == METHODS
    out = folder / "report.html"
    done = subprocess.run([sys.executable, str(REPO / "dashboards" / "study_report.py"), "--tracking-uri",
                           report_store, "--study", STUDY.name, "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out.resolve())
    return out


def test_unknown_study_exits_2_with_one_line(report: Path, report_store: str, tmp_path: Path):
    done = subprocess.run([sys.executable, str(REPO / "dashboards" / "study_report.py"), "--tracking-uri",
                           report_store, "--study", "no_such_study", "--out", str(tmp_path / "r.html")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no_such_study" in lines[0], done.stderr
    assert not (tmp_path / "r.html").exists()


def test_rendered_dom_has_one_row_per_method_and_no_console_messages(report: Path, tmp_path: Path):
    done = browse(report, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    page = PageParser()
    page.feed(done.stdout)
    assert sorted(page.method_rows) == sorted(METHODS), page.method_rows
    assert "script" not in page.tags and not page.external, page.external
    verdicts = re.findall(r"vs supervised: [^<]*", done.stdout)
    assert verdicts and all(" over 2 paired runs (seeds)" in v for v in verdicts), verdicts


def test_every_image_decodes_to_a_non_blank_picture(report: Path, tmp_path: Path):
    done = browse(report, tmp_path / "profile", "--dump-dom")
    page = PageParser()
    page.feed(done.stdout)
    assert len(page.images) >= 3, "learning curves, sensitivity and cost figures at least"
    for src in page.images:
        match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
        assert match, src[:80]
        assert non_blank(base64.b64decode(match.group(2))), src[:80]


def test_screenshot_is_not_blank(report: Path, tmp_path: Path):
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    done = browse(report, tmp_path / "profile", f"--screenshot={SCREENSHOT}", "--window-size=1400,3000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert SCREENSHOT.exists(), done.stderr[-3000:]
    assert non_blank(SCREENSHOT.read_bytes())
