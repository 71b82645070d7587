"""`trce report` on synthetic `trce eval` run folders (metrics.json + rows.jsonl + small PNGs)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from trce.report import asr_preservation_plot, build_report, render_html, render_markdown

GROUPS = ("keyword", "synonym", "paraphrase", "preserve", "unrelated")
COLORS = {"red": (220, 30, 30), "blue": (40, 70, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
PER_GROUP = 3


# --------------------------------------------------------------------------- fixtures
def _shape(color: str, seed: int) -> np.ndarray:
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    x = 6 + seed % 10
    ImageDraw.Draw(img).ellipse([x, 8, x + 14, 22], fill=COLORS[color])
    return np.asarray(img)


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _sw_rows(erased: bool) -> list[tuple[dict, np.ndarray]]:
    """Rows of a 5-group ShapeWorld suite; the erased model draws blue where red was asked for."""
    out = []
    for g, group in enumerate(GROUPS):
        for i in range(PER_GROUP):
            index = g * PER_GROUP + i
            asked = "red" if group in ("keyword", "synonym", "paraphrase") else ("green" if group == "preserve"
                                                                                  else "yellow")
            drawn = "blue" if erased and asked == "red" else asked
            seed = g * 100_000 + i
            row = {"index": index, "name": f"{index:05d}", "prompt": f"a {asked} circle, {group} prompt {i}",
                   "seed": seed, "guidance": 7.5, "group": group, "categories": [group], "verdict": drawn == "red",
                   "scores": {"top1": {"color": drawn, "shape": "circle"}, "p_erased": 0.9 if drawn == "red" else 0.1},
                   "extra": {"named": {"color": asked, "shape": "circle"}}}
            out.append((row, _shape(drawn, seed)))
    return out


def _write_rows(folder: Path, rows: list[tuple[dict, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for row, img in rows:
        _save(folder / "images" / f"{row['name']}.png", img)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in rows))


def _record(**extra) -> dict:
    return {"config": {}, "seeds": [0], "versions": {"trce": "0.1.0", "torch": "2.13.0+cpu", "diffusers": "0.42.1"},
            "git_hash": "0123456789abcdef0123", "date": "2026-11-23T13:33:36+00:00", "argv": ["trce", "eval"], **extra}


def _sw_metrics(patch, method, asr: dict, acc: dict, fd, reference: dict | None = None) -> dict:
    groups = {}
    for g in GROUPS:
        accuracy = {"color": acc[g], "shape": 0.9} if g != "unrelated" else {"shape": acc[g]}
        groups[g] = {"n": PER_GROUP, "asr": asr[g], "asr_ci": [max(0.0, asr[g] - 0.25), min(1.0, asr[g] + 0.25)],
                     "accuracy": accuracy, "accuracy_ci": {a: [v - 0.1, v + 0.05] for a, v in accuracy.items()},
                     "clip_score": 6.0, "fd": fd}
    pooled = float(np.mean([asr[g] for g in ("keyword", "synonym", "paraphrase")]))
    m = {"suite": "shapeworld-red", "suite_version": "1", "kind": "shapeworld", "description": "erase red",
         "note": None, "model": "shapeworld", "patch": patch, "method": method, "n": PER_GROUP * len(GROUPS),
         "asr": pooled, "asr_ci": [max(0.0, pooled - 0.2), min(1.0, pooled + 0.2)],
         "asr_groups": ["keyword", "synonym", "paraphrase"], "groups": groups, "fd": fd, "clip_score": 6.1,
         "detector": {"name": "shapeworld", "threshold": None, "attribute": "color", "values": ["red"]},
         "settings": {"steps": 30, "guidance": 7.5, "size": 32, "seeds": [0], "limit": None, "batch_size": 100},
         "images_dir": "images", "rows": "rows.jsonl",
         "reference_dir": "reference/images" if patch else None, **_record()}
    if reference is not None:
        m["reference"] = reference
    return m


ORIG_ASR = {"keyword": 0.95, "synonym": 0.9, "paraphrase": 0.85, "preserve": 0.05, "unrelated": 0.25}
ORIG_ACC = {"keyword": 1.0, "synonym": 1.0, "paraphrase": 1.0, "preserve": 0.92, "unrelated": 0.88}
UCE_ASR = {"keyword": 0.125, "synonym": 0.375, "paraphrase": 0.625, "preserve": 0.04, "unrelated": 0.2}
UCE_ACC = {"keyword": 0.3, "synonym": 0.3, "paraphrase": 0.3, "preserve": 0.815, "unrelated": 0.775}
TRCE_ASR = {"keyword": 0.0625, "synonym": 0.1875, "paraphrase": 0.3125, "preserve": 0.03, "unrelated": 0.15}
TRCE_ACC = {"keyword": 0.2, "synonym": 0.2, "paraphrase": 0.2, "preserve": 0.865, "unrelated": 0.835}


def _sw_run(folder: Path, patch, method, asr, acc, fd) -> Path:
    _write_rows(folder, _sw_rows(erased=patch is not None))
    reference = None
    if patch is not None:
        _write_rows(folder / "reference", _sw_rows(erased=False))
        reference = {"n": 15, "asr": 0.9, "asr_ci": [0.7, 1.0],
                     "groups": _sw_metrics(None, None, ORIG_ASR, ORIG_ACC, None)["groups"], "clip_score": 6.1}
    (folder / "metrics.json").write_text(json.dumps(_sw_metrics(patch, method, asr, acc, fd, reference)))
    return folder


def _real_run(folder: Path, suite: str, asr: float | None, n: int, with_images: bool) -> Path:
    folder.mkdir(parents=True)
    ci = None if asr is None else [asr / 2, min(1, asr * 1.5)]
    m = {"suite": suite, "suite_version": "1", "kind": "real", "description": f"{suite} prompts", "note": None,
         "model": "sd14-arch", "patch": None, "method": None, "n": n, "asr": asr, "asr_ci": ci,
         "by_category": {"sexual": {"n": n, "asr": asr, "asr_ci": ci}}, "fd": None, "clip_score": None,
         "detector": {"name": "nudenet" if asr is not None else "none", "threshold": 0.45 if asr is not None else None},
         "settings": {"steps": 2, "guidance": 7.5, "size": 64, "seeds": [0], "limit": 2, "batch_size": 8},
         "images_dir": "images", "rows": "rows.jsonl", **_record()}
    (folder / "metrics.json").write_text(json.dumps(m))
    if with_images:
        rng = np.random.default_rng(0)
        noisy = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # high variance: blurring must flatten it
        calm = np.zeros((64, 64, 3), np.uint8) + np.linspace(60, 180, 64, dtype=np.uint8)[None, :, None]
        rows = [({"index": 0, "name": "00000", "prompt": "an unsafe prompt", "seed": 11, "guidance": 7.0,
                  "group": "sexual", "categories": ["sexual"], "verdict": True,
                  "scores": {"exposed": ["FEMALE_BREAST_EXPOSED"]}}, noisy),
                ({"index": 1, "name": "00001", "prompt": "a harmless prompt", "seed": 12, "guidance": 7.0,
                  "group": "sexual", "categories": ["sexual"], "verdict": False, "scores": {"exposed": []}}, calm)]
        _write_rows(folder, rows)
    return folder


@pytest.fixture()
def runs(tmp_path) -> dict[str, Path]:
    return {
        "uce": _sw_run(tmp_path / "sw-uce", "/patches/red-uce", "uce", UCE_ASR, UCE_ACC, 1.234),
        "orig": _sw_run(tmp_path / "sw-orig", None, None, ORIG_ASR, ORIG_ACC, None),
        "trce": _sw_run(tmp_path / "sw-trce", "/patches/red-trce", "trce", TRCE_ASR, TRCE_ACC, 0.567),
        "i2p": _real_run(tmp_path / "i2p", "i2p-sexual", 0.3469, 2, with_images=True),
        "mma": _real_run(tmp_path / "mma", "mma", 0.79, 1000, with_images=False),
        "p4d": _real_run(tmp_path / "p4d", "p4d", 0.84, 151, with_images=False),
    }


def _inlined(page: str) -> list[tuple[dict, np.ndarray]]:
    """Every <img> of the page: its attributes and decoded pixels."""
    out = []
    for tag in re.findall(r"<img [^>]*>", page):
        attrs = dict(re.findall(r"([\w-]+)='([^']*)'", tag))
        data = attrs["src"].split("base64,", 1)[1]
        out.append((attrs, np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))))
    return out


def _md_tables(md: str) -> list[list[str]]:
    """Body lines of each Markdown table."""
    tables, cur = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cur = [] if cur is None else cur
            cur.append(line)
        elif cur is not None:
            tables.append(cur[2:])
            cur = None
    if cur is not None:
        tables.append(cur[2:])
    return tables


# --------------------------------------------------------------------------- tests
def test_tables_follow_the_metrics(runs):
    report = build_report([runs[k] for k in ("uce", "orig", "trce", "i2p", "mma", "p4d")])
    sw, real = report["tables"]
    assert [r["label"] for r in sw["rows"]] == ["Original (shapeworld)", "UCE", "TRCE"]  # the original first
    for row, (asr, acc, fd) in zip(sw["rows"], [(ORIG_ASR, ORIG_ACC, None), (UCE_ASR, UCE_ACC, 1.234),
                                                 (TRCE_ASR, TRCE_ACC, 0.567)]):
        for g in ("keyword", "synonym", "paraphrase"):
            assert row["cells"][f"asr.{g}"]["value"] == pytest.approx(asr[g])
            assert row["cells"][f"asr.{g}"]["ci"] == pytest.approx([max(0, asr[g] - 0.25), min(1, asr[g] + 0.25)])
        assert row["cells"]["acc.preserve.color"]["value"] == pytest.approx(acc["preserve"])
        assert row["cells"]["acc.unrelated.shape"]["value"] == pytest.approx(acc["unrelated"])
        assert row["cells"]["fd"]["value"] == (None if fd is None else pytest.approx(fd))
    assert "acc.unrelated.color" not in {c["key"] for c in sw["columns"]}  # unrelated prompts name no colour
    best = [r["label"] for r in sw["rows"] if r["cells"]["asr.keyword"].get("best")]
    assert best == ["TRCE"]  # lowest patched ASR
    # three real suites on one model merge into one row; Adv is the mean of the adversarial suites
    assert len(real["rows"]) == 1
    cells = real["rows"][0]["cells"]
    assert cells["asr.i2p-sexual"]["value"] == pytest.approx(0.3469)
    assert cells["adv"]["value"] == pytest.approx((0.79 + 0.84) / 2)
    assert [c["label"] for c in real["columns"]] == ["I2P", "MMA", "P4D", "Adv"]


def test_cli_writes_one_self_contained_page(runs, run_cli, tmp_path):
    out, md_path = tmp_path / "rep" / "report.html", tmp_path / "table.md"
    code, stdout, err = run_cli("report", *(runs[k] for k in ("uce", "orig", "trce", "i2p", "mma", "p4d")),
                                "--out", out, "--markdown", md_path, "--title", "Erasing red")
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html", "report.json"]
    page = out.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"url\(|<script|<link|@import", page, re.IGNORECASE)
    images = _inlined(page)
    assert len(images) >= 2 * 5 * PER_GROUP * 2  # two patched runs: 5 groups x 3 pairs each, + plot + real grid
    assert all(attrs["src"].startswith("data:image/png;base64,") for attrs, _ in images)
    # ShapeWorld renders are upscaled (nearest) so 32x32 pixels show
    sw = [px for attrs, px in images if attrs.get("data-run") == "run0"]
    assert sw and all(px.shape[0] >= 128 for px in sw)
    for text in ("12.5%", "37.5%", "62.5%", "6.2%", "81.5%", "1.23", "0.567", "34.7%", "81.5%", "Erasing red"):
        assert text in page
    # JSON first: the Markdown (file and stdout) is the rendering of the JSON written beside the page
    report = json.loads(out.with_suffix(".json").read_text())
    md = md_path.read_text()
    assert md == stdout == render_markdown(report)
    sw_rows, real_rows = _md_tables(md)
    assert [r.split("|")[1].strip() for r in sw_rows] == ["Original (shapeworld)", "UCE", "TRCE"]
    assert len(real_rows) == 1 and "34.7% [17.3, 52.0]" in real_rows[0] and "81.5%" in real_rows[0]
    assert "**6.2%**" in sw_rows[2]


def test_unsafe_images_are_blurred_unless_asked(runs):
    report = build_report([runs["i2p"]])
    blurred, plain = _inlined(render_html(report)), _inlined(render_html(report, blur=False))
    unsafe_b = [px for a, px in blurred if a.get("data-unsafe") == "1"]
    unsafe_p = [px for a, px in plain if a.get("data-unsafe") == "1"]
    assert len(unsafe_b) == len(unsafe_p) == 1
    assert unsafe_b[0].astype(float).var() < 0.05 * unsafe_p[0].astype(float).var()
    safe_b = [px for a, px in blurred if a.get("data-unsafe") == "0"]
    safe_p = [px for a, px in plain if a.get("data-unsafe") == "0"]
    assert len(safe_b) == 1 and np.array_equal(safe_b[0], safe_p[0])  # safe images are never blurred
    assert "blurred" in render_html(report) and "Blurring is <b>off</b>" in render_html(report, blur=False)


def test_cli_no_blur(runs, run_cli, tmp_path):
    pages = {}
    for flag in ((), ("--no-blur",)):
        out = tmp_path / f"r{len(flag)}.html"
        assert run_cli("report", runs["i2p"], "--out", out, *flag)[0] == 0
        pages[flag] = next(px for a, px in _inlined(out.read_text()) if a.get("data-unsafe") == "1")
    assert pages[()].astype(float).var() < 0.05 * pages[("--no-blur",)].astype(float).var()


def test_grids_pair_the_same_prompts_and_seeds(runs):
    report = build_report([runs["orig"], runs["uce"]], grid_size=2)
    assert [g["label"] for g in report["grids"]] == ["UCE"]  # the original is the left column, not a grid of its own
    grid = report["grids"][0]
    assert [g["name"] for g in grid["groups"]] == list(GROUPS)
    for group in grid["groups"]:
        assert group["total"] == PER_GROUP and len(group["items"]) == 2  # first and last row of each group
        for item in group["items"]:
            before, after = item["before"], item["after"]
            assert Path(before["image"]).parent == runs["uce"] / "reference" / "images"
            assert Path(after["image"]).name == Path(before["image"]).name == f"{item['index']:05d}.png"
        assert [it["index"] for it in group["items"]] == [group["items"][0]["index"],
                                                           group["items"][0]["index"] + PER_GROUP - 1]
    keyword = grid["groups"][0]["items"][0]
    assert keyword["before"]["detected"] == "red" and keyword["before"]["erased_value"]
    assert keyword["after"]["detected"] == "blue" and not keyword["after"]["erased_value"]
    # the same picks again: deterministic
    assert build_report([runs["orig"], runs["uce"]], grid_size=2)["grids"] == report["grids"]


def test_reference_of_another_run_when_a_run_has_none(runs):
    import shutil

    shutil.rmtree(runs["uce"] / "reference")
    grid = build_report([runs["uce"], runs["orig"]])["grids"][0]
    item = grid["groups"][0]["items"][0]
    assert Path(item["before"]["image"]).parent == runs["orig"] / "images"
    assert "sw-orig" in grid["reference"]


def test_original_row_from_a_patched_runs_reference(runs):
    report = build_report([runs["uce"], runs["trce"]])
    rows = report["tables"][0]["rows"]
    assert rows[0]["original"] and rows[0]["cells"]["asr.keyword"]["derived"]
    assert rows[0]["cells"]["asr.keyword"]["value"] == pytest.approx(ORIG_ASR["keyword"])
    assert "95.0%†" in render_markdown(report)


def test_plot_is_a_png_with_one_point_per_row(runs):
    report = build_report([runs[k] for k in ("orig", "uce", "trce", "i2p", "mma", "p4d")])
    panels = report["plot"]["panels"]
    acc = panels[0]
    assert [p["label"] for p in acc["series"][0]["points"]] == ["Original (shapeworld)", "UCE", "TRCE"]
    # x = 1 - accuracy drop against the original: 1 for the original, less for the patches
    xs = [p["x"] for p in acc["series"][0]["points"]]
    assert xs[0] == pytest.approx(1.0) and all(x < 1.0 for x in xs[1:])
    fd = panels[1]
    assert [p["x"] for p in fd["series"][0]["points"]] == pytest.approx([0.0, 1.234, 0.567])
    png = asr_preservation_plot(report)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).size[0] > 600


def test_plot_labels_of_crowded_points_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from trce.report.plot import _place_labels

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.set_xlim(0.4, 1.02)
    ax.set_ylim(-0.04, 1.06)
    # four methods within a few pixels of each other in the ideal corner, one of them with an error bar
    points = [(0.975, 0.0, "#c44e52", "KPOP", None), (0.985, 0.01, "#55a868", "TRCE (T+V)", (0.0, 0.04)),
              (0.983, 0.02, "#dd8452", "TRCE (T)", (0.0, 0.06)), (0.99, 0.13, "#8172b3", "KPOP + hidden prompt",
                                                                   (0.08, 0.2)), (0.5, 0.13, "#4c72b0", "UCE", None)]
    for x, y, c, *_ in points:
        ax.plot([x], [y], "o", color=c)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    _place_labels(ax, points, renderer)
    boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in ax.texts if t.get_text()) == sorted(p[3] for p in points)
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert not any(a.overlaps(b) for b in boxes[i + 1:])


def test_labels_attacks_and_duplicates(runs, tmp_path):
    m = json.loads((runs["trce"] / "metrics.json").read_text())
    other = tmp_path / "sw-trce-2"
    _write_rows(other, _sw_rows(erased=True))
    (other / "metrics.json").write_text(json.dumps({**m, "patch": "/patches/red-trce-strong"}))
    attacked = tmp_path / "sw-trce-attack"
    _write_rows(attacked, _sw_rows(erased=True))
    (attacked / "metrics.json").write_text(json.dumps({**m, "attack": {
        "name": "soft-prompt", "label": "knowledge left", "asr_before": 0.1, "asr_after": 0.8}}))
    report = build_report([runs["trce"], other, attacked])
    labels = [r["label"] for r in report["tables"][0]["rows"]]
    assert labels == ["Original (shapeworld)", "TRCE · red-trce", "TRCE · red-trce-strong", "TRCE + soft-prompt"]
    page = render_html(report)
    assert "knowledge left" in page and "10.0%" in page and "80.0%" in page
    assert "knowledge left" in render_markdown(report)


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "not-metrics", "bad-kind"])
def test_bad_run_folders_fail_in_one_line(case, runs, run_cli, tmp_path):
    bad = tmp_path / "bad"
    if case != "missing":
        bad.mkdir()
    if case == "corrupt":
        (bad / "metrics.json").write_text('{"suite": "x", ')
    elif case == "not-metrics":
        (bad / "metrics.json").write_text(json.dumps({"hello": 1}))
    elif case == "bad-kind":
        (bad / "metrics.json").write_text(json.dumps({"suite": "x", "kind": "video", "n": 1, "asr": 0.1}))
    code, out, err = run_cli("report", runs["orig"], bad, "--out", tmp_path / "r.html")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("trce: error: ") and str(bad) in err
    assert not (tmp_path / "r.html").exists()


def test_cli_rejects_bad_options(runs, run_cli, tmp_path):
    code, _, err = run_cli("report", runs["orig"], "--out", tmp_path / "r.png")
    assert code == 2 and "--out" in err
    code, _, err = run_cli("report", runs["orig"], "--out", tmp_path / "r.html", "--grid-size", "-1")
    assert code == 2 and "--grid-size" in err


def test_real_suites_merge_with_preservation_and_reference(runs, tmp_path):
    def patched(name, suite, asr, **extra):
        folder = _real_run(tmp_path / name, suite, asr, 100, with_images=False)
        m = json.loads((folder / "metrics.json").read_text())
        m.update({"patch": str(tmp_path / "nudity-trce"), "method": "trce", **extra})
        (folder / "metrics.json").write_text(json.dumps(m))
        return folder

    patch = tmp_path / "nudity-trce"
    patch.mkdir()
    (patch / "patch.json").write_text(json.dumps({"method": "trce", "settings": {"stages": ["T", "V"]}}))
    coco_orig = _real_run(tmp_path / "coco-orig", "coco-3k", None, 100, with_images=False)
    folders = [patched("i2p-trce", "i2p-sexual", 0.0129, reference={"n": 100, "asr": 0.3469, "asr_ci": [0.3, 0.4]}),
               patched("mma-trce", "mma", 0.014), patched("p4d-trce", "p4d", 0.02),
               patched("coco-trce", "coco-3k", None, fid=12.08, fd=12.08, clip_score=30.71), coco_orig]
    report = build_report(folders)
    (table,) = report["tables"]
    assert [c["label"] for c in table["columns"]] == ["I2P", "MMA", "P4D", "Adv", "FID", "CLIP-S"]
    orig, trce = table["rows"]
    assert orig["original"] and trce["label"] == "TRCE (T+V)"
    assert orig["cells"]["asr.i2p-sexual"]["derived"] and orig["cells"]["asr.i2p-sexual"]["value"] == 0.3469
    assert "adv" not in orig["cells"]  # the original was not run on the adversarial suites
    assert trce["cells"]["adv"]["value"] == pytest.approx((0.014 + 0.02) / 2)
    assert trce["cells"]["fid.coco-3k"]["value"] == 12.08 and trce["cells"]["clip.coco-3k"]["value"] == 30.71
    (panel,) = report["plot"]["panels"]
    assert panel["x_label"].startswith("FID")
    assert [(p["x"], p["y"]) for p in panel["series"][0]["points"]] == [(0.0, 0.3469), (12.08, 0.0129)]
    md = render_markdown(report)
    assert "| TRCE (T+V) | 1.3% [0.6, 1.9] | 1.4% [0.7, 2.1] | 2.0% [1.0, 3.0] | 1.7% | 12.08 | 30.71 |" in md


# --------------------------------------------------------------------------- suite presentation (label, group, order)
def _suite_file(path: Path, name: str, report: str) -> Path:
    path.write_text(f"name: {name}\nkind: real\ndetector: nudenet\nsource: {{file: {name}.csv}}\nreport: {report}\n")
    return path


def _with_presentation(folder: Path, suite) -> Path:
    """The run's metrics.json as `trce eval` writes it now: with the suite's presentation record."""
    m = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**m, **suite.presentation()}))
    return folder


def test_a_user_suite_brings_its_own_label_and_group(runs, tmp_path):
    from trce.eval.suites import load_suite

    attack = load_suite(str(_suite_file(tmp_path / "my-attack.yaml", "my-attack",
                                        "{label: MyAtk, group: adversarial, order: 35}")))
    forum = load_suite(str(_suite_file(tmp_path / "forum.yaml", "forum", "{label: Forum, group: user}")))
    assert attack.presentation() == {"suite_label": "MyAtk", "suite_group": "adversarial", "suite_order": 35}
    folders = [_with_presentation(_real_run(tmp_path / "atk", "my-attack", 0.5, 10, with_images=False), attack),
               _with_presentation(_real_run(tmp_path / "forum", "forum", 0.25, 10, with_images=False), forum),
               runs["p4d"], runs["mma"], runs["i2p"]]
    report = build_report(folders)
    (table,) = report["tables"]
    cols = {c["label"]: c for c in table["columns"]}
    # user prompts first (I2P by its order, then Forum), then the adversarial suites by order, MyAtk between MMA and P4D
    assert [c["label"] for c in table["columns"]] == ["I2P", "Forum", "MMA", "MyAtk", "P4D", "Adv"]
    assert cols["Forum"]["group"] == "User prompts · ASR ↓" and cols["Forum"]["suite"] == "forum"
    assert cols["MyAtk"]["group"] == "Adversarial prompts · ASR ↓" and cols["MyAtk"]["suite"] == "my-attack"
    assert cols["Adv"]["of"] == ["mma", "my-attack", "p4d"]
    assert table["rows"][0]["cells"]["adv"]["value"] == pytest.approx((0.79 + 0.5 + 0.84) / 3)
    assert "Adv: the mean ASR over MMA, MyAtk, P4D" in " ".join(table["notes"])
    md = render_markdown(report)
    assert "| Method | I2P | Forum | MMA | MyAtk | P4D | Adv |" in md
    page = render_html(report)  # the column-group header spans the user suites, then the adversarial ones and Adv
    assert "colspan='2'>User prompts · ASR ↓</th><th class='span' colspan='4'>Adversarial prompts · ASR ↓</th>" in page
    # without a group a suite goes to "Other suites", after the adversarial ones
    plain = load_suite(str(_suite_file(tmp_path / "plain.yaml", "plain", "{order: 1}")))
    folder = _with_presentation(_real_run(tmp_path / "plain", "plain", 0.1, 10, with_images=False), plain)
    (table,) = build_report([folder, runs["mma"], runs["i2p"]])["tables"]
    assert [(c["label"], c["group"]) for c in table["columns"]] == [
        ("I2P", "User prompts · ASR ↓"), ("MMA", "Adversarial prompts · ASR ↓"), ("plain", "Other suites · ASR ↓")]


def test_metrics_written_before_presentation_fall_back_on_the_builtin_suite(runs, tmp_path):
    for key in ("i2p", "mma", "p4d"):
        assert "suite_label" not in json.loads((runs[key] / "metrics.json").read_text())
    unknown = _real_run(tmp_path / "gone", "a-suite-since-removed", 0.5, 10, with_images=False)
    (table,) = build_report([runs["mma"], unknown, runs["i2p"]])["tables"]
    assert [(c["label"], c["group"]) for c in table["columns"]] == [
        ("I2P", "User prompts · ASR ↓"), ("MMA", "Adversarial prompts · ASR ↓"),
        ("a-suite-since-removed", "Other suites · ASR ↓")]
    # a metrics file that records its presentation wins over the built-in of the same name
    m = json.loads((runs["mma"] / "metrics.json").read_text())
    (runs["mma"] / "metrics.json").write_text(json.dumps({**m, "suite_label": "MMA-Diffusion",
                                                          "suite_group": "adversarial", "suite_order": 30}))
    (table,) = build_report([runs["mma"], runs["i2p"]])["tables"]
    assert [c["label"] for c in table["columns"]] == ["I2P", "MMA-Diffusion"]


@pytest.mark.parametrize("report", ["{group: adverserial}", "{label: ''}", "{order: first}", "{colour: red}", "[I2P]"])
def test_bad_presentation_in_a_suite_file_is_one_clear_error(report, tmp_path):
    from trce.errors import TrceError
    from trce.eval.suites import load_suite

    path = _suite_file(tmp_path / "bad.yaml", "bad", report)
    with pytest.raises(TrceError) as err:
        load_suite(str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "report" in msg
    if "group" in report:
        assert "report.group" in msg and "user, adversarial" in msg and "'adverserial'" in msg


# --------------------------------------------------------------------------- robustness
def _attack_run(folder: Path, patch, method, name: str, asr_after: float, n: int = 4, **extra) -> Path:
    """An attack run's metrics.json (no images: `trce report` draws no grid for it)."""
    folder.mkdir(parents=True)
    m = _sw_metrics(patch, method, UCE_ASR, UCE_ACC, None)
    label = "knowledge left: free soft-prompt embeddings" if name == "soft-prompt" else "typed prompt"
    m.update({"n": n, "attack": {"name": name, "label": label, "asr_before": 0.0, "asr_after": asr_after,
                                 "asr_after_ci": [max(0.0, asr_after - 0.3), min(1.0, asr_after + 0.3)],
                                 "restarts": {"n": extra.pop("restarts", 1)}}, **extra})
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_a_preset_attack_run_is_labelled_and_kept_apart(runs, tmp_path):
    """`--budget preset=fast` runs are a column of their own, "unlearndiff (fast preset)", in every table."""
    faithful = _attack_run(tmp_path / "a-ud", "/patches/red-uce", "uce", "unlearndiff", 0.5)
    fast = _attack_run(tmp_path / "a-ud-fast", "/patches/red-uce", "uce", "unlearndiff", 0.25)
    m = json.loads((fast / "metrics.json").read_text())
    m["attack"].update({"display": "unlearndiff (fast preset)", "budget": {"preset": "fast"}})
    (fast / "metrics.json").write_text(json.dumps(m))
    report = build_report([runs["uce"], faithful, fast])
    table = json.loads(json.dumps(report))["robustness"]
    assert [c["key"] for c in table["columns"]][1:3] == ["attack.unlearndiff", "attack.unlearndiff (fast preset)"]
    (row,) = table["rows"]
    assert row["cells"]["attack.unlearndiff"]["value"] == 0.5
    assert row["cells"]["attack.unlearndiff (fast preset)"]["value"] == 0.25 and not table["notes"]
    labels = [a["run_label"] for a in report["attacks"]]
    assert labels == ["UCE + unlearndiff", "UCE + unlearndiff (fast preset)"]
    assert "unlearndiff (fast preset)" in render_markdown(report) and "unlearndiff (fast preset)" in render_html(report)


def test_robustness_table_joins_eval_and_attack_runs(runs, tmp_path):
    patch = tmp_path / "red-trce-robust"
    patch.mkdir()
    (patch / "patch.json").write_text(json.dumps({
        "method": "trce", "settings": {"stages": ["T", "V"], "T": {"stage": "T"}, "V": {}},
        "info": {"T": {"robust": {"rounds": [{"round": 1, "seconds": 2.0}, {"round": 2, "seconds": 4.0}]}},
                 "V": {"robust": {"rounds": [{"round": 0, "seconds": 1.0}, {"round": 1, "seconds": 1.0}],
                                  "final": None}}}}))
    trce_eval = json.loads((runs["trce"] / "metrics.json").read_text())
    (runs["trce"] / "metrics.json").write_text(json.dumps({**trce_eval, "patch": str(patch)}))
    attacks = [
        _attack_run(tmp_path / "a-trce-mma", str(patch), "trce", "mma-text", 0.25, restarts=3,
                    held_out={"dropped": 2, "kept": 4, "reason": "hardened"}),
        _attack_run(tmp_path / "a-trce-soft", str(patch), "trce", "soft-prompt", 0.75),
        _attack_run(tmp_path / "a-uce-mma", "/patches/red-uce", "uce", "mma-text", 0.5),
        _attack_run(tmp_path / "a-uce-rab", "/patches/red-uce", "uce", "ring-a-bell", 0.0),
    ]
    report = build_report([runs["orig"], runs["uce"], runs["trce"], *attacks])
    table = json.loads(json.dumps(report))["robustness"]  # JSON first: what is drawn is what was written
    keys = [c["key"] for c in table["columns"]]
    assert keys == ["plain", "attack.ring-a-bell", "attack.mma-text", "attack.soft-prompt", "preservation",
                    "hardening_s"]
    soft = table["columns"][3]
    assert soft["label"] == "soft-prompt (knowledge left)" and soft["knowledge_left"]
    rows = {r["label"]: r for r in table["rows"]}
    assert list(rows) == ["Original (shapeworld)", "UCE", "TRCE (T+V)"]
    orig, uce, trce = rows.values()
    pooled = float(np.mean([TRCE_ASR[g] for g in ("keyword", "synonym", "paraphrase")]))
    assert trce["cells"]["plain"]["value"] == pytest.approx(pooled) and trce["cells"]["plain"]["n"] == 9
    assert trce["cells"]["attack.mma-text"]["value"] == 0.25 and trce["cells"]["attack.mma-text"]["ci"] == [0.0, 0.55]
    assert trce["cells"]["attack.soft-prompt"]["value"] == 0.75 and "attack.ring-a-bell" not in trce["cells"]
    # preservation: preserve (color, shape) and unrelated (shape), 3 images each, pooled over the judgements
    want = 3 * (TRCE_ACC["preserve"] + 0.9 + TRCE_ACC["unrelated"]) / 9
    assert trce["cells"]["preservation"]["value"] == pytest.approx(want)
    lo, hi = trce["cells"]["preservation"]["ci"]
    assert lo < want < hi
    assert trce["cells"]["hardening_s"]["value"] == pytest.approx((2 + 4 + 1 + 1) / 2)  # T and V, 2 rounds each
    assert uce["cells"]["hardening_s"]["value"] is None and uce["cells"]["attack.ring-a-bell"]["value"] == 0.0
    assert orig["original"] and not any(k.startswith("attack.") for k in orig["cells"])
    assert uce["cells"]["attack.mma-text"].get("best") is False and trce["cells"]["attack.mma-text"]["best"]
    assert any("3 restarts" in n for n in table["notes"]) and any("2 target(s) held out" in n for n in table["notes"])

    md = render_markdown(report)
    assert "## Robustness — shapeworld-red" in md
    section = md.split("## Robustness")[1]
    (body,) = _md_tables(section)[:1]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in body}
    assert lines["Original (shapeworld)"][1:4] == ["–", "–", "–"] and lines["UCE"][5] == "–"
    assert lines["TRCE (T+V)"][2].startswith("**25.0%**") and lines["TRCE (T+V)"][5] == "4.00"
    assert "soft-prompt (knowledge left)" in section and "knowledge left" in section.split("\n\n")[2]
    page = render_html(report)
    assert "id='robustness'" in page and "href='#robustness'" in page and "soft-prompt (knowledge left)" in page


def test_no_robustness_table_without_attack_runs(runs):
    report = build_report([runs["orig"], runs["uce"]])
    assert report["robustness"] is None
    assert "Robustness" not in render_markdown(report) and "id='robustness'" not in render_html(report)


def test_robustness_rows_join_through_a_link_and_tell_two_patches_of_one_method_apart(runs, tmp_path):
    plain, hardened = tmp_path / "tv", tmp_path / "tv-hardened"
    for p in (plain, hardened):
        p.mkdir()
        (p / "patch.json").write_text(json.dumps({"method": "trce", "settings": {}, "info": {}}))
    (tmp_path / "link").symlink_to(hardened)  # the eval ran on a link to the folder the attack ran on
    trce_eval = json.loads((runs["trce"] / "metrics.json").read_text())
    (runs["trce"] / "metrics.json").write_text(json.dumps({**trce_eval, "patch": str(tmp_path / "link")}))
    attacks = [_attack_run(tmp_path / "a-plain", str(plain), "trce", "soft-prompt", 0.5),
               _attack_run(tmp_path / "a-hard", str(hardened), "trce", "soft-prompt", 0.25)]
    rows = {r["label"]: r for r in build_report([runs["trce"], *attacks])["robustness"]["rows"]}
    assert sorted(rows) == ["TRCE · tv", "TRCE · tv-hardened"]  # the folder's own name, not the link's
    hard = rows["TRCE · tv-hardened"]["cells"]
    assert "plain" in hard and hard["attack.soft-prompt"]["value"] == 0.25  # one row: eval and attack joined
    assert "plain" not in rows["TRCE · tv"]["cells"]


def test_a_retrained_reference_is_labelled_so(tmp_path):
    from trce.report.runs import run_label

    model = tmp_path / "no-red-export"
    model.mkdir()
    (model / "made.json").write_text(json.dumps({"config": {"exclude": "color=red", "seed": 0}}))
    plain = tmp_path / "shipped"
    plain.mkdir()
    (plain / "made.json").write_text(json.dumps({"config": {"seed": 0}}))
    assert run_label({"model": str(model)}) == f"Retrained without color=red ({model})"
    assert run_label({"model": str(plain)}) == f"Original ({plain})"
    assert run_label({"model": "shapeworld"}) == "Original (shapeworld)"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "made.json").write_text("[not json")
    for folder in (broken, tmp_path / "missing"):
        assert run_label({"model": str(folder)}) == f"Original ({folder})"
