"""The MLflow UI, read in a real browser: `mlflow ui` on a store with a finished `kfold` and `optuna` run, opened in
headless Chromium (Debian's ``chromium``, driven by Playwright), and the rendered pages checked against the store.

Skipped without ``chromium`` or the ``playwright`` package unless ``PIPELINES_REQUIRE_UI=1`` (then it fails).
``PIPELINES_UI_SCREENSHOTS=DIR`` keeps the screenshots in DIR (the README's come from ``docs/ui``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import run_entrypoint, store_env
from helpers import children, free_port, parents

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the page fixture skips, or fails under PIPELINES_REQUIRE_UI=1
    expect = sync_playwright = None

pytestmark = pytest.mark.ui

TIMEOUT_MS = 60_000  # CI machines are slow: the UI's first load parses several MB of JavaScript
VIEWPORT = {"width": 1400, "height": 900}
SPACE = "learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"
# what a user has after the first visit: the assistant panel closed and the "Model training" view picked (the
# UI keeps both in localStorage as `<key>_v<version>`; on 127.0.0.1 it opens the assistant on first load)
UI_SETTINGS = """
localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
localStorage.setItem("mlflow.workflowType_v1", '"machine_learning"');
"""


def unavailable(reason: str):
    if os.environ.get("PIPELINES_REQUIRE_UI") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def js_string(value: float) -> str:
    """``String(value)`` in JavaScript, as the run page writes a metric: the shortest digits that read back as
    ``value``, without an exponent (for 1e-7 <= |value| < 1e21)."""
    return np.format_float_positional(value, trim="-")


def format_metric(value: float) -> str:
    """``Utils.formatMetric`` of the MLflow UI, as the compare view writes a metric: 3, 2 or 1 decimals."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    return js_string(math.floor(value * scale + 0.5) / scale)  # Math.round rounds halves up


def start_mlflow_ui(folder: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` on the store in ``folder``, in its own process group; returns it and its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", env["MLFLOW_TRACKING_URI"],
           "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # else 8 job-runner processes start with it
    with open(folder / "mlflow-ui.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/"


def wait_until_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"mlflow ui did not answer {url}health within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (the whole process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        pass
    proc.wait()


KFOLD = {"k_folds": 3, "epochs": 1, "batch_size": 8, "max_length": 32, "learning_rate": 1e-2, "seed": 42,
         "experiment_name": "cv"}
OPTUNA = {"n_trials": 3, "epochs": 1, "max_length": 32, "seed": 7, "search_space": SPACE, "pruner": "none",
          "experiment_name": "hpo"}


@pytest.fixture(scope="module")
def ui(chromium, tiny_data, tiny_model, tmp_path_factory):
    """A finished kfold run (3 folds) and optuna run (3 trials) in a SQLite store, served by `mlflow ui`."""
    folder = tmp_path_factory.mktemp("ui-store")
    env = store_env(folder)
    data = {"data": tiny_data, "model": tiny_model}
    kfold = run_entrypoint("kfold", {**data, **KFOLD}, env, folder)
    assert kfold.returncode == 0, kfold.stderr[-3000:]
    server, url = start_mlflow_ui(folder, env)  # it takes seconds to start: let it while optuna runs
    try:
        search = run_entrypoint("optuna_search", {**data, **OPTUNA, "optuna_storage": f"sqlite:///{folder}/optuna.db"},
                                env, folder)
        assert search.returncode == 0, search.stderr[-3000:]
        wait_until_healthy(server, url, folder / "mlflow-ui.log")
        yield {"url": url, "env": env, "cv": stage_runs(env, "cv", "kfold", "fold"),
               "hpo": stage_runs(env, "hpo", "optuna", "trial")}
    finally:
        stop(server)


def stage_runs(env: dict, experiment: str, stage: str, unit_tag: str) -> dict:
    """The finished parent run of ``stage`` and its child runs ordered by their unit (fold or trial number)."""
    (parent,) = parents(env, experiment, stage)
    assert parent.info.status == "FINISHED"
    units = sorted(children(env, experiment, parent.info.run_id), key=lambda r: int(r.data.tags[unit_tag]))
    assert units and all(r.info.status == "FINISHED" for r in units)
    return {"experiment_id": parent.info.experiment_id, "parent": parent, "children": units}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("PIPELINES_UI_SCREENSHOTS")
    if not folder:
        return tmp_path_factory.mktemp("ui-screenshots")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's browser (Playwright's own builds cannot be downloaded here), checked before any store is built."""
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(executable, os.X_OK):
        unavailable("no chromium browser (apt-get install chromium)")
    if sync_playwright is None:
        unavailable("the playwright package is not installed (pip install playwright)")
    return executable


@pytest.fixture(scope="module")
def page(chromium, ui):
    """One headless Chromium tab."""
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(UI_SETTINGS)
        try:
            yield context.new_page()
        finally:
            browser.close()


def open_runs(page, ui: dict, experiment: str):
    """The run list of ``experiment`` in the "Model training" view (the default view is GenAI's overview)."""
    page.goto(ui["url"] + f"#/experiments/{ui[experiment]['experiment_id']}/runs?workflowType=machine_learning")


def expand_parent(page, ui: dict, experiment: str):
    """Check the parent's row shows its child runs only once expanded, and expand it."""
    runs = ui[experiment]
    parent = page.get_by_role("link", name=runs["parent"].info.run_name, exact=True)
    expect(parent).to_have_attribute("href", f"#/experiments/{runs['experiment_id']}/runs/"
                                     f"{runs['parent'].info.run_id}")
    first_child = page.get_by_role("link", name=runs["children"][0].info.run_name, exact=True)
    expect(first_child).to_have_count(0)  # grouped under the parent, collapsed
    page.get_by_role("gridcell").filter(has=parent).get_by_role("button").click()  # the unnamed "+" expander
    for child in runs["children"]:
        expect(page.get_by_role("link", name=child.info.run_name, exact=True)).to_have_attribute(
            "href", f"#/experiments/{runs['experiment_id']}/runs/{child.info.run_id}")


def show_columns(page, keys: list[str]):
    """Columns: hide the empty Dataset, Source and Models columns, show the metrics or params ``keys`` (no metric
    or param is shown by default)."""
    page.get_by_role("button", name="Columns").click()
    for item in ["Dataset", "Source", "Models", *keys]:  # the tree lists Attributes, Metrics, Parameters, Tags
        page.get_by_role("dialog").get_by_text(item, exact=True).first.click()
    page.keyboard.press("Escape")


def expect_cell(page, run, column: str, text: str):
    """The run list's cell in the row of ``run`` and ``column`` (``metrics.`name```, ``params.`name```): the grid
    names its rows by run id and its columns by key."""
    expect(page.locator(f'[role=row][row-id="{run.info.run_id}"] [role=gridcell][col-id="{column}"]')).to_have_text(
        text)


def run_list(page, ui, experiment: str, columns: list[str]):
    """The experiment's run list, its stage run expanded to show the unit runs, with ``columns`` added."""
    open_runs(page, ui, experiment)
    expand_parent(page, ui, experiment)
    show_columns(page, columns)


def screenshot(page, path: Path):
    page.mouse.move(0, 0)  # no hover highlight left from the last click
    page.screenshot(path=path)


def test_run_list_groups_the_fold_runs_under_the_kfold_run(ui, page, shots):
    runs = ui["cv"]
    assert [r.info.run_name for r in runs["children"]] == ["fold-0", "fold-1", "fold-2"]
    run_list(page, ui, "cv", ["cv_f1_macro_mean", "cv_f1_macro_std", "final_f1_macro"])
    parent = runs["parent"]
    for name in ("cv_f1_macro_mean", "cv_f1_macro_std"):
        expect_cell(page, parent, f"metrics.`{name}`", js_string(parent.data.metrics[name]))
    for fold in runs["children"]:
        expect_cell(page, fold, "metrics.`final_f1_macro`", js_string(fold.data.metrics["final_f1_macro"]))
    screenshot(page, shots / "kfold-runs.png")


def test_kfold_run_page_shows_the_cv_metrics(ui, page, shots):
    parent = ui["cv"]["parent"]
    metrics = parent.data.metrics
    page.goto(ui["url"] + f"#/experiments/{ui['cv']['experiment_id']}/runs/{parent.info.run_id}")
    expect(page.get_by_role("heading", name="kfold", exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name=f"Metrics ({len(metrics)})")).to_be_visible()
    cv_names = [f"cv_{m}_{s}" for m in ("accuracy", "f1_macro", "loss") for s in ("mean", "std")]
    for name in cv_names + ["fold0_f1_macro", "fold1_f1_macro", "fold2_f1_macro"]:
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
        expect(row.get_by_role("cell")).to_have_text([name, js_string(metrics[name])])
    for child in ui["cv"]["children"]:  # "Child runs" in "About this run"
        expect(page.get_by_role("link", name=child.info.run_name, exact=True)).to_be_visible()
    screenshot(page, shots / "kfold-run.png")


def test_compare_view_shows_the_folds_side_by_side(ui, page, shots):
    folds = ui["cv"]["children"]
    ids = [r.info.run_id for r in folds]
    page.goto(ui["url"] + f"#/compare-runs?runs={quote(json.dumps(ids))}"
                          f"&experiments={quote(json.dumps([ui['cv']['experiment_id']]))}")
    expect(page.get_by_role("heading", name="Comparing 3 Runs from 1 Experiment")).to_be_visible()
    expect(page.get_by_role("row", name=re.compile("^Run ID:")).get_by_role("link")).to_have_text(ids)
    expect(page.get_by_role("row", name=re.compile("^Run Name:")).get_by_role("cell")).to_have_text(
        ["fold-0", "fold-1", "fold-2"])
    # metrics: a grid of names, one link a row, beside a grid of values, one cell per run a row
    metric = "final_f1_macro"
    name = page.get_by_role("link", name=metric, exact=True)
    expect(name).to_be_visible()
    names = page.get_by_role("grid").filter(has=name).get_by_role("link").all_inner_texts()
    cells = page.get_by_role("grid").filter(has=name).locator(
        "xpath=following::*[@role='grid'][1]/*[@role='rowgroup']/div")
    expect(cells).to_have_count(len(names) * len(ids))
    row = names.index(metric)
    expected = [format_metric(r.data.metrics[metric]) for r in folds]
    assert cells.all_inner_texts()[row * len(ids):(row + 1) * len(ids)] == expected
    diff_only = page.get_by_role("switch", name="Parameters - Show diff only")
    diff_only.click()
    differing = diff_only.locator("xpath=following::table[1]").get_by_role("row")
    expect(differing).to_have_count(1)  # the fold number, nothing else
    expect(differing.get_by_role("rowheader")).to_have_text("fold")
    expect(differing.get_by_role("cell")).to_have_text(["0", "1", "2"])
    page.get_by_role("button", name="Visualizations").click()  # collapsed: the tables fill the screenshot
    screenshot(page, shots / "compare-folds.png")


def test_run_list_groups_the_trial_runs_under_the_optuna_run(ui, page, shots):
    runs = ui["hpo"]
    assert [r.info.run_name for r in runs["children"]] == ["trial-0", "trial-1", "trial-2"]
    run_list(page, ui, "hpo", ["best_value", "objective", "learning_rate"])
    expect_cell(page, runs["parent"], "metrics.`best_value`", js_string(runs["parent"].data.metrics["best_value"]))
    for trial in runs["children"]:
        expect_cell(page, trial, "metrics.`objective`", js_string(trial.data.metrics["objective"]))
        expect_cell(page, trial, "params.`learning_rate`", trial.data.params["learning_rate"])
    screenshot(page, shots / "optuna-runs.png")
